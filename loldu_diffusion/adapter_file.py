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
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .io import atomic_save_safetensors, refuse_existing
from .layer import LoLDUVector
from .model import attach_layer, components, install_processors, iter_layers, resolve_submodule
from .processor import projection

FORMAT = "loldu-diffusion-adapter"
VERSION = 1
MAX_FILE_BYTES = 64 * 2**20  # SDXL with both text encoders at rank 128 is ~2 MB
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int16, torch.int32, torch.int64)


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
    _extra: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(t.shape[1] for t in self.delta.values())

    @property
    def num_layers(self) -> int:
        return sum(len(v) for v in self.layers.values())

    @property
    def num_parameters(self) -> int:
        """Numbers that define the adapter: one δ entry per rank per layer."""
        return sum(t.numel() for t in self.delta.values())

    # ---- writing -------------------------------------------------------------------------
    def save(self, path: str, overwrite: bool = False) -> None:
        """Atomic write (temp file + rename); an existing file is kept unless `overwrite`."""
        refuse_existing(path, overwrite)
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
        """Parse and check a file on its own (no base model needed)."""
        from safetensors import safe_open

        name = os.path.basename(path)
        if not os.path.isfile(path):
            raise AdapterFileError(f"{path}: no such adapter file")
        nbytes = os.path.getsize(path)
        if nbytes > max_bytes:
            raise AdapterFileError(f"{name}: {nbytes} bytes is larger than the {max_bytes}-byte limit for an adapter file")
        try:
            with safe_open(path, framework="pt") as f:
                raw_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated/garbage files
            raise AdapterFileError(f"{name}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        if "loldu" not in raw_meta:
            raise AdapterFileError(f"{name}: no LoLDU metadata; this is not a loldu-diffusion adapter (a LoRA file? use diffusers' load_lora_weights)")
        try:
            meta = json.loads(raw_meta["loldu"])
            assert isinstance(meta, dict)
        except Exception:
            raise AdapterFileError(f"{name}: the LoLDU metadata is not valid JSON") from None
        if meta.get("format") != FORMAT:
            raise AdapterFileError(f"{name}: format {meta.get('format')!r} is not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise AdapterFileError(f"{name}: adapter format version {meta.get('version')!r} is not supported (this loldu-diffusion reads version {VERSION}); upgrade loldu-diffusion")
        try:
            layers = {c: [(str(m), str(t)) for m, ts in mods.items() for t in ts] for c, mods in meta["layers"].items()}
        except Exception:
            raise AdapterFileError(f"{name}: the metadata's layer list is malformed") from None
        if not layers:
            raise AdapterFileError(f"{name}: the adapter holds no layers")

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
            for key, t in ((f"{c}.delta", dl), (f"{c}.d", dg)):
                bad = (~torch.isfinite(t.float())).nonzero()
                if len(bad):
                    raise AdapterFileError(f"{name}: tensor {key!r} holds NaN/inf values (layer {'.'.join(rows[int(bad[0, 0])])})")
            if (pv < 0).any():
                raise AdapterFileError(f"{name}: tensor {c}.pivots holds negative row indices")
            delta[c], pivots[c], d[c] = dl.float(), pv.long(), dg.float()
        return cls(meta, layers, delta, pivots, d, path=path, nbytes=nbytes)

    # ---- against a base model -------------------------------------------------------------
    def check_against(self, model) -> dict:
        """Verify every layer exists in the base with matching pivots and d; no change to the
        model. Returns {(component, module, target): LDU factors or None if already attached}."""
        from .ldu import decompose_ldu

        name = os.path.basename(self.path) or "adapter"
        comps = components(model)
        attached = {(c, m, t): layer for c, m, t, layer in iter_layers(model)}
        arch = self.metadata.get("base_architecture", "unknown")
        model_arch = base_description(model)["base_architecture"]
        if arch != "unknown" and model_arch != "unknown" and arch != model_arch:
            raise AdapterFileError(f"{name}: the adapter is for a different architecture: {arch}; this model is {model_arch}")
        found = {}
        for c, rows in self.layers.items():
            if c not in comps:
                raise AdapterFileError(f"{name}: adapter has {c} layers but the model has no {c} (adapter base: {arch})")
            for i, (mod_path, target) in enumerate(rows):
                layer_name = f"{c}.{mod_path}.{target}"
                linear = _linear(comps[c], c, mod_path, target)
                if linear is None:
                    raise AdapterFileError(f"{name}: layer {layer_name} does not exist in this base model; the adapter is for a different architecture ({arch})")
                r = self.delta[c].shape[1]
                if r > min(linear.weight.shape):
                    raise AdapterFileError(f"{name}: layer {layer_name}: rank {r} exceeds the layer's {tuple(linear.weight.shape)} shape; different architecture ({arch})")
                if int(self.pivots[c][i].max()) >= linear.weight.shape[0]:
                    raise AdapterFileError(f"{name}: layer {layer_name}: pivot index beyond the layer's {linear.weight.shape[0]} rows; different architecture ({arch})")
                layer = attached.get((c, mod_path, target))
                if layer is not None and layer.fused_delta is not None:
                    raise AdapterFileError(f"{name}: the model's adapters are fused; call unfuse_loldu(model) before loading")
                if layer is not None and layer.rank >= r:
                    piv, dg, factors = layer.pivots[:r].cpu(), layer.d[:r].cpu(), None
                else:
                    factors = decompose_ldu(linear.weight, r)
                    piv, dg = factors.pivots, factors.d.float()
                low_precision = linear.weight.dtype in (torch.float16, torch.bfloat16)
                if layer is None and not torch.equal(piv, self.pivots[c][i]) and low_precision:
                    # a near-tie broken the other way by fp16 rounding: use the file's pivots
                    # if they are partial pivots of this weight (|L̃| ≤ 1 up to rounding)
                    prescribed = decompose_ldu(linear.weight, r, pivots=self.pivots[c][i])
                    if prescribed.L.abs().max() <= 1.02:
                        factors, piv, dg = prescribed, prescribed.pivots, prescribed.d.float()
                rtol = 2e-2 if low_precision else 2e-3
                if not torch.equal(piv, self.pivots[c][i]) or not torch.allclose(dg, self.d[c][i], rtol=rtol, atol=1e-6):
                    base = self.metadata.get("base_model") or "another base model"
                    raise AdapterFileError(f"{name}: layer {layer_name} does not match this base model's weights; the adapter was trained on {base}")
                found[(c, mod_path, target)] = factors
        return found


def _linear(component, comp_name, mod_path, target):
    try:
        module = resolve_submodule(component, mod_path)
    except AttributeError:
        return None
    if comp_name == "unet":
        return projection(module, target) if hasattr(module, "set_processor") else None
    lin = getattr(module, target, None)
    return lin if isinstance(lin, torch.nn.Linear) else None


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
    delta, pivots, d = {}, {}, {}
    for c, rs in rows.items():
        for _, layer in rs:
            layer.ensure_rank(r)  # blends of adapters of several ranks are saved at the largest
        delta[c] = torch.stack([torch.nn.functional.pad(dl, (0, r - dl.shape[0])) for dl, _ in rs])
        pivots[c] = torch.stack([layer.pivots[:r].cpu() for _, layer in rs])
        d[c] = torch.stack([layer.d[:r].cpu() for _, layer in rs])
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
    """Load an adapter file onto `model` under `adapter_name` (default: the file's stem),
    active with `weight`. Injects LoLDU where needed. The model is unchanged if the file is
    refused."""
    f = path_or_file if isinstance(path_or_file, AdapterFile) else AdapterFile.read(path_or_file)
    adapter_name = adapter_name or os.path.splitext(os.path.basename(f.path))[0] or "adapter"
    for *_, layer in iter_layers(model):
        if adapter_name in layer.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pick another adapter_name or delete_adapter() it")
    factors = f.check_against(model)
    comps = components(model)
    for c, rows in f.layers.items():
        install_processors(comps[c], c, [m for m, _ in rows])
        for i, (m, t) in enumerate(rows):
            layer = attach_layer(comps[c], c, m, t, f.delta[c].shape[1], factors[(c, m, t)])
            layer.add_adapter(adapter_name, LoLDUVector.fixed(f.delta[c][i]), weight)
    return f
