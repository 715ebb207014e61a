"""`make demo`: generate a small photo-like image folder, convert it, describe it, preview it,
and read the shards back.

Usage: python scripts/demo.py [WORKDIR]   (default: demo)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import shardkit
from shardkit.tools.synth import make_image_folder


def run(*args: str) -> None:
    print("$ shardkit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "shardkit", *args], check=True)


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "demo")
    src, out = work / "src", work / "shards"
    if not src.exists():
        print(f"generating photo-like JPEGs (300-1200 px) in {src} ...", flush=True)
        make_image_folder(src, classes=3, per_class=40, seed=7)
    run("convert", str(src), str(out), "--size", "150", "--samples-per-shard", "48",
        "--shuffle", "--seed", "0", "--overwrite", "--no-progress")
    run("info", str(out))
    run("preview", str(out), "-o", str(work / "preview.png"), "--n", "36")

    dataset = shardkit.open(out)
    started = time.perf_counter()
    seen = 0
    label_sum = 0
    for number in range(len(dataset.manifest.shards)):
        shard = dataset.read_shard(number)
        assert isinstance(shard.images, np.ndarray) and shard.labels is not None
        seen += len(shard.images)
        label_sum += int(shard.labels.sum())
        print(f"shard {number}: images {shard.images.dtype} {tuple(shard.images.shape)}, "
              f"labels {shard.labels.tolist()[:8]}...")
    seconds = time.perf_counter() - started
    if seen != len(dataset):
        print(f"read back {seen} samples but index.json lists {len(dataset)}", file=sys.stderr)
        return 1
    print(f"read back all {seen} samples in {seconds * 1000:.1f} ms; "
          f"preview: {work / 'preview.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
