"""The base model, as the trainer sees it: where it is, how it loads, how a prompt conditions it,
how it draws. One class per model family (kohya's `load_target_model` / `call_unet` hooks):
SD 1.x/2.x and SDXL differ only in their text encoders and the UNet's extra conditioning, so
adding a family means one subclass of `StableDiffusion` and one line in `family_of`."""
from __future__ import annotations

import itertools
import json
import os
import re
import types

import torch
from tqdm.auto import tqdm

from ..model import iter_layers
from ..quiet import no_loading_bars
from ..images import read_images
from ..io import atomic_write, atomic_write_text
from ..single_file import SingleFileError, checkpoint_family, is_single_file, load_single_file
from .errors import TrainingError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(args) -> str:
    """The local diffusers folder or single-file checkpoint for --pretrained_model_name_or_path,
    found before anything heavy loads; each way the flag can be wrong has its own sentence."""
    flag, given = "--pretrained_model_name_or_path", args.pretrained_model_name_or_path
    if os.path.isfile(given):
        if is_single_file(given):
            try:
                checkpoint_family(given)  # its header (a .ckpt: its mapped weights), not the model
            except SingleFileError as e:
                raise TrainingError(f"{flag} {e}") from None
            return given
        raise TrainingError(f"{flag} {given}: a file, not a diffusers model folder (a folder with model_index.json) "
                            "or a single-file checkpoint (.safetensors / .ckpt)")
    if os.path.isdir(given):
        if not os.path.isfile(os.path.join(given, "model_index.json")):
            raise TrainingError(not_a_model(given))
        return given
    if not HUB_ID.match(given):
        raise TrainingError(f"{flag} {given}: no such folder")
    return hub_snapshot(given, args)


def not_a_model(given: str) -> str:
    return (f"--pretrained_model_name_or_path {given}: not a diffusers model folder (no model_index.json) or a single-file "
            "checkpoint (.safetensors / .ckpt)")


def hub_snapshot(repo_id: str, args) -> str:
    """A Hugging Face Hub id: its cached snapshot, else a download; one line if neither works."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    kw = dict(revision=args.revision, variant=args.variant, cache_dir=getattr(args, "cache_dir", None))
    try:
        return DiffusionPipeline.download(repo_id, local_files_only=True, **kw)
    except Exception:  # noqa: BLE001 — not (fully) cached: try the Hub below
        pass
    where = (f"--pretrained_model_name_or_path {repo_id}: no such folder, and as a Hugging Face Hub id it is not in the local cache "
             f"({constants.HF_HUB_CACHE})")
    fix = f"download it where there is network (huggingface-cli download {repo_id}) or pass a local diffusers folder"
    if constants.HF_HUB_OFFLINE:
        raise TrainingError(f"{where} and HF_HUB_OFFLINE is set: {fix}")
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(repo_id, revision=args.revision, timeout=15)
    except GatedRepoError:
        raise TrainingError(f"{where}, and it is gated: accept its license on huggingface.co, then huggingface-cli login") from None
    except RepositoryNotFoundError:
        raise TrainingError(f"{where}, and the Hub has no such model (or it is private: huggingface-cli login)") from None
    except Exception:  # noqa: BLE001 — connection errors differ between huggingface_hub releases
        raise TrainingError(f"{where}, and the Hub cannot be reached (no network?): {fix}") from None
    try:
        return DiffusionPipeline.download(repo_id, **kw)
    except Exception as e:  # noqa: BLE001
        raise TrainingError(f"--pretrained_model_name_or_path {repo_id}: the download failed: {(str(e).splitlines() or [''])[0]}") from None


class StableDiffusion:
    """SD 1.x / 2.x: one CLIP text encoder whose last hidden state conditions the UNet."""

    xl = False

    def load_text_encoders(self, m, path, args, kw) -> None:
        from transformers import AutoTokenizer, CLIPTextModel

        tok_path, sub = (args.tokenizer_name, None) if getattr(args, "tokenizer_name", None) else (path, "tokenizer")
        m.tokenizer = AutoTokenizer.from_pretrained(tok_path, subfolder=sub, use_fast=False, **kw)
        m.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, torch_dtype=torch.float32, **kw)
        m.tokenizer_2 = m.text_encoder_2 = None

    def encode_prompts(self, m, prompts: list[str], device, resolution: int, encoders=None, max_length=None, use_mask=False):
        """(encoder_hidden_states [B, 77, D], added_cond_kwargs or None). `encoders` replaces
        (text_encoder, text_encoder_2) when they train: the process-synchronised wrappers."""
        te1, _ = encoders or (m.text_encoder, m.text_encoder_2)
        ids, mask = _tokens(m.tokenizer, prompts, device, max_length)
        return (te1(ids, attention_mask=mask)[0] if use_mask else te1(ids)[0]), None

    def call_unet(self, unet, noisy, t, hidden, added):
        return unet(noisy, t, hidden, added_cond_kwargs=added).sample

    def pipeline_components(self, m) -> dict:
        return dict(text_encoder=m.text_encoder, tokenizer=m.tokenizer, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)


class StableDiffusionXL(StableDiffusion):
    """SDXL: two text encoders (penultimate hidden states concatenated) and the pooled text
    embedding plus size/crop ids as the UNet's added conditioning."""

    xl = True

    def load_text_encoders(self, m, path, args, kw) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        super().load_text_encoders(m, path, args, kw)
        m.tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False, **kw)
        m.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=args.variant,
                                                                       torch_dtype=torch.float32, **kw)

    def encode_prompts(self, m, prompts, device, resolution, encoders=None, max_length=None, use_mask=False):
        te1, te2 = encoders or (m.text_encoder, m.text_encoder_2)
        hidden, pooled = [], None
        for tok, enc in ((m.tokenizer, te1), (m.tokenizer_2, te2)):
            ids, mask = _tokens(tok, prompts, device, max_length)
            out = enc(ids, output_hidden_states=True, **({"attention_mask": mask} if use_mask else {}))
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection encoder (the second one)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=pooled.dtype)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}

    def pipeline_components(self, m) -> dict:
        return dict(text_encoder=m.text_encoder, tokenizer=m.tokenizer, text_encoder_2=m.text_encoder_2, tokenizer_2=m.tokenizer_2)


def _tokens(tok, prompts, device, max_length=None):
    """(input_ids, attention_mask) padded to --tokenizer_max_length or the tokenizer's own length."""
    t = tok(prompts, padding="max_length", max_length=max_length or tok.model_max_length, truncation=True, return_tensors="pt")
    return t.input_ids.to(device), t.attention_mask.to(device)


def family_of(index: dict) -> StableDiffusion:
    """The family of a diffusers folder, from its model_index.json."""
    return StableDiffusionXL() if index.get("text_encoder_2") and index["text_encoder_2"][0] else StableDiffusion()


def load_models(args, path: str | None = None):
    """The frozen base: tokenizers, text encoders, VAE, UNet and noise scheduler, in fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    path = path or getattr(args, "model_path", None) or args.pretrained_model_name_or_path
    vae_path = getattr(args, "pretrained_vae_model_name_or_path", None)
    kw = dict(revision=args.revision)
    try:
        vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32) if vae_path else None
        single = load_single_file(path, **({"vae": vae} if vae else {})) if is_single_file(path) else None
    except SingleFileError as e:
        raise TrainingError(f"--pretrained_model_name_or_path {e}") from None
    except (OSError, ValueError) as e:
        raise TrainingError(f"--pretrained_vae_model_name_or_path {vae_path}: could not load the VAE: {str(e).splitlines()[0]}") from None
    folder = single._loldu_config if single else path  # a single file's: the shipped configs of its family (the scheduler)
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise TrainingError(not_a_model(args.pretrained_model_name_or_path))
    with open(index_path) as f:
        index = json.load(f)
    family = family_of(index)
    m = types.SimpleNamespace(family=family, xl=family.xl, path=folder, index=index, base_parts={})
    try:
        if single:
            for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae", "unet"):
                setattr(m, name, getattr(single, name, None))
            # the config folder holds no weights: what a saved pipeline needs besides the trained parts
            m.base_parts = {k: getattr(m, k) for k in ("vae", "tokenizer", "tokenizer_2") if getattr(m, k) is not None}
            if getattr(args, "tokenizer_name", None):
                from transformers import AutoTokenizer

                m.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, use_fast=False, **kw)
        else:
            family.load_text_encoders(m, path, args, kw)
            m.vae = vae or AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, torch_dtype=torch.float32, **kw)
            m.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, torch_dtype=torch.float32, **kw)
        m.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise TrainingError(f"--pretrained_model_name_or_path {path}: could not load the model: {str(e).splitlines()[0]}") from None
    for mod in frozen_modules(m):
        mod.requires_grad_(False)
        mod.eval()
    m.vae_scale = 2 ** (len(m.vae.config.block_out_channels) - 1)
    return m


def frozen_modules(m) -> list[torch.nn.Module]:
    return [mod for mod in (m.vae, m.text_encoder, m.text_encoder_2, m.unet) if mod is not None]


def text_encoders_of(m) -> list[torch.nn.Module]:
    return [e for e in (m.text_encoder, m.text_encoder_2) if e is not None]


def native_resolution(m) -> int:
    return m.unet.config.sample_size * m.vae_scale


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen base weights to `dtype`; trainable values and LoLDU factors stay fp32."""
    keep = set()
    for *_, layer in iter_layers(module):
        keep |= {id(t) for t in list(layer.parameters()) + list(layer.buffers())}
    for p in module.parameters():
        if not p.requires_grad and id(p) not in keep and p.is_floating_point():
            p.data = p.data.to(dtype)
    for mod in module.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and id(b) not in keep:
                mod._buffers[name] = b.to(dtype)


def encode_prompts(m, prompts: list[str], device, resolution: int, encoders=None, max_length=None, use_mask=False):
    return m.family.encode_prompts(m, prompts, device, resolution, encoders, max_length, use_mask)


class PromptEncoder:
    """Conditioning for a batch of captions. A frozen text encoder gives each caption the same
    embedding every step, so it is computed once; a training one runs every step."""

    def __init__(self, m, device, resolution: int, train_encoders=None, max_length=None, use_mask=False):
        self.m, self.device, self.resolution, self.train_encoders = m, device, resolution, train_encoders
        self.options = (max_length, use_mask)
        self.cache = {}

    def __call__(self, captions: list[str]):
        if self.train_encoders:
            return encode_prompts(self.m, captions, self.device, self.resolution, self.train_encoders, *self.options)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            with torch.no_grad():
                hid, added = encode_prompts(self.m, missing, self.device, self.resolution, None, *self.options)
            for i, c in enumerate(missing):
                self.cache[c] = (hid[i], None if added is None else {k: v[i] for k, v in added.items()})
        hid = torch.stack([self.cache[c][0] for c in captions])
        first = self.cache[captions[0]][1]
        added = None if first is None else {k: torch.stack([self.cache[c][1][k] for c in captions]) for k in first}
        return hid, added


def make_pipeline(m, unet, args):
    from diffusers import DiffusionPipeline

    comps = dict(unet=unet, vae=m.vae, **m.family.pipeline_components(m))
    with no_loading_bars():  # only the scheduler is read from disk: no bar nested in the training bar
        pipe = DiffusionPipeline.from_pretrained(m.path, revision=args.revision, torch_dtype=unet.dtype, **comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_pipeline(m, unet, args):
    """The pipeline validation images are drawn with: --validation_scheduler when given."""
    pipe = make_pipeline(m, unet, args)
    if getattr(args, "validation_scheduler", None):
        import diffusers

        pipe.scheduler = getattr(diffusers, args.validation_scheduler).from_config(pipe.scheduler.config)
    return pipe


def generate(pipe, prompt: str, n: int, seed: int, args, resolution: int, desc=None):
    """n images of one prompt; image i uses seed + i whatever the batching."""
    from ..pipeline import draw

    return draw(pipe, [prompt] * n, [seed + i for i in range(n)], batch=8, progress=desc, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, height=resolution, width=resolution)


def ensure_class_images(args, accelerator, m, resolution, prompts=None):
    """Generate the missing class images with the base model, --sample_batch_size at a time
    (main process; others wait). Image k uses seed + 100000 + k, so a folder filled in two
    runs holds the images one run would have made. With `prompts` (the class prompt in the
    instance captions' contexts), image k is drawn from prompts[k % len] and captioned so."""
    from ..pipeline import draw

    prompts = prompts or [args.class_prompt]
    os.makedirs(args.class_data_dir, exist_ok=True)
    have, _ = read_images(args.class_data_dir, "--class_data_dir")
    missing = args.num_class_images - len(have)
    if missing > 0 and accelerator.is_main_process:
        pipe = make_pipeline(m, m.unet, args).to(accelerator.device)
        png = lambda k: os.path.join(args.class_data_dir, f"class_{k:05d}.png")  # noqa: E731
        todo = list(itertools.islice((k for k in itertools.count(len(have)) if not os.path.exists(png(k))), missing))
        for b in tqdm(range(0, missing, args.sample_batch_size), desc="generating class images"):
            ks = todo[b:b + args.sample_batch_size]
            images = draw(pipe, [prompts[k % len(prompts)] for k in ks], [args.seed + 100_000 + k for k in ks], batch=len(ks),
                          num_inference_steps=args.class_num_inference_steps, guidance_scale=args.guidance_scale, height=resolution, width=resolution)
            for k, img in zip(ks, images):
                txt = os.path.join(args.class_data_dir, f"class_{k:05d}.txt")
                if prompts != [args.class_prompt]:  # the caption first: an image without one would read as the bare class prompt
                    atomic_write_text(txt, prompts[k % len(prompts)] + "\n")
                elif os.path.exists(txt):  # left by a deleted image drawn in context: it would caption this one wrongly
                    os.remove(txt)
                atomic_write(png(k), img.save, ".png")
    accelerator.wait_for_everyone()
