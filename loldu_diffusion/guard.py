"""One freshness check per model call, not one per layer per call.

Each LoLDU layer caches its blended δ and must notice when adapters, weights or values change
(layer.py). Checked inside every layer's forward, that costs a Python pass over every active
adapter's values in every layer: adapters × layers reads of version counters on each UNet call,
which a blend of 16 adapters pays in full. `BlendGuard` checks once, when its component (a UNet,
a text encoder) is called: a loaded adapter's rows are one tensor per component
(layer.DeltaTable), so one version counter per loaded adapter says whether any was edited;
requires_grad flags are read only where gradients are recorded. If nothing changed the layers
keep their cached blends, and the layers it covers skip their own check while the component runs. A layer called any other way (a direct call, a
recomputation in backward under gradient checkpointing, a layer the guard has not seen yet)
checks itself as before.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .sites import sites_for


class BlendGuard:
    def __init__(self, comp_name: str):
        self.comp_name = comp_name
        self.depth = 0  # > 0 while the component runs (nested calls count)
        self.outer = None  # the frame of the outermost running call (while depth > 0)
        self.generation = 0  # bumped when the covered layers are looked up again
        self.layers: list | None = None  # None: look them up at the next call
        self.values: list | None = None  # the tensors of every covered layer's active adapters; None: collect again
        self.key = None
        self.handles = []

    def __getstate__(self):  # a copy (deepcopy, pickle) of the component looks its layers up again
        return self.__dict__ | {"depth": 0, "outer": None, "layers": None, "values": None, "key": None}

    def install(self, component: nn.Module) -> "BlendGuard":
        self.handles = [component.register_forward_pre_hook(self.enter),
                        component.register_forward_hook(self.leave, always_call=True)]
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for layer in self.layers or ():
            layer._guard = None

    def layers_changed(self) -> None:
        self.layers = None

    def values_changed(self) -> None:
        self.values = None

    def covers(self, layer) -> bool:
        return self.depth > 0 and layer._guard_generation == self.generation

    def enter(self, component, args) -> None:
        if not torch.compiler.is_compiling():
            caller = sys._getframe(1)  # nn.Module's call of the component
            if self.depth > 0 and not self._inside_outer(caller):
                # the last call never left: torch runs always_call hooks after an Exception only, so a KeyboardInterrupt
                # (a notebook's stop button) skipped `leave`, and a guard stuck "running" would never check again
                self.depth = 0
            if self.depth == 0:
                self.outer = caller
                self.check(component)
        self.depth += 1

    def _inside_outer(self, frame) -> bool:
        f = frame.f_back
        while f is not None:
            if f is self.outer:
                return True
            f = f.f_back
        return False

    def leave(self, component, args, output) -> None:
        self.depth -= 1
        if self.depth <= 0:
            self.depth, self.outer = 0, None  # the frame holds the call's inputs: not a moment longer

    def check(self, component) -> None:
        if self.layers is None:
            self.generation += 1
            self.layers = [layer for _, _, layer in sites_for(self.comp_name).layers(component)]
            for layer in self.layers:
                layer._guard, layer._guard_generation = self, self.generation
            self.values = None
        if self.values is None:
            vectors = {id(v): v for layer in self.layers for v in layer.plan_vectors()}.values()
            self.values = list({id(t): t for v in vectors for t in v.tensors()}.values())
            self.key = None
        key = [t._version for t in self.values]
        if torch.is_grad_enabled():  # whether a value trains matters only where gradients are recorded
            key += [t.requires_grad for t in self.values]
        if key != self.key:
            for layer in self.layers:
                layer.refresh()
            self.key = key


def guard_of(component: nn.Module, comp_name: str) -> BlendGuard:
    """The component's guard, installed on first use."""
    guard = component.__dict__.get("_loldu_guard")
    if guard is None:
        guard = component.__dict__["_loldu_guard"] = BlendGuard(comp_name).install(component)
    return guard


def remove_guard(component: nn.Module) -> None:
    guard = component.__dict__.pop("_loldu_guard", None)
    if guard is not None:
        guard.remove()
