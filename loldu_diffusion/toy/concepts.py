"""DreamBooth subjects of the toy world: one specific object (shape + colour + marking) rendered
at varied sizes and positions on varied backgrounds, like 3–10 photos of a user's dog.

    python -m loldu_diffusion.toy.concepts OUT_DIR --shape heart --color purple --marking stripe
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass

import torch

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

    @property
    def description(self) -> str:
        """What the base is told when asked for the subject exactly: its ceiling."""
        article = "an" if self.object_color[0] in "aeiou" else "a"  # as the world's captions say it
        return f"a photo of {article} {self.object_color} {self.shape} with a {self.marking}"

    def prompt_on(self, background: str) -> str:
        """A recontextualisation prompt: the subject on a background it was not shown on."""
        return f"a photo of {self.identifier} {self.shape} on a {background} background"

    def description_on(self, background: str) -> str:
        return f"{self.description} on a {background} background"

    def shown_in(self, attrs: dict) -> bool:
        """Does a judged image show this subject (shape, colour and marking all match)?"""
        return (attrs["shape"], attrs["object_color"], attrs["marking"]) == (self.shape, self.object_color, self.marking)


DEFAULT_SUBJECT = Subject("heart", "purple", "stripe")
# The learning benchmark's subjects (each with its own identifier word). Defaults are tuned on
# BENCH_SUBJECTS only; HELD_OUT subjects are reported in their own rows. Every subject must pass
# `admission` on the base it is measured on.
BENCH_SUBJECTS = (DEFAULT_SUBJECT, Subject("star", "orange", "dot", "zwx"), Subject("square", "cyan", "cross", "qlt"),
                  Subject("triangle", "green", "stripe", "vvb"), Subject("circle", "pink", "cross", "ohwx"))
HELD_OUT_SUBJECTS = (Subject("ring", "blue", "stripe", "xyr"), Subject("heart", "yellow", "dot", "pfm"),
                     Subject("square", "red", "stripe", "tok"))
# Instance images use these backgrounds only, so the others measure recontextualisation.
TRAIN_BACKGROUNDS = ("white", "gray", "beige")
UNSEEN_BACKGROUNDS = tuple(b for b in world.BACKGROUND_COLORS if b not in TRAIN_BACKGROUNDS)
ADMIT_EXPLICIT, ADMIT_CLASS = 0.8, 0.05


def is_admitted(explicit: float, class_rate: float) -> bool:
    """The admission rule: told exactly, the base shows the whole subject in ≥ 80 % of images;
    from the class prompt, in ≤ 5 %."""
    return explicit >= ADMIT_EXPLICIT and class_rate <= ADMIT_CLASS


@torch.no_grad()
def explicit_rate(pipe, judge, subject: Subject, n: int = 48, seed: int = 5000) -> float:
    """How often the base shows the whole subject when told exactly: the subject's ceiling."""
    from .evaluate_base import generate

    return sum(map(subject.shown_in, judge.read(generate(pipe, [subject.description] * n, seed)))) / n


@torch.no_grad()
def admission(pipe, judge, subject: Subject, n: int = 48, seed: int = 5000) -> dict:
    """Can the base draw the subject at all, and does it not already draw it unasked?"""
    from .evaluate_base import generate

    cls = judge.read(generate(pipe, [subject.class_prompt] * n, seed + 1))
    r = {"explicit": explicit_rate(pipe, judge, subject, n, seed), "class": sum(map(subject.shown_in, cls)) / n, "n": n}
    r["admitted"] = is_admitted(r["explicit"], r["class"])
    return r


def read_subject(folder: str) -> Subject | None:
    """The toy-world subject a folder of instance images shows, if `render_subject` wrote it."""
    path = os.path.join(folder, "subject.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return Subject(**json.load(f))


def render_subject(subject: Subject, out_dir: str, n: int = 5, seed: int = 0, captions: bool = False) -> list[str]:
    """Write n instance images (PNG) of the subject, a README with its prompts and subject.json
    (what the trainer's judge compares the learnt images with). With `captions`, each image gets a
    NAME.txt caption that names its background, as a user captions photos for kohya's trainers:
    the identifier then need not carry the background the photos happen to share."""
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
        if captions:
            with open(os.path.join(out_dir, f"{i:02d}.txt"), "w") as f:
                f.write(subject.prompt_on(scene.background_color) + "\n")
    with open(os.path.join(out_dir, "subject.json"), "w") as f:
        json.dump(asdict(subject), f)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(
            f"# {subject.identifier} {subject.shape}\n\n"
            f"A {subject.object_color} {subject.shape} with a {subject.marking}, {n} images on "
            f"{', '.join(TRAIN_BACKGROUNDS[:n])} backgrounds.\n\n"
            f"instance prompt: `{subject.instance_prompt}`\n\nclass prompt: `{subject.class_prompt}`\n"
            + (f"\nEach image's caption (`NAME.txt`, e.g. `{subject.prompt_on(TRAIN_BACKGROUNDS[0])}`) names its background, so the "
               "identifier does not learn the backgrounds the photos share.\n" if captions else "")
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
    p.add_argument("--captions", action="store_true", help="write NAME.txt beside each image, naming its background")
    a = p.parse_args(argv)
    paths = render_subject(Subject(a.shape, a.color, a.marking, a.identifier), a.out_dir, a.n, a.seed, a.captions)
    print(f"wrote {len(paths)} images to {a.out_dir}")


if __name__ == "__main__":
    main()
