"""torch.compile for a UNet with LoLDU processors, without stale blends.

`compile_unet(unet)` compiles the UNet's forward in place (module names, state dict and the
adapter API unchanged: adapters still load, blend and fuse by name) and adds a forward
pre-hook, run eagerly before every call, that brings each layer's cached blend up to date.
The compiled graph then only reads the cached δ tensors: new weights, per-sample blends or
in-place edits of an adapter's values are seen without tracing Python bookkeeping. The UNet
with LoLDU processors traces as one graph with no breaks (tests/test_compile.py).

A change of which adapters are active, of a blend's rank, or of the batch size recompiles
(torch's guards); changing weights within the same set does not.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer import LoLDULayer


def _refresh_blends(unet: nn.Module, args) -> None:
    for m in unet.modules():
        if isinstance(m, LoLDULayer):
            m.refresh()


def compile_unet(unet: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile `unet.forward` with torch.compile(**compile_kwargs) (e.g. mode="max-autotune",
    backend="inductor"); returns the same module. Calling it twice does nothing more."""
    if not isinstance(unet, nn.Module) or not hasattr(unet, "set_attn_processor"):
        raise TypeError(f"compile_unet takes a diffusers UNet, not a {type(unet).__name__}")
    if is_compiled(unet):
        return unet
    # an instance attribute: nn.Module.__call__ runs the (eager) hooks, then this compiled forward
    unet.forward = torch.compile(unet.forward, **compile_kwargs)
    unet.__dict__["_loldu_refresh_hook"] = unet.register_forward_pre_hook(_refresh_blends)
    return unet


def is_compiled(unet: nn.Module) -> bool:
    return "_loldu_refresh_hook" in unet.__dict__


def uncompile_unet(unet: nn.Module) -> nn.Module:
    """Back to the eager forward."""
    if is_compiled(unet):
        unet.__dict__.pop("_loldu_refresh_hook").remove()
        del unet.forward
    return unet
