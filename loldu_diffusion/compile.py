"""torch.compile for a UNet with LoLDU processors, without stale blends.

`compile_unet(unet)` compiles the UNet's forward in place (module names, state dict and the
adapter API unchanged: adapters still load, blend and fuse by name). The UNet's BlendGuard
(guard.py), a forward pre-hook run eagerly before every call, brings each layer's cached blend
up to date.
The compiled graph then only reads the cached δ tensors: new weights, per-sample blends or
in-place edits of an adapter's values are seen without tracing Python bookkeeping. The UNet
with LoLDU processors traces as one graph with no breaks (tests/test_compile.py).

A change of which adapters are active, of a blend's rank, or of the batch size recompiles
(torch's guards); changing weights within the same set does not.
"""
from __future__ import annotations

import torch
from torch import nn

from .guard import guard_of


def compile_unet(unet: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile `unet.forward` with torch.compile(**compile_kwargs) (e.g. mode="max-autotune",
    backend="inductor"); returns the same module. Calling it twice does nothing more."""
    if not isinstance(unet, nn.Module) or not hasattr(unet, "set_attn_processor"):
        raise TypeError(f"compile_unet takes a diffusers UNet, not a {type(unet).__name__}")
    if is_compiled(unet):
        return unet
    # an instance attribute: nn.Module.__call__ runs the (eager) hooks, then this compiled forward
    unet.forward = torch.compile(unet.forward, **compile_kwargs)
    unet.__dict__["_loldu_compiled"] = True
    guard_of(unet, "unet")  # (every attach installs it too: this covers a UNet compiled before any adapter)
    return unet


def is_compiled(unet: nn.Module) -> bool:
    return "_loldu_compiled" in unet.__dict__


def uncompile_unet(unet: nn.Module) -> nn.Module:
    """Back to the eager forward."""
    if is_compiled(unet):
        del unet.__dict__["_loldu_compiled"]
        del unet.forward
    return unet
