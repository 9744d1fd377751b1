"""Base pipelines and adapter specs for the command line and the app."""
from __future__ import annotations

import os

import torch

from .adapter_file import AdapterFile, AdapterFileError, load_adapter
from .model import adapter_name_from_path


def load_base(path: str | None = None, dtype=torch.float32, device: str | None = None):
    """A diffusers pipeline (SD 1.x/2.x or SDXL) from a local folder (by its model_index.json)
    or a single-file checkpoint (single_file.py); default: the embedded tiny base."""
    from diffusers import DiffusionPipeline

    from .assets import default_base_path
    from .single_file import SingleFileError, is_single_file, load_single_file

    path = path or default_base_path()
    if is_single_file(path):
        try:
            pipe = load_single_file(path, dtype)
        except SingleFileError as e:
            raise ValueError(f"--base {e}") from None
    else:
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"--base {path}: not a diffusers model folder (no model_index.json) "
                                    "or a single-file checkpoint (.safetensors / .ckpt)")
        kw = {}
        if "StableDiffusionPipeline" in open(os.path.join(path, "model_index.json")).read():
            kw = dict(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, **kw)
    pipe.set_progress_bar_config(disable=True)
    pipe._loldu_base_path = path
    return pipe.to(device) if device else pipe


MAX_WEIGHT = 100.0  # the app's sliders go to ±2; beyond ±100 a weight is a typo or an attack


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """'concept.safetensors:0.7' → (path, 0.7); no weight → 1.0."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and not os.path.exists(spec):
        try:
            w = float(weight)
        except ValueError:
            return spec, 1.0
        if not -MAX_WEIGHT <= w <= MAX_WEIGHT:  # also NaN
            raise ValueError(f"{spec}: the weight must be a number between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
        return path, w
    return spec, 1.0


def adapter_name_for(path: str, taken) -> str:
    """A safe adapter name from any file name ('sks.v2.safetensors' → 'sks_v2'), unique in `taken`."""
    return adapter_name_from_path(path, taken)


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
    rank-R ones of the same base, so pivots must agree on their common prefix. Linear in the
    number of rows; each component keeps its own rank."""
    files = [(AdapterFile.read(p), w) for p, w in map(parse_adapter_spec, specs)]
    if not files:
        raise ValueError("nothing to blend: give FILE[:WEIGHT] arguments")
    archs = sorted({f.metadata.get("base_architecture") or "unknown" for f, _ in files} - {"unknown"})
    if len(archs) > 1:
        raise AdapterFileError(f"the adapters are for different architectures ({', '.join(archs)}): blend adapters of one base model")
    top = max(files, key=lambda fw: fw[0].rank)[0]
    index: dict[str, dict[tuple[str, str], int]] = {}  # component → row → position
    for f, _ in files:
        for c, rows in f.layers.items():
            idx = index.setdefault(c, {})
            for row in rows:
                idx.setdefault(row, len(idx))
    delta, pivots, d = {}, {}, {}
    for c, idx in index.items():
        n, rank = len(idx), max(f.delta[c].shape[1] for f, _ in files if c in f.layers)
        delta[c] = torch.zeros(n, rank)
        pivots[c] = torch.full((n, rank), -1, dtype=torch.long)
        d[c] = torch.zeros(n, rank)
        full = torch.full((n,), rank)  # a row a file pads is a layer at its full rank: it needs no more pivots
        for f, w in files:
            if c not in f.layers:
                continue
            r, rows_r = f.delta[c].shape[1], f.row_ranks(c)
            j = torch.tensor([idx[row] for row in f.layers[c]])
            delta[c][j, :r] += w * f.delta[c]  # padding adds 0
            known, theirs = pivots[c][j, :r], f.pivots[c]
            # pivots and d identify the base's weights (check_against's test, with fp16's tolerance)
            same = (known == theirs) & torch.isclose(d[c][j, :r], f.d[c], rtol=2e-2, atol=1e-6)
            clash = ((known >= 0) & (theirs >= 0) & ~same).any(dim=1)
            if clash.any():
                row = f.layers[c][int(clash.nonzero()[0, 0])]
                raise AdapterFileError(f"{os.path.basename(f.path)}: layer {c}.{'.'.join(row)} has other pivots or d than the other adapters: they were trained on different base models")
            grow = rows_r >= (pivots[c][j] >= 0).sum(dim=1)  # this file knows at least as many pivots
            pivots[c][j[grow], :r], d[c][j[grow], :r] = theirs[grow], f.d[c][grow]
            padded = rows_r < r
            full[j[padded]] = torch.minimum(full[j[padded]], rows_r[padded])
        count = (pivots[c] >= 0).sum(dim=1)
        if (count > full).any():
            row = next(r for r, i in idx.items() if count[i] > full[i])
            raise AdapterFileError(f"layer {c}.{'.'.join(row)} has rank {int(full[idx[row]])} in one adapter and more in another: they were trained on different base models")
        short = count < full
        if short.any():
            row = next(r for r, i in idx.items() if short[i])
            raise AdapterFileError(f"layer {c}.{'.'.join(row)} is only in adapters of a rank below {rank}: blending adapters of "
                                   "different ranks that do not share every layer needs a base model (use export-lora or the library)")
    meta = {k: v for k, v in top.metadata.items() if k not in ("layers", "format", "version")}
    meta.update(method="loldu", rank=max(t.shape[1] for t in delta.values()),
                blend=[{"file": os.path.basename(f.path), "weight": w} for f, w in files])
    layers = {c: list(idx) for c, idx in index.items()}
    return AdapterFile(meta, layers, delta, pivots, d, path="blend").validate()


@torch.no_grad()
def draw(pipe, prompts: list[str], seeds: list[int], batch: int = 8, progress: str | None = None, **kwargs) -> list:
    """One image per prompt, image i from a generator seeded seeds[i], `batch` prompts per
    pipeline call: the images do not depend on the batching (up to the arithmetic of batched
    kernels). Other keyword arguments go to the pipeline (steps, guidance, size, negative_prompt)."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"draw: {len(prompts)} prompts but {len(seeds)} seeds")
    negative = kwargs.pop("negative_prompt", None)
    images = []
    for i in tqdm(range(0, len(prompts), batch), desc=progress, disable=progress is None, leave=False):
        chunk = list(prompts[i : i + batch])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch]]
        neg = [negative] * len(chunk) if negative else None
        images += pipe(chunk, generator=gens, negative_prompt=neg, **kwargs).images
    return images
