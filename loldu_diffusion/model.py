"""Model-level injection: find the layers to adapt in a pipeline, UNet or text encoder,
attach LoLDU to them, and act on all of them at once (weights, fuse, enable, remove).

Where a layer lives (a UNet attention's processor, a text encoder's hooked projection) is
sites.py's business; this module sees components and their sites only.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .config import LoLDUConfig
from .guard import guard_of, remove_guard
from .layer import LoLDULayer, LoLDUVector, initial_z
from .sites import canonical_path, resolve_submodule, sites_for  # noqa: F401 — canonical_path, resolve_submodule re-exported

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def components(model) -> dict[str, nn.Module]:
    """{"unet": …, "text_encoder": …, "text_encoder_2": …} for a pipeline; one entry for a
    bare UNet or text encoder."""
    if hasattr(model, "unet") and isinstance(getattr(model, "unet"), nn.Module):  # a diffusers pipeline
        found = {"unet": model.unet}
        for name in TEXT_ENCODERS:
            if isinstance(getattr(model, name, None), nn.Module):
                found[name] = getattr(model, name)
        return found
    if hasattr(model, "set_attn_processor"):
        return {"unet": model}
    if isinstance(model, nn.Module):
        return {"text_encoder": model}
    raise TypeError(f"cannot inject LoLDU into a {type(model).__name__}: pass a diffusers pipeline, UNet or CLIP text encoder")


def iter_layers(model) -> Iterator[tuple[str, str, str, LoLDULayer]]:
    """(component, module path, target, layer) for every injected layer, in a fixed order."""
    for comp, module in components(model).items():
        for path, target, layer in sites_for(comp).layers(module):
            yield comp, path, target, layer


def attach_layer(component: nn.Module, comp_name: str, module_path: str, target: str, rank: int, factors=None) -> LoLDULayer:
    """The LoLDULayer on (module_path, target), created (at `rank`, from precomputed LDU
    `factors` when given) if missing."""
    layer = sites_for(comp_name).attach(component, module_path, target, rank, factors)
    layer.ensure_rank(rank)
    guard = guard_of(component, comp_name)
    guard.layers_changed()
    layer._guard = guard
    return layer


@contextmanager
def all_or_nothing(model, adapter_name: str):
    """Undo a partial attach if the block fails: the adapter's vectors, new LoLDU layers,
    processors and text-encoder hooks. (Factors grown to a larger rank are kept: same output.)"""
    undo = [sites_for(c).snapshot(comp) for c, comp in components(model).items()]
    try:
        yield
    except BaseException:
        for *_, layer in iter_layers(model):
            layer.remove_adapter(adapter_name)
        for u in undo:
            u()
        raise


def install_processors(component: nn.Module, comp_name: str, module_paths) -> None:
    """Prepare the sites of `module_paths` at once (one set_attn_processor call for a UNet)."""
    sites_for(comp_name).install(component, module_paths)


def find_targets(component: nn.Module, comp_name: str, targets: tuple[str, ...]) -> list[tuple[str, str]]:
    """(module path, target) for every targeted projection present in the component."""
    return sites_for(comp_name).find(component, targets)


_PROBE = nn.ModuleDict()  # adapter names must not shadow its attributes


def check_adapter_name(name) -> str:
    """An adapter name must be a key of the layers' nn.ModuleDict: a non-empty string without
    dots that is not one of its attributes ('items', 'keys', 'training', …)."""
    if not isinstance(name, str) or not name or "." in name or hasattr(_PROBE, name) or name.startswith("_"):
        raise ValueError(f"adapter_name {name!r} is not usable: use a non-empty name without dots that does not start "
                         "with '_' (and is not 'items', 'keys', 'values', …)")
    return name


def adapter_name_from_path(path: str, taken=()) -> str:
    """A safe adapter name from any file name ('sks.v2.safetensors' → 'sks_v2'; spaces and
    punctuation → '_'; letters of any script kept), made unique against `taken`."""
    stem = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem[: -len(".safetensors")] if stem.lower().endswith(".safetensors") else stem
    stem = re.sub(r"[^\w-]+", "_", stem).strip("_")[:64] or "adapter"
    if hasattr(_PROBE, stem) or stem.startswith("_"):
        stem = f"adapter_{stem}"
    name, k = stem, 2
    while name in taken:
        name, k = f"{stem}_{k}", k + 1
    return name


def inject_loldu(model, config: LoLDUConfig | None = None, adapter_name: str = "default") -> list[LoLDULayer]:
    """Attach a trainable LoLDU adapter. Base parameters are frozen; the model's output is
    unchanged until the adapter trains. Returns the adapted layers."""
    config = config or LoLDUConfig()
    check_adapter_name(adapter_name)
    comps = components(model)
    plan = []
    for comp_name, comp in comps.items():
        targets = config.targets_for(comp_name)
        if targets:
            plan += [(comp_name, comp, path, t) for path, t in find_targets(comp, comp_name, targets)]
    if not plan:
        raise ValueError("LoLDUConfig selects no layer in this model (check unet_targets / text_encoder_targets)")
    for layer in (lay for *_, lay in iter_layers(model)):
        if adapter_name in layer.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} is already injected; pick another adapter_name")
    for comp in {id(c): c for _, c, _, _ in plan}.values():
        # the base freezes; adapters injected earlier (a UNet's processors are its submodules) keep training
        trained = {id(p) for mod in comp.modules() if isinstance(mod, LoLDUVector) for p in mod.parameters()}
        for p in comp.parameters():
            if id(p) not in trained:
                p.requires_grad_(False)
    for comp_name, comp in comps.items():
        install_processors(comp, comp_name, [path for c, _, path, _ in plan if c == comp_name])
    layers = []
    for comp_name, comp, path, t in plan:
        rank = min(config.rank, *sites_for(comp_name).linear(comp, path, t).weight.shape)  # at most the layer's full rank
        layer = attach_layer(comp, comp_name, path, t, rank)
        z0 = initial_z(layer.d[:rank].cpu().double(), config.init).float()
        layer.add_adapter(adapter_name, LoLDUVector(z0, config.sigma0, trainable=True))
        layers.append(layer)
    for comp_name, comp in comps.items():
        configs = comp.__dict__.setdefault("_loldu_configs", {})
        configs[adapter_name] = config
    return layers


def loldu_parameters(model) -> list[nn.Parameter]:
    """The trainable z and σ tensors, nothing else."""
    params = {}  # (a loaded adapter's table, made to train by hand, is one tensor for all its layers)
    for *_, layer in iter_layers(model):
        for vec in layer.adapters.values():
            params.update({id(p): p for p in vec.tensors() if p.requires_grad})
    return list(params.values())


def adapter_names(model) -> list[str]:
    names: dict[str, None] = {}
    for *_, layer in iter_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def set_adapter_weights(model, weights: dict[str, float]) -> None:
    """Activate exactly the named adapters with these blend weights (negative allowed); the
    others become inactive. Recomputes nothing but the blended δ of each layer."""
    known = adapter_names(model)
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; loaded: {known}")
    bad = {n: w for n, w in weights.items() if not math.isfinite(float(w))}
    if bad:
        raise ValueError(f"adapter weights must be finite numbers, got {bad}")
    for *_, layer in iter_layers(model):
        if layer.fused_delta is not None:
            raise RuntimeError("the LoLDU adapters are fused: call unfuse_loldu(model) before changing weights")
        layer.weights = {n: float(w) for n, w in weights.items() if n in layer.adapters}


def get_adapter_weights(model) -> dict[str, float]:
    weights: dict[str, float] = {}
    for *_, layer in iter_layers(model):
        weights.update(layer.weights)
    return weights


def delete_adapter(model, adapter_name: str) -> None:
    """Remove the adapter from every layer, and the factors only it needed (a larger rank)."""
    for *_, layer in iter_layers(model):
        if adapter_name in layer.adapters:
            if layer.fused_delta is not None:
                raise RuntimeError("the LoLDU adapters are fused: call unfuse_loldu(model) first")
            layer.remove_adapter(adapter_name)
            layer.shrink_to_adapters()


def fuse_loldu(model) -> None:
    """W += L̃ diag(δ) U_r for every layer: inference at the base model's cost. All or nothing:
    if one layer cannot be fused, the ones already fused are restored and the error raised."""
    try:
        for comp, path, target, layer in iter_layers(model):
            try:
                layer.fuse()
            except OverflowError as e:
                raise OverflowError(f"{comp}.{path}.{target}: {e}") from None
    except BaseException:
        unfuse_loldu(model)
        raise


def unfuse_loldu(model) -> None:
    for *_, layer in iter_layers(model):
        layer.unfuse()


def set_loldu_enabled(model, enabled: bool) -> None:
    for *_, layer in iter_layers(model):
        if layer.fused_delta is not None:
            raise RuntimeError("the LoLDU adapters are fused: call unfuse_loldu(model) first")
        layer.enabled = enabled


@contextmanager
def loldu_disabled(model):
    """Run the base model (e.g. for a side-by-side or prior-preservation images)."""
    set_loldu_enabled(model, False)
    try:
        yield model
    finally:
        set_loldu_enabled(model, True)


def remove_loldu(model, keep_fused: bool = False) -> None:
    """Unfuse (unless keep_fused: bake the adapters into the weights for good), then restore
    the previous attention processors and drop all hooks and layers."""
    for *_, layer in iter_layers(model):
        if keep_fused:
            layer.forget_fused()
        else:
            layer.unfuse()
    for comp_name, comp in components(model).items():
        sites_for(comp_name).remove(comp)
        remove_guard(comp)
        comp.__dict__.pop("_loldu_configs", None)
