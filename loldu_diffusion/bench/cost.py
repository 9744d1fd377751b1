"""Cost suite: per-step time and memory of LoLDU against the floor, LoRA, OLoRA and the
authors' formulation, all measured in the same run on an SD 1.5-architecture UNet (random
weights: speed does not depend on them); inference unfused / fused / blended (1, 4, 16
adapters, cached δ); a batch of 16 samples with 16 different adapters against 16 with one
(serving); torch.compile against eager; attach time; trainable values and file sizes.
Inference rows are steady state: a blend's δ is computed at the first forward after a change
(untimed here; its cost for 16 per-sample blends is its own row) and reused by every other.

Memory: on CUDA the allocator's peak; on the CPU, the bytes autograd saves for backward plus
gradients and optimizer state of what trains (frozen weights, common to all, excluded).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

SD15 = dict(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8)
QUICK = dict(sample_size=16, cross_attention_dim=64, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
             norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def build_unet(cfg, device, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).to(device, dtype).eval()


def inputs(unet, latent, device, dtype, batch=1, tokens=77):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    c = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    return x, torch.tensor([500] * batch, device=device), c


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class SavedBytes:
    """Bytes autograd keeps for backward (deduplicated by storage)."""

    def __init__(self):
        self.seen, self.total = set(), 0

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self.seen:
            self.seen.add(key)
            self.total += key[1]
        return t


def train_step_cost(unet, params, inp, device, warmup, iters):
    """(seconds per step, MB): forward, backward (to params, or to the input for the floor), AdamW step."""
    x, t, c = inp
    floor = not params
    opt = torch.optim.AdamW(params, 1e-4) if params else None

    def step():
        xi = x.detach().requires_grad_(floor)
        out = unet(xi, t, c).sample
        out.float().pow(2).mean().backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)

    secs = timed(step, device, warmup, iters)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return secs, (torch.cuda.max_memory_allocated() - base) / 2**20
    saved = SavedBytes()
    xi = x.detach().requires_grad_(floor)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        out = unet(xi, t, c).sample
    out.float().pow(2).mean().backward()
    state = sum(p.numel() * p.element_size() * 3 for p in params)  # grad + 2 Adam moments
    return secs, (saved.total + state) / 2**20


@torch.no_grad()
def python_calls(unet, inp) -> int:
    """Python function calls in one forward: the overhead a busy CPU's timings blur, counted exactly."""
    import cProfile
    import pstats

    x, t, c = inp
    prof = cProfile.Profile()
    prof.runcall(lambda: unet(x, t, c))
    return pstats.Stats(prof).total_calls


@torch.no_grad()
def infer_cost(unet, inp, device, warmup, iters):
    x, t, c = inp
    return timed(lambda: unet(x, t, c), device, warmup, iters)


def set_inference_state(unet, name, original, loldu_procs):
    """base (the original processors) | unfused | fused (the trained adapter) | blendN (N of
    the 16 loaded copies, weights 1/N)."""
    from .. import fuse_loldu, unfuse_loldu
    from ..model import set_adapter_weights

    unfuse_loldu(unet)
    if name == "base":
        unet.set_attn_processor(dict(original))  # diffusers empties the dict it is given
        return
    unet.set_attn_processor(dict(loldu_procs))
    if name.startswith("blend"):
        n = int(name[len("blend"):])
        set_adapter_weights(unet, {f"b{k}": 1.0 / n for k in range(n)})
    else:
        set_adapter_weights(unet, {"default": 1.0})
    if name == "fused":
        fuse_loldu(unet)


def serving_cost(unet, latent, device, dtype, original, loldu_procs, warmup, iters, batch=16):
    """Seconds per forward of a batch of `batch`: the base, one adapter for every sample, and
    one different adapter per sample (b0…b15, per-sample blends), in interleaved rounds."""
    from ..model import set_adapter_weights
    from ..serving import set_sample_weights

    from ..model import iter_layers

    inp = inputs(unet, latent, device, dtype, batch=batch)
    times = {n: [] for n in ("base", "same", "hetero", "hetero_setup")}
    for rnd in range(warmup + iters):
        order = ("base", "same", "hetero")
        for n in order[rnd % 3:] + order[: rnd % 3]:
            set_inference_state(unet, "base" if n == "base" else "unfused", original, loldu_procs)
            if n != "base":
                set_adapter_weights(unet, {"b0": 1.0})
            sync(device)
            t0 = time.perf_counter()
            if n == "hetero":  # what a server does once per batch: 16 blends, every layer's (16, r) δ
                set_sample_weights(unet, [{f"b{k % 16}": 1.0} for k in range(batch)])
            for *_, layer in iter_layers(unet):
                layer.refresh()
            sync(device)
            setup = time.perf_counter() - t0
            # the first forward after a change also lets the blend guard (guard.py) list what to watch:
            # once per batch, like the blends, so it counts in the setup; every denoising step after it is timed
            first = infer_cost(unet, inp, device, 0, 1)
            t = infer_cost(unet, inp, device, 0, 1)
            setup += max(first - t, 0.0)
            set_sample_weights(unet, None)
            if rnd >= warmup:
                times[n].append(t)
                if n == "hetero":
                    times["hetero_setup"].append(setup)
    return {n: statistics.median(v) for n, v in times.items()}


def compile_cost(unet, inp, device, original, loldu_procs, warmup, iters, backend):
    """(compile seconds, compiled s/forward, eager s/forward) of the UNet with one adapter."""
    from ..compile import compile_unet, uncompile_unet

    set_inference_state(unet, "unfused", original, loldu_procs)
    infer_cost(unet, inp, device, 0, 1)  # the cached δ, before timing the compilation alone
    compile_unet(unet, backend=backend)
    try:
        sync(device)
        t0 = time.perf_counter()
        infer_cost(unet, inp, device, 0, 1)  # traces and compiles
        first = time.perf_counter() - t0
        times = {"eager": [], "compiled": []}
        for rnd in range(warmup + iters):  # interleaved, as the other inference rows
            for n in (("eager", "compiled") if rnd % 2 else ("compiled", "eager")):
                with torch.compiler.set_stance("force_eager" if n == "eager" else "default"):
                    t = infer_cost(unet, inp, device, 0, 1)
                if rnd >= warmup:
                    times[n].append(t)
    finally:
        uncompile_unet(unet)
    return first, statistics.median(times["compiled"]), statistics.median(times["eager"])


def compile_train_cost(cfg, device, dtype, rank, latent, warmup, iters, backend):
    """(compile seconds, compiled s/step, eager s/step) of a LoLDU training step (forward,
    backward, AdamW) on a fresh UNet, eager and compiled in interleaved rounds."""
    from .. import LoLDUConfig, inject_loldu, loldu_parameters
    from ..compile import compile_unet

    unet = build_unet(cfg, device, dtype)
    unet.requires_grad_(False)
    inject_loldu(unet, LoLDUConfig(rank=rank, init="lu", unet_targets=TARGETS))
    x, t, c = inputs(unet, latent, device, dtype)
    opt = torch.optim.AdamW(loldu_parameters(unet), 1e-4)

    def step():
        unet(x, t, c).sample.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    compile_unet(unet, backend=backend)
    sync(device)
    t0 = time.perf_counter()
    step()  # traces and compiles forward and backward
    sync(device)
    first = time.perf_counter() - t0
    times = {"eager": [], "compiled": []}
    for rnd in range(warmup + iters):
        for n in (("eager", "compiled") if rnd % 2 else ("compiled", "eager")):
            with torch.compiler.set_stance("force_eager" if n == "eager" else "default"):
                secs = timed(step, device, 0, 1)
            if rnd >= warmup:
                times[n].append(secs)
    return first, statistics.median(times["compiled"]), statistics.median(times["eager"])


def lora_unet(cfg, device, dtype, init):
    from peft import LoraConfig

    unet = build_unet(cfg, device, dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=init, target_modules=list(TARGETS)))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet, [p for p in unet.parameters() if p.requires_grad]


def many_adapters_cost(unet, path: str, device: str, loaded: int, n: int = 16) -> dict:
    """What a server holding many adapters pays per file: bytes one more loaded adapter holds
    (Python objects, by tracemalloc, plus its tensors), and the time to load one when `loaded`
    are loaded already. The extra adapters are deleted after."""
    import gc
    import tracemalloc

    from .. import delete_adapter, load_adapter
    from ..model import iter_layers

    names = [f"many{k}" for k in range(loaded + n)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for name in names[:n]:
        load_adapter(unet, path, adapter_name=name, weight=0.0)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    tensors = {id(t): t for *_, layer in iter_layers(unet) for name in names[:n] for t in layer.adapters[name].tensors()}
    held += sum(t.nbytes for t in tensors.values())
    for name in names[n:loaded]:
        load_adapter(unet, path, adapter_name=name, weight=0.0)
    sync(device)
    t0 = time.perf_counter()
    for name in names[loaded:]:
        load_adapter(unet, path, adapter_name=name, weight=0.0)
    sync(device)
    secs = (time.perf_counter() - t0) / n
    for name in names:
        delete_adapter(unet, name)
    return {"loaded_adapter_kb": held / n / 1000, "adapters_loaded_before": loaded, "load_adapter_many_s": secs}


def multi_subject_cost(steps: int, ks=(1, 4, 8)) -> dict:
    """Wall time of the real trainer on the embedded base: one --concepts_list run of K subjects
    against K runs of one subject each (same flags, in this process, so the separate runs do
    not even pay a process start or an import). Validation images and the judge are off in
    both. {"separate_s": [8 runs], "together_s": {K: seconds}}."""
    import json

    from ..toy.concepts import BENCH_SUBJECTS, HELD_OUT_SUBJECTS, render_subject
    from ..training import parse_args, train

    subjects = (BENCH_SUBJECTS + HELD_OUT_SUBJECTS)[: max(ks)]
    common = ["--max_train_steps", str(steps), "--judge_images", "0", "--num_validation_images", "0", "--report_to", "none",
              "--checkpointing_steps", str(10**9)]
    out = {"steps": steps, "separate_s": [], "together_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        entries = []
        warm = os.path.join(tmp, "data", "warm-up")
        render_subject(subjects[0], warm)  # first use of the trainer in this process: imports and caches, untimed
        train(parse_args(common + ["--max_train_steps", "1", "--instance_data_dir", warm, "--instance_prompt", subjects[0].instance_prompt,
                                   "--output_dir", os.path.join(tmp, "warm-up")]))
        for s in subjects:
            folder = os.path.join(tmp, "data", s.identifier)
            render_subject(s, folder)
            entries.append({"name": s.identifier, "instance_prompt": s.instance_prompt, "instance_data_dir": folder})
        with open(os.path.join(tmp, "warm-up.json"), "w") as f:
            json.dump(entries[:2], f)
        # and the first --concepts_list run's own first uses (the per-sample path), untimed too
        train(parse_args(common + ["--max_train_steps", "1", "--concepts_list", os.path.join(tmp, "warm-up.json"),
                                   "--output_dir", os.path.join(tmp, "warm-up-concepts")]))
        for s, e in zip(subjects, entries):
            folder = e["instance_data_dir"]
            t0 = time.perf_counter()
            train(parse_args(common + ["--instance_data_dir", folder, "--instance_prompt", s.instance_prompt,
                                       "--output_dir", os.path.join(tmp, "alone", s.identifier)]))
            out["separate_s"].append(time.perf_counter() - t0)
        for k in ks:
            path = os.path.join(tmp, f"concepts-{k}.json")
            with open(path, "w") as f:
                json.dump(entries[:k], f)
            t0 = time.perf_counter()
            train(parse_args(common + ["--concepts_list", path, "--output_dir", os.path.join(tmp, f"together-{k}")]))
            out["together_s"][k] = time.perf_counter() - t0
    out["floor_rows_s"] = frozen_rows_cost(rows=4, ks=ks)  # 4: the embedded base's --train_batch_size
    return out


def frozen_rows_cost(rows: int, ks, warmup: int = 2, rounds: int = 15) -> dict:
    """{K: seconds} of the embedded base's frozen UNet, forward and backward to its input, on
    K × `rows` rows: the arithmetic every K-subject step must do whatever the adapters cost.
    floor[K] / (K · floor[1]) is the ratio K subjects in one run tend to when that arithmetic is
    all a step costs; other per-step work (model load, adapters, the optimizer) is shared by
    the K subjects and takes a joint run below it. On a CPU a batch of 32 rows costs several
    times one of 4. The K's are timed in interleaved rounds (median per K), so a machine that
    speeds up or slows down during the run sways them alike."""
    from diffusers import UNet2DConditionModel

    from ..assets import default_base_path

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the trainer above ran (accelerate's choice)
    unet = UNet2DConditionModel.from_pretrained(default_base_path(), subfolder="unet").to(device).eval().requires_grad_(False)
    tokens = 24  # the embedded tokenizer's model_max_length
    batches = {k: inputs(unet, unet.config.sample_size, device, torch.float32, batch=k * rows, tokens=tokens) for k in ks}

    def step(k):
        x, t, c = batches[k]
        unet(x.detach().requires_grad_(True), t, c).sample.float().pow(2).mean().backward()

    times = {k: [] for k in ks}
    for rnd in range(warmup + rounds):
        for k in ks:
            secs = timed(lambda: step(k), device, 0, 1)
            if rnd >= warmup:
                times[k].append(secs)
    return {k: statistics.median(v) for k, v in times.items()}


def run(quick: bool = False, device: str | None = None, iters: int | None = None, latent: int | None = None,
        compile_backend: str | None = "inductor", subjects: bool = True) -> dict:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from .. import LoLDUConfig, inject_loldu, load_adapter, loldu_parameters, save_adapter
    from ..model import iter_layers
    from .authors import inject_authors

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    cfg = QUICK if quick else SD15
    latent = latent or (8 if quick else (64 if cuda else 32))
    iters = iters or (3 if quick else (20 if cuda else 5))
    warmup = 1 if quick else (5 if cuda else 2)
    # quick inference forwards take milliseconds: more interleaved rounds, for medians a busy machine does not sway
    infer_iters = 15 * iters if quick else iters
    rank = 8 if quick else 32
    r = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
         "config": "quick" if quick else "sd15", "latent": latent, "dtype": str(dtype).replace("torch.", ""), "rank": rank,
         "iters": iters, "infer_iters": infer_iters}
    peak = {}

    unet = build_unet(cfg, device, dtype)
    inp = inputs(unet, latent, device, dtype)
    unet.requires_grad_(False)
    r["floor_s"], peak["floor"] = train_step_cost(unet, [], inp, device, warmup, iters)
    original = dict(unet.attn_processors)

    sync(device)
    t0 = time.perf_counter()
    inject_loldu(unet, LoLDUConfig(rank=rank, init="lu", unet_targets=TARGETS))
    sync(device)
    r["attach_s"] = time.perf_counter() - t0
    r["layers"] = len(list(iter_layers(unet)))
    params = loldu_parameters(unet)
    r["loldu_params"] = sum(p.numel() for p in params)
    r["loldu_s"], peak["loldu"] = train_step_cost(unet, params, inp, device, warmup, iters)
    with torch.no_grad():
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
            p.requires_grad_(False)  # trained: inference rows serve it (cached δ), as an app does
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.safetensors")
        save_adapter(unet, path, adapter_name="default")
        r["file_kb"] = os.path.getsize(path) / 1000
        sync(device)
        t0 = time.perf_counter()
        for n in range(16):  # 16 loaded adapters, blended
            load_adapter(unet, path, adapter_name=f"b{n}", weight=0.1)
        sync(device)
        r["load_adapter_s"] = (time.perf_counter() - t0) / 16  # read, validate against the base, attach
        r.update(many_adapters_cost(unet, path, device, loaded=200))
    with torch.no_grad():  # 16 different adapters, not 16 copies
        for *_, layer in iter_layers(unet):
            for n in range(16):
                layer.adapters[f"b{n}"].z.mul_(1 + 0.01 * n)
    loldu_procs = dict(unet.attn_processors)

    # Inference states are measured in interleaved rounds, so that drift of a busy machine
    # (clock, caches, other load) falls on every state alike.
    names = ("base", "unfused", "fused", "blend1", "blend4", "blend16")
    times = {n: [] for n in names}
    for rnd in range(warmup + infer_iters):
        for n in names[rnd % len(names):] + names[: rnd % len(names)]:  # each state takes each place in a round
            set_inference_state(unet, n, original, loldu_procs)
            infer_cost(unet, inp, device, 0, 1)  # untimed: a blend's δ is computed at the first forward after a change
            t = infer_cost(unet, inp, device, 0, 1)
            if rnd >= warmup:
                times[n].append(t)
    for n in names:
        r[f"{n}_infer_s"] = statistics.median(times[n])
        set_inference_state(unet, n, original, loldu_procs)
        infer_cost(unet, inp, device, 0, 1)
        r[f"{n}_py_calls"] = python_calls(unet, inp)
    set_inference_state(unet, "unfused", original, loldu_procs)
    serving = serving_cost(unet, latent, device, dtype, original, loldu_procs, warmup, infer_iters)
    r["batch16_hetero_setup_s"] = serving.pop("hetero_setup")
    for n, secs in serving.items():
        r[f"batch16_{n}_infer_s"] = secs
    if compile_backend:
        r["compile_backend"] = compile_backend
        r["compile_s"], r["compiled_infer_s"], r["eager_infer_s"] = compile_cost(unet, inp, device, original, loldu_procs, warmup,
                                                                                 infer_iters, compile_backend)
    del unet

    for name, init in (("lora", "gaussian"), ("olora", "olora")):
        unet, params = lora_unet(cfg, device, dtype, init)
        r[f"{name}_params"] = sum(p.numel() for p in params)
        r[f"{name}_s"], peak[name] = train_step_cost(unet, params, inp, device, warmup, iters)
        if name == "lora":
            with tempfile.TemporaryDirectory() as tmp:
                StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=get_peft_model_state_dict(unet))
                r["lora_file_kb"] = os.path.getsize(os.path.join(tmp, "pytorch_lora_weights.safetensors")) / 1000
        del unet

    if compile_backend:
        r["compile_train_s"], r["loldu_compiled_s"], r["loldu_eager_s"] = compile_train_cost(cfg, device, dtype, rank, latent,
                                                                                           warmup, iters, compile_backend)
    unet = build_unet(cfg, device, dtype)
    params = inject_authors(unet, rank, TARGETS)
    r["authors_s"], peak["authors"] = train_step_cost(unet, params, inp, device, warmup, iters)
    del unet
    r["peak_mb"] = peak
    ms = r["multi_subject"] = multi_subject_cost(steps=20 if quick else 100) if subjects else None
    compiled = {"compiled_vs_eager": r["compiled_infer_s"] / r["eager_infer_s"],
                "compiled_train_vs_eager": r["loldu_compiled_s"] / r["loldu_eager_s"]} if compile_backend else {}
    r["ratios"] = compiled | {
        "loldu_vs_floor": r["loldu_s"] / r["floor_s"],
        "loldu_vs_lora": r["loldu_s"] / r["lora_s"],
        "authors_vs_loldu": r["authors_s"] / r["loldu_s"],
        "fused_vs_base": r["fused_infer_s"] / r["base_infer_s"],
        "blend4_vs_blend1": r["blend4_infer_s"] / r["blend1_infer_s"],
        "blend16_vs_blend1": r["blend16_infer_s"] / r["blend1_infer_s"],
        "blend16_vs_blend1_py_calls": r["blend16_py_calls"] / r["blend1_py_calls"],
        "hetero16_vs_same16": r["batch16_hetero_infer_s"] / r["batch16_same_infer_s"],
        "lora_params_vs_loldu": r["lora_params"] / r["loldu_params"],
    } | ({"subjects8_vs_8_runs": ms["together_s"][8] / sum(ms["separate_s"][:8]),
          "subjects8_floor_bound": ms["floor_rows_s"][8] / (8 * ms["floor_rows_s"][1])} if ms else {})
    return r


def markdown(r: dict) -> str:
    p = r["peak_mb"]
    mem = "CUDA peak MB" if "cuda" in r["dtype"] or r["device"].lower().startswith(("nvidia", "tesla")) else "MB (saved activations + grads + Adam state)"
    rows = [
        ("frozen UNet, backward to input (floor)", r["floor_s"], p["floor"], "—", "—"),
        (f"LoLDU r={r['rank']} (this project)", r["loldu_s"], p["loldu"], f"{r['loldu_params']:,}", f"{r['file_kb']:.1f} KB"),
        ("PEFT LoRA r=4", r["lora_s"], p["lora"], f"{r['lora_params']:,}", f"{r['lora_file_kb']:.1f} KB"),
        ("PEFT OLoRA r=4", r["olora_s"], p["olora"], f"{r['olora_params']:,}", "(LoRA r=8 after conversion)"),
        (f"authors' formulation r={r['rank']} (dense P·L·diag(z)·U)", r["authors_s"], p["authors"], f"{r['loldu_params']:,}", "—"),
    ]
    out = [f"UNet `{r['config']}` on {r['device']}, latents {r['latent']}×{r['latent']}, {r['dtype']}, {r['layers']} adapted layers.", "",
           f"| training step | s/step | ×floor | {mem} | trainable | file |", "|---|---|---|---|---|---|"]
    for name, s, m, n, f in rows:
        out.append(f"| {name} | {s:.4f} | {s / r['floor_s']:.3f} | {m:.1f} | {n} | {f} |")
    out += ["", "| inference | s/forward | ×base | Python calls / forward |", "|---|---|---|---|"]
    for k, name in (("base", "base"), ("unfused", "LoLDU unfused"), ("fused", "LoLDU fused"),
                    ("blend1", "1 adapter (blend path)"), ("blend4", "4 blended"), ("blend16", "16 blended")):
        secs = r[f"{k}_infer_s"]
        calls = r.get(f"{k}_py_calls")
        out.append(f"| {name} | {secs:.4f} | {secs / r['base_infer_s']:.3f} | {'—' if calls is None else f'{calls:,}'} |")
    out += ["", "| batch of 16 (serving) | s/forward | ×base | ×one adapter |", "|---|---|---|---|"]
    for k, name in (("base", "base"), ("same", "one adapter for all 16"), ("hetero", "16 different adapters, one per sample")):
        v = r[f"batch16_{k}_infer_s"]
        out.append(f"| {name} | {v:.4f} | {v / r['batch16_base_infer_s']:.3f} | {v / r['batch16_same_infer_s']:.3f} |")
    out += ["", f"Setting 16 per-sample blends (once per batch: every layer's 16 × r δ, and the first forward's extra over the next): {r['batch16_hetero_setup_s'] * 1000:.1f} ms."]
    if "compile_s" in r:
        out += ["", f"| torch.compile ({r['compile_backend']}), LoLDU unfused, batch 1 | s/forward | ×eager |", "|---|---|---|",
                f"| eager | {r['eager_infer_s']:.4f} | 1.000 |",
                f"| compiled | {r['compiled_infer_s']:.4f} | {r['compiled_infer_s'] / r['eager_infer_s']:.3f} |",
                "", f"First compiled call (tracing and compiling): {r['compile_s']:.1f} s.",
                "", f"| torch.compile ({r['compile_backend']}), LoLDU r={r['rank']} training step | s/step | ×eager |", "|---|---|---|",
                f"| eager | {r['loldu_eager_s']:.4f} | 1.000 |",
                f"| compiled | {r['loldu_compiled_s']:.4f} | {r['loldu_compiled_s'] / r['loldu_eager_s']:.3f} |",
                "", f"First compiled step (forward and backward): {r['compile_train_s']:.1f} s."]
    out += ["", f"Attach (decompose all {r['layers']} layers at r={r['rank']}): {r['attach_s']:.3f} s."]
    if "load_adapter_s" in r:  # runs before session 17 did not time it
        out += ["", f"Load an adapter file onto the base (read, check every tensor against the base, attach; mean of 16): "
                f"{r['load_adapter_s'] * 1000:.1f} ms."]
    if "loaded_adapter_kb" in r:  # runs before session 18 did not measure it
        out += [f"With {r['adapters_loaded_before']} adapters loaded already: {r['load_adapter_many_s'] * 1000:.1f} ms. "
                f"Memory one loaded adapter holds (Python objects and its δ table): {r['loaded_adapter_kb']:.1f} KB "
                f"(its file: {r['file_kb']:.1f} KB)."]
    ms = r.get("multi_subject")
    if ms:
        out += ["", f"| training K subjects on the embedded base, {ms['steps']} steps (whole run, in-process) | seconds | per subject | "
                "×K separate runs |", "|---|---|---|---|"]
        for k, secs in ms["together_s"].items():
            alone = sum(ms["separate_s"][: int(k)])
            out.append(f"| one --concepts_list run, K = {k} | {secs:.1f} | {secs / int(k):.1f} | {secs / alone:.3f} |")
        out.append(f"| one run per subject (mean of {len(ms['separate_s'])}) | {statistics.mean(ms['separate_s']):.1f} | "
                   f"{statistics.mean(ms['separate_s']):.1f} | 1.000 |")
        if "floor_rows_s" in ms:  # runs before session 17 did not measure it
            f = ms["floor_rows_s"]
            out += ["", "| frozen embedded UNet, forward + backward, K × 4 rows (the arithmetic of one step) | s/step | "
                    "×K steps of 4 rows |", "|---|---|---|"]
            one = f[1] if 1 in f else f["1"]  # keys are strings once read back from the JSON
            out += [f"| K = {k} ({int(k) * 4} rows) | {secs:.4f} | {secs / (int(k) * one):.3f} |" for k, secs in f.items()]
    return "\n".join(out)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["floor", "loldu", "lora", "olora", "authors"]
    secs = [r[f"{n}_s"] for n in names]
    ms = r.get("multi_subject") or {}
    fig, axes = plt.subplots(1, 3 if ms else 2, figsize=(13.5 if ms else 9, 3.2))
    axes[0].bar(names, secs, color=["gray", "C0", "C1", "C2", "C3"])
    axes[0].set_ylabel("s / training step")
    axes[1].bar(names, [r["peak_mb"][n] for n in names], color=["gray", "C0", "C1", "C2", "C3"])
    axes[1].set_ylabel("MB")
    if ms:  # K subjects in one run against K runs, and what the UNet's arithmetic alone allows
        ks = [int(k) for k in ms["together_s"]]
        axes[2].plot(ks, [secs / sum(ms["separate_s"][:k]) for k, secs in zip(ks, ms["together_s"].values())], "o-",
                     label="one --concepts_list run")
        if "floor_rows_s" in ms:
            f = {int(k): v for k, v in ms["floor_rows_s"].items()}
            axes[2].plot(list(f), [v / (k * f[1]) for k, v in f.items()], "s--", color="gray", label="frozen UNet arithmetic")
        axes[2].axhline(1.0, color="black", lw=0.5)
        axes[2].axhline(0.25, color="C3", ls=":", label="issue 16's target at K = 8")
        axes[2].set_xlabel("subjects K")
        axes[2].set_ylabel("time / K separate runs")
        axes[2].set_ylim(0, 1.2)
        axes[2].legend(fontsize=8)
    fig.suptitle(f"training step cost, {r['config']} UNet on {r['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
