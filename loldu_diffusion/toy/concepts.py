"""DreamBooth subjects of the toy world: one specific object (shape + colour + marking) rendered
at varied sizes and positions on varied backgrounds, like 3–10 photos of a user's dog.

    python -m loldu_diffusion.toy.concepts OUT_DIR --shape heart --color purple --marking stripe
"""
from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

from . import world


@dataclass(frozen=True)
class Subject:
    shape: str
    object_color: str
    marking: str
    identifier: str = "sks"

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.identifier} {self.shape}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.shape}"

    def prompt_on(self, background: str) -> str:
        """A recontextualisation prompt: the subject on a background it was not shown on."""
        return f"a photo of {self.identifier} {self.shape} on a {background} background"

    def shown_in(self, attrs: dict) -> bool:
        """Does a judged image show this subject (shape, colour and marking all match)?"""
        return (attrs["shape"], attrs["object_color"], attrs["marking"]) == (self.shape, self.object_color, self.marking)


DEFAULT_SUBJECT = Subject("heart", "purple", "stripe")
# Extra subjects for the learning benchmark (each with its own identifier word).
BENCH_SUBJECTS = (DEFAULT_SUBJECT, Subject("star", "orange", "dot", "zwx"), Subject("square", "cyan", "cross", "qlt"))
TRAIN_BACKGROUNDS = ("white", "gray", "beige", "black", "navy")


def render_subject(subject: Subject, out_dir: str, n: int = 5, seed: int = 0) -> list[str]:
    """Write n instance images (PNG) of the subject and a README with its prompts."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(n):
        scene = world.random_scene(
            rng, shape=subject.shape, object_color=subject.object_color, marking=subject.marking,
            background_color=TRAIN_BACKGROUNDS[i % len(TRAIN_BACKGROUNDS)],
        )
        path = os.path.join(out_dir, f"{i:02d}.png")
        world.render(scene).save(path)
        paths.append(path)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(
            f"# {subject.identifier} {subject.shape}\n\n"
            f"A {subject.object_color} {subject.shape} with a {subject.marking}, {n} images on "
            f"{', '.join(TRAIN_BACKGROUNDS[:n])} backgrounds.\n\n"
            f"instance prompt: `{subject.instance_prompt}`\n\nclass prompt: `{subject.class_prompt}`\n"
        )
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--shape", default=DEFAULT_SUBJECT.shape, choices=world.SHAPES)
    p.add_argument("--color", default=DEFAULT_SUBJECT.object_color, choices=list(world.OBJECT_COLORS))
    p.add_argument("--marking", default=DEFAULT_SUBJECT.marking, choices=world.MARKINGS)
    p.add_argument("--identifier", default="sks")
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = render_subject(Subject(a.shape, a.color, a.marking, a.identifier), a.out_dir, a.n, a.seed)
    print(f"wrote {len(paths)} images to {a.out_dir}")


if __name__ == "__main__":
    main()
