"""Does the loop wait for data? The stall monitor on the raw folder and on its shards.

    python examples/monitor_demo.py shards                      # ShardLoader
    python examples/monitor_demo.py shards --raw data/train     # PIL + DataLoader on the folder

The "model" is a stand-in for a GPU that consumes `--rate` samples/s: it sleeps for
batch/rate seconds, because a GPU step costs the CPU almost nothing. Whatever the loader
cannot deliver in that time shows up as waiting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

import shardkit


class RawFolder(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The loader most people have today: decode, convert and crop one JPEG per sample."""

    def __init__(self, root: str, size: tuple[int, int], limit: int) -> None:
        files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        classes = sorted({p.parent.name for p in files})
        step = max(1, len(files) // limit)
        self.files = files[::step][:limit]
        self.labels = [classes.index(p.parent.name) for p in self.files]
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        with Image.open(self.files[i]) as im:
            pixels = np.array(ImageOps.fit(im.convert("RGB"), self.size, Image.Resampling.BILINEAR))
        return {"image": torch.from_numpy(pixels), "label": self.labels[i]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="a dataset folder written by `shardkit convert`")
    parser.add_argument("--raw", default=None, help="the raw folder: monitor the PIL loader on it instead")
    parser.add_argument("--rate", type=float, default=3000, help="samples/s the stand-in model consumes")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for --raw")
    parser.add_argument("--limit", type=int, default=1024, help="raw samples per epoch")
    args = parser.parse_args()

    if args.raw:
        height, width, _ = shardkit.open(args.shards).shape or (224, 224, 3)
        loader: Any = torch.utils.data.DataLoader(
            RawFolder(args.raw, (width, height), args.limit), batch_size=args.batch_size,
            shuffle=True, num_workers=args.workers)
    else:
        loader = shardkit.ShardLoader(args.shards, args.batch_size, shuffle=True)
    mon = shardkit.monitor(loader)
    for _ in range(args.epochs):
        for batch in mon:
            time.sleep(len(batch["label"]) / args.rate)  # the "GPU" step
    if len(mon.epochs) > 1:
        print(mon.total().line("total"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
