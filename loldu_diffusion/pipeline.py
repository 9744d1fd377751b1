"""Base pipelines and adapter specs for the command line and the app."""
from __future__ import annotations

import os

import torch

from .adapter_file import AdapterFile, AdapterFileError, load_adapter


def load_base(path: str | None = None, dtype=torch.float32, device: str | None = None):
    """A diffusers pipeline (SD 1.x/2.x or SDXL, by its model_index.json) from a local folder;
    default: the embedded tiny base."""
    from diffusers import DiffusionPipeline

    from .toy import default_base_path

    path = path or default_base_path()
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"--base {path}: not a diffusers model folder (no model_index.json)")
    kw = {}
    if "StableDiffusionPipeline" in open(os.path.join(path, "model_index.json")).read():
        kw = dict(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, **kw)
    pipe.set_progress_bar_config(disable=True)
    pipe._loldu_base_path = path
    return pipe.to(device) if device else pipe


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """'concept.safetensors:0.7' → (path, 0.7); no weight → 1.0."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and not os.path.exists(spec):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def adapter_name_for(path: str, taken) -> str:
    stem = os.path.splitext(os.path.basename(path))[0] or "adapter"
    name, k = stem, 2
    while name in taken:
        name, k = f"{stem}_{k}", k + 1
    return name


def load_adapter_specs(pipe, specs: list[str]) -> dict[str, float]:
    """Load every 'FILE[:WEIGHT]' onto the pipeline; returns {adapter name: weight}."""
    weights: dict[str, float] = {}
    for spec in specs:
        path, w = parse_adapter_spec(spec)
        name = adapter_name_for(path, weights)
        load_adapter(pipe, AdapterFile.read(path), adapter_name=name, weight=w)
        weights[name] = w
    return weights


def blend_files(specs: list[str]) -> AdapterFile:
    """One adapter file holding Σ wᵢ δᵢ, from the files alone: rank-r factors are prefixes of
    rank-R ones of the same base, so pivots must agree on their common prefix."""
    files = [(AdapterFile.read(p), w) for p, w in map(parse_adapter_spec, specs)]
    if not files:
        raise ValueError("nothing to blend: give FILE[:WEIGHT] arguments")
    rank = max(f.rank for f, _ in files)
    top = max(files, key=lambda fw: fw[0].rank)[0]
    layers: dict[str, list] = {}
    for f, _ in files:
        for c, rows in f.layers.items():
            for row in rows:
                if row not in layers.setdefault(c, []):
                    layers[c].append(row)
    delta, pivots, d = {}, {}, {}
    for c, rows in layers.items():
        n = len(rows)
        delta[c] = torch.zeros(n, rank)
        pivots[c] = torch.full((n, rank), -1, dtype=torch.long)
        d[c] = torch.zeros(n, rank)
        for f, w in files:
            if c not in f.layers:
                continue
            r = f.delta[c].shape[1]
            for i, row in enumerate(f.layers[c]):
                j = rows.index(row)
                delta[c][j, :r] += w * f.delta[c][i]
                known = pivots[c][j, :r] >= 0
                if (known & (pivots[c][j, :r] != f.pivots[c][i])).any():
                    raise AdapterFileError(f"{os.path.basename(f.path)}: layer {c}.{'.'.join(row)} has other pivots than the other adapters: they were trained on different base models")
                if r >= int((pivots[c][j] >= 0).sum()):
                    pivots[c][j, :r], d[c][j, :r] = f.pivots[c][i], f.d[c][i]
        if (pivots[c] < 0).any():
            raise AdapterFileError("blending adapters of different ranks that do not share every layer needs --base (not supported from files alone)")
    meta = {k: v for k, v in top.metadata.items() if k not in ("layers", "format", "version")}
    meta.update(method="loldu", rank=rank, blend=[{"file": os.path.basename(f.path), "weight": w} for f, w in files])
    return AdapterFile(meta, layers, delta, pivots, d)
