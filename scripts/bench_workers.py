"""Does `num_workers` ever make reading slower? ShardLoader against a DataLoader over a
ShardDataset built by hand, in the loop the peer benchmark uses.

Usage:
    python scripts/bench_workers.py [--out bench-out/workers] [--src FOLDER] [--images 1500]
                                    [--rounds 3] [--write-doc docs/performance.md]

The corpus (--src: an image folder; default: the photo-like corpus bench_convert.py makes) is
converted at 150 and 224 px raw and at 224 px jpeg q90. Each configuration reads 2 epochs in
batches of 64, in stored order, and the second is timed; every batch is copied into one
staging tensor (the host side of ``.to(device)``), as ../shared/peer-bench does:

* ``ShardLoader`` (threads in this process; ``num_workers=2`` and ``8`` are accepted and not
  used, with a warning);
* ``DataLoader(ShardDataset(...), batch_size=None, num_workers=k)``: worker processes a user
  builds by hand (k = 2, 8), each copying or decoding alone, batches handed over through
  shared memory.

Configurations alternate round by round; the table gives medians (min-max) of samples/s and
CPU ms per sample (this process and its workers). --write-doc puts it between
``<!-- workers:begin -->`` and ``<!-- workers:end -->``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_convert import corpus
from docblock import write_block

import shardkit
from shardkit.tools.monitor import cpu_seconds

BATCH = 64
BEGIN, END = "<!-- workers:begin -->", "<!-- workers:end -->"
DATASETS = (("raw", 150), ("raw", 224), ("jpeg", 224))


def loaders(path: Path) -> dict[str, Callable[[], Any]]:
    def shard_loader(workers: int) -> Callable[[], Any]:
        def make() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return shardkit.ShardLoader(path, BATCH, shuffle=False, num_workers=workers)
        return make

    def by_hand(workers: int) -> Callable[[], Any]:
        def make() -> Any:
            dataset = shardkit.ShardDataset(path, BATCH, shuffle=False)
            return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                               persistent_workers=True)
        return make

    return {"ShardLoader": shard_loader(0), "ShardLoader(num_workers=2)": shard_loader(2),
            "ShardLoader(num_workers=8)": shard_loader(8),
            "DataLoader(ShardDataset, num_workers=2)": by_hand(2),
            "DataLoader(ShardDataset, num_workers=8)": by_hand(8)}


def measure(make: Callable[[], Any], size: int) -> tuple[float, float]:
    """(samples/s, CPU ms per sample) of the second of two epochs."""
    staging = torch.empty((BATCH, size, size, 3), dtype=torch.uint8)
    loader = make()
    for _epoch in range(2):
        samples, cpu, started = 0, cpu_seconds(), time.perf_counter()
        for batch in loader:
            images = batch["image"]
            staging[:len(images)].copy_(images)
            samples += len(images)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    del loader
    return samples / seconds, 1000 * cpu / samples


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/workers"))
    parser.add_argument("--src", type=Path, default=None)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write-doc", type=Path, default=None)
    args = parser.parse_args()
    src = args.src or corpus(args.out.parent, args.images)
    rows = []
    for codec, size in DATASETS:
        data = args.out / f"{codec}-{size}"
        shardkit.convert(src, data, size=size, codec=codec, workers=2, progress=False, overwrite=True)
        runs: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for name, make in loaders(data).items():
                runs.setdefault(name, []).append(measure(make, size))
        for name, values in runs.items():
            rate, cpu = [v[0] for v in values], [v[1] for v in values]
            rows.append(f"| {codec} {size} px | {name} | {spread(rate, ',.0f')} | {spread(cpu, '.3f')} |")
            print(rows[-1], flush=True)
    table = "\n".join([
        BEGIN, "", "### `num_workers`: ShardLoader against worker processes built by hand", "",
        f"`python scripts/bench_workers.py --rounds {args.rounds}`: batches of {BATCH}, stored "
        "order, the second of two epochs, each batch copied into a staging tensor (as the peer "
        f"benchmark's loop does); medians (min-max) of {args.rounds} alternated rounds.", "",
        "| dataset | loader | samples/s | CPU ms/sample |", "|---|---|---|---|", *rows, "", END])
    print(table)
    if args.write_doc:
        write_block(args.write_doc, BEGIN, END, table)


if __name__ == "__main__":
    main()
