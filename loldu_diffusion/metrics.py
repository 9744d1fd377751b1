"""DreamBooth's metrics for users who have the evaluation models on disk (nothing is fetched):

    DINO    mean cosine of DINO ViT CLS embeddings, generated × real images (subject fidelity)
    CLIP-I  the same with CLIP image embeddings
    CLIP-T  mean cosine of CLIP image embedding and the prompt's text embedding (prompt fidelity)
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .images import read_images


def _images(folder: str, flag: str):
    found, skipped = read_images(folder, flag)
    if not found:
        raise FileNotFoundError(f"{flag} {folder}: no readable image")
    return [im for _, im in found]


def _require(path: str, flag: str):
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{flag} {path}: not a local transformers model folder (no config.json)")


@torch.no_grad()
def clip_embeddings(clip_path: str, images, text: str | None = None):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    _require(clip_path, "--clip")
    model = CLIPModel.from_pretrained(clip_path).eval()
    proc = AutoImageProcessor.from_pretrained(clip_path)
    img = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt").pixel_values)
    img = getattr(img, "pooler_output", img)
    txt = None
    if text is not None:
        tok = AutoTokenizer.from_pretrained(clip_path)
        ids = tok([text], padding=True, truncation=True, return_tensors="pt")
        txt = model.get_text_features(**ids)
        txt = getattr(txt, "pooler_output", txt)
    return F.normalize(img, dim=-1), None if txt is None else F.normalize(txt, dim=-1)


@torch.no_grad()
def dino_embeddings(dino_path: str, images):
    from transformers import AutoImageProcessor, AutoModel

    _require(dino_path, "--dino")
    model = AutoModel.from_pretrained(dino_path).eval()
    proc = AutoImageProcessor.from_pretrained(dino_path)
    out = model(pixel_values=proc(images=images, return_tensors="pt").pixel_values)
    return F.normalize(out.last_hidden_state[:, 0], dim=-1)  # CLS token


def dreambooth_metrics(images_dir: str, reference_dir: str, prompt: str, clip_path: str, dino_path: str | None = None) -> dict:
    gen = _images(images_dir, "--images")
    ref = _images(reference_dir, "--reference")
    gen_clip, text = clip_embeddings(clip_path, gen, prompt)
    ref_clip, _ = clip_embeddings(clip_path, ref)
    result = {
        "clip_i": float((gen_clip @ ref_clip.T).mean()),
        "clip_t": float((gen_clip @ text.T).mean()),
        "n_images": len(gen),
        "n_reference": len(ref),
    }
    if dino_path:
        result["dino"] = float((dino_embeddings(dino_path, gen) @ dino_embeddings(dino_path, ref).T).mean())
    return result
