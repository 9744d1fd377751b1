"""A copy of the embedded base whose identifier words have embedding rows of a trained word's size.

    python -m loldu_diffusion.toy.identifier_rows OUT [--base PATH] [--seed 0]

The identifiers ("sks", "zwx", …) never occur in the base's training captions, so their rows
of the text encoder's embedding table are still at their random initialisation: norm ≈ 0.2,
against ≈ 0.59 for trained words. The text encoder then reads "a photo of sks heart" almost as
"a photo of a heart" (5 % apart at the identifier's position, 0–3 % elsewhere), so a UNet-only
adapter trained with prior preservation is asked to draw the subject and the class for nearly
the same conditioning. On SD 1.5, "sks" is a trained token of CLIP's vocabulary. This copy
gives each identifier a random direction at the trained words' mean norm (30 % apart at its
position); nothing else changes, so the class and explicit prompts draw exactly as before.
An experiment for the learning bench (`loldu bench learning --base OUT`), not the shipped base.
"""
from __future__ import annotations

import argparse
import os
import shutil

import torch


def identifier_rows(base: str, out: str, seed: int = 0) -> float:
    """Write the copy to `out` (which must not exist); returns the norm given to the rows."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..io import atomic_save_dir
    from .world import RARE_WORDS, vocabulary

    tok = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder"))
    table = te.get_input_embeddings().weight  # (vocab, width)
    words = [tok(w, add_special_tokens=False).input_ids[0] for w in vocabulary() if w not in RARE_WORDS]
    norm = float(table[words].norm(dim=1).mean())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in RARE_WORDS:
            v = torch.randn(table.shape[1], generator=g)
            table[tok(w, add_special_tokens=False).input_ids[0]] = v / v.norm() * norm

    def write(tmp):
        shutil.copytree(base, tmp, dirs_exist_ok=True)
        te.save_pretrained(os.path.join(tmp, "text_encoder"))

    atomic_save_dir(write, out)
    return norm


def main(argv=None):
    from . import default_base_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--base", default=None, help="default: the embedded base")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    norm = identifier_rows(a.base or default_base_path(), a.out, a.seed)
    print(f"wrote {a.out}: identifier rows at norm {norm:.3f}")


if __name__ == "__main__":
    main()
