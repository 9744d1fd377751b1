"""The LoLDU side path of one frozen linear layer.

    h = W x + L̃ (δ ⊙ (U_r x)),   δ = Σ_a w_a (σ_a z_a − σ₀ z₀_a)

The base weight W is never modified (except by an explicit `fuse`), so the output at
injection equals the base model's for every init, and an adapter is fully described relative
to the pristine base by δ. Several named adapters on one layer blend by summing their δ's
(rank-r factors are prefixes of rank-R ones): one low-rank product whatever their number.

That sum is cached: it is recomputed only when the adapters, their weights or their values
change (tensor version counters), and computed live, with gradients, only while one of the
active adapters trains. A blend of 16 loaded adapters then costs one adapter per forward.

Serving: per-sample blends (`sample_weights`, one blend per sample of the batch) give each
sample its own δ in the same call, h_b = W x_b + L̃ (δ_b ⊙ (U_r x_b)): batch row j uses sample
j mod S, so a classifier-free-guidance batch [uncond; cond] maps both halves to the same δ_b.

`refresh()` brings the cached blends up to date; the forward calls it when eager, and
`compile.compile_unet` calls it before every compiled forward, which then only reads tensors.

Fusing keeps a CPU copy of the weight it changes, and unfusing restores that copy: W + Δ − Δ
is not W in floating point, and a served base must come back bit for bit whatever was fused.
"""
from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from .ldu import decompose_ldu


def initial_z(d: torch.Tensor, init: str) -> torch.Tensor:
    """z₀ for the paper's init ablation; d: (r,) the LDU diagonal. Uses torch's global RNG."""
    m = d.mean()
    if init == "lu":
        return d.clone()
    if init == "uniform":
        return (torch.rand(d.shape, dtype=d.dtype) - 0.5) * m  # U(−m/2, m/2)
    if init == "constant":
        return torch.full_like(d, float(m))
    if init == "normal":
        return m + d.std() * torch.randn(d.shape, dtype=d.dtype)
    if init == "ones":
        return torch.ones_like(d)
    if init == "zeros":
        return torch.zeros_like(d)
    raise ValueError(f"unknown init {init!r}")


class LoLDUVector(nn.Module):
    """One adapter's values on one layer: δ = σ z − σ₀ z₀ (r + 1 trainable numbers)."""

    def __init__(self, z0: torch.Tensor, sigma0: float, trainable: bool):
        super().__init__()
        z0 = z0.detach().to(torch.float32)
        self.z = nn.Parameter(z0.clone(), requires_grad=trainable)  # (r,)
        self.sigma = nn.Parameter(torch.tensor(float(sigma0), device=z0.device), requires_grad=trainable)
        self.register_buffer("z0", z0.clone())
        self.register_buffer("sigma0", torch.tensor(float(sigma0), device=z0.device))

    @property
    def rank(self) -> int:
        return self.z.shape[0]

    def delta(self) -> torch.Tensor:  # (r,)
        return self.sigma * self.z - self.sigma0 * self.z0

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What δ is computed from that may train or be edited in place (version counters)."""
        return self.z, self.sigma

    @classmethod
    def fixed(cls, delta: torch.Tensor) -> "LoLDUVector":
        """A vector of given δ that does not train (z = δ, σ = 1, z₀ = 0, σ₀ = 0)."""
        v = cls(delta, 1.0, trainable=False)
        v.z0.zero_()
        v.sigma0.zero_()
        return v


class DeltaTable:
    """A loaded adapter's δ on every layer of one component: (layers, r), one row per layer.
    One tensor, so one version counter says whether any row was edited in place (guard.py
    checks a loaded adapter once per call, not once per layer) and a move (`.to()`) of the
    component copies it once."""

    __slots__ = ("z", "_moved")

    def __init__(self, z: torch.Tensor):
        self.z = z  # (layers, r) float32
        self._moved = None  # (fn, the table it gave): the other rows of the same pass take that one

    def moved(self, fn) -> "DeltaTable":
        """This table under a module's `.to()` / `.half()` / … function: a new table, made once per
        pass (every layer of a moved component passes the same function on), so the layers of one
        pass share it, and layers the pass did not reach keep this one where it is."""
        if self._moved is None or self._moved[0] is not fn:
            with torch.no_grad():  # as Module._apply: a copy, not a step of the autograd graph
                z = fn(self.z).requires_grad_(self.z.requires_grad)
            self._moved = (fn, DeltaTable(z))
        return self._moved[1]

    def __getstate__(self):  # (a closure of .to() does not pickle)
        return {"z": self.z}

    def __setstate__(self, state):
        self.z, self._moved = state["z"], None


class LoadedDelta:
    """A loaded adapter on one layer: the first `rank` entries of row `row` of its DeltaTable.
    Not a module: a server holding thousands of adapters keeps 128 of these per SD 1.5 adapter,
    and a module's own bookkeeping (a dozen dicts, four tensors) was ~3 KB each, 30× its numbers,
    and most of a load's time."""

    __slots__ = ("table", "row", "rank")

    def __init__(self, table: DeltaTable, row: int, rank: int):
        self.table, self.row, self.rank = table, row, rank

    @classmethod
    def rows(cls, deltas: torch.Tensor, ranks: list[int]) -> list["LoadedDelta"]:
        """One per row of `deltas` (layers, r), row i holding its first ranks[i] entries."""
        table = DeltaTable(deltas.detach().to(dtype=torch.float32, copy=True))
        return [cls(table, i, rank) for i, rank in enumerate(ranks)]

    @property
    def z(self) -> torch.Tensor:  # (rank,) a new view at each read: an in-place edit changes the table
        return self.table.z[self.row, : self.rank]

    def delta(self) -> torch.Tensor:  # (rank,) a copy: a layer's cached blend must not alias the adapter
        return self.z.clone()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.table.z,)


class AdapterDict(nn.ModuleDict):
    """A layer's adapters by name, in the order added: LoLDUVector modules (their values train
    and are in the state dict, under `adapters.<name>`) and LoadedDelta rows (no module each);
    moving the layer moves both."""

    def __init__(self):
        super().__init__()
        self._entries: dict[str, LoLDUVector | LoadedDelta] = {}

    def __getitem__(self, name: str):
        return self._entries[name]

    def __setitem__(self, name: str, value) -> None:
        self._modules.pop(name, None)
        if isinstance(value, nn.Module):
            self.add_module(name, value)
        self._entries[name] = value

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._modules.pop(name, None)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return self._entries.keys()

    def values(self):
        return self._entries.values()

    def items(self):
        return self._entries.items()

    def clear(self) -> None:
        self._entries.clear()
        self._modules.clear()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for v in self._entries.values():
            if isinstance(v, LoadedDelta):
                v.table = v.table.moved(fn)
        return self

    def extra_repr(self) -> str:
        loaded = [n for n, v in self._entries.items() if isinstance(v, LoadedDelta)]
        return f"loaded={loaded}" if loaded else ""


class LoLDULayer(nn.Module):
    """Factors of one base linear (fp32 buffers, whatever the base dtype) and its adapters."""

    def __init__(self, base: nn.Linear, rank: int, factors=None):
        super().__init__()
        self._base = [base]  # a plain reference: the base weight stays where the base model keeps it
        self.adapters = AdapterDict()
        self._weights: dict[str, float] = {}  # adapter name → blend weight; absent = inactive
        self.enabled = True
        self.fused_delta: torch.Tensor | None = None
        self._saved_weight: torch.Tensor | None = None  # the base weight as it was before fuse
        self._sample_weights: list[dict[str, float]] | None = None  # one blend per sample, while serving a batch
        self._plan = None  # (shared active, per-sample actives, their values) until adapters or weights change
        self._cache_key = None  # version counters of the active values when the cache was computed
        self._live = False  # an active adapter trains: blends are computed in the forward
        self._guard = None  # the component's BlendGuard (guard.py), once it has seen this layer
        self._guard_generation = -1
        self._rows_cache = None
        # buffers so that .to() / .half() move them with the factors; never saved
        self.register_buffer("_delta_cache", None, persistent=False)  # (r,) the shared blend
        self.register_buffer("_sample_cache", None, persistent=False)  # (S, r) one blend per sample
        self._set_factors(rank, factors)
        self.first_rank = self.rank  # what the layer was made for: the floor when factors shrink back (shrink_to_adapters)

    @property
    def weights(self):
        """Adapter name → blend weight (read-only: assign a new dict to change it)."""
        return MappingProxyType(self._weights)

    @weights.setter
    def weights(self, weights: dict) -> None:
        self._weights = {str(n): float(w) for n, w in weights.items()}
        self._invalidate()

    @property
    def sample_weights(self):
        """One blend {adapter name: weight} per sample, or None (every sample uses `weights`)."""
        return self._sample_weights

    @sample_weights.setter
    def sample_weights(self, blends) -> None:
        self._sample_weights = None if blends is None else [{str(n): float(w) for n, w in b.items()} for b in blends]
        self._invalidate()

    def _invalidate(self) -> None:
        # straight into the dicts nn.Module.__setattr__ would reach after its checks: this runs for every layer on every
        # adapter load, where those checks were a sixth of the load's time
        self.__dict__.update(_plan=None, _cache_key=None, _rows_cache=None)  # _rows_cache: ((S, r) δ, (R, ndim), (R, 1…, r))
        self._buffers.update(_delta_cache=None, _sample_cache=None)
        if self._guard is not None:
            self._guard.values_changed()

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), …: the plan's tensors may be new ones
        self._invalidate()
        return super()._apply(fn, *args, **kwargs)

    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    @property
    def rank(self) -> int:
        return self.L.shape[1]

    def _set_factors(self, rank: int, factors=None) -> None:
        weight = self.base.weight
        f = factors if factors is not None and factors.L.shape[1] == rank else decompose_ldu(weight, rank)
        dev = weight.device
        self.register_buffer("L", f.L.to(dev, torch.float32), persistent=False)  # (out, R)
        self.register_buffer("U", f.U.to(dev, torch.float32), persistent=False)  # (R, in)
        self.register_buffer("d", f.d.to(dev, torch.float32), persistent=False)  # (R,)
        self.register_buffer("pivots", f.pivots.to(dev), persistent=False)  # (R,)

    def ensure_rank(self, rank: int) -> None:
        """Grow the factors to `rank`; the old ones are a prefix of the new (same pivots)."""
        if rank > self.rank:
            if self.fused_delta is not None:
                raise RuntimeError("unfuse the LoLDU adapters before loading one of a larger rank")
            old_pivots = self.pivots.clone()
            self._set_factors(rank)
            assert torch.equal(self.pivots[: old_pivots.shape[0]], old_pivots)

    def shrink_to_adapters(self) -> None:
        """Cut the factors back to the largest rank the layer still needs (its adapters', and no
        less than it was made with) after an adapter of a larger rank left: one full-rank upload
        would otherwise keep twice the base weight in factors for the life of a server. The
        factors of rank r are the first r of larger ones (same pivots), so outputs do not change."""
        keep = max([self.first_rank] + [v.rank for v in self.adapters.values()])
        if keep < self.rank and self.fused_delta is None:
            for name, t in (("L", self.L[:, :keep]), ("U", self.U[:keep]), ("d", self.d[:keep]), ("pivots", self.pivots[:keep])):
                self.register_buffer(name, t.clone(), persistent=False)  # a clone: a view would keep the large storage
            self._invalidate()

    def factors_at(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pivots (rank,), d (rank,)) of this layer's LDU at `rank`, leaving the layer as it is:
        a file stores every row at one rank, the largest of the layers it holds."""
        if rank <= self.rank:
            return self.pivots[:rank], self.d[:rank]
        if self.fused_delta is not None:
            raise RuntimeError("unfuse the LoLDU adapters before saving a blend of adapters of several ranks")
        f = decompose_ldu(self.base.weight, rank)
        assert torch.equal(f.pivots[: self.rank].to(self.pivots.device), self.pivots)
        return f.pivots, f.d

    def add_adapter(self, name: str, vector: LoLDUVector | LoadedDelta, weight: float = 1.0) -> None:
        if vector.rank > self.rank:
            self.ensure_rank(vector.rank)
        if isinstance(vector, LoLDUVector):
            vector = vector.to(self.L.device)
        elif vector.table.z.device != self.L.device:  # a layer placed apart from the others (device_map): a row of its own
            vector = LoadedDelta(DeltaTable(vector.z.to(self.L.device, copy=True)[None]), 0, vector.rank)
        self.adapters[name] = vector
        self._weights[name] = float(weight)
        self._invalidate()

    def remove_adapter(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        self._weights.pop(name, None)
        self._invalidate()

    def _active(self, weights: dict[str, float]) -> list:
        return [(self.adapters[n], w) for n, w in weights.items() if w != 0.0 and n in self.adapters]

    def refresh(self) -> None:
        """Recompute the cached blends if adapters, weights or values changed (eager only)."""
        self._ensure_plan()
        active, samples, values, _ = self._plan
        self._live = any(t.requires_grad for t in values)  # read each time: a trainer may freeze or unfreeze
        if self._live:
            return  # computed in the forward, with gradients to what trains
        key = [t._version for t in values]  # in-place edits of an adapter's values bump these
        if key != self._cache_key:
            with torch.no_grad():
                self._delta_cache = self._blend(active) if active else None
                self._sample_cache = None if samples is None else self._stack(samples)
            self._cache_key = key

    def _ensure_plan(self) -> None:
        """Which adapter vectors (and values) the blends read, until adapters or weights change."""
        if self._plan is None:
            active = self._active(self._weights)
            samples = None if self._sample_weights is None else [self._active(b) for b in self._sample_weights]
            vecs = {id(v): v for a in [active] + (samples or []) for v, _ in a}.values()
            values = [t for v in vecs for t in v.tensors()]
            self._plan = (active, samples, values, list(vecs))
            self._cache_key = None

    def plan_vectors(self) -> list[LoLDUVector | LoadedDelta]:
        """The adapter vectors the cached blends are computed from."""
        self._ensure_plan()
        return self._plan[3]

    def _check(self) -> None:
        """Refresh unless compiling or the component's guard has checked this call already."""
        if torch.compiler.is_compiling():
            return
        guard = self._guard
        if self._plan is None or guard is None or not guard.covers(self):
            if guard is not None and guard.depth > 0:  # run by its component, yet not in the guard's list (processors
                guard.layers_changed()  # swapped since it looked): look again at the next call
            self.refresh()

    def delta_vector(self) -> torch.Tensor | None:
        """Σ_a w_a δ_a of the shared blend, zero-padded to the largest active rank: (r,) or None.
        Cached unless an active adapter trains."""
        self._check()
        active = self._plan[0]
        if self._live:
            return self._blend(active) if active else None
        return self._delta_cache

    def sample_deltas(self) -> torch.Tensor | None:
        """(S, r): one blended δ per sample (zero rows for samples without an adapter), or None
        when no per-sample blends are set or none of them touches this layer."""
        self._check()
        samples = self._plan[1]
        return self._stack(samples) if self._live and samples is not None else self._sample_cache

    def _stack(self, samples) -> torch.Tensor | None:
        if not any(samples):
            return None
        vecs = [a[0][0] for a in samples if len(a) == 1 and a[0][1] == 1.0 and isinstance(a[0][0], LoLDUVector)]
        if len(vecs) == len(samples) and len({v.rank for v in vecs}) == 1:
            # one adapter per sample, as K subjects training together: a few stacked ops (and as
            # many autograd nodes) instead of ~4 per sample; the same values bit for bit as delta()
            z, sigma = torch.stack([v.z for v in vecs]), torch.stack([v.sigma for v in vecs])  # (S, r), (S,)
            z0, sigma0 = torch.stack([v.z0 for v in vecs]), torch.stack([v.sigma0 for v in vecs])
            return sigma[:, None] * z - sigma0[:, None] * z0  # (S, r)
        rank = max(v.rank for a in samples for v, _ in a)
        rows = [F.pad(self._blend(a), (0, rank - self._blend_rank(a))) if a else self.L.new_zeros(rank) for a in samples]
        return torch.stack(rows)  # (S, rank)

    @staticmethod
    def _blend_rank(active) -> int:
        return max(v.rank for v, _ in active)

    def _blend(self, active) -> torch.Tensor:  # (max rank of active,)
        if len(active) == 1:
            vec, w = active[0]
            return vec.delta() if w == 1.0 else w * vec.delta()
        total = torch.zeros(self._blend_rank(active), device=self.L.device)
        for vec, w in active:
            total = total + F.pad(w * vec.delta(), (0, total.shape[0] - vec.rank))
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The side path L̃ (δ ⊙ (U_r x)) for x (R, ..., in), or None when there is nothing to add."""
        if not self.enabled or self.fused_delta is not None:
            return None
        if self._sample_weights is not None:
            return self._forward_samples(x)
        delta = self.delta_vector()
        if delta is None:
            return None
        r = delta.shape[0]
        h = F.linear(x.to(self.U.dtype), self.U[:r]) * delta  # (..., r)
        return F.linear(h, self.L[:, :r]).to(x.dtype)  # (..., out)

    def _forward_samples(self, x: torch.Tensor) -> torch.Tensor | None:
        deltas = self.sample_deltas()  # (S, r)
        if deltas is None:
            return None
        (n_samples, r), rows = deltas.shape, x.shape[0]
        if rows % n_samples:
            raise ValueError(f"a batch of {rows} rows for {n_samples} per-sample adapter blends: give one blend per "
                             "image (one prompt per blend, num_images_per_prompt=1)")
        d = self._rows_of(deltas, rows, x.ndim)  # (R, 1…, r)
        h = F.linear(x.to(self.U.dtype), self.U[:r]) * d  # (R, ..., r)
        return F.linear(h, self.L[:, :r]).to(x.dtype)  # (R, ..., out)

    def _rows_of(self, deltas: torch.Tensor, rows: int, ndim: int) -> torch.Tensor:
        """(R, 1…, r): row j's δ is sample j mod S's ([uncond; cond] halves of a guidance batch
        share their sample's). Laid out once per batch shape while serving, not at every layer
        call of every denoising step (a copy per call was 2 % of a quick-UNet forward)."""
        cached = self._rows_cache
        if cached is not None and cached[0] is deltas and cached[1] == (rows, ndim):
            return cached[2]
        n_samples, r = deltas.shape
        d = deltas.repeat(rows // n_samples, 1).view(rows, *([1] * (ndim - 2)), r)
        if not self._live and not torch.compiler.is_compiling():
            self._rows_cache = (deltas, (rows, ndim), d)
        return d

    def delta_weight(self, delta: torch.Tensor) -> torch.Tensor:
        r = delta.shape[0]
        return (self.L[:, :r] * delta) @ self.U[:r]  # (out, in) = L̃ diag(δ) U_r

    @torch.no_grad()
    def fuse(self) -> None:
        """W += L̃ diag(δ) U_r, keeping a copy of W for `unfuse`. Refuses (W unchanged) if the
        result does not fit the weight's dtype."""
        if self.fused_delta is not None:
            return
        if self._sample_weights is not None:
            raise RuntimeError("per-sample adapter blends are set: a fused weight would serve one blend to every sample")
        delta = self.delta_vector()
        if delta is None or not self.enabled:
            return
        w = self.base.weight
        fused = w.data + self.delta_weight(delta.detach()).to(w.dtype)
        if not torch.isfinite(fused).all():
            raise OverflowError(f"fusing gives non-finite {w.dtype} weights (shape {tuple(w.shape)}): "
                                "run this adapter unfused")
        self._saved_weight = w.detach().to("cpu", copy=True)
        w.data.copy_(fused)
        self.fused_delta = delta.detach().clone()

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore W exactly as it was before `fuse`."""
        if self.fused_delta is None:
            return
        self.base.weight.data.copy_(self._saved_weight)
        self._saved_weight = None
        self.fused_delta = None

    def forget_fused(self) -> None:
        """Keep the fused weights for good (remove_loldu(keep_fused=True)): drop the copy."""
        self._saved_weight = None
        self.fused_delta = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, adapters={dict(self.weights)}"
