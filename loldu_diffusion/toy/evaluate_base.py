"""How well does a base model of the toy world follow its prompts? The judge decides.

    python -m loldu_diffusion.toy.evaluate_base [--base PATH] [--n 48] [--json]

Generates one image per prompt for a fixed set of prompts ("a red star on a navy background"),
asks the judge for shape, object colour, marking and background colour, and reports the
fraction of images right on each and on all four together. Writes a contact sheet PNG.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from . import world

GUIDANCE = 4.0
STEPS = 20


def prompt_set(n: int = 48) -> list[dict]:
    """n prompts covering every shape, colour, marking and background (a fixed, seedless list)."""
    colors, backgrounds = list(world.OBJECT_COLORS), list(world.BACKGROUND_COLORS)
    out = []
    for i in range(n):
        a = dict(shape=world.SHAPES[i % 6], object_color=colors[(i * 3 + i // 6) % 8], background_color=backgrounds[(i * 5 + i // 8) % 6],
                 marking=world.MARKINGS[(i + i // 12) % 4])
        marking = "" if a["marking"] == "none" else f" with a {a['marking']}"
        a["prompt"] = f"a {a['object_color']} {a['shape']}{marking} on a {a['background_color']} background"
        out.append(a)
    return out


def load_pipeline(path: str | None = None, dtype=torch.float32):
    from ..pipeline import load_base

    return load_base(path, dtype)


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE, batch: int = 64, negative_prompt=None):
    """One image per prompt; image i uses generator seed + i, so results do not depend on batching."""
    from ..pipeline import draw

    return draw(pipe, prompts, [seed + i for i in range(len(prompts))], batch=batch, num_inference_steps=steps, guidance_scale=guidance,
                negative_prompt=negative_prompt, height=64, width=64)


def contact_sheet(images, path: str, columns: int = 12, scale: int = 2):
    from PIL import Image

    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (64 * columns, 64 * rows), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im.resize((64, 64)), (64 * (i % columns), 64 * (i // columns)))
    sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)


def evaluate(pipe, judge, n: int = 48, seed: int = 0, sheet: str | None = None) -> dict:
    prompts = prompt_set(n)
    images = generate(pipe, [p["prompt"] for p in prompts], seed)
    read = judge.read(images)
    keys = ("shape", "object_color", "background_color", "marking")
    hits = {k: sum(r[k] == p[k] for r, p in zip(read, prompts)) / n for k in keys}
    hits["all"] = sum(all(r[k] == p[k] for k in keys) for r, p in zip(read, prompts)) / n
    hits["n"] = n
    if sheet:
        contact_sheet(images, sheet)
    return hits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="diffusers model folder (default: the embedded assets/tiny-sd)")
    p.add_argument("--n", type=int, default=48, help="number of prompts (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheet", default="output/evaluate_base.png", help="contact sheet PNG")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    a = p.parse_args(argv)
    from .judge import load_judge

    result = evaluate(load_pipeline(a.base), load_judge(), a.n, a.seed, a.sheet)
    if a.json:
        print(json.dumps(result))
    else:
        for k in ("shape", "object_color", "background_color", "marking", "all"):
            print(f"{k:>17}: {result[k]:.1%}")
        print(f"{result['n']} images; contact sheet: {a.sheet}")


if __name__ == "__main__":
    main()
