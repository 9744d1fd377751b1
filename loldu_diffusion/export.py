"""LoLDU → standard LoRA, exactly: the update L̃ diag(δ) U_r has rank ≤ r, so

    lora_up = L̃ diag(δ)   (out × r),   lora_down = U_r   (r × in),   alpha = r (scale 1)

reproduces it in any tool that only knows LoRA: diffusers' `load_lora_weights` (format
"diffusers") or kohya / A1111 / ComfyUI (format "kohya", with `ss_*` metadata).
Blends export too: the active blend's δ is what is written.
"""
from __future__ import annotations

import json

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
        up = (layer.L[:, :r] * delta.detach()).float().cpu()
        down = layer.U[:r].float().cpu()
        rows.append((comp, mod, target, up, down))
    if not rows:
        raise ValueError("no active LoLDU adapter to export")
    return rows


def _kohya_name(comp: str, mod: str, target: str, sdxl: bool) -> str:
    prefix = _KOHYA_PREFIX[comp]
    if comp.startswith("text_encoder") and sdxl:
        prefix = "lora_te1" if comp == "text_encoder" else "lora_te2"
    return f"{prefix}_{mod}.{target}".replace(".", "_")


def lora_state_dict(model, fmt: str = "diffusers") -> tuple[dict, dict]:
    """(tensors, metadata) of the standard-LoRA form of the active LoLDU blend."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows = lora_factors(model)
    sdxl = any(c == "text_encoder_2" for c, *_ in rows) or _is_sdxl(model)
    tensors, rank = {}, 0
    for comp, mod, target, up, down in rows:
        rank = max(rank, up.shape[1])
        if fmt == "diffusers":
            key = f"{comp}.{mod}.{target}"
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
        else:
            key = _kohya_name(comp, mod, target, sdxl)
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(up.shape[1]))  # alpha = r: scale 1
    meta = {"format": "pt", "loldu_export": json.dumps({"source": "loldu-diffusion", "rank": rank, "layers": len(rows)})}
    if fmt == "kohya":
        fam = base_family(model)
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(rank),
                    ss_base_model_version=fam["ss_base_model_version"], ss_v2=str(fam["v2"]),
                    ss_v_parameterization=str(fam["v_parameterization"]),
                    ss_training_comment="exported from a LoLDU adapter (exact)", **{f"modelspec.{k}": v for k, v in fam["modelspec"].items()})
    return tensors, meta


def base_family(model) -> dict:
    """What kohya / A1111 / ComfyUI read to decide how to apply a LoRA: SD 1.x, SD 2.x (OpenCLIP's
    1024-wide cross-attention) or SDXL (text_time conditioning), and v-prediction (from the
    pipeline's scheduler; A1111 needs it for SD 2.x 768-v models). Labels as kohya's
    sai_model_spec writes them."""
    unet = getattr(model, "unet", model)
    cfg = getattr(unet, "config", None)
    scheduler = getattr(getattr(model, "scheduler", None), "config", None) or {}
    v_param = scheduler.get("prediction_type") == "v_prediction"
    sdxl = _is_sdxl(model)
    v2 = not sdxl and getattr(cfg, "cross_attention_dim", None) == 1024
    if sdxl:
        version, arch, impl, res = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models", "1024x1024"
    elif v2:
        version, arch, impl, res = "sd_v2", "stable-diffusion-v2-768-v" if v_param else "stable-diffusion-v2-512", "diffusers", "768x768" if v_param else "512x512"
    else:
        version, arch, impl, res = "sd_v1", "stable-diffusion-v1", "diffusers", "512x512"
    spec = {"sai_model_spec": "1.0.0", "architecture": f"{arch}/lora", "implementation": impl, "title": "LoLDU adapter (exported as LoRA)",
            "resolution": res, "prediction_type": "v" if v_param else "epsilon"}
    return {"ss_base_model_version": version, "v2": v2, "v_parameterization": v_param, "modelspec": spec}


def _is_sdxl(model) -> bool:
    unet = getattr(model, "unet", model)
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def export_lora(model, path: str, fmt: str = "diffusers", overwrite: bool = False) -> str:
    tensors, meta = lora_state_dict(model, fmt)
    return atomic_save_safetensors(tensors, path, meta, overwrite)
