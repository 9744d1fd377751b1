"""The judge: a small CNN that reads shape, object colour, background colour and marking
from a 64×64 render. Offline, it plays the role DINO / CLIP-I / CLIP-T play in DreamBooth's
benchmark: it says whether a generated image shows what was asked for."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from .world import BACKGROUND_COLORS, MARKINGS, OBJECT_COLORS, SHAPES, Scene

ATTRIBUTES = {
    "shape": list(SHAPES),
    "object_color": list(OBJECT_COLORS),
    "background_color": list(BACKGROUND_COLORS),
    "marking": list(MARKINGS),
}


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(
            block(3, width), block(width, width * 2), block(width * 2, width * 4), block(width * 4, width * 4),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # (B, 3, 64, 64) → (B, 4w)
        self.heads = nn.ModuleDict({k: nn.Linear(width * 4, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, 64, 64) in [-1, 1] → logits per attribute."""
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images) -> list[dict[str, str]]:
        """PIL images or a (B,3,64,64) tensor in [-1,1] → one attribute dict per image."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([torch.from_numpy(_pil_to_array(im)) for im in images])
        self.eval()
        logits = self(images.float())
        idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        return [{k: ATTRIBUTES[k][idx[k][i]] for k in ATTRIBUTES} for i in range(images.shape[0])]


def _pil_to_array(img) -> np.ndarray:
    img = img.convert("RGB")
    if img.size != (64, 64):
        img = img.resize((64, 64))
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def labels_of(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in ATTRIBUTES.items()}


def save_judge(judge: Judge, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, os.path.join(path, "judge.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"width": judge.features[1][0].in_channels, "attributes": ATTRIBUTES}, f, indent=1)


def load_judge(path: str | None = None) -> Judge:
    from safetensors.torch import load_file

    from . import default_judge_path

    path = path or default_judge_path()
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    judge = Judge(cfg["width"])
    judge.load_state_dict(load_file(os.path.join(path, "judge.safetensors")))
    return judge.eval()
