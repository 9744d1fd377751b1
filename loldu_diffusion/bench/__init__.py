"""Benchmarks: `loldu bench cost|learning [--quick] [--json] [--out DIR]` (also
`python -m loldu_diffusion.bench`). Each suite writes JSON, a Markdown table and a PNG plot
into --out (default bench_results/)."""
from __future__ import annotations

import argparse
import json
import os

from ..io import atomic_write, atomic_write_text


def main(argv=None) -> int:
    from ..cli import HelpFormatter

    p = argparse.ArgumentParser(prog="loldu bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("suite", choices=["cost", "learning"])
    p.add_argument("--quick", action="store_true", help="a small configuration (seconds)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    p.add_argument("--out", default="bench_results", help="folder for the results: JSON, a Markdown table, a PNG plot")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--compile", default="inductor", choices=["inductor", "eager", "none"],
                   help="cost: the torch.compile backend of the compiled-vs-eager rows (none: skip them; inductor compiles "
                   "for minutes on a CPU the first time, then hits its cache)")
    p.add_argument("--no_subjects", action="store_true", help="cost: skip the many-subjects rows (13 short trainer runs on the embedded base)")
    p.add_argument("--steps", type=int, default=None, help="learning: training steps per run (default 300, judged at 50, 100, 200, 300)")
    p.add_argument("--subjects", type=int, default=None, help="learning: how many bench subjects (default all five; 1 = the bundled one)")
    p.add_argument("--seeds", type=int, default=None, help="learning: training seeds per subject (default 2)")
    p.add_argument("--n", type=int, default=None, help="learning: images per prompt kind and checkpoint (default 48)")
    p.add_argument("--configs", default=None, help="learning: comma-separated config names to run (default all)")
    p.add_argument("--core", action="store_true", help="learning: the default, session 13's default (rank 32), LoLDU alone and the small-file peers only (LoRA r4; VeRA, IA³, textual inversion, plain and with the default's recipe)")
    p.add_argument("--no_held_out", action="store_true", help="learning: skip the held-out subjects")
    p.add_argument("--subject_names", default=None, help="learning: comma-separated subject identifiers to run (e.g. sks,zwx)")
    p.add_argument("--plan", default=None, metavar="JSON", help="learning: run exactly these [config, subject, seed] triples, in order "
                   "(docs/learning_plan_*.json are the published runs)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="learning: merge results (e.g. learning_partial.json of "
                   "processes that ran different subjects) instead of running")
    p.add_argument("--base", default=None, metavar="PATH", help="learning: train and judge on this base (a diffusers folder of the "
                   "toy world, e.g. one made by `python -m loldu_diffusion.toy.identifier_rows`); default the embedded base")
    a = p.parse_args(argv)
    if a.plan and a.merge:
        p.error("--plan runs a plan and --merge merges finished results: give one of them")
    if (a.plan or a.merge) and a.suite != "learning":
        p.error(f"--{'plan' if a.plan else 'merge'} is for the learning suite: loldu bench learning --{'plan' if a.plan else 'merge'} …")
    for flag, path in [("--plan", a.plan)] * bool(a.plan) + [("--merge", m) for m in a.merge or []]:
        if not os.path.isfile(path):
            p.error(f"{flag} {path}: no such file")
    name = f"{a.suite}{'_quick' if a.quick else ''}"
    outputs = [os.path.join(a.out, f"{name}.{ext}") for ext in ("json", "md", "png")]
    if not a.overwrite and any(map(os.path.exists, outputs)):  # before the run: a long one's results are not lost at its end
        p.error(f"--out {a.out}: {name}.json/.md/.png are already there (an earlier run's results); "
                "choose another --out or add --overwrite")
    os.makedirs(a.out, exist_ok=True)
    if a.suite == "cost":
        from . import cost as suite

        result = suite.run(quick=a.quick, device=a.device, compile_backend=None if a.compile == "none" else a.compile,
                           subjects=not a.no_subjects)
    else:
        from . import learning as suite

        if a.merge:
            result = suite.merge(a.merge)
        elif a.plan:
            with open(a.plan) as f:
                plan = [tuple(x) for x in json.load(f)]
            result = suite.run_plan(plan, a.steps or suite.CHECKPOINTS[-1], a.n or 48, a.out, base_path=a.base)
        else:
            result = suite.run(quick=a.quick, steps=a.steps, out_dir=a.out, subjects=a.subjects, seeds=a.seeds, n=a.n,
                               which="core" if a.core else "all", held_out=not a.no_held_out,
                               configs_only=a.configs.split(",") if a.configs else None,
                               subject_names=a.subject_names.split(",") if a.subject_names else None)
    table = suite.markdown(result)
    atomic_write_text(outputs[0], json.dumps(result, indent=1))
    atomic_write_text(outputs[1], table + "\n")
    atomic_write(outputs[2], lambda tmp: suite.plot(result, tmp), ".png")
    print(table)
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
