"""Synthetic photo-like images, for the demo, the benchmarks and the tests.

Real photographs cost JPEG decoders more than flat synthetic pictures do, because texture
leaves more DCT coefficients to decode. These images mix smooth gradients, shapes and texture
whose strength falls from coarse to fine scales, as in natural images (white noise at every
pixel would make them harder to decode than photos: entropy decoding would dominate and hide
what draft decoding saves). At quality 90 they take about 1.7 bits per pixel.
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
    pixels = np.asarray(im, dtype=np.float32)
    for cell, sigma in ((16, 10.0), (4, 7.0), (1, 5.0)):  # coarse to fine
        rows, cols = height // cell + 2, width // cell + 2
        if cell == 1:
            pixels = pixels + rng.normal(0, sigma, size=(height, width, 3)).astype(np.float32)
            continue
        noise = Image.fromarray(rng.normal(0, sigma, size=(rows, cols)).astype(np.float32))
        smooth = np.asarray(noise.resize((cols * cell, rows * cell), Image.Resampling.BILINEAR))
        pixels = pixels + smooth[:height, :width, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


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
