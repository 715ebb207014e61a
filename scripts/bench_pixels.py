"""Raw Parquet pixels as bytes (the default) against Hugging Face's Array3D (``--pixels
array3d``): bytes a sample on disk, conversion speed, and reading speed, through shardkit's
reader and through ``datasets`` (``load_dataset("parquet")``, numpy format), on the
benchmark's photo-like corpus.

Usage:
    python scripts/bench_pixels.py [--out bench-out] [--images 600] [--repeats 3] [--quick]

Prints a markdown table of medians (ranges in brackets); the layouts run round-robin. The
shardkit read is a second pass over the dataset (shards opened, page cache warm), batches of
64 in order; the ``datasets`` read is ``load_dataset`` (which reads the Parquet files into its
Arrow cache, once) and a pass in slices of 64 (bytes: ``np.frombuffer`` of each row, as
format.md tells its users to write; Array3D: ``with_format("numpy", dtype=np.uint8)``), timed
together, the cache emptied each round. Conversion runs with 2 workers at 150 px.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_convert import corpus, corpus_arguments

import shardkit

LAYOUTS = (("bytes", "none"), ("array3d", "none"), ("array3d", "zstd"))
SIZE = 150
BATCH = 64


def convert(src: Path, out: Path, pixels: str, compression: str) -> float:
    started = time.perf_counter()
    shardkit.convert(src, out, size=SIZE, format="parquet", pixels=pixels, compression=compression,
                     workers=2, progress=False, overwrite=True)
    return time.perf_counter() - started


def read_shardkit(out: Path) -> float:
    data = shardkit.open(out)
    for _ in data.batches(BATCH, shuffle=False):  # first pass: shards opened, pages cached
        pass
    started, samples = time.perf_counter(), 0
    for batch in data.batches(BATCH, shuffle=False):
        samples += len(batch["image"])
    return samples / (time.perf_counter() - started)


def read_datasets(out: Path, pixels: str, cache: str) -> float:
    import datasets

    files = sorted(str(p) for p in out.glob("*.parquet"))
    started = time.perf_counter()
    loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    # bytes: Python bytes per row (numpy's format makes fixed-width bytes, which drop trailing
    # zero bytes); Array3D: numpy's format, kept uint8.
    rows_of = loaded.select_columns(["image"]) if pixels == "bytes" else \
        loaded.with_format("numpy", columns=["image"], dtype=np.uint8)
    shape = (SIZE, SIZE, 3)
    for begin in range(0, len(loaded), BATCH):
        rows = rows_of[begin:begin + BATCH]["image"]
        if pixels == "bytes":
            images = np.stack([np.frombuffer(r, np.uint8).reshape(shape) for r in rows])
        else:
            images = np.asarray(rows)
        assert images.shape[1:] == shape
    return len(loaded) / (time.perf_counter() - started)


def main() -> None:
    args, images, repeats = corpus_arguments(__doc__, None, what="pixels", quick_images=60,
                                             repeats=3)
    out = Path(args.out)
    src = corpus(out, images)
    results: dict[tuple[str, str], dict[str, list[float]]] = {
        layout: {"convert": [], "read": [], "hf": []} for layout in LAYOUTS}
    sizes: dict[tuple[str, str], float] = {}
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # datasets' own setting: nothing to fetch
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        for _ in range(repeats):
            for pixels, compression in LAYOUTS:
                target = Path(scratch) / f"{pixels}-{compression}"
                seconds = convert(src, target, pixels, compression)
                runs = results[(pixels, compression)]
                runs["convert"].append(images / seconds)
                runs["read"].append(read_shardkit(target))
                runs["hf"].append(read_datasets(target, pixels, str(Path(scratch) / "hf-cache")))
                shutil.rmtree(Path(scratch) / "hf-cache", ignore_errors=True)
                sizes[(pixels, compression)] = sum(
                    f.stat().st_size for f in target.glob("*.parquet")) / images

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"

    print(f"{images} images at {SIZE} px, {repeats} rounds; samples/s, medians (ranges)\n")
    print("| layout | bytes/sample | convert (2 workers) | shardkit read | datasets read |")
    print("|---|---|---|---|---|")
    for layout in LAYOUTS:
        r = results[layout]
        name = f"`--pixels {layout[0]}`" + (f" `--compression {layout[1]}`" if layout[1] != "none" else "")
        print(f"| {name} | {sizes[layout]:,.0f} | {cell(r['convert'])} | {cell(r['read'])} | "
              f"{cell(r['hf'])} |")


if __name__ == "__main__":
    main()
