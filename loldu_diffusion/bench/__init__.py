"""Benchmarks: `loldu bench cost|learning [--quick] [--json] [--out DIR]` (also
`python -m loldu_diffusion.bench`). Each suite writes JSON, a Markdown table and a PNG plot
into --out (default bench_results/)."""
from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="loldu bench", description=__doc__)
    p.add_argument("suite", choices=["cost", "learning"])
    p.add_argument("--quick", action="store_true", help="a small configuration (seconds)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=None, help="learning: training steps per run (default: the embedded trainer default, 600)")
    p.add_argument("--subjects", type=int, default=None, help="learning: how many of the three subjects (default all; 1 = the bundled one)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.suite == "cost":
        from . import cost as suite

        result = suite.run(quick=a.quick, device=a.device)
    else:
        from . import learning as suite

        result = suite.run(quick=a.quick, steps=a.steps, out_dir=a.out, subjects=a.subjects)
    name = f"{a.suite}{'_quick' if a.quick else ''}"
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = suite.markdown(result)
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    suite.plot(result, os.path.join(a.out, f"{name}.png"))
    print(table)
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
