"""The DreamBooth training loop, on accelerate (processes, mixed precision, checkpoints,
trackers). `train(args)` is what `train_dreambooth_loldu.py` runs."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import types

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapter_file import AdapterFileError
from ..model import iter_layers
from ..quiet import no_loading_bars, quiet_libraries
from . import report
from .args import resolve_defaults
from .data import DataError, ImageSet, check_identifier, read_images, sample_indices, step_generator
from .errors import TrainingError
from .methods import ADAPTER_FILE, LORA_FILE, make_method, make_optimizer
from .outdir import claim_output_dir, refuse_to_replace

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
RUN_FILE = "run.json"


# ---- models ------------------------------------------------------------------------------
SINGLE_FILE = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(args) -> str:
    """The local diffusers folder for --pretrained_model_name_or_path, found before anything
    heavy loads; each way the flag can be wrong has its own sentence."""
    flag, given = "--pretrained_model_name_or_path", args.pretrained_model_name_or_path
    if os.path.isfile(given):
        if given.lower().endswith(SINGLE_FILE):
            out = os.path.splitext(given)[0] + "-diffusers"
            raise TrainingError(f"{flag} {given}: a single-file checkpoint, and loading those is not supported yet; convert it once with "
                                f"python -c \"from diffusers import StableDiffusionPipeline as P; P.from_single_file('{given}').save_pretrained('{out}')\" "
                                f"(StableDiffusionXLPipeline for SDXL) and pass {out}")
        raise TrainingError(f"{flag} {given}: a file, not a diffusers model folder (a folder with model_index.json)")
    if os.path.isdir(given):
        return given
    if not HUB_ID.match(given):
        raise TrainingError(f"{flag} {given}: no such folder")
    return hub_snapshot(given, args)


def hub_snapshot(repo_id: str, args) -> str:
    """A Hugging Face Hub id: its cached snapshot, else a download; one line if neither works."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    kw = dict(revision=args.revision, variant=args.variant)
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


TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",), "mlflow": ("mlflow",),
            "clearml": ("clearml",), "dvclive": ("dvclive",), "aim": ("aim",)}


def tracker_installed(name: str) -> bool:
    import importlib.util

    return any(importlib.util.find_spec(module) is not None for module in TRACKERS.get(name, (name,)))


def choose_tracker(report_to: str | None) -> tuple[str | None, str | None]:
    """(tracker, warning): a tracker that is not installed falls back to tensorboard (or none)
    with one line saying how to install it, rather than failing after the model has loaded."""
    if report_to in (None, "none", ""):
        return None, None
    if report_to not in TRACKERS or tracker_installed(report_to):
        return report_to, None
    fallback = "tensorboard" if report_to != "tensorboard" and tracker_installed("tensorboard") else None
    return fallback, (f"--report_to {report_to}: {report_to} is not installed (pip install {report_to.replace('_', '-')}); "
                      + ("logging to tensorboard instead" if fallback else "training without a tracker"))


def check_inputs(args) -> None:
    """What can be checked before anything heavy loads (and before accelerate starts), so that
    a mistake costs seconds, not a model load."""
    if args.resolution is not None and args.resolution < 1:
        raise TrainingError(f"--resolution {args.resolution}: must be a positive size in pixels (e.g. 512 for SD 1.5); "
                            "leave it out for the base model's native size")
    folder = args.instance_data_dir
    if not os.path.isdir(folder):
        raise TrainingError(f"--instance_data_dir {folder!r}: no such folder")
    args.model_path = resolve_model_path(args)


def load_models(args):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = getattr(args, "model_path", None) or args.pretrained_model_name_or_path
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise TrainingError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: not a diffusers model folder "
                            "(no model_index.json); a single-file checkpoint needs converting first (see the README)")
    with open(index_path) as f:
        index = json.load(f)
    kw = dict(revision=args.revision)
    xl = bool(index.get("text_encoder_2") and index["text_encoder_2"][0])
    m = types.SimpleNamespace(xl=xl, path=path, index=index)
    try:
        m.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False, **kw)
        m.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, torch_dtype=torch.float32, **kw)
        m.tokenizer_2 = m.text_encoder_2 = None
        if xl:
            m.tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False, **kw)
            m.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=args.variant, torch_dtype=torch.float32, **kw)
        m.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, torch_dtype=torch.float32, **kw)
        m.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, torch_dtype=torch.float32, **kw)
        m.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise TrainingError(f"--pretrained_model_name_or_path {path}: could not load the model: {str(e).splitlines()[0]}") from None
    for mod in (m.vae, m.text_encoder, m.text_encoder_2, m.unet):
        if mod is not None:
            mod.requires_grad_(False)
            mod.eval()
    m.vae_scale = 2 ** (len(m.vae.config.block_out_channels) - 1)
    return m


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


def encode_prompts(m, prompts: list[str], device, resolution: int, encoders=None):
    """(encoder_hidden_states, added_cond_kwargs) for SD 1.x/2.x or SDXL. `encoders` replaces
    (text_encoder, text_encoder_2) when they train: the process-synchronised wrappers."""
    te1, te2 = encoders or (m.text_encoder, m.text_encoder_2)
    def ids(tok):
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)

    if not m.xl:
        return te1(ids(m.tokenizer))[0], None
    hidden, pooled = [], None
    for tok, enc in ((m.tokenizer, te1), (m.tokenizer_2, te2)):
        out = enc(ids(tok), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of the projection encoder (the second one)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=pooled.dtype)
    return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}


def make_pipeline(m, unet, args):
    from diffusers import DiffusionPipeline

    comps = dict(unet=unet, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer)
    if m.xl:
        comps.update(text_encoder_2=m.text_encoder_2, tokenizer_2=m.tokenizer_2)
    else:
        comps.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with no_loading_bars():  # only the scheduler is read from disk: no bar nested in the training bar
        pipe = DiffusionPipeline.from_pretrained(m.path, revision=args.revision, torch_dtype=unet.dtype, **comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompt: str, n: int, seed: int, args, resolution: int, desc=None):
    """n images of one prompt; image i uses seed + i whatever the batching."""
    images = []
    chunk = 8
    for start in tqdm(range(0, n, chunk), desc=desc, disable=desc is None, leave=False):
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(start, min(n, start + chunk))]
        images += pipe(prompt, num_images_per_prompt=len(gens), num_inference_steps=args.num_inference_steps,
                       guidance_scale=args.guidance_scale, generator=gens, height=resolution, width=resolution).images
    return images


# ---- data --------------------------------------------------------------------------------
def ensure_class_images(args, accelerator, m, resolution):
    """Generate the missing class images with the base model (main process; others wait)."""
    os.makedirs(args.class_data_dir, exist_ok=True)
    have, _ = read_images(args.class_data_dir, "--class_data_dir")
    missing = args.num_class_images - len(have)
    if missing > 0 and accelerator.is_main_process:
        pipe = make_pipeline(m, m.unet, args).to(accelerator.device)
        start = len(os.listdir(args.class_data_dir))
        for i in tqdm(range(missing), desc="generating class images"):
            g = torch.Generator("cpu").manual_seed(args.seed + 100_000 + start + i)
            img = pipe(args.class_prompt, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       generator=g, height=resolution, width=resolution).images[0]
            path = os.path.join(args.class_data_dir, f"class_{start + i:05d}.png")
            img.save(path + ".tmp.png")
            os.replace(path + ".tmp.png", path)
    accelerator.wait_for_everyone()


class LatentCache:
    """VAE posterior (mean, std) per (image, flip): the VAE encoder runs once per image, not
    once per step. Off when random crops make every step's pixels different."""

    def __init__(self, m, images: ImageSet, resolution, args, device, dtype):
        self.m, self.images, self.res, self.args, self.device, self.dtype = m, images, resolution, args, device, dtype
        self.enabled = not images.needs_random_crop(resolution, args.center_crop)
        self.cache = {}

    @torch.no_grad()
    def _posterior(self, pixels):
        dist = self.m.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def latents(self, indices, flips, gen):
        if self.enabled:
            for i, f in zip(indices, flips):
                if (i, f) not in self.cache:
                    mean, std = self._posterior(self.images.crop(i, self.res, True, f, gen)[None])
                    self.cache[(i, f)] = (mean[0], std[0])
            mean = torch.stack([self.cache[(i, f)][0] for i, f in zip(indices, flips)])
            std = torch.stack([self.cache[(i, f)][1] for i, f in zip(indices, flips)])
        else:
            pixels = torch.stack([self.images.crop(i, self.res, self.args.center_crop, f, gen) for i, f in zip(indices, flips)])
            mean, std = self._posterior(pixels)
        eps = torch.randn(mean.shape, generator=gen).to(mean.device)
        return (mean + std * eps) * self.m.vae.config.scaling_factor


# ---- checkpoints -------------------------------------------------------------------------
def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(mt.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir) if (mt := CHECKPOINT.match(n))]
    return sorted(found)


def resolve_resume(args) -> str | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        return found[-1][1] if found else None
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, path)
    if not os.path.isfile(os.path.join(path, TRAINABLE_FILE)):
        raise TrainingError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint there (expected {TRAINABLE_FILE})")
    return path


def save_run_state(folder: str, state: dict, before, during) -> None:
    """Time so far and the validation images, beside a checkpoint: a resumed run then reports
    the whole run (total seconds, validation_before.png, the grid) and not only its own part."""
    images = {"before": before or []} | {str(step): imgs for step, imgs in during}
    for tag, imgs in images.items():
        for i, im in enumerate(imgs):
            im.save(os.path.join(folder, f"validation_{tag}_{i}.png"))
    with open(os.path.join(folder, RUN_FILE), "w") as f:
        json.dump(dict(state, images={tag: len(imgs) for tag, imgs in images.items()}), f)


def load_run_state(folder: str) -> tuple[dict, list | None, list]:
    """(state, before, during) as save_run_state wrote them; empty for older checkpoints."""
    from PIL import Image

    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        return {}, None, []
    with open(path) as f:
        state = json.load(f)

    def read(tag, n):
        out = []
        for i in range(n):
            with Image.open(os.path.join(folder, f"validation_{tag}_{i}.png")) as im:
                out.append(im.convert("RGB"))
        return out

    images = state.pop("images", {})
    during = sorted(((int(tag), read(tag, n)) for tag, n in images.items() if tag != "before"), key=lambda si: si[0])
    return state, read("before", images.get("before", 0)) or None, during


def existing_outputs(output_dir: str) -> list[str]:
    names = (ADAPTER_FILE, LORA_FILE, "unet")
    return [n for n in names if os.path.exists(os.path.join(output_dir, n))]


# ---- the loop ----------------------------------------------------------------------------
def train(args) -> dict:
    quiet_libraries()  # before diffusers imports its pipelines
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from safetensors.torch import load_file, save_file

    t_start = time.time()
    try:
        args = resolve_defaults(args)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    check_inputs(args)
    resume_path = resolve_resume(args)
    refuse_to_replace(args.output_dir, existing_outputs(args.output_dir), bool(args.resume_from_checkpoint), resume_path, args.overwrite)

    report_to, tracker_warning = choose_tracker(args.report_to)
    from accelerate.state import AcceleratorState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) and hasattr(AcceleratorState, "_reset_state"):
        # accelerate's state is process-wide: an earlier run in this process (the tests, the app)
        # would refuse this one's --mixed_precision
        AcceleratorState._reset_state(True)
    accelerator = Accelerator(
        # no GPU: say so, so that `accelerate launch --num_processes N` runs N CPU processes over gloo
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    main = accelerator.is_main_process
    say = accelerator.print
    lock = claim_output_dir(args, accelerator, resume_path, existing_outputs)  # noqa: F841 — held until train() returns
    if tracker_warning:
        say(f"warning: {tracker_warning}")
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        say("warning: --mixed_precision fp16 on a CPU: CPUs have no fast fp16 arithmetic, so every step runs many times slower "
            "than in fp32; use --mixed_precision no (or bf16, which CPUs do run fast under autocast)")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    m = load_models(args)
    native = native_resolution(m)
    resolution = args.resolution or native
    if not 0.5 < resolution / native < 2:
        ratio = resolution / native
        say(f"warning: --resolution {resolution} is {ratio:.3g}× the base model's native {native} px: "
            + (f"each step costs about {ratio ** 2:.0f}× more, and " if ratio > 1 else "")
            + f"the base draws poorly at sizes it was not trained at; leave --resolution out to train at {native}")
    if resolution % (8 if m.vae_scale >= 8 else m.vae_scale):
        raise TrainingError(f"--resolution {resolution} must be a multiple of {m.vae_scale}")
    try:
        instance = ImageSet.from_folder(args.instance_data_dir, args.instance_prompt, resolution, warn=say)
    except DataError as e:
        raise TrainingError(str(e)) from None
    warning = check_identifier(args.instance_prompt)
    if warning:
        say(f"warning: {warning}")
    if args.embedded and main:
        from PIL import Image

        def shorter_side(path):
            with Image.open(path) as im:  # reads the header only
                return min(im.size)

        photos = [p for p in instance.paths if shorter_side(p) > 2 * native]
        if photos:
            say(f"warning: the embedded base only knows its own toy world ({native} px scenes of six shapes in eight colours); "
                f"{len(photos)} of the instance images are larger pictures, likely photos, which it cannot learn recognisably: "
                "for photos, pass a real Stable Diffusion model with --pretrained_model_name_or_path")
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for mod in (m.vae, m.text_encoder, m.text_encoder_2, m.unet):
        if mod is not None:
            mod.to(device)

    classes = None
    if args.with_prior_preservation:
        ensure_class_images(args, accelerator, m, resolution)
        classes = ImageSet.from_folder(args.class_data_dir, args.class_prompt, resolution, flag="--class_data_dir", warn=say)

    if main:
        os.makedirs(args.output_dir, exist_ok=True)
    val_seed = args.seed

    def validation(unet_, desc, bar=True):
        """The validation images, or None and a warning: a failing validation never costs the run."""
        try:
            # the frozen base is cast to half precision below; bf16 on a CPU only runs under autocast
            with accelerator.autocast():
                return generate(make_pipeline(m, unet_, args), args.validation_prompt, args.num_validation_images, val_seed, args, resolution,
                                desc=desc if bar else None)
        except Exception as e:  # noqa: BLE001 — any library error; the adapter matters more than its preview
            say(f"warning: {desc} failed, training goes on without these images: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            return None

    before = None
    if main and not resume_path:
        before = validation(m.unet, desc="validation (before)")

    # the method: attach, then cast what stays frozen
    from accelerate.utils import set_seed

    set_seed(args.seed)  # the random z₀ inits and LoRA's init draw from the global RNG
    method = make_method(args)
    models = types.SimpleNamespace(unet=m.unet, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2, tokenizer=m.tokenizer)
    params = method.setup(models)
    n_trainable = sum(p.numel() for p in params)
    if weight_dtype != torch.float32:
        for mod in (m.vae, m.text_encoder, m.text_encoder_2, m.unet):
            if mod is not None:
                cast_frozen(mod, weight_dtype)
    if args.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
    # the text encoder runs with gradients when the method trains something in it
    text_trained = getattr(method, "trains_text_encoder", False) or (args.train_text_encoder and args.method in ("loldu", "lora", "olora"))

    steps_per_epoch = math.ceil(len(instance) / args.train_batch_size / accelerator.num_processes)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr = args.learning_rate
    if args.scale_lr:
        lr = lr * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, params)
    for g in optimizer.param_groups:
        g["lr"] = lr
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps, num_cycles=args.lr_num_cycles, power=args.lr_power)
    prepared = [m.unet, optimizer, lr_scheduler]
    if text_trained:
        prepared += [m.text_encoder] + ([m.text_encoder_2] if m.text_encoder_2 is not None else [])
    prepared = accelerator.prepare(*prepared)
    unet, optimizer, lr_scheduler = prepared[:3]
    # the trained text encoders run through their wrappers so their gradients are synchronised
    train_encoders = (tuple(prepared[3:]) + (None,))[:2] if text_trained else None
    accumulate_over = [unet] + [e for e in (train_encoders or ()) if e is not None]

    def save_hook(models_, weights, output_dir):
        if main:
            save_file(method.trainable_state(models), os.path.join(output_dir, TRAINABLE_FILE))
        weights.clear()  # the frozen base is not checkpointed: only what trains

    def load_hook(models_, input_dir):
        method.load_trainable_state(models, load_file(os.path.join(input_dir, TRAINABLE_FILE)))
        models_.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, history = 0, []
    earlier, resumed_during = {}, []  # the killed part of a resumed run: its time and validation images
    if args.resume_from_checkpoint and resume_path is None:
        say(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting a new run")
    if resume_path:
        accelerator.load_state(resume_path)
        global_step = int(CHECKPOINT.match(os.path.basename(resume_path)).group(1))
        hist_path = os.path.join(resume_path, "history.json")
        if os.path.isfile(hist_path):
            with open(hist_path) as f:
                history = json.load(f)
        earlier, before, resumed_during = load_run_state(resume_path)
        say(f"resumed from {resume_path} at step {global_step}")

    if main and report_to:
        accelerator.init_trackers("dreambooth-" + args.method, config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    # text embeddings of a frozen text encoder are fixed: compute each caption's once
    emb_cache = {}

    def conditioning(captions):
        if text_trained:
            return encode_prompts(m, captions, device, resolution, train_encoders)
        missing = [c for c in dict.fromkeys(captions) if c not in emb_cache]
        if missing:
            with torch.no_grad():
                hid, added = encode_prompts(m, missing, device, resolution)
            for i, c in enumerate(missing):
                emb_cache[c] = (hid[i], None if added is None else {k: v[i] for k, v in added.items()})
        hid = torch.stack([emb_cache[c][0] for c in captions])
        added = None
        if emb_cache[captions[0]][1] is not None:
            added = {k: torch.stack([emb_cache[c][1][k] for c in captions]) for k in emb_cache[captions[0]][1]}
        return hid, added

    inst_cache = LatentCache(m, instance, resolution, args, device, weight_dtype)
    class_cache = LatentCache(m, classes, resolution, args, device, weight_dtype) if classes else None
    sched = m.noise_scheduler
    T = sched.config.num_train_timesteps
    sync_check = accelerator.num_processes > 1 and n_trainable < 10_000_000
    divergence = 0.0

    def micro_loss(step, micro):
        gen = step_generator(args.seed, step, micro, accelerator.process_index)
        idx = sample_indices(len(instance), args.train_batch_size, gen)
        flips = [bool(args.random_flip and torch.rand(1, generator=gen) < 0.5) for _ in idx]
        latents = inst_cache.latents(idx, flips, gen)
        captions = [instance.captions[i] for i in idx]
        if classes:
            cidx = sample_indices(len(classes), args.train_batch_size, gen)
            cflips = [bool(args.random_flip and torch.rand(1, generator=gen) < 0.5) for _ in cidx]
            latents = torch.cat([latents, class_cache.latents(cidx, cflips, gen)])
            captions += [classes.captions[i] for i in cidx]
        latents = latents.to(device, weight_dtype)
        noise = torch.randn(latents.shape, generator=gen)
        if args.noise_offset:
            noise = noise + args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        noise = noise.to(device, weight_dtype)
        t = torch.randint(0, T, (latents.shape[0],), generator=gen).to(device)
        noisy = sched.add_noise(latents, noise, t)
        hidden, added = conditioning(captions)
        with accelerator.autocast():
            pred = unet(noisy, t, hidden.to(weight_dtype), added_cond_kwargs=added).sample
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        pred, target = pred.float(), target.float()
        prior = torch.zeros((), device=device)
        if classes:
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            t = t.chunk(2)[0]
            prior = F.mse_loss(pred_prior, target_prior)
        if args.snr_gamma is None:
            loss = F.mse_loss(pred, target)
        else:
            snr = compute_snr(sched, t)
            w = torch.stack([snr, args.snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
            w = w / snr if sched.config.prediction_type == "epsilon" else w / (snr + 1)
            loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        return loss + args.prior_loss_weight * prior

    def save_checkpoint(step):
        if args.checkpoints_total_limit is not None and main:
            existing = list_checkpoints(args.output_dir)
            for _, old in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                shutil.rmtree(old)  # oldest first, leaving room for the one about to be written
        final = os.path.join(args.output_dir, f"checkpoint-{step}")
        tmp = final + ".tmp"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(tmp)
        except RuntimeError as e:  # torch.save on a full disk: "basic_ios::clear", "PytorchStreamWriter failed"
            raise OSError(f"could not write the checkpoint {tmp}: {str(e).splitlines()[0]} (is the disk full?)") from None
        if main:
            with open(os.path.join(tmp, "history.json"), "w") as f:
                json.dump(history, f)
            save_run_state(tmp, {"seconds": earlier.get("seconds", 0.0) + time.time() - t_start, "train_seconds": train_time,
                                 "steps_run": steps_run}, before, val_grids)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a kill mid-save leaves only a .tmp folder, never a broken checkpoint
        accelerator.wait_for_everyone()

    val_grids = list(resumed_during)
    bar = tqdm(total=args.max_train_steps, initial=global_step, desc=f"{args.method} training", disable=not main)
    unet.train()
    train_time, steps_run = earlier.get("train_seconds", 0.0), earlier.get("steps_run", 0)
    while global_step < args.max_train_steps:
        t0 = time.time()
        for micro in range(args.gradient_accumulation_steps):
            with accelerator.accumulate(*accumulate_over):
                loss = micro_loss(global_step, micro)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        global_step += 1
        steps_run += 1
        loss_value = accelerator.gather(loss.detach()[None]).mean().item()
        history.append(loss_value)
        if sync_check:
            flat = torch.cat([p.detach().reshape(-1).float() for p in params])
            everyone = accelerator.gather(flat[None])
            divergence = max(divergence, float((everyone - everyone[0]).abs().max()))
            if divergence > 0:
                raise RuntimeError(f"trainable values differ across processes at step {global_step} (max {divergence:g})")
        step_time = time.time() - t0
        train_time += step_time
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2g}", s_per_step=f"{step_time:.2f}")
        accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "step_time_s": step_time}, step=global_step)
        # validation first: the checkpoint then holds this step's images too
        if main and args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            imgs = validation(accelerator.unwrap_model(unet), f"validation at step {global_step}", bar=False)
            if imgs:
                val_grids.append((global_step, imgs))
                report.save_grid([imgs], os.path.join(args.output_dir, f"validation_step_{global_step}.png"))
                report.log_images(accelerator, "validation", imgs, global_step)
        if global_step % args.checkpointing_steps == 0:  # the last step too, as diffusers' scripts do
            save_checkpoint(global_step)
    bar.close()
    accelerator.wait_for_everyone()

    summary = {}
    if main:
        unet_u = accelerator.unwrap_model(unet)
        unet_u.eval()
        summary = {
            "method": args.method, "base_model": os.path.basename(os.path.normpath(args.pretrained_model_name_or_path)),
            "steps": global_step, "trainable_parameters": n_trainable, "learning_rate": args.learning_rate,
            "rank": args.rank, "batch_size": args.train_batch_size, "resolution": resolution,
            "seconds": round(earlier.get("seconds", 0.0) + time.time() - t_start, 1), "seconds_per_step": round(train_time / max(steps_run, 1), 4),
            "final_loss": history[-1] if history else None, "processes": accelerator.num_processes,
            "max_process_divergence": divergence if sync_check else None,
        }
        metadata = {"instance_prompt": args.instance_prompt, "class_prompt": args.class_prompt, "validation_prompt": args.validation_prompt,
                    "training": {k: summary[k] for k in ("steps", "learning_rate", "batch_size", "resolution", "seconds")}}
        models.unet = unet_u
        outputs = method.save(models, args.output_dir, metadata)
        summary["outputs"] = [os.path.relpath(p, args.output_dir) for p in outputs]
        summary["output_bytes"] = sum(report.size_of(p) for p in outputs)
        report.write_json(os.path.join(args.output_dir, "train_summary.json"), summary)
        # the adapter is on disk before the final validation runs: a failure there costs only its images
        after = validation(unet_u, desc="validation (after)")
        if after:
            report.log_images(accelerator, "validation", after, global_step)
        grids = report.write_images(args.output_dir, before, val_grids, after)
        report.loss_curve(history, os.path.join(args.output_dir, "loss.png"))
        report.write_json(os.path.join(args.output_dir, "train_summary.json"), summary)
        judged = judge_toy_subject(args, method)
        if judged:
            summary["judged"] = judged
            report.write_json(os.path.join(args.output_dir, "train_summary.json"), summary)
            say(f"judged ({judged['n']} images per prompt): '{args.instance_prompt}' shows the whole subject in {judged['subject']:.0%} "
                f"of images, {judged['subject_of_ceiling']:.0%} of what the base draws when told exactly ({judged['ceiling']:.0%}); "
                f"the class prompt took its colour or marking {judged['drift_points']:+.0f} points more often than the base")
        report.model_card(args, summary, grids)
        say(f"wrote {', '.join(summary['outputs'])} ({summary['output_bytes']:,} bytes) to {args.output_dir} "
            f"in {summary['seconds']:.0f} s ({summary['seconds_per_step']:.3f} s/step)")
    accelerator.end_training()
    return summary


def judge_toy_subject(args, method):
    """On the embedded base, a folder rendered by toy.concepts says which subject it shows: judge
    the output the way `loldu bench learning` does. None elsewhere (real photos have no judge)."""
    from ..toy.concepts import read_subject

    subject = read_subject(args.instance_data_dir) if args.embedded and args.judge_images > 0 else None
    if subject is None:
        return None
    from ..bench.learning import judge_output

    return judge_output(args, method, subject, args.judge_images)


def main(argv=None) -> int:
    import sys

    from .args import parse_args

    args = parse_args(argv)
    try:
        train(args)
    except (TrainingError, AdapterFileError, FileExistsError, OSError) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every process finds the same mistake: say it once
            from ..io import describe_os_error

            print(f"error: {describe_os_error(e) if isinstance(e, OSError) and not isinstance(e, FileExistsError) else e}", file=sys.stderr)
        # A failure must fail (scripts and CI read the status). `accelerate launch` answers it with
        # a traceback of its own unless launched with --quiet (-q); the README says so.
        return 2
    return 0
