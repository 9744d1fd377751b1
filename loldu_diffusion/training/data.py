"""DreamBooth data: instance (and class) images, read defensively, sampled deterministically.

Every random choice of a training step (which images, flips, crops) comes from a generator
seeded by (seed, step, micro-batch, process), so a resumed run sees exactly the batches an
uninterrupted one would have seen, and each process of a multi-process run sees its own.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .compat import INTERPOLATION
from ..images import IMAGE_EXTENSIONS, MAX_ASPECT, MAX_PIXELS, DataError, read_images, to_rgb  # noqa: F401 — re-exported

MAX_CAPTION_BYTES = 64 * 1024


def caption_for(path: str, default: str) -> str:
    """A per-image caption from NAME.txt beside the image, else the instance prompt."""
    txt = os.path.splitext(path)[0] + ".txt"
    if os.path.isfile(txt):  # a regular file (or a link to one): a FIFO named x.txt is ignored
        with open(txt, "rb") as f:
            raw = f.read(MAX_CAPTION_BYTES + 1)
        if len(raw) > MAX_CAPTION_BYTES:
            raise DataError(f"caption {txt}: longer than {MAX_CAPTION_BYTES:,} bytes; a caption is one sentence")
        try:
            text = raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"caption {txt}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        if text:
            return text
    return default


def identifier_of(instance_prompt: str, class_prompt: str | None) -> str | None:
    """The instance prompt's word that the class prompt lacks: a known identifier ('sks') first, then a rare-looking one,
    so that 'a dslr photo of sks dog' against 'a dog' gives 'sks' (not 'dslr' or 'photo'); else the first word the class
    prompt lacks; None when it lacks none."""
    class_words = {w.lower() for w in (class_prompt or "").split()}
    extra = [w for w in (instance_prompt or "").split() if w.lower() not in class_words and w.lower() not in ("a", "an", "the")]
    known = (w for w in extra if w.lower() in KNOWN_IDENTIFIERS)
    return next(known, next((w for w in extra if is_rare_word(w)), extra[0] if extra else None))


def class_caption(caption: str, instance_prompt: str, class_prompt: str) -> str | None:
    """The class prompt in the caption's context: 'a photo of sks heart on a white background' → 'a photo of a heart on a
    white background'. The instance prompt matches as whole words, in any case ('A photo of sks heart, …'); in a caption
    that keeps only a rare identifier, the identifier gives way to the class word ('sks dog on a grey sofa' → 'dog on a
    grey sofa', 'sks on a sofa' → 'dog on a sofa'); None for a caption naming neither (nothing says what to keep)."""
    whole = re.compile(rf"(?<!\w){re.escape(instance_prompt)}(?!\w)", re.IGNORECASE)
    if whole.search(caption):
        return whole.sub(lambda _: class_prompt, caption, count=1)
    ident = identifier_of(instance_prompt, class_prompt)
    noun = (class_prompt.split() or [""])[-1]
    if not (ident and is_rare_word(ident) and noun):  # a common word ('photo') is no identifier to take out of captions
        return None
    alone = re.compile(rf"(?<!\w){re.escape(ident)}(?:\s+({re.escape(noun)}s?))?(?!\w)", re.IGNORECASE)
    if not alone.search(caption):
        return None
    return alone.sub(lambda mt: mt.group(1) or noun, caption, count=1)


def class_captions(instance_captions, instance_prompt: str, class_prompt: str) -> list[str]:
    """The class prompt in each context the instance captions name (class_caption), each once, in order; a caption naming
    neither the instance prompt nor its identifier gives the class prompt alone."""
    out = [class_caption(c, instance_prompt, class_prompt) or class_prompt for c in instance_captions]
    return list(dict.fromkeys(out)) or [class_prompt]


RESAMPLE = {name: Image.Resampling[name.upper()] for name in INTERPOLATION}  # --image_interpolation_mode's choices


def readable_images(folder: str, flag: str = "--instance_data_dir") -> tuple[list, list[str]]:
    """read_images, or DataError naming the folder if none of its files is a readable image."""
    found, skipped = read_images(folder, flag)
    if not found:
        what = "no readable image" if skipped else f"no image ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        raise DataError(f"{flag} {folder!r}: {what} found; add 3–10 photos of the subject")
    return found, skipped


def resize_shorter(img: Image.Image, size: int, resample: str | None = None) -> torch.Tensor:
    """Shorter side to `size` (bicubic unless --image_interpolation_mode), as a (3, H, W) tensor in [-1, 1]."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), RESAMPLE[resample or "bicubic"])
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1).copy()) / 127.5 - 1.0


@dataclass
class ImageSet:
    images: list[torch.Tensor]  # (3, H, W), shorter side = resolution
    captions: list[str]
    paths: list[str] = field(default_factory=list)
    read_sides: list[int] = field(default_factory=list)  # shorter side of each distinct image as read (not repeated)

    def __len__(self):
        return len(self.images)

    @classmethod
    def from_folder(cls, folder, prompt, resolution, flag="--instance_data_dir", warn=print, resample=None) -> "ImageSet":
        found, skipped = readable_images(folder, flag)
        if skipped:
            warn(f"{flag} {folder}: skipped {len(skipped)} unreadable file(s): {', '.join(skipped)}")
        return cls([resize_shorter(im, resolution, resample) for _, im in found], [caption_for(p, prompt) for p, _ in found],
                   [p for p, _ in found], [min(im.size) for _, im in found])

    @classmethod
    def from_dataset(cls, name, config, image_column, caption_column, prompt, resolution, cache_dir=None, resample=None) -> "ImageSet":
        """A datasets-library dataset (hub id, or a local folder read as an imagefolder), as
        diffusers' SDXL DreamBooth script reads --dataset_name: the train split, images from
        --image_column, captions from --caption_column (else the instance prompt for all)."""
        try:
            from datasets import load_dataset
        except ImportError:
            raise DataError("--dataset_name needs the datasets package: pip install datasets") from None
        try:
            ds = load_dataset(name, config, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 — datasets raises many kinds for a missing or offline dataset
            local = _cached_dataset_repo(name, cache_dir)  # offline: the repo's files in the Hub cache, read as a folder
            if local is None:
                raise DataError(f"--dataset_name {name}: could not load it ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
            ds = load_dataset(local, config, cache_dir=cache_dir)
        split = ds["train"] if "train" in ds else next(iter(ds.values()))
        columns = split.column_names
        for flag, col in (("--image_column", image_column), ("--caption_column", caption_column)):
            if col is not None and col not in columns:
                raise DataError(f"{flag} {col!r}: the dataset {name} has no such column (it has {', '.join(columns)})")
        images = [to_rgb(im) for im in split[image_column]]
        if not images:
            raise DataError(f"--dataset_name {name}: no images in its train split")
        captions = [str(c) for c in split[caption_column]] if caption_column else [prompt] * len(images)
        return cls([resize_shorter(im, resolution, resample) for im in images], captions, [], [min(im.size) for im in images])

    def repeated(self, n: int) -> "ImageSet":
        """Each image n times (--repeats): longer epochs, the same images."""
        return self if n == 1 else ImageSet(self.images * n, self.captions * n, self.paths * n, self.read_sides)

    def crop(self, i: int, resolution: int, center: bool, flip: bool, gen: torch.Generator) -> torch.Tensor:
        img = self.images[i]
        _, h, w = img.shape
        if center:
            top, left = (h - resolution) // 2, (w - resolution) // 2
        else:
            top = int(torch.randint(0, h - resolution + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - resolution + 1, (1,), generator=gen))
        out = img[:, top : top + resolution, left : left + resolution]
        return out.flip(-1) if flip else out

    def needs_random_crop(self, resolution: int, center: bool) -> bool:
        return not center and any(img.shape[1] != resolution or img.shape[2] != resolution for img in self.images)


def _cached_dataset_repo(name: str, cache_dir=None) -> str | None:
    """The local snapshot of a Hub dataset repository, if the Hugging Face cache holds one."""
    if os.path.isdir(name):
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, repo_type="dataset", local_files_only=True, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 — not cached (or not a repo id)
        return None


def step_generator(seed: int, step: int, micro: int = 0, process: int = 0) -> torch.Generator:
    """The one source of randomness for (step, micro-batch, process): resumable and disjoint."""
    return torch.Generator().manual_seed((((seed * 1_000_003 + step) * 1009 + micro) * 257 + process) % (2**63 - 1))


def sample_indices(n: int, batch: int, gen: torch.Generator) -> list[int]:
    """`batch` indices; without repeats while the set is large enough."""
    if batch <= n:
        return torch.randperm(n, generator=gen)[:batch].tolist()
    return torch.randint(0, n, (batch,), generator=gen).tolist()


KNOWN_IDENTIFIERS = {"sks", "ohwx", "zwx", "qlt", "vvb", "xyr", "pfm", "tok", "bnha", "shs"}


def is_rare_word(word: str) -> bool:
    """'sks', 'ohwx', 'zwx': known identifiers, or short words with no vowel after the first letter."""
    word = word.lower()  # CLIP's tokenizers lower-case: 'SKS' is 'sks'
    return word in KNOWN_IDENTIFIERS or (3 <= len(word) <= 5 and word.isalpha() and not set(word[1:]) & set("aeiouy"))


def check_identifier(prompt: str) -> str | None:
    """A warning if the instance prompt has no rare identifier word (like 'sks')."""
    words = prompt.lower().replace(",", " ").split()
    if any(is_rare_word(w) for w in words):
        return None
    noun = words[-1] if words else "dog"
    return (f"--instance_prompt {prompt!r} has no rare identifier (like 'sks'): the model may change the whole "
            f"class instead of learning one subject; try 'a photo of sks {noun}'")
