"""Tiny generated image trees shared by the conversion tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shardkit.tools.synth import photo_like


def image_tree(root: Path, *, classes: tuple[str, ...] = ("cat", "dog", "emu"), per_class: int = 5,
               seed: int = 0, min_side: int = 40, max_side: int = 90) -> list[Path]:
    """class folders of small photo-like JPEGs and PNGs; returns the files in sorted order."""
    rng = np.random.default_rng(seed)
    paths = []
    folders = [root / c for c in classes] if classes else [root]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            ext = "png" if j % 2 else "jpg"
            path = folder / f"im{j:03d}.{ext}"
            photo_like(w, h, rng).save(path)
            paths.append(path)
    return sorted(paths)


def add_bad_files(folder: Path) -> dict[str, str]:
    """Bad inputs in `folder`; returns {file name: expected reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    good = folder / "whole.jpg"
    photo_like(64, 48, np.random.default_rng(1)).save(good)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return {"empty.jpg": "empty_file", "notes.jpg": "not_an_image", "truncated.jpg": "truncated"}


def slow_tree(root: Path, pristine: Path) -> Path:
    """240 inputs that take a few seconds to convert (16 large images hard-linked 15 times
    into classes a, b, c) and one broken file, so that errors.jsonl and a resume journal carry
    a failure. `pristine` holds the 16 originals."""
    rng = np.random.default_rng(0)
    pristine.mkdir()
    for i in range(16):
        photo_like(1100, 900, rng).save(pristine / f"p{i:02d}.jpg", quality=92)
    for c, klass in enumerate(("a", "b", "c")):
        (root / klass).mkdir(parents=True)
        for i in range(80):
            os.link(pristine / f"p{(i + c) % 16:02d}.jpg", root / klass / f"{i:03d}.jpg")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file directly in `folder`, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def small_tree(root: Path, per_class: int) -> Path:
    """Three class folders of `per_class` small JPEGs: the reader tests' sources."""
    image_tree(root, classes=("a", "b", "c"), per_class=per_class, min_side=20, max_side=40)
    return root


def small_dataset(src: Path, out: Path, shard_samples: int, /, **options: object) -> Path:
    """`src` converted in this process to 12x10 images, `shard_samples` per shard unless
    `options` say otherwise: the reader tests' small datasets."""
    import shardkit

    options = {"samples_per_shard": shard_samples, **options}
    shardkit.convert(src, out, size=(12, 10), workers=0, **options)  # type: ignore[arg-type]
    return out


def to_array(im: Image.Image) -> np.ndarray:
    """H×W×C uint8 pixels of an RGB or L image (C = 1 for L)."""
    array = np.asarray(im, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def loader(path: Path, batch_size: int, workers: int, **options: object) -> Any:
    """ShardLoader for `workers` 0, else the DataLoader over a ShardDataset a user builds to
    read with worker processes (ShardLoader itself reads with threads)."""
    import torch

    import shardkit

    if workers == 0:
        return shardkit.ShardLoader(path, batch_size, **options)  # type: ignore[arg-type]
    dataset = shardkit.ShardDataset(path, batch_size, **options)  # type: ignore[arg-type]
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
