"""LoLDU → standard LoRA, exactly: the update L̃ diag(δ) U_r has rank ≤ r, so

    lora_up = L̃ diag(δ) S   (out × r),   lora_down = S⁻¹ U_r   (r × in),   alpha = r (scale 1)

(S diagonal: each rank-1 term's two factors at equal norm, for fp16 tools)

reproduces it in any tool that only knows LoRA: diffusers' `load_lora_weights` (format
"diffusers") or kohya / A1111 / ComfyUI (format "kohya", with `ss_*` metadata).
Blends export too: the active blend's δ is what is written.
"""
from __future__ import annotations

import json
import os

import torch

from .config import EXPORT_FORMATS
from .io import atomic_save_safetensors
from .model import iter_layers

FORMATS = EXPORT_FORMATS
_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def lora_factors(model) -> list[tuple[str, str, str, torch.Tensor, torch.Tensor]]:
    """(component, module path, target, up (out, r), down (r, in)) for every layer with a
    non-zero active δ, from the LoLDU adapters loaded (and weighted) on `model`."""
    rows = []
    for comp, mod, target, layer in iter_layers(model):
        delta = layer.delta_vector()
        if delta is None or not layer.enabled:
            continue
        r = delta.shape[0]
        up = (layer.L[:, :r] * delta.detach()).float().cpu()  # (out, r)
        down = layer.U[:r].float().cpu()  # (r, in)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise ValueError(f"{comp}.{mod}.{target}: the blend's update is not finite (inf or nan): nothing exported")
        # the same product with each rank-1 term's two factors at equal norm: U_r's rows carry the pivots'
        # inverse scale and can exceed fp16's range where tools cast a LoRA to the base's dtype
        s = (down.norm(dim=1) / up.norm(dim=0)).sqrt()  # (r,)
        s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))  # δ_k = 0: that term is zero anyway
        rows.append((comp, mod, target, up * s, down / s[:, None]))
    if not rows:
        raise ValueError("no active LoLDU adapter to export")
    return rows


def _kohya_name(comp: str, mod: str, target: str, sdxl: bool) -> str:
    prefix = _KOHYA_PREFIX[comp]
    if comp.startswith("text_encoder") and sdxl:
        prefix = "lora_te1" if comp == "text_encoder" else "lora_te2"
    return f"{prefix}_{mod}.{target}".replace(".", "_")


def lora_state_dict(model, fmt: str = "diffusers", title: str | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of the standard-LoRA form of the active LoLDU blend; `title` names it
    in the kohya labels (kohya: the output name)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows = lora_factors(model)
    sdxl = any(c == "text_encoder_2" for c, *_ in rows) or _is_sdxl(model)
    tensors, rank = {}, max(up.shape[1] for _, _, _, up, _ in rows)
    for comp, mod, target, up, down in rows:
        # every layer at the largest rank, zero-padded (the product is unchanged): diffusers' format has no alpha and
        # its loaders scale each layer by one alpha / r, and diffusers reads a kohya file's per-layer alphas into an
        # alpha_pattern whose keys match no module (PEFT ignores them), so layers of another rank came out scaled
        pad = rank - up.shape[1]
        down, up = torch.cat([down, down.new_zeros(pad, down.shape[1])]), torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1)
        if fmt == "diffusers":
            key = f"{comp}.{mod}.{target}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
        else:
            key = _kohya_name(comp, mod, target, sdxl)
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))  # alpha = r: scale 1
    meta = {"format": "pt", "loldu_export": json.dumps({"source": "loldu-diffusion", "rank": rank, "layers": len(rows)})}
    if fmt == "kohya":
        meta.update(kohya_labels(model, rank, title))
    return tensors, meta


def kohya_labels(model, rank: int, title: str | None = None, timestamp: float | None = None) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata kohya's train_network.py / sai_model_spec.py write
    for a LoRA of this base: what A1111, ComfyUI and kohya read to apply it."""
    import datetime
    import time

    from . import __version__

    fam = base_family(model)
    timestamp = time.time() if timestamp is None else timestamp
    labels = dict(ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(rank),
                  ss_base_model_version=fam["ss_base_model_version"], ss_v2=str(fam["v2"]),
                  ss_v_parameterization=str(fam["v_parameterization"]), ss_output_name=title or "",
                  ss_training_comment="exported from a LoLDU adapter (exact)")
    base = getattr(model, "_loldu_base_path", None)
    if base:
        labels["ss_sd_model_name"] = os.path.basename(os.path.normpath(base))
    spec = dict(fam["modelspec"], title=title or f"LoRA@{timestamp}", date=datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
                implementation_version=f"loldu-diffusion/{__version__}",
                description="a LoLDU adapter exported as an exact LoRA (lora_up = L diag(delta) S, lora_down = S^-1 U_r, "
                            "S balancing each term's factors, alpha = rank)")
    labels.update({f"modelspec.{k}": v for k, v in spec.items()})
    return {k: v for k, v in labels.items() if v != ""}


def base_family(model) -> dict:
    """What kohya / A1111 / ComfyUI read to decide how to apply a LoRA: SD 1.x, SD 2.x (OpenCLIP's
    1024-wide cross-attention) or SDXL (text_time conditioning), and v-prediction (from the
    pipeline's scheduler; A1111 needs it for SD 2.x 768-v models). Labels as kohya writes them:
    ss_base_model_version from model_util.get_model_version_str_for_sd1_sd2 (sd_v1, sd_v2,
    sd_v2_v …) or sdxl_base_v1-0; modelspec.* from sai_model_spec.build_metadata for a LoRA."""
    unet = getattr(model, "unet", model)
    cfg = getattr(unet, "config", None)
    scheduler = getattr(getattr(model, "scheduler", None), "config", None) or {}
    v_param = scheduler.get("prediction_type") == "v_prediction"
    sdxl = _is_sdxl(model)
    v2 = not sdxl and getattr(cfg, "cross_attention_dim", None) == 1024
    if sdxl:
        version, arch, impl, res = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models", 1024
    else:
        version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_param else "")
        arch = ("stable-diffusion-v2-768-v" if v_param else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
        impl, res = "diffusers", 768 if v2 and v_param else 512
    res = _native_size(model) or res
    spec = {"sai_model_spec": "1.0.1", "architecture": f"{arch}/lora", "implementation": impl, "resolution": f"{res}x{res}",
            "prediction_type": "v" if v_param else "epsilon"}
    return {"ss_base_model_version": version, "v2": v2, "v_parameterization": v_param, "modelspec": spec}


def _native_size(model) -> int | None:
    """The base's own image size (UNet sample size × the VAE's scale) when the model has both."""
    unet, vae = getattr(model, "unet", None), getattr(model, "vae", None)
    try:
        return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    except (AttributeError, TypeError):
        return None


def _is_sdxl(model) -> bool:
    unet = getattr(model, "unet", model)
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def export_lora(model, path: str, fmt: str = "diffusers", overwrite: bool = False) -> str:
    title = os.path.splitext(os.path.basename(path))[0]
    tensors, meta = lora_state_dict(model, fmt, title=title)
    return atomic_save_safetensors(tensors, path, meta, overwrite)


DIFFUSERS_FORMAT_WARNING = ("ComfyUI and A1111 want the kohya format (--format kohya): this diffusers-format file is for diffusers' "
                            "load_lora_weights (ComfyUI skips every UNet layer of it, with only a log warning)")


def default_format(base: str | None) -> str:
    """kohya for a single-file base (its users' tools, A1111 and ComfyUI, read kohya LoRAs), else diffusers."""
    from .single_file import is_single_file

    return "kohya" if base and is_single_file(base) else "diffusers"


def format_warning(fmt: str) -> str | None:
    """The one-line warning an export in this format deserves, if any."""
    return DIFFUSERS_FORMAT_WARNING if fmt == "diffusers" else None


def embedding_warning(what: str) -> str:
    """The warning for a token embedding the exported subject needs (pivotal tuning): a LoRA file cannot hold it."""
    return (f"{what} is not part of a LoRA file: its subject needs it too (in A1111, put that file in embeddings/ named "
            "after its token; in diffusers, load_textual_inversion)")
