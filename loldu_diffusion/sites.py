"""Where LoLDU layers live in a model, behind one small interface.

Two kinds of site, one class each:
    AttentionSites  diffusers attentions (the UNet): each adapted attention gets a
                    `LoLDUAttnProcessor`, which holds the layers of its projections. This is
                    how LoLDU enters the UNet, and how an SD3/Flux transformer would.
    LinearSites     plain nn.Linear projections (CLIP text encoders, which have no
                    processors): the `LoLDULayer` is a child named `loldu` and a forward hook
                    adds its delta. The base's own state-dict keys do not change.

Both answer the same questions: which projections a component has (`adaptable`), which of
them a target list selects (`find`), the nn.Linear at a (module path, target), attaching a
layer there, iterating the layers, undoing an attach, removing everything. model.py,
adapter_file.py and the methods see only this; adding a model family means mapping its
component name to a kind of site in `SITES`.
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn

from .layer import LoLDULayer
from .processor import UNET_TARGETS, LoLDUAttnProcessor, projection


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


def _walk(component: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) as `named_modules()` gives them, without descending into what LoLDU added
    (processors, layers and their adapters' vectors): those grow with every loaded adapter, so a
    full walk made each load slower than the last (69 → 191 ms at SD size over 60 adapters)."""
    seen, stack = set(), [("", component)]
    while stack:
        path, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield path, m
        children = [(f"{path}.{name}" if path else name, child) for name, child in m._modules.items()
                    if child is not None and not isinstance(child, (LoLDUAttnProcessor, LoLDULayer))]
        stack.extend(reversed(children))  # pre-order, children in registration order: named_modules' order


_scope = threading.local()  # .walks: {(kind, id(component)): (component, result)} inside fixed_module_trees()


@contextmanager
def fixed_module_trees():
    """A block in which no component's module tree changes (loading an adapter only sets
    processors, hooks and LoLDU layers, which the walks do not enter): each component is walked
    once, not once per question (five walks and a get_submodule per row were most of a load's
    time at SD size). Nested blocks share the outer one's walks; each thread has its own."""
    if getattr(_scope, "walks", None) is not None:
        yield
        return
    _scope.walks = {}
    try:
        yield
    finally:
        _scope.walks = None


def _walked(kind: str, component: nn.Module, compute):
    walks = getattr(_scope, "walks", None)
    if walks is None:
        return compute()
    key = (kind, id(component))
    if key not in walks:
        walks[key] = (component, compute())  # holding the component keeps its id from being reused in the block
    return walks[key][1]


def base_modules(component: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the component's own modules, in named_modules' order (see _walk)."""
    return _walked("modules", component, lambda: list(_walk(component)))


def _submodule_or_none(component: nn.Module, path: str) -> nn.Module | None:
    try:
        return resolve_submodule(component, path)
    except AttributeError:
        return None


def canonical_path(comp_name: str, path: str) -> str:
    """Text-encoder layer names as in HF CLIP checkpoints ('text_model.encoder.layers.0…'):
    transformers 5's CLIPTextModel dropped the 'text_model.' level that 4.x (and
    CLIPTextModelWithProjection) have, and adapter files must load under both."""
    if comp_name == "unet" or path.startswith("text_model"):
        return path
    return f"text_model.{path}" if path else "text_model"


class AttentionSites:
    """Projections of diffusers `Attention` modules, adapted through their processor."""

    targets = UNET_TARGETS
    optional_targets = {"add_k_proj", "add_v_proj"}  # these exist only in some UNets

    def __init__(self, comp_name: str):
        self.comp_name = comp_name

    @staticmethod
    def attentions(component: nn.Module) -> dict[str, nn.Module]:
        return _walked("attentions", component, lambda: {name: m for name, m in base_modules(component)
                                                         if getattr(type(m), "set_processor", None) is not None and hasattr(m, "processor")})

    def _attention_at(self, component, path: str) -> nn.Module | None:
        """The module at `path` (None if none): from the block's walk inside fixed_module_trees()."""
        if getattr(_scope, "walks", None) is not None and (attn := self.attentions(component).get(path)) is not None:
            return attn
        return _submodule_or_none(component, path)

    def adaptable(self, component) -> set[tuple[str, str]]:
        return {(p, t) for p, attn in self.attentions(component).items() for t in self.targets if projection(attn, t) is not None}

    def split_scope(self, target: str) -> tuple[str, str]:
        """'attn2.to_k' → ('attn2', 'to_k'): a target may name the attentions it applies to by the
        end of their module path (Custom Diffusion's cross-attention-only K/V, as PEFT's suffix
        matching of target_modules does); a bare projection name applies to every attention."""
        for proj in sorted(self.targets, key=len, reverse=True):
            if target == proj:
                return "", proj
            if target.endswith("." + proj):
                return target[: -len(proj) - 1], proj
        return "", target

    def find(self, component, targets: tuple[str, ...]) -> list[tuple[str, str]]:
        found, hit = {}, set()
        scoped = [(t, *self.split_scope(t)) for t in targets]
        for path, attn in self.attentions(component).items():
            for t, scope, proj in scoped:
                if (not scope or path == scope or path.endswith("." + scope)) and projection(attn, proj) is not None:
                    found[(path, proj)] = None  # 'to_k' and 'attn2.to_k' together select a layer once
                    hit.add(t)
        missing = set(targets) - hit
        if not found:
            raise ValueError(f"{self.comp_name}: target modules {sorted(missing)} not found (targets asked: {list(targets)})")
        if missing - self.optional_targets:
            raise ValueError(f"{self.comp_name}: target modules {sorted(missing)} not found in any attention")
        return list(found)

    def linear(self, component, path: str, target: str) -> nn.Linear | None:
        module = self._attention_at(component, path)
        return projection(module, target) if hasattr(module, "set_processor") else None

    def name_problem(self, path: str, target: str) -> str | None:
        if target not in self.targets or path.split(".")[0] == "text_model":
            return f"is not a UNet attention projection ({', '.join(self.targets)})"
        return None

    def install(self, component, paths) -> None:
        """Give every listed attention a (still empty) processor, in one set_attn_processor call."""
        changes = {}
        for path in dict.fromkeys(paths):
            attn = self._attention_at(component, path)
            if attn is None:
                raise AttributeError(f"no submodule {path!r}")
            if not isinstance(attn.processor, LoLDUAttnProcessor):
                changes[path] = LoLDUAttnProcessor(attn, (), 0, previous=attn.processor)
        if changes:
            self._set_processors(component, changes)

    def attach(self, component, path: str, target: str, rank: int, factors=None) -> LoLDULayer:
        module = self._attention_at(component, path)
        if module is None:
            raise AttributeError(f"no submodule {path!r}")
        proc = module.processor
        if not isinstance(proc, LoLDUAttnProcessor):
            proc = LoLDUAttnProcessor(module, (), rank, previous=proc)
            self._set_processors(component, {path: proc})
        if proc.layer(target) is None:
            linear = projection(module, target)
            if linear is None:
                raise KeyError(f"{self.comp_name}.{path} has no linear projection {target!r}")
            proc.add_layer(target, LoLDULayer(linear, rank, factors))
        return proc.layer(target)

    def layers(self, component) -> Iterator[tuple[str, str, LoLDULayer]]:
        for path, attn in self.attentions(component).items():
            if isinstance(attn.processor, LoLDUAttnProcessor):
                for t in attn.processor.targets:
                    yield path, t, attn.processor.layer(t)

    def snapshot(self, component) -> Callable[[], None]:
        """A function that puts the processors and their layers back as they are now."""
        procs = {f"{path}.processor": attn.processor for path, attn in self.attentions(component).items()}  # attn_processors' keys
        kept = {id(p): (p, p.targets, set(p.layers)) for p in procs.values() if isinstance(p, LoLDUAttnProcessor)}

        def undo():
            for proc, targets, keys in kept.values():
                proc.targets = targets
                for k in set(proc.layers) - keys:
                    del proc.layers[k]
            component.set_attn_processor(dict(procs))

        return undo

    def remove(self, component) -> None:
        changes = {p: a.processor.previous for p, a in self.attentions(component).items() if isinstance(a.processor, LoLDUAttnProcessor)}
        if changes:
            self._set_processors(component, changes)

    def _set_processors(self, component, changes: dict[str, object]) -> None:
        """set_attn_processor with a full dict: `changes` by module path, the rest kept."""
        component.set_attn_processor({f"{path}.processor": changes.get(path, attn.processor) for path, attn in self.attentions(component).items()})


def _hook(linear, args, output):
    delta = linear.loldu(args[0])
    return output if delta is None else output + delta


class LinearSites:
    """nn.Linear projections adapted through a forward hook (CLIP text encoders)."""

    def __init__(self, comp_name: str):
        self.comp_name = comp_name

    def adaptable(self, component) -> set[tuple[str, str]]:
        found = set()
        for path, m in base_modules(component):
            parent, _, leaf = path.rpartition(".")
            if isinstance(m, nn.Linear):  # (base_modules never enters a LoLDULayer)
                found.add((canonical_path(self.comp_name, parent), leaf))
        return found

    def find(self, component, targets: tuple[str, ...]) -> list[tuple[str, str]]:
        found = []
        for path, m in base_modules(component):
            parent, _, leaf = path.rpartition(".")
            if leaf in targets and isinstance(m, nn.Linear):
                found.append((canonical_path(self.comp_name, parent), leaf))
        missing = set(targets) - {t for _, t in found}
        if not found or missing:
            raise ValueError(f"{self.comp_name}: target modules {sorted(missing)} not found (targets asked: {list(targets)})")
        return found

    def linear(self, component, path: str, target: str) -> nn.Linear | None:
        lin = getattr(_submodule_or_none(component, path), target, None)
        return lin if isinstance(lin, nn.Linear) else None

    def name_problem(self, path: str, target: str) -> str | None:
        if not _IDENTIFIER.fullmatch(target) or path.split(".")[0] != "text_model":
            return "is not a text-encoder projection named as in CLIP checkpoints ('text_model.encoder.layers.N.self_attn', 'q_proj')"
        return None

    def install(self, component, paths) -> None:
        pass  # hooks are added per layer

    def attach(self, component, path: str, target: str, rank: int, factors=None) -> LoLDULayer:
        linear = resolve_submodule(component, path).get_submodule(target)
        if not isinstance(getattr(linear, "loldu", None), LoLDULayer):
            if not isinstance(linear, nn.Linear):
                raise KeyError(f"{self.comp_name}.{path}.{target} is not a linear layer")
            linear.loldu = LoLDULayer(linear, rank, factors)
            linear._loldu_hook = linear.register_forward_hook(_hook)
        return linear.loldu

    @staticmethod
    def _hooked(component) -> list[tuple[str, nn.Linear]]:
        """(path, linear) of every projection carrying a LoLDULayer, listed before any is unhooked."""
        return [(path, m) for path, m in base_modules(component) if isinstance(getattr(m, "loldu", None), LoLDULayer)]

    def layers(self, component) -> Iterator[tuple[str, str, LoLDULayer]]:
        for path, m in self._hooked(component):
            parent, _, leaf = path.rpartition(".")
            yield canonical_path(self.comp_name, parent), leaf, m.loldu

    def snapshot(self, component) -> Callable[[], None]:
        hooked = {id(m) for _, m in self._hooked(component)}

        def undo():
            for _, m in self._hooked(component):
                if id(m) not in hooked:
                    self._unhook(m)

        return undo

    def remove(self, component) -> None:
        for _, m in self._hooked(component):
            self._unhook(m)

    @staticmethod
    def _unhook(m) -> None:
        m._loldu_hook.remove()
        del m.loldu
        del m._loldu_hook


# component name → kind of site; anything else (text_encoder, text_encoder_2) is LinearSites
SITES = {"unet": AttentionSites}


def sites_for(comp_name: str):
    return SITES.get(comp_name, LinearSites)(comp_name)
