"""--concepts_list FILE.json: K subjects in one run, one LoLDU adapter each.

The file is the list DreamBooth users know (ShivamShrirao's diffusers fork, kohya's
dataset configs), one entry per subject:

    [{"instance_prompt": "a photo of sks dog", "instance_data_dir": "data/dog",
      "class_prompt": "a photo of a dog", "class_data_dir": "class/dog", "name": "dog"}, …]

(class_* only with --with_prior_preservation; `name`, optional, names the subject's output
folder and adapter: default the instance folder's name.)

Subjects share no trained value, so one run of K subjects is K runs in one: every subject has
its own adapter on every layer, each sample of the UNet batch uses its own subject's δ
(`LoLDULayer.sample_weights`, as serving does), the loss is the sum of the subjects' own
DreamBooth losses, each subject's gradients are clipped on their own, and every subject's
batch, noise and timesteps come from the same per-step generator a run of that subject alone
would use. With Adam (elementwise) and one schedule, subject k's adapter equals the one
`--instance_data_dir <k's folder>` trains with the same flags and seed (a test checks it).
What is shared is the cost: one model load, one UNet call per step over K × batch rows.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass

from ..model import adapter_name_from_path, check_adapter_name


@dataclass(frozen=True)
class Concept:
    name: str
    instance_prompt: str
    instance_data_dir: str
    class_prompt: str | None = None
    class_data_dir: str | None = None


KEYS = ("name", "instance_prompt", "instance_data_dir", "class_prompt", "class_data_dir")
# a subject's name is a folder of --output_dir on every file system: no separators, no case-only twins, none of the
# run's own names (checkpoints are pruned, logs and class_images are left out of uploads)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RESERVED = re.compile(r"(?i)(checkpoint-\d+(\.tmp)?|logs|class_images|con|prn|aux|nul|com\d|lpt\d)")


def _folder(here: str, given: str) -> str:
    """A relative folder from the list's own folder; else, as ShivamShrirao's fork reads it,
    from the current folder."""
    beside = os.path.join(here, given)
    return beside if os.path.isdir(beside) or not os.path.isdir(given) else os.path.abspath(given)


def read_concepts_list(path: str, output_dir: str, with_prior: bool) -> tuple[Concept, ...]:
    """The subjects of a --concepts_list file; ValueError (one line naming the file and the
    entry) for anything that would fail later. Relative folders are read from the file's folder
    (or, when not there, from the current one)."""
    flag = f"--concepts_list {path}"
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{flag}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: not JSON ({e}); give a list of {{\"instance_prompt\": …, \"instance_data_dir\": …}} entries") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{flag}: give a non-empty JSON list with one {{\"instance_prompt\": …, \"instance_data_dir\": …}} per subject")
    here = os.path.dirname(os.path.abspath(path))
    concepts, names = [], set()
    for i, e in enumerate(entries):
        where = f"{flag}, entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: a {type(e).__name__}, not an object with instance_prompt and instance_data_dir")
        unknown = sorted(set(e) - set(KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; the keys are {', '.join(KEYS)}")
        for key in ("instance_prompt", "instance_data_dir") + (("class_prompt",) if with_prior else ()):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise ValueError(f"{where}: {key} is missing" + (" (--with_prior_preservation needs one per subject)" if key == "class_prompt" else ""))
        folder = _folder(here, e["instance_data_dir"])
        given = e.get("name")
        name = given
        if not given:  # the folder's name, made unique as folders compare ('dog', 'Dog' → 'dog', 'Dog_2')
            stem = adapter_name_from_path(os.path.basename(os.path.normpath(folder)))
            name, k = stem, 2
            while name.lower() in names:
                name, k = f"{stem}_{k}", k + 1
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise ValueError(f"{where}: name {name!r}: {err}") from None
        if not isinstance(name, str) or not NAME.fullmatch(name) or RESERVED.fullmatch(name):
            what = "is a name the run uses itself" if isinstance(name, str) and RESERVED.fullmatch(name) else \
                "must be 1–64 letters, digits, '_' or '-', starting with a letter or digit"
            raise ValueError(f"{where}: name {name!r} {what}: it names the subject's folder in --output_dir"
                             + ("" if given else "; add a \"name\" to the entry"))
        if name.lower() in names:
            raise ValueError(f"{where}: the name {name!r} is already used by another subject (names are compared without case, as "
                             "macOS and Windows compare folder names); names must differ: they name the output folders")
        names.add(name.lower())
        class_dir = e.get("class_data_dir")
        class_dir = _folder(here, class_dir) if class_dir else (os.path.join(output_dir, name, "class_images") if with_prior else None)
        concepts.append(Concept(name, e["instance_prompt"], folder, e.get("class_prompt"), class_dir))
    return tuple(concepts)


def subject_args(args: argparse.Namespace, concept: Concept) -> argparse.Namespace:
    """The arguments of the run that would train this subject alone, writing into its own
    folder of --output_dir (a copy; `args` is not changed)."""
    return argparse.Namespace(**vars(args) | {
        "instance_prompt": concept.instance_prompt, "instance_data_dir": concept.instance_data_dir,
        "class_prompt": concept.class_prompt, "class_data_dir": concept.class_data_dir,
        "output_dir": os.path.join(args.output_dir, concept.name), "concepts": None, "concepts_list": None,
    })
