"""Heterogeneous batches: one pipeline call in which each sample uses its own adapter blend.

Adapters differ from the base only by a vector δ per layer, so a batch of S samples with S
different blends costs one low-rank product per layer, as one adapter does:

    h_b = W x_b + L̃ (δ_b ⊙ (U_r x_b)),   b = 1…S

Batch row j uses sample j mod S. Diffusers' guidance batch is [uncond (S rows); cond (S rows)]
and its text encoders see the S prompts (then the S negative prompts): every one of them maps
to its own sample's blend, text-encoder layers included.

    with per_sample_adapters(pipe, [{"heart": 1.0}, {"star": 0.8, "style": 0.5}, {}]):
        images = pipe(["a photo of sks heart", "a photo of zwx star", "a photo of a ring"], …).images

or `generate(pipe, prompts, adapters=[…], seeds=[…])`, which also gives each image its own seed:
image b equals generating it alone with its blend and seed (to floating-point tolerance).
"""
from __future__ import annotations

import math
import numbers
import weakref
from contextlib import contextmanager

import torch

from .model import adapter_names, iter_layers


def _check_blends(model, blends) -> list[dict[str, float]]:
    if not isinstance(blends, (list, tuple)) or not blends:
        raise ValueError("per-sample adapters: give a non-empty list with one {adapter name: weight} dict per sample")
    known = set(adapter_names(model))
    out = []
    for i, b in enumerate(blends):
        if b is None:
            b = {}
        if not isinstance(b, dict):
            raise ValueError(f"per-sample adapters: sample {i} is a {type(b).__name__}, not a {{adapter name: weight}} dict")
        unknown = sorted(set(b) - known)
        if unknown:
            raise KeyError(f"per-sample adapters: sample {i} names unknown adapter(s) {unknown}; loaded: {sorted(known)}")
        bad = {n: w for n, w in b.items() if not isinstance(w, numbers.Real) or not math.isfinite(w)}  # numpy floats are Real
        if bad:
            raise ValueError(f"per-sample adapters: sample {i} has weights that are not finite numbers: {bad}")
        out.append({n: float(w) for n, w in b.items()})
    return out


def set_sample_weights(model, blends: list[dict[str, float]] | None) -> None:
    """One blend per sample for the following calls (None: back to the shared blend of
    `set_adapter_weights`). Raises if the adapters are fused."""
    blends = None if blends is None else _check_blends(model, blends)
    layers = [layer for *_, layer in iter_layers(model)]
    if blends is not None and any(layer.fused_delta is not None for layer in layers):
        raise RuntimeError("the LoLDU adapters are fused: call unfuse_loldu(model) before per-sample blends")
    for layer in layers:
        layer.sample_weights = blends


# the blocks open on each UNet, innermost last: only the innermost block's hook checks a call
_OPEN_BLOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


@contextmanager
def per_sample_adapters(model, blends: list[dict[str, float]]):
    """Within the block, sample b of every call uses blends[b] ({} = the base model); on leaving
    it, what held before comes back (an enclosing block's blends, or the shared blend: nested
    blocks close innermost first, as `with` blocks do). A UNet
    call of other than S or 2S rows (S samples, with or without guidance) is refused: diffusers
    lays out num_images_per_prompt > 1 as [p0, p0, p1, p1], which row j mod S would give the
    wrong blends."""
    layers = [layer for *_, layer in iter_layers(model)]
    before = [layer.sample_weights for layer in layers]
    set_sample_weights(model, blends)
    unet = getattr(model, "unet", model)
    n, block = len(blends), object()

    def one_row_per_sample(module, args, kwargs):
        if (_OPEN_BLOCKS.get(module) or [None])[-1] is not block:  # an inner block's blends hold (or a copy of the UNet)
            return
        sample = args[0] if args else kwargs.get("sample")
        rows = getattr(sample, "shape", (None,))[0]
        if rows is not None and rows not in (n, 2 * n):
            raise ValueError(f"per-sample adapters: a UNet batch of {rows} rows for {n} blends; give one blend per image "
                             "(num_images_per_prompt=1; repeat a prompt for more images)")

    hook = None
    if isinstance(unet, torch.nn.Module):
        _OPEN_BLOCKS.setdefault(unet, []).append(block)
        hook = unet.register_forward_pre_hook(one_row_per_sample, with_kwargs=True)
    try:
        yield model
    finally:
        if hook is not None:
            hook.remove()
            _OPEN_BLOCKS[unet].remove(block)
        for layer, weights in zip(layers, before):
            layer.sample_weights = weights


def generate(pipe, prompts: list[str], adapters: list[dict[str, float]] | None = None, seeds=None,
             negative_prompt=None, **kwargs):
    """Images for `prompts` in one pipeline call, prompt b with blend adapters[b] and a generator
    seeded seeds[b] (an int: that seed for every prompt). Other keyword arguments go to the
    pipeline (num_inference_steps, guidance_scale, height, width, output_type, …)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("generate: give a non-empty list of prompts")
    n = len(prompts)
    adapters = [{}] * n if adapters is None else list(adapters)
    if len(adapters) != n:
        raise ValueError(f"generate: {n} prompts but {len(adapters)} adapter blends (one per prompt)")
    if kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError("generate: repeat a prompt for more images (num_images_per_prompt must be 1)")
    seeds = [seeds] * n if isinstance(seeds, numbers.Integral) else (list(seeds) if seeds is not None else None)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"generate: {n} prompts but {len(seeds)} seeds")
    if seeds is not None:
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * n
    with per_sample_adapters(pipe, adapters):
        return pipe(list(prompts), negative_prompt=negative_prompt, **kwargs).images
