"""Single-file checkpoints: one `.safetensors` / `.ckpt` holding a whole model in the original
(LDM) key layout, as A1111, ComfyUI and kohya keep them. They load offline through diffusers'
`from_single_file`, with the configs this package ships in `configs/`: per family, a diffusers
folder layout of the component configs (model_index.json, unet, vae, text encoder(s),
scheduler, tokenizer settings), no weights; and one CLIP vocabulary (`configs/clip`, written by
scripts/build_clip_tokenizer.py) that every family's tokenizers share.

The family comes from the checkpoint's keys, through diffusers' own `infer_diffusers_model_type`
(SD 2 = a 1024-wide cross-attention, SDXL = the second text encoder's keys):

  sd1     SD 1.x                  stable-diffusion-v1-5's configs
  sd2     SD 2.x 512, ε-prediction stable-diffusion-2-1-base's
  sd2-v   SD 2.x 768, v-prediction stable-diffusion-2-1's
  sdxl    SDXL base               stable-diffusion-xl-base-1.0's

SD 2's prediction type is not in its weights. An A1111-style config beside the file
(`NAME.yaml`, as `v2-inference-v.yaml`) decides when there is one (`parameterization: "v"`);
otherwise diffusers' rule: v-prediction unless the checkpoint says `global_step` 875000 (the
512 base's). Other kinds (inpainting, the SDXL refiner, SD 3, Flux, ControlNets, LoRAs, VAEs…)
are refused by name.

Nothing in a file runs: a .safetensors holds only tensors, and a .ckpt is read with
torch.load(weights_only=True), which allows tensors and plain containers; the few training
leftovers original checkpoints carry (a Lightning ModelCheckpoint, numpy scalars for the step)
are read as inert data. A .ckpt that needs anything else is refused with one line.
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile

import torch

EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
CONFIGS_ENV = "LOLDU_SINGLE_FILE_CONFIGS"  # another folder of family configs (the tests' tiny ones)
CLIP_VOCAB = os.path.join(CONFIGS, "clip", "vocab.json")
CLIP_MERGES = os.path.join(CONFIGS, "clip", "merges.txt")
FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x (512, ε-prediction)", "sd2-v": "SD 2.x (768, v-prediction)", "sdxl": "SDXL"}
SD2_BASE_GLOBAL_STEP = 875000  # diffusers: "epsilon" if global_step == 875000 else "v_prediction"
UNET = "model.diffusion_model."
# what each family needs besides its UNet, by a key diffusers itself looks for
PARTS = {
    "sd1": {"text encoder": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"},
    "sd2": {"text encoder": "cond_stage_model.model.token_embedding.weight"},
    "sdxl": {"first text encoder": "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
             "second text encoder": "conditioner.embedders.1.model.positional_embedding"},
}
VAE_PREFIXES = ("first_stage_model.", "vae.")
REFUSED = {"inpainting": "an SD 1.x inpainting model", "inpainting_v2": "an SD 2.x inpainting model",
           "xl_inpaint": "an SDXL inpainting model", "xl_refiner": "the SDXL refiner", "upscale": "an SD upscaler",
           "playground-v2-5": "a Playground v2.5 model", "instruct-pix2pix": "an InstructPix2Pix model"}
# data-only stand-ins for classes original training checkpoints pickle beside the weights
INERT = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")


class SingleFileError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and what to do."""


def is_single_file(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(path) and str(path).lower().endswith(EXTENSIONS)


def config_folder(family: str, root: str | None = None) -> str:
    """The diffusers-layout config folder of a family (the shipped ones unless `root` or
    $LOLDU_SINGLE_FILE_CONFIGS names another folder of them)."""
    return os.path.join(root or os.environ.get(CONFIGS_ENV) or CONFIGS, family)


def _inert_class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return type(name, (), {"__module__": module, "__doc__": "read as data only: no code of the original class runs"})


def _safe_globals() -> list:
    """What torch.load(weights_only=True) may build besides tensors: numpy scalars and dtypes
    (a checkpoint's global_step) and inert stand-ins for training callbacks."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    found = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    found += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")]
    return found + [(_inert_class(p), p) for p in INERT]


@contextlib.contextmanager
def _weights_only_reads():
    with torch.serialization.safe_globals(_safe_globals()):
        yield


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_keys(path: str) -> tuple[dict, int | None]:
    """({key: tensor}, global_step) — enough to tell the family without loading the weights: a
    .safetensors header's shapes on the meta device, a .ckpt's memory-mapped tensors."""
    name = str(path)
    if name.lower().endswith(".sft"):
        raise SingleFileError(f"{name}: a safetensors file under the .sft extension; rename it to .safetensors (diffusers reads safetensors by that name)")
    if name.lower().endswith(".safetensors") and not name.endswith(".safetensors"):  # diffusers compares the suffix as written
        raise SingleFileError(f"{name}: rename it to end in .safetensors, in lower case (diffusers reads any other name as a pickled .ckpt)")
    if name.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(name, "pt") as f:
                keys = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys() if k != "global_step"}
                step = int(f.get_tensor("global_step").item()) if "global_step" in f.keys() else None
        except OSError as e:  # a folder, a vanished file, no permission: the file may be fine
            raise _unreadable(name, e) from None
        except Exception:  # noqa: BLE001 — safetensors has its own error types for a bad header
            raise SingleFileError(f"{name}: not a readable safetensors file (truncated or corrupt?); download it again") from None
        return keys, step
    state = load_torch_checkpoint(name)
    step = state.get("global_step") if isinstance(state, dict) else None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SingleFileError(f"{name}: holds a {type(state).__name__}, not a checkpoint's dictionary of weights")
    try:
        step = int(step) if step is not None else None
    except (TypeError, ValueError):
        step = None
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, step


def load_torch_checkpoint(path: str):
    """torch.load without running pickled code; one line when the file needs more than data."""
    import re

    try:
        with _weights_only_reads():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except OSError as e:
        raise _unreadable(path, e) from None
    except Exception as e:  # noqa: BLE001 — a refused global, a truncated zip, not a torch file at all, …
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if needs:
            raise SingleFileError(f"{path}: this checkpoint needs Python code to load (pickled {needs.group(1)}), which is never run "
                                  "here; use the model's .safetensors release, or convert it to .safetensors where you trust the file") from None
        raise SingleFileError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?); download it again") from None


def _unreadable(path, e: OSError) -> SingleFileError:
    """The system refused to read the file (permissions, a folder, gone): saying "corrupt,
    download it again" would send the user after the wrong fix."""
    if os.path.isdir(path):
        return SingleFileError(f"{path}: a folder, not a model file; pass the checkpoint file itself")
    return SingleFileError(f"{path}: cannot be read ({e.strerror or _first_line(e)}); check that it is a file you may read")


def _what_else(keys) -> str:
    """What a file without SD UNet weights probably is, for the error."""
    ks = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_down" in k for k in ks):
        return "a LoRA"
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in ks):
        return "a textual-inversion embedding"
    if ks and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.") + VAE_PREFIXES) for k in ks):
        return "a VAE"
    if any(k.startswith(("down_blocks.", "text_model.", "transformer_blocks.")) for k in ks):
        return "one model in diffusers' layout (pass its diffusers folder instead)"
    if any(k.startswith(("double_blocks.", "joint_blocks.")) or ".double_blocks." in k or ".joint_blocks." in k for k in ks):
        return "an SD 3 / Flux model"
    return "not a Stable Diffusion checkpoint"


def family_of_keys(keys: dict, path: str = "checkpoint", global_step: int | None = None) -> str:
    """sd1, sd2, sd2-v or sdxl for a checkpoint's {key: tensor}; SingleFileError otherwise."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(k.startswith(UNET) for k in keys):
        what = _what_else(keys)
        what = what if what.startswith("not ") else f"{what}, not a Stable Diffusion checkpoint"
        raise SingleFileError(f"{path}: {what} (no {UNET}* weights); pass a full SD 1.x / 2.x / SDXL model file or a diffusers folder")
    kind = infer_diffusers_model_type(keys)
    family = {"v1": "sd1", "v2": "sd2", "xl_base": "sdxl"}.get(kind)
    if family is None:
        what = REFUSED.get(kind, f"a {kind} checkpoint")
        raise SingleFileError(f"{path}: {what}; single files of SD 1.x, SD 2.x and SDXL base models load here")
    missing = [part for part, key in PARTS[family].items() if key not in keys]
    if not any(k.startswith(VAE_PREFIXES) for k in keys):
        missing.append("VAE")
    if missing:
        raise SingleFileError(f"{path}: an {FAMILIES[family].split(' (')[0]} checkpoint without its {' and '.join(missing)} weights "
                              "(a UNet-only or pruned file?); pass the full model file")
    if family == "sd2" and _v_prediction(path, global_step):
        family = "sd2-v"
    return family


def _v_prediction(path: str, global_step: int | None) -> bool:
    """SD 2.x: the LDM config beside the file (A1111's NAME.yaml) when there is one, else
    diffusers' rule (v-prediction unless global_step is the 512 base's 875000)."""
    beside = os.path.splitext(str(path))[0] + ".yaml"
    if os.path.isfile(beside):
        import yaml

        try:
            with open(beside) as f:
                params = yaml.safe_load(f)["model"]["params"]
            if not isinstance(params, dict):
                raise TypeError(type(params).__name__)
        except Exception:  # noqa: BLE001 — not YAML, or not an LDM config
            raise SingleFileError(f"{beside}: not an LDM model config (no model.params); fix it or remove it (it sets SD 2's "
                                  "prediction type: parameterization: \"v\" for 768-v models)") from None
        return params.get("parameterization") == "v"
    if global_step == SD2_BASE_GLOBAL_STEP:
        return False
    import warnings

    warnings.warn(f"{path}: an SD 2.x checkpoint taken as v-prediction (768-v) by diffusers' rule, since no {os.path.basename(beside)} "
                  "beside it says otherwise; for a 2.x-base (512 px, epsilon) model put the LDM config it was released with there "
                  "(v2-inference.yaml), or images come out wrong", stacklevel=2)
    return True


def checkpoint_family(path: str) -> str:
    """The family of a single-file checkpoint, read before anything loads (SingleFileError if
    it is not one of ours)."""
    keys, step = read_keys(path)
    return family_of_keys(keys, str(path), step)


def _tokenizers(folder: str) -> dict:
    """The family's CLIP tokenizers from the shared vocabulary and each tokenizer folder's
    settings (its pad token); a folder with a vocabulary of its own (vocab.json or
    tokenizer.json: a tiny test config) is left to diffusers, which loads it as it is."""
    from transformers import CLIPTokenizer

    out = {}
    for name in ("tokenizer", "tokenizer_2"):
        sub = os.path.join(folder, name)
        own = any(os.path.isfile(os.path.join(sub, f)) for f in ("vocab.json", "tokenizer.json"))
        if os.path.isdir(sub) and not own:
            with open(os.path.join(sub, "tokenizer_config.json")) as f:
                cfg = json.load(f)
            special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in cfg}
            out[name] = CLIPTokenizer(vocab=CLIP_VOCAB, merges=CLIP_MERGES, model_max_length=cfg.get("model_max_length", 77), **special)
    return out


def load_single_file(path: str, dtype=torch.float32, configs: str | None = None, **components):
    """A StableDiffusionPipeline / StableDiffusionXLPipeline from a single-file checkpoint, offline.
    `components` (e.g. vae=…) replace what would be converted from the file. The pipeline
    carries `_loldu_family` and `_loldu_config` (the config folder it was built with)."""
    import diffusers

    from .quiet import no_loading_bars

    family = checkpoint_family(path)
    folder = config_folder(family, configs)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise SingleFileError(f"{path}: an {FAMILIES[family]} checkpoint, but {folder} holds no config for it (model_index.json)")
    xl = family == "sdxl"
    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    kw = {**_tokenizers(folder), **components}
    if not xl:
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        with _weights_only_reads(), no_loading_bars():
            pipe = cls.from_single_file(str(path), config=folder, local_files_only=True, torch_dtype=dtype, **kw)
    except SingleFileError:
        raise
    except Exception as e:  # noqa: BLE001 — a shape that does not fit the family's config, a missing key, …
        raise SingleFileError(f"{path}: it does not load as an {FAMILIES[family]} model ({_first_line(e)}); "
                              "a fine-tune of another architecture? convert it with the tool that made it") from None
    empty = [name for name, mod in pipe.components.items()
             if isinstance(mod, torch.nn.Module) and any(p.device.type == "meta" for p in mod.parameters())]
    if empty:
        raise SingleFileError(f"{path}: the checkpoint lacks weights of its {', '.join(empty)} (a pruned file?); pass the full model file")
    pipe._loldu_family, pipe._loldu_config = family, folder
    return pipe
