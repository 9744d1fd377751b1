"""Model-level injection: find the layers to adapt in a pipeline, UNet or text encoder,
attach LoLDU to them, and act on all of them at once (weights, fuse, enable, remove).

UNet attentions get a `LoLDUAttnProcessor` through `unet.set_attn_processor`. CLIP text
encoders have no processors, so each targeted projection gets a forward hook and its
`LoLDULayer` as a child named `loldu`; the base model's own state-dict keys do not change.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .config import LoLDUConfig
from .layer import LoLDULayer, LoLDUVector, initial_z
from .processor import LoLDUAttnProcessor, projection

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


def _attentions(unet: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in unet.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}


def iter_layers(model) -> Iterator[tuple[str, str, str, LoLDULayer]]:
    """(component, module path, target, layer) for every injected layer, in a fixed order."""
    for comp, module in components(model).items():
        if comp == "unet":
            for path, attn in _attentions(module).items():
                if isinstance(attn.processor, LoLDUAttnProcessor):
                    for t in attn.processor.targets:
                        yield comp, path, t, attn.processor.layer(t)
        else:
            for path, m in module.named_modules():
                if isinstance(getattr(m, "loldu", None), LoLDULayer):
                    parent, _, leaf = path.rpartition(".")
                    yield comp, canonical_path(comp, parent), leaf, m.loldu


def canonical_path(comp_name: str, path: str) -> str:
    """Text-encoder layer names as in HF CLIP checkpoints ('text_model.encoder.layers.0…'):
    transformers 5's CLIPTextModel dropped the 'text_model.' level that 4.x (and
    CLIPTextModelWithProjection) have, and adapter files must load under both."""
    if comp_name == "unet" or path.startswith("text_model"):
        return path
    return f"text_model.{path}" if path else "text_model"


def resolve_submodule(component: nn.Module, path: str) -> nn.Module:
    """component.get_submodule(path), accepting names with or without the 'text_model.' level."""
    candidates = [path]
    if path == "text_model" or path.startswith("text_model."):
        candidates.append(path[len("text_model.") :] if "." in path else "")
    else:
        candidates.append(f"text_model.{path}" if path else "text_model")
    for p in candidates:
        try:
            return component.get_submodule(p) if p else component
        except AttributeError:
            continue
    raise AttributeError(f"no submodule {path!r}")


def _te_hook(linear, args, output):
    delta = linear.loldu(args[0])
    return output if delta is None else output + delta


def attach_layer(component: nn.Module, comp_name: str, module_path: str, target: str, rank: int, factors=None) -> LoLDULayer:
    """The LoLDULayer on (module_path, target), created (at `rank`, from precomputed LDU
    `factors` when given) if missing."""
    module = resolve_submodule(component, module_path)
    if comp_name == "unet":
        proc = module.processor
        if not isinstance(proc, LoLDUAttnProcessor):
            new = LoLDUAttnProcessor(module, (), rank, previous=proc)
            _set_processors(component, {module_path: new})
            proc = new
        if proc.layer(target) is None:
            linear = projection(module, target)
            if linear is None:
                raise KeyError(f"{comp_name}.{module_path} has no linear projection {target!r}")
            proc.layers[target.replace(".", "_")] = LoLDULayer(linear, rank, factors)
            proc.targets = proc.targets + (target,)
        layer = proc.layer(target)
    else:
        linear = module.get_submodule(target)
        if not isinstance(getattr(linear, "loldu", None), LoLDULayer):
            if not isinstance(linear, nn.Linear):
                raise KeyError(f"{comp_name}.{module_path}.{target} is not a linear layer")
            linear.loldu = LoLDULayer(linear, rank, factors)
            linear._loldu_hook = linear.register_forward_hook(_te_hook)
        layer = linear.loldu
    layer.ensure_rank(rank)
    return layer


@contextmanager
def all_or_nothing(model, adapter_name: str):
    """Undo a partial attach if the block fails: the adapter's vectors, new LoLDU layers,
    processors and text-encoder hooks. (Factors grown to a larger rank are kept: same output.)"""
    comps = components(model)
    procs = {c: dict(m.attn_processors) for c, m in comps.items() if c == "unet"}
    layers = {id(p): (p, p.targets, set(p.layers)) for c in procs for p in procs[c].values() if isinstance(p, LoLDUAttnProcessor)}
    hooked = {id(m) for c, comp in comps.items() if c != "unet" for m in comp.modules() if isinstance(getattr(m, "loldu", None), LoLDULayer)}
    try:
        yield
    except BaseException:
        for *_, layer in iter_layers(model):
            layer.remove_adapter(adapter_name)
        for proc, targets, keys in layers.values():
            proc.targets = targets
            for k in set(proc.layers) - keys:
                del proc.layers[k]
        for c, p in procs.items():
            comps[c].set_attn_processor(dict(p))
        for c, comp in comps.items():
            for m in comp.modules() if c != "unet" else ():
                if isinstance(getattr(m, "loldu", None), LoLDULayer) and id(m) not in hooked:
                    m._loldu_hook.remove()
                    del m.loldu
                    del m._loldu_hook
        raise


def install_processors(component: nn.Module, comp_name: str, module_paths) -> None:
    """Give every listed attention a (still empty) LoLDUAttnProcessor, with one
    unet.set_attn_processor call for all of them."""
    if comp_name != "unet":
        return
    changes = {}
    for path in dict.fromkeys(module_paths):
        attn = resolve_submodule(component, path)
        if not isinstance(attn.processor, LoLDUAttnProcessor):
            changes[path] = LoLDUAttnProcessor(attn, (), 0, previous=attn.processor)
    if changes:
        _set_processors(component, changes)


def _set_processors(unet: nn.Module, changes: dict[str, object]) -> None:
    """unet.set_attn_processor with a full dict: `changes` by module path, the rest kept."""
    procs = {f"{path}.processor": changes.get(path, attn.processor) for path, attn in _attentions(unet).items()}
    unet.set_attn_processor(procs)


def find_targets(component: nn.Module, comp_name: str, targets: tuple[str, ...]) -> list[tuple[str, str]]:
    """(module path, target) for every targeted projection present in the component."""
    found = []
    if comp_name == "unet":
        for path, attn in _attentions(component).items():
            found += [(path, t) for t in targets if projection(attn, t) is not None]
    else:
        for path, m in component.named_modules():
            parent, _, leaf = path.rpartition(".")
            if leaf in targets and isinstance(m, nn.Linear):
                found.append((canonical_path(comp_name, parent), leaf))
    missing = set(targets) - {t for _, t in found}
    if not found or (comp_name != "unet" and missing):
        raise ValueError(f"{comp_name}: target modules {sorted(missing)} not found (targets asked: {list(targets)})")
    if comp_name == "unet" and missing - {"add_k_proj", "add_v_proj"}:  # these exist only in some UNets
        raise ValueError(f"unet: target modules {sorted(missing)} not found in any attention")
    return found


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
        targets = config.unet_targets if comp_name == "unet" else config.text_encoder_targets
        if targets:
            plan += [(comp_name, comp, path, t) for path, t in find_targets(comp, comp_name, targets)]
    if not plan:
        raise ValueError("LoLDUConfig selects no layer in this model (check unet_targets / text_encoder_targets)")
    for layer in (lay for *_, lay in iter_layers(model)):
        if adapter_name in layer.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} is already injected; pick another adapter_name")
    for comp in {id(c): c for _, c, _, _ in plan}.values():
        comp.requires_grad_(False)
    for comp_name, comp in comps.items():
        install_processors(comp, comp_name, [path for c, _, path, _ in plan if c == comp_name])
    layers = []
    for comp_name, comp, path, t in plan:
        layer = attach_layer(comp, comp_name, path, t, config.rank)
        z0 = initial_z(layer.d[: config.rank].cpu().double(), config.init).float()
        layer.add_adapter(adapter_name, LoLDUVector(z0, config.sigma0, trainable=True))
        layers.append(layer)
    for comp_name, comp in comps.items():
        configs = comp.__dict__.setdefault("_loldu_configs", {})
        configs[adapter_name] = config
    return layers


def loldu_parameters(model) -> list[nn.Parameter]:
    """The trainable z and σ tensors, nothing else."""
    params = []
    for *_, layer in iter_layers(model):
        for vec in layer.adapters.values():
            params += [p for p in (vec.z, vec.sigma) if p.requires_grad]
    return params


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
    for *_, layer in iter_layers(model):
        if adapter_name in layer.adapters:
            if layer.fused_delta is not None:
                raise RuntimeError("the LoLDU adapters are fused: call unfuse_loldu(model) first")
            layer.remove_adapter(adapter_name)


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
        if comp_name == "unet":
            attns = _attentions(comp)
            changes = {p: a.processor.previous for p, a in attns.items() if isinstance(a.processor, LoLDUAttnProcessor)}
            if changes:
                _set_processors(comp, changes)
        else:
            for m in comp.modules():
                if isinstance(getattr(m, "loldu", None), LoLDULayer):
                    m._loldu_hook.remove()
                    del m.loldu
                    del m._loldu_hook
        comp.__dict__.pop("_loldu_configs", None)
