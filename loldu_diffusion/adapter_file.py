"""The adapter file: safetensors only, a few kilobytes, checked against the base on load.

Per component ("unet", "text_encoder", "text_encoder_2") three tensors, one row per layer:
    {component}.delta   (n, r) float32   the effective δ = Σ w (σ z − σ₀ z₀)
    {component}.pivots  (n, r) int16/32  pivot row indices of the base weight's LDU
    {component}.d       (n, r) float16/32  the LDU diagonal (a signature of the base weights)
and one JSON metadata entry "loldu" holding the format, version, settings, and the layer list
({component: {module path: [targets]}}) that gives the rows their names.

Files come from strangers: nothing but safetensors is parsed, every name, shape, dtype and
value is checked, and loading recomputes the factors from the base and compares pivots and d,
so an adapter trained on another base model is refused instead of silently misapplied.

Every bound lives here, in the reader, so the library, the CLI and the app refuse the same
files with the same one-line error: resource limits are checked on the safetensors header
before any tensor is read (and the work is linear in the file's size); layer names must be
canonical (exactly as the base names them: no `to_out.00`, no non-ASCII digits) and unique;
δ must be finite and bounded by the scale of the base weights (below).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from .io import atomic_save_safetensors, read_bounded, refuse_existing, safetensors_header, unique_keys
from .layer import LoadedDelta
from .model import adapter_name_from_path, all_or_nothing, attach_layer, check_adapter_name, components, install_processors, iter_layers
from .sites import fixed_module_trees, sites_for

FORMAT = "loldu-diffusion-adapter"
VERSION = 1
MAX_FILE_BYTES = 64 * 2**20  # SDXL with both text encoders at rank 128 is ~2 MB
MAX_HEADER_BYTES = 2**20  # the safetensors header (names, shapes, the layer list): SDXL needs ~60 KB
MAX_LAYERS = 4096  # rows per file; SDXL with both text encoders has ~830 adaptable layers
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# |δ| of a layer ≤ DELTA_BOUND × max|d| of that layer: a rank-1 term of L̃ diag(δ) U_r is about
# δ_k / d_k times the size of the base weight, and trained adapters stay within a few times d
# (the bundled one: 0.83×). The file's d is the base's (check_against compares them). Until
# session 19 the bound was 1000: a file with every layer at 50× passed and turned every image of
# the tiny base in fp16 into NaN (30× stayed finite there); 20 leaves trained adapters ~25×
# headroom.
DELTA_BOUND = 20.0
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int16, torch.int32, torch.int64)
_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|0|[1-9][0-9]*)"  # ASCII only: '٠' and '00' are not indices
_MODULE_PATH = re.compile(rf"{_PART}(?:\.{_PART})*")
_TEXT_FIELDS = ("instance_prompt", "class_prompt", "validation_prompt", "base_model", "base_architecture")


class AdapterFileError(ValueError):
    """A file that is not a valid LoLDU adapter, or not for this base model."""


@dataclass
class AdapterFile:
    metadata: dict
    layers: dict[str, list[tuple[str, str]]]  # component → [(module path, target)], row order
    delta: dict[str, torch.Tensor]  # component → (n, r) float32
    pivots: dict[str, torch.Tensor]  # component → (n, r) int64
    d: dict[str, torch.Tensor]  # component → (n, r) float32
    path: str = ""
    nbytes: int = 0
    sha256: str = ""  # of the bytes read (read()): what a server keys a loaded file by

    @property
    def rank(self) -> int:
        return max(t.shape[1] for t in self.delta.values())

    @property
    def num_layers(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def row_ranks(self, comp: str) -> torch.Tensor:
        """(n,) the rank of each row: the file's rank, or less for a layer whose full rank
        min(out, in) is below it (its trailing entries are padding: pivot −1, δ = d = 0)."""
        return (self.pivots[comp] >= 0).sum(dim=1)

    @property
    def num_parameters(self) -> int:
        """Numbers that define the adapter: one δ entry per rank per layer."""
        return sum(int(self.row_ranks(c).sum()) for c in self.delta)

    # ---- writing -------------------------------------------------------------------------
    def save(self, path: str, overwrite: bool = False) -> None:
        """Atomic write (temp file + rename); an existing file is kept unless `overwrite`. What
        `read` would refuse is refused here, before anything is written."""
        refuse_existing(path, overwrite)
        self.validate()
        _check_text_fields(self.metadata, os.path.basename(path))
        tensors = {}
        for comp in self.layers:
            d = self.d[comp].float()
            pivots = self.pivots[comp]
            tensors[f"{comp}.delta"] = self.delta[comp].float()
            tensors[f"{comp}.pivots"] = pivots.to(torch.int16 if int(pivots.max()) < 2**15 else torch.int32)
            tensors[f"{comp}.d"] = d.to(torch.float16 if float(d.abs().max()) < 6e4 else torch.float32)
        meta = dict(self.metadata)
        meta.update(format=FORMAT, version=VERSION)
        meta["layers"] = {c: _group(rows) for c, rows in self.layers.items()}
        atomic_save_safetensors(tensors, path, {"format": "pt", "loldu": json.dumps(meta, separators=(",", ":"))}, overwrite)

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str, max_bytes: int = MAX_FILE_BYTES) -> "AdapterFile":
        """Parse and check a file on its own (no base model needed). The file is read once: every
        check below is of those bytes, and `sha256` is theirs."""
        import hashlib

        from safetensors.torch import load as load_bytes

        name = os.path.basename(path)
        data = read_bounded(path, max_bytes, AdapterFileError, "adapter file")
        nbytes = len(data)
        raw_meta = _check_header(data, name)  # limits first: nothing is allocated for what follows
        try:
            tensors = load_bytes(data)
        except Exception as e:  # safetensors raises its own error types for truncated/garbage files
            raise AdapterFileError(f"{name}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        if "loldu" not in raw_meta:
            raise AdapterFileError(f"{name}: no LoLDU metadata; this is not a loldu-diffusion adapter (a LoRA file? use diffusers' load_lora_weights)")
        try:
            meta = json.loads(raw_meta["loldu"], object_pairs_hook=unique_keys)
            assert isinstance(meta, dict)
        except Exception:  # also RecursionError from absurd nesting
            raise AdapterFileError(f"{name}: the LoLDU metadata is not valid JSON (or repeats a key)") from None
        if meta.get("format") != FORMAT:
            raise AdapterFileError(f"{name}: format {meta.get('format')!r} is not {FORMAT!r}")
        version = meta.get("version")
        if type(version) is not int or version != VERSION:  # `true == 1` in Python: not a version
            raise AdapterFileError(f"{name}: adapter format version {version!r} is not supported (this loldu-diffusion reads version {VERSION}); upgrade loldu-diffusion")
        _check_text_fields(meta, name)
        layers = _layer_list(meta.get("layers"), name)

        expected = {f"{c}.{k}" for c in layers for k in ("delta", "pivots", "d")}
        unexpected, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        if unexpected:
            raise AdapterFileError(f"{name}: unexpected tensor {unexpected[0]!r} (expected only {sorted(expected)})")
        if missing:
            raise AdapterFileError(f"{name}: tensor {missing[0]!r} is missing")
        delta, pivots, d = {}, {}, {}
        for c, rows in layers.items():
            dl, pv, dg = tensors[f"{c}.delta"], tensors[f"{c}.pivots"], tensors[f"{c}.d"]
            for key, t, dtypes in ((f"{c}.delta", dl, _FLOATS), (f"{c}.pivots", pv, _INTS), (f"{c}.d", dg, _FLOATS)):
                if t.dtype not in dtypes:
                    raise AdapterFileError(f"{name}: tensor {key!r} has dtype {t.dtype}, expected one of {[str(x) for x in dtypes]}")
                if t.dim() != 2 or t.shape[0] != len(rows) or t.shape != dl.shape or t.shape[1] < 1:
                    raise AdapterFileError(f"{name}: tensor {key!r} has shape {tuple(t.shape)}, expected ({len(rows)}, rank) like {c}.delta")
            delta[c], pivots[c], d[c] = dl.float(), pv.long(), dg.float()
        f = cls(meta, layers, delta, pivots, d, path=path, nbytes=nbytes, sha256=hashlib.sha256(data).hexdigest())
        f.validate()
        return f

    def validate(self) -> "AdapterFile":
        """The value bounds (also for files built in memory, e.g. a blend): finite d and δ,
        |δ| ≤ DELTA_BOUND × the layer's max |d|, distinct non-negative pivots."""
        name = os.path.basename(self.path) or "adapter"
        for c, rows in self.layers.items():
            for key, t in ((f"{c}.delta", self.delta[c]), (f"{c}.d", self.d[c])):
                bad = (~torch.isfinite(t)).nonzero()
                if len(bad):
                    raise AdapterFileError(f"{name}: tensor {key!r} holds NaN/inf values (layer {'.'.join(rows[int(bad[0, 0])])})")
            scale = self.d[c].abs().amax(dim=1).clamp_min(1e-6)
            ratio = self.delta[c].abs().amax(dim=1) / scale
            i = int(ratio.argmax())
            if float(ratio[i]) > DELTA_BOUND:
                raise AdapterFileError(
                    f"{name}: layer {c}.{'.'.join(rows[i])}: |δ| = {float(self.delta[c][i].abs().max()):.3g} exceeds the bound "
                    f"{DELTA_BOUND:g} × max|d| = {DELTA_BOUND * float(scale[i]):.3g} (d: the base weight's LDU diagonal); "
                    "this is not a trained adapter")
            pv = self.pivots[c]
            pad = pv == -1  # a layer whose full rank is below the file's: trailing entries pad
            if (pv < -1).any() or pad[:, 0].any() or (pad[:, :-1] & ~pad[:, 1:]).any():
                raise AdapterFileError(f"{name}: tensor {c}.pivots holds negative row indices (only trailing −1s may pad a layer of lower rank)")
            if (self.delta[c][pad] != 0).any() or (self.d[c][pad] != 0).any():
                raise AdapterFileError(f"{name}: tensor {c}.delta or {c}.d is not 0 where {c}.pivots pads a layer of lower rank")
            distinct = torch.where(pad, -1 - torch.arange(pv.shape[1]).expand_as(pv), pv)  # padding never repeats
            srt = distinct.sort(dim=1).values
            if (srt[:, 1:] == srt[:, :-1]).any():
                raise AdapterFileError(f"{name}: tensor {c}.pivots repeats a row index within a layer")
        return self

    # ---- against a base model -------------------------------------------------------------
    def check_against(self, model) -> dict:
        """Verify every layer exists in the base with matching pivots and d; no change to the
        model. Returns {(component, module, target): LDU factors or None if already attached}."""
        with fixed_module_trees():
            return self._check_against(model)

    def _check_against(self, model) -> dict:
        from .ldu import decompose_ldu

        name = os.path.basename(self.path) or "adapter"
        comps = components(model)
        attached = {(c, m, t): layer for c, m, t, layer in iter_layers(model)}
        arch = self.metadata.get("base_architecture", "unknown")
        model_arch = base_description(model)["base_architecture"]
        if arch != "unknown" and model_arch != "unknown" and arch != model_arch:
            raise AdapterFileError(f"{name}: the adapter is for a different architecture: {arch}; this model is {model_arch}")
        if any(layer.fused_delta is not None for layer in attached.values()):
            raise AdapterFileError(f"{name}: the model's adapters are fused; call unfuse_loldu(model) before loading")
        found, same_factors = {}, []  # same_factors: (layer name, its pivots, its d, the file's pivots, the file's d, fp16/bf16)
        for c, rows in self.layers.items():
            if c not in comps:
                raise AdapterFileError(f"{name}: adapter has {c} layers but the model has no {c} (adapter base: {arch})")
            valid = adaptable_layers(comps[c], c)
            ranks = self.row_ranks(c).tolist()
            if len(rows) > len(valid):  # before any decomposition: rows are unique, so this is a bound
                raise AdapterFileError(f"{name}: {len(rows)} {c} layers, but this base model has only {len(valid)}; the adapter is for a different architecture ({arch})")
            for i, (mod_path, target) in enumerate(rows):
                layer_name = f"{c}.{mod_path}.{target}"
                linear = sites_for(c).linear(comps[c], mod_path, target) if (mod_path, target) in valid else None
                if linear is None:
                    raise AdapterFileError(f"{name}: layer {layer_name} does not exist in this base model; the adapter is for a different architecture ({arch})")
                r, full = ranks[i], min(linear.weight.shape)
                if r > full or (r < self.delta[c].shape[1] and r != full):  # padded rows are layers at their full rank
                    raise AdapterFileError(f"{name}: layer {layer_name}: rank {r} does not fit the layer's {tuple(linear.weight.shape)} shape; different architecture ({arch})")
                if int(self.pivots[c][i].max()) >= linear.weight.shape[0]:
                    raise AdapterFileError(f"{name}: layer {layer_name}: pivot index beyond the layer's {linear.weight.shape[0]} rows; different architecture ({arch})")
                layer = attached.get((c, mod_path, target))
                low_precision = linear.weight.dtype in (torch.float16, torch.bfloat16)
                want_piv, want_d = self.pivots[c][i, :r], self.d[c][i, :r]
                if layer is not None and layer.rank >= r:
                    # compared below, all such rows at once: one comparison per row was a fifth of a load
                    same_factors.append((layer_name, layer.pivots[:r], layer.d[:r], want_piv, want_d, low_precision))
                    found[(c, mod_path, target)] = None
                    continue
                factors = decompose_ldu(linear.weight, r)
                piv, dg = factors.pivots, factors.d.float()
                if layer is None and not torch.equal(piv, want_piv) and low_precision:
                    # a near-tie broken the other way by fp16 rounding: use the file's pivots
                    # if they are partial pivots of this weight (|L̃| ≤ 1 up to rounding)
                    prescribed = decompose_ldu(linear.weight, r, pivots=want_piv)
                    if prescribed.L.abs().max() <= 1.02:
                        factors, piv, dg = prescribed, prescribed.pivots, prescribed.d.float()
                if not _same_factors(piv, dg, want_piv, want_d, low_precision):
                    raise self._other_base(layer_name)
                found[(c, mod_path, target)] = factors
        if same_factors:
            names, piv, dg, want_piv, want_d, low = zip(*same_factors)
            if not _same_factors(torch.cat(piv).cpu(), torch.cat(dg).cpu(), torch.cat(want_piv), torch.cat(want_d), any(low)):
                bad = next(n for n, *row in same_factors if not _same_factors(row[0].cpu(), row[1].cpu(), *row[2:]))
                raise self._other_base(bad)
        return found

    def _other_base(self, layer_name: str) -> "AdapterFileError":
        name = os.path.basename(self.path) or "adapter"
        base = self.metadata.get("base_model") or "another base model"
        return AdapterFileError(f"{name}: layer {layer_name} does not match this base model's weights; the adapter was trained on {base}")


def _same_factors(piv, dg, want_piv, want_d, low_precision: bool) -> bool:
    rtol = 2e-2 if low_precision else 2e-3
    return torch.equal(piv, want_piv) and torch.allclose(dg, want_d, rtol=rtol, atol=1e-6)


MAX_TEXT = 1000  # characters of a metadata text field: a prompt, a model name


def _check_text_fields(meta: dict, name: str) -> None:
    """Text that errors, cards and pages quote: a string, printable (no terminal escapes, no line breaks), bounded."""
    for key in _TEXT_FIELDS:
        value = meta.get(key) or ""
        if not isinstance(value, str):
            raise AdapterFileError(f"{name}: metadata {key!r} must be a string")
        if len(value) > MAX_TEXT or not value.isprintable():
            raise AdapterFileError(f"{name}: metadata {key!r} must be one line of printable text of at most {MAX_TEXT:,} characters")


def _check_header(data: bytes, name: str) -> dict:
    """The header's bounds (io.safetensors_header; an adapter holds 3 tensors per component);
    the metadata."""
    try:
        header = safetensors_header(data, MAX_HEADER_BYTES)
    except OverflowError as e:
        raise AdapterFileError(f"{name}: {e} for an adapter file") from None
    except ValueError as e:
        raise AdapterFileError(f"{name}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    count = len(header) - ("__metadata__" in header)
    if count > 3 * len(COMPONENTS):
        raise AdapterFileError(f"{name}: {count} tensors; an adapter file holds at most {3 * len(COMPONENTS)} (delta, pivots, d per component)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterFileError(f"{name}: not a readable safetensors file: its metadata must map names to strings")
    return meta


def _layer_list(raw, name: str) -> dict[str, list[tuple[str, str]]]:
    """{component: [(module path, target)]} from the metadata, canonical and unique."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise AdapterFileError(f"{name}: the metadata's layer list is malformed")
    layers: dict[str, list[tuple[str, str]]] = {}
    total = 0
    for c, mods in raw.items():
        if c not in COMPONENTS:
            raise AdapterFileError(f"{name}: unknown component {c!r} in the layer list (expected {', '.join(COMPONENTS)})")
        rows = layers[c] = []
        for mod, targets in mods.items():
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
                raise AdapterFileError(f"{name}: the metadata's layer list is malformed at {c}.{mod}")
            total += len(targets)
            if total > MAX_LAYERS:
                raise AdapterFileError(f"{name}: more than {MAX_LAYERS} layers listed; no base model has that many")
            rows += [(mod, t) for t in targets]
        for mod, t in rows:
            layer = f"{c}.{mod}.{t}"
            if not _MODULE_PATH.fullmatch(mod):
                raise AdapterFileError(f"{name}: layer name {layer!r} is not canonical (ASCII names and plain indices like 'to_out.0' only)")
            problem = sites_for(c).name_problem(mod, t)
            if problem:
                raise AdapterFileError(f"{name}: layer {layer!r} {problem}")
        if not rows:
            raise AdapterFileError(f"{name}: the layer list of {c} is empty")
        seen = set()
        for row in rows:
            if row in seen:  # load: the last would win; blend: summed twice
                raise AdapterFileError(f"{name}: layer {c}.{'.'.join(row)} is listed twice")
            seen.add(row)
    if not layers:
        raise AdapterFileError(f"{name}: the adapter holds no layers")
    return layers


def adaptable_layers(component, comp_name: str) -> set[tuple[str, str]]:
    """(module path, target) of every projection an adapter may name, as the base names it."""
    return sites_for(comp_name).adaptable(component)


def _group(rows: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for m, t in rows:
        grouped.setdefault(m, []).append(t)
    return grouped


def base_description(model) -> dict:
    comps = components(model)
    unet = comps.get("unet")
    info = {"base_model": "", "base_architecture": "unknown"}
    for c in comps.values():
        path = getattr(getattr(c, "config", None), "_name_or_path", "") or getattr(c, "name_or_path", "")
        if path:
            path = os.path.normpath(str(path))
            if os.path.basename(path) in ("unet", "text_encoder", "text_encoder_2"):  # a pipeline's subfolder
                path = os.path.dirname(path)
            info["base_model"] = os.path.basename(path) if os.path.isdir(path) else path
            break
    if unet is not None and hasattr(unet, "config"):
        cfg = unet.config
        kind = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(cfg.cross_attention_dim, "custom")
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            kind = "sdxl"
        info["base_architecture"] = f"{kind} (unet {type(unet).__name__}, blocks {list(cfg.block_out_channels)}, cross_attention_dim {cfg.cross_attention_dim})"
    return info


def save_adapter(model, path: str, adapter_name: str | None = None, metadata: dict | None = None, overwrite: bool = False) -> AdapterFile:
    """Write one adapter's δ (or, with adapter_name=None, the active blend's) to `path`."""
    layers, rows = {}, {}
    for c, m, t, layer in iter_layers(model):
        if adapter_name is not None:
            if adapter_name not in layer.adapters:
                continue
            delta = layer.adapters[adapter_name].delta()
        else:
            delta = layer.delta_vector()
            if delta is None:
                continue
        layers.setdefault(c, []).append((m, t))
        rows.setdefault(c, []).append((delta.detach().float().cpu(), layer))
    if not layers:
        what = f"adapter {adapter_name!r}" if adapter_name else "active LoLDU adapter"
        raise ValueError(f"nothing to save: the model has no {what}")
    r = max(dl.shape[0] for rs in rows.values() for dl, _ in rs)
    pad = torch.nn.functional.pad
    delta, pivots, d = {}, {}, {}
    for c, rs in rows.items():
        # blends of adapters of several ranks are saved at the largest; a layer whose full rank is below it, at its full
        # rank (its δ is no longer), the rest of its row padded
        factors = [layer.factors_at(min(r, *layer.base.weight.shape)) for _, layer in rs]
        delta[c] = torch.stack([pad(dl, (0, r - dl.shape[0])) for dl, _ in rs])
        pivots[c] = torch.stack([pad(p.cpu(), (0, r - p.shape[0]), value=-1) for p, _ in factors])
        d[c] = torch.stack([pad(dd.float().cpu(), (0, r - dd.shape[0])) for _, dd in factors])
    meta = {"method": "loldu", "rank": r}
    configs = {}
    for comp in components(model).values():
        configs.update(comp.__dict__.get("_loldu_configs", {}))
    cfg = configs.get(adapter_name) if adapter_name else (next(iter(configs.values())) if len(configs) == 1 else None)
    if cfg is not None:
        meta.update(alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, init=cfg.init,
                    unet_targets=list(cfg.unet_targets or []), text_encoder_targets=list(cfg.text_encoder_targets or []))
    meta.update(base_description(model))
    meta.update(metadata or {})
    f = AdapterFile(meta, layers, delta, pivots, d)
    f.save(path, overwrite=overwrite)
    f.path, f.nbytes = path, os.path.getsize(path)
    return f


def load_adapter(model, path_or_file, adapter_name: str | None = None, weight: float = 1.0) -> AdapterFile:
    """Load an adapter file onto `model` under `adapter_name` (default: derived from the file
    name), active with `weight`. Injects LoLDU where needed. All or nothing: everything is
    checked and built first, and the model is unchanged if the file is refused."""
    f = path_or_file if isinstance(path_or_file, AdapterFile) else AdapterFile.read(path_or_file)
    adapter_name = check_adapter_name(adapter_name) if adapter_name is not None else adapter_name_from_path(f.path or "adapter")
    if not math.isfinite(float(weight)):
        raise ValueError(f"adapter weight must be a finite number, got {weight}")
    with fixed_module_trees():  # walked once for the checks and the attach below
        for *_, layer in iter_layers(model):
            if adapter_name in layer.adapters:
                raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pick another adapter_name or delete_adapter() it")
        factors = f.check_against(model)
        comps = components(model)
        vectors = {}
        for c, rows in f.layers.items():
            device = next(comps[c].parameters()).device  # built where the layers are: one table for all of them
            vectors.update(zip([(c, m, t) for m, t in rows], LoadedDelta.rows(f.delta[c].to(device), f.row_ranks(c).tolist())))
        with all_or_nothing(model, adapter_name):
            for c, rows in f.layers.items():
                install_processors(comps[c], c, [m for m, _ in rows])
                for m, t in rows:
                    layer = attach_layer(comps[c], c, m, t, vectors[(c, m, t)].rank, factors[(c, m, t)])
                    layer.add_adapter(adapter_name, vectors[(c, m, t)], weight)
    return f
