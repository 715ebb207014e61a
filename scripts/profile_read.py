"""Where a later epoch of the raw tar reader spends its time, and what a batch-sized copy costs.

    python scripts/profile_read.py bench-out/read/tar-150-x20

Part 1 times `gather` (the copy into the batch buffer) and `assemble` (the whole batch)
inside real ShardLoader epochs. Part 2 copies the same bytes out of one shard four ways:
batch-sized copies into 8 rotating buffers (what the loader's buffer pool amounts to) from
the page-cache memory map and from anonymous memory, into 1 buffer, and as one large copy
(glibc switches to non-temporal stores for copies that large).
"""

from __future__ import annotations

import argparse
import json
import mmap
import time
from pathlib import Path
from typing import Any

import numpy as np

import shardkit
from shardkit.reader import batches


def part1(path: Path, shuffle: bool, epochs: int = 4) -> None:
    spent = {"gather": 0.0, "assemble": 0.0}
    # batches imports gather without re-exporting it; the script swaps both for timed ones.
    gather, assemble = batches.gather, batches.assemble  # type: ignore[attr-defined]

    def timed_gather(*args: Any) -> None:
        started = time.perf_counter()
        gather(*args)
        spent["gather"] += time.perf_counter() - started

    def timed_assemble(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        batch = assemble(*args, **kwargs)
        spent["assemble"] += time.perf_counter() - started
        return batch

    batches.gather, batches.assemble = timed_gather, timed_assemble  # type: ignore[attr-defined,assignment]
    try:
        loader = shardkit.ShardLoader(path, 256, shuffle=shuffle)
        for epoch in range(epochs):
            spent.update(gather=0.0, assemble=0.0)
            started, count = time.perf_counter(), 0
            for batch in loader:
                count += len(batch["image"])
            wall = time.perf_counter() - started
            order = "shuffled" if shuffle else "sequential"
            print(f"{order} epoch {epoch}: {count / wall:9,.0f} samples/s; "
                  f"assemble {spent['assemble'] / wall:4.0%} of wall, gather {spent['gather'] / wall:4.0%}")
    finally:
        batches.gather, batches.assemble = gather, assemble  # type: ignore[attr-defined,assignment]


def best_rate(samples: int, run: Any, repeats: int = 5) -> float:
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = max(best, samples / (time.perf_counter() - started))
    return best


def part2(path: Path, batch: int = 256) -> None:
    index = json.loads((path / "index.json").read_text())
    record = index["shards"][0]
    layout, file = record["layout"], path / record["file"]
    height, width, channels = index["schema"]["image"]["shape"]
    stride, offset, image = layout["stride"], layout["offset"], height * width * channels
    count = record["samples"] - record["samples"] % batch
    with open(file, "rb") as handle:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapped = np.frombuffer(mmap.mmap(handle.fileno(), 0, flags=flags, prot=mmap.PROT_READ), np.uint8)
    anonymous = mapped.copy()

    def rows(buffer: np.ndarray) -> np.ndarray:
        return np.lib.stride_tricks.as_strided(buffer[offset:], shape=(count, image),
                                               strides=(stride, 1))

    def batch_copies(buffer: np.ndarray, targets: list[np.ndarray]) -> Any:
        source = rows(buffer)
        def run() -> None:
            for k, s in enumerate(range(0, count, batch)):
                np.copyto(targets[k % len(targets)], source[s:s + batch])
        return run

    eight = [np.ones((batch, image), np.uint8) for _ in range(8)]
    one = [np.ones((batch, image), np.uint8)]
    whole = np.ones(count * stride, np.uint8)
    print(f"one shard, {count} samples of {image:,} bytes, batches of {batch}:")
    cases = [
        ("batch copies into 8 buffers, from the memory map", batch_copies(mapped, eight)),
        ("batch copies into 8 buffers, from anonymous memory", batch_copies(anonymous, eight)),
        ("batch copies into 1 buffer, from anonymous memory", batch_copies(anonymous, one)),
        ("one copy of the whole shard", lambda: np.copyto(whole, anonymous[:count * stride])),
    ]
    for label, run in cases:
        print(f"  {label:52s} {best_rate(count, run):9,.0f} samples/s")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a raw tar dataset (e.g. bench-out/read/tar-150-x20)")
    args = parser.parse_args()
    part1(args.path, shuffle=False)
    part1(args.path, shuffle=True)
    part2(args.path)


if __name__ == "__main__":
    main()
