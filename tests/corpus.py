"""Tiny generated image trees shared by the conversion tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardkit.synth import photo_like


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
