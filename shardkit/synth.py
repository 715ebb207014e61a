"""Synthetic photo-like images, for the demo, the benchmarks and the tests.

Real photographs cost JPEG decoders more than flat synthetic pictures do, because fine texture
leaves more DCT coefficients to decode. These images mix smooth gradients, shapes and
band-limited noise so their JPEG sizes and decode times resemble photos of the same size
(about 2-3 bits per pixel at quality 90).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["make_image_folder", "photo_like"]


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image with gradients, a few shapes and fine texture."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, size=(3, 2)).astype(np.float32) * 400 / max(width, height)
    pixels = base + x[..., None] * slope[:, 0] + y[..., None] * slope[:, 1]
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1 + 1, y1 + 1), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    texture = rng.normal(0, 14, size=(height // 2 + 1, width // 2 + 1, 3)).astype(np.float32)
    texture = np.repeat(np.repeat(texture, 2, axis=0), 2, axis=1)[:height, :width]
    noisy = np.asarray(im, dtype=np.float32) + texture
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(root: str | os.PathLike[str], *, classes: int = 3, per_class: int = 20,
                      min_side: int = 300, max_side: int = 1200, seed: int = 0,
                      quality: int = 90) -> list[Path]:
    """Write ``root/class_i/img_j.jpg`` photo-like JPEGs of random sizes; return their paths.

    With ``classes=0`` the images go straight into `root` (a flat, unlabelled folder).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    paths = []
    folders = [root / f"class_{c}" for c in range(classes)] if classes else [root]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            path = folder / f"img_{j:04d}.jpg"
            photo_like(width, height, rng).save(path, quality=quality)
            paths.append(path)
    return paths
