"""A procedural captioned-image world: one object on a plain background, 64×64 RGB.

Every scene is a `Scene` (shape, object colour, background colour, marking, size, position);
`render(scene)` draws it with PIL and `caption(scene)` describes it. Everything is
deterministic from a seed, so the base model, the judge and the benchmarks can be rebuilt.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # draw at 4× and downsample: anti-aliased edges the VAE can reproduce

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring")
OBJECT_COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (40, 210, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 200),
    "pink": (250, 120, 190),
}
BACKGROUND_COLORS = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (225, 205, 160),
    "navy": (20, 30, 90),
    "olive": (110, 120, 40),
}
MARKINGS = ("none", "dot", "stripe", "cross")

# Words the tokenizer knows but no caption ever uses: DreamBooth subject identifiers.
RARE_WORDS = ("sks", "zwx", "qlt", "vvb", "ohwx", "xyr", "pfm", "tok")
PROMPT_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ")


@dataclass(frozen=True)
class Scene:
    shape: str
    object_color: str
    background_color: str
    marking: str = "none"
    scale: float = 1.0  # object radius as a fraction of the nominal 18 px
    dx: float = 0.0  # centre offset in pixels
    dy: float = 0.0


def random_scene(rng: random.Random, **fixed) -> Scene:
    """A random scene; attributes given in `fixed` are kept."""
    shape = fixed.get("shape") or rng.choice(SHAPES)
    color = fixed.get("object_color") or rng.choice(list(OBJECT_COLORS))
    background = fixed.get("background_color") or rng.choice(list(BACKGROUND_COLORS))
    marking = fixed.get("marking") or rng.choice(MARKINGS)
    return Scene(
        shape,
        color,
        background,
        marking,
        scale=fixed.get("scale", rng.uniform(0.8, 1.2)),
        dx=fixed.get("dx", rng.uniform(-7, 7)),
        dy=fixed.get("dy", rng.uniform(-7, 7)),
    )


def _star(cx, cy, r):
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _heart(cx, cy, r):
    pts = []
    for k in range(60):
        t = 2 * math.pi * k / 60
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x * r / 17, cy - y * r / 17 - r * 0.1))
    return pts


def _marking_color(rgb):
    """Black on light objects, white on dark ones (by luma, so purple gets a white marking)."""
    return (15, 15, 15) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (245, 245, 245)


def _draw_shape(draw, shape, cx, cy, r, fill, hole):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
    elif shape == "heart":
        draw.polygon(_heart(cx, cy, r), fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        h = r * 0.55
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=hole)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_marking(draw, scene: Scene, cx, cy, r):
    """The marking's own mask (255 = marked), before clipping to the object."""
    # Where every shape has object pixels: the ring's band is to the left of its hole.
    mx = cx - r * 0.77 if scene.shape == "ring" else cx
    my = cy + (r * 0.15 if scene.shape == "triangle" else 0)
    if scene.marking == "dot":  # a disc ≈ 14 px across, off-centre so a dotted circle is no ring
        m = r * 0.4
        ox, oy = (0, 0) if scene.shape == "ring" else (r * 0.25, -r * 0.2)
        draw.ellipse([mx + ox - m, my + oy - m, mx + ox + m, my + oy + m], fill=255)
    elif scene.marking == "stripe":  # a horizontal band ≈ 10 px tall across the whole object
        w = r * 0.28
        draw.rectangle([cx - 2 * r, my - w, cx + 2 * r, my + w], fill=255)
    elif scene.marking == "cross":  # two bands ≈ 8 px wide, across the whole object
        w = r * 0.22
        draw.rectangle([cx - 2 * r, my - w, cx + 2 * r, my + w], fill=255)
        draw.rectangle([mx - w, cy - 2 * r, mx + w, cy + 2 * r], fill=255)


def render(scene: Scene) -> Image.Image:
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUND_COLORS[scene.background_color])
    draw = ImageDraw.Draw(img)
    color = OBJECT_COLORS[scene.object_color]
    cx, cy = (SIZE / 2 + scene.dx) * s, (SIZE / 2 + scene.dy) * s
    r = 18 * scene.scale * s
    _draw_shape(draw, scene.shape, cx, cy, r, color, BACKGROUND_COLORS[scene.background_color])
    if scene.marking != "none":
        # Markings are coarse (≥ 2 latent pixels = 8 px across at scale 1) and clipped to the
        # object: the base must be able to draw them, or no adapter can learn them (v2's 2-px
        # stripes and crosses were read in 17 % and 4 % of images the base was asked for).
        shape_mask = Image.new("L", img.size, 0)
        _draw_shape(ImageDraw.Draw(shape_mask), scene.shape, cx, cy, r, 255, 0)
        mark_mask = Image.new("L", img.size, 0)
        _draw_marking(ImageDraw.Draw(mark_mask), scene, cx, cy, r)
        mask = ImageChops.multiply(shape_mask, mark_mask)
        img.paste(Image.new("RGB", img.size, _marking_color(color)), (0, 0), mask)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def caption(scene: Scene, rng: random.Random | None = None, drop: float = 0.0) -> str:
    """'a red star with a dot on a navy background'. With `rng` and `drop` > 0, attributes are
    dropped at random so the model also learns partial prompts ('a photo of a star')."""

    def keep():
        return rng is None or rng.random() >= drop

    words = []
    if keep():
        words.append(scene.object_color)
    words.append(scene.shape)
    text = " ".join(words)
    if scene.marking != "none" and keep():
        text += f" with a {scene.marking}"
    if keep():
        text += f" on a {scene.background_color} background"
    prefix = rng.choice(PROMPT_PREFIXES) if rng is not None else ""
    article = "an" if text[0] in "aeiou" else "a"
    return f"{prefix}{article} {text}"


def vocabulary() -> list[str]:
    """Every whole word the world's tokenizer knows."""
    words = set(SHAPES) | set(OBJECT_COLORS) | set(BACKGROUND_COLORS) | set(MARKINGS) | set(RARE_WORDS)
    words |= {"a", "an", "on", "with", "background", "photo", "of", "image", "picture", "the", "in"}
    return sorted(words)


def to_tensor(img: Image.Image) -> np.ndarray:
    """uint8 HWC image → float32 CHW in [-1, 1]."""
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def render_dataset(n: int, seed: int, drop: float = 0.0, **fixed):
    """n (image array [-1,1] CHW, caption, scene) triples, deterministic in `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, **fixed)
        out.append((to_tensor(render(scene)), caption(scene, rng, drop), scene))
    return out

