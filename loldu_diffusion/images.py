"""Reading images people give us, defensively: any format PIL reads, EXIF rotation, alpha,
16-bit and palette images become 8-bit RGB; decompression bombs, absurd sizes, FIFOs and
broken files are skipped with a reason, never fatal and never a hang."""
from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Checked on the header, before decoding: a few-KB PNG can declare 20000×20000 pixels, and a
# 1×20000 strip would be upscaled to resolution × 20000·resolution.
MAX_PIXELS = 64_000_000  # an 8000×8000 photo; larger ones are skipped (downscale them)
MAX_ASPECT = 8.0  # longer side / shorter side; a panorama beyond that is not a subject photo


class DataError(ValueError):
    """A problem with the training images the user must fix."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image (EXIF-rotated, grayscale, RGBA, palette, CMYK, 16-bit) → 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def read_images(folder: str, flag: str = "--instance_data_dir") -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """(path, RGB image) for every readable image in `folder`, and the names it skipped."""
    if not folder or not os.path.isdir(folder):
        raise DataError(f"{flag} {folder!r}: no such folder")
    names = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    images, skipped = [], []
    for n in names:
        path = os.path.join(folder, n)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
                skipped.append(f"{n} (not a regular file)")
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # bounded below
                with Image.open(path) as im:
                    problem = _size_problem(*im.size)
                    if problem:
                        skipped.append(f"{n} ({problem})")
                        continue
                    im.load()
                    images.append((path, to_rgb(im)))
        except Image.DecompressionBombError:  # PIL's own limit, hit while reading the header
            skipped.append(f"{n} (more than {MAX_PIXELS // 1_000_000} megapixels; downscale it)")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            skipped.append(f"{n} ({type(e).__name__})")
    return images, skipped


def _size_problem(w: int, h: int) -> str | None:
    if w < 1 or h < 1:
        return f"{w}×{h} pixels"
    if w * h > MAX_PIXELS:
        return f"{w}×{h} is more than {MAX_PIXELS // 1_000_000} megapixels; downscale it"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return f"{w}×{h}: aspect ratio beyond {MAX_ASPECT:g}:1; crop it"
    return None
