"""Tabular CSV benchmark: conversion time and peak RSS, then training-time reading.

Generates a CSV of ROWS rows × 20 numeric columns + 1 string column + an integer label, then
in one run measures:

* conversion (``shardkit.convert``) in a child process: wall time and the child's peak RSS
  (``ru_maxrss``), beside the CSV's size;
* reading EPOCHS epochs of shuffled batches, as rows/s and CPU-seconds per row (process CPU
  time, all threads): (a) what a tabular training loop does today, ``pandas.read_csv`` each
  epoch + a torch ``TensorDataset`` in a ``DataLoader``; (b) ``shardkit.ShardLoader``.

Usage: python scripts/bench_csv.py [--rows 1000000] [--out bench-out/csv]
       [--write-doc docs/performance.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from docblock import write_block

BEGIN, END = "<!-- csv:begin -->", "<!-- csv:end -->"
FEATURES = 20
CITIES = [f"city_{i:02d}" for i in range(40)]


def make_csv(path: Path, rows: int, seed: int = 0) -> None:
    """ROWS rows written in chunks (bounded memory), floats with 6 significant digits."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    chunk = 200_000
    with open(path, "w", encoding="utf-8") as handle:
        for first in range(0, rows, chunk):
            n = min(chunk, rows - first)
            frame = pd.DataFrame(rng.standard_normal((n, FEATURES)).astype(np.float32),
                                 columns=[f"x{i:02d}" for i in range(FEATURES)])
            frame["city"] = np.asarray(CITIES)[rng.integers(0, len(CITIES), n)]
            frame["label"] = rng.integers(0, 10, n)
            frame.to_csv(handle, index=False, header=first == 0, float_format="%.6g")


_CHILD = """
import json, resource, sys, time
import shardkit
start = time.perf_counter()
summary = shardkit.convert(sys.argv[1], sys.argv[2], label_col="label", overwrite=True,
                           progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "samples": summary.samples,
                  "bytes": summary.bytes,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def convert(csv: Path, out: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(csv), str(out)], check=True,
                          capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def read_pandas(csv: Path, epochs: int, batch_size: int) -> tuple[float, float, int]:
    """(wall s, CPU s, rows) for read_csv each epoch + TensorDataset + shuffled DataLoader."""
    import pandas as pd
    import torch

    rows = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for epoch in range(epochs):
        frame = pd.read_csv(csv)
        frame["city"] = frame["city"].astype("category").cat.codes
        features = torch.from_numpy(frame.drop(columns="label").to_numpy(np.float32))
        labels = torch.from_numpy(frame["label"].to_numpy(np.int64, copy=True))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(features, labels), batch_size=batch_size,
            shuffle=True, generator=torch.Generator().manual_seed(epoch))
        for x, _y in loader:
            rows += len(x)
    return time.perf_counter() - wall, time.process_time() - cpu, rows


def read_shardkit(out: Path, epochs: int, batch_size: int) -> tuple[float, float, int]:
    import shardkit

    rows = 0
    cpu, wall = time.process_time(), time.perf_counter()
    loader = shardkit.ShardLoader(out, batch_size=batch_size, shuffle=True, seed=0)
    for _epoch in range(epochs):
        for batch in loader:
            rows += len(batch["features"])
    return time.perf_counter() - wall, time.process_time() - cpu, rows


def report(args: argparse.Namespace, csv_bytes: int, conv: dict[str, float],
           reads: dict[str, tuple[float, float, int]]) -> str:
    mb = 1e6
    lines = [
        "## Tabular CSV (`scripts/bench_csv.py`)",
        "",
        f"{args.rows:,} rows × {FEATURES} numeric + 1 string column + integer label; CSV "
        f"{csv_bytes / mb:,.0f} MB. Command: `python scripts/bench_csv.py --rows {args.rows}`.",
        "",
        f"**Conversion** (one process, streamed): {conv['seconds']:.1f} s "
        f"({args.rows / conv['seconds']:,.0f} rows/s), peak RSS of the converting process "
        f"**{conv['peak_rss'] / mb:,.0f} MB** (a quarter of the rows: "
        f"{conv['quarter_rss'] / mb:,.0f} MB: memory does not grow with the file), output "
        f"{conv['bytes'] / mb:,.1f} MB of Parquet.",
        "",
        f"**Reading**, {args.epochs} epochs, shuffled batches of {args.batch_size}:",
        "",
        "| loader | rows/s | CPU-µs per row | wall s |",
        "|---|---:|---:|---:|",
    ]
    for name, (wall, cpu, rows) in reads.items():
        lines.append(f"| {name} | {rows / wall:,.0f} | {cpu / rows * 1e6:,.2f} | {wall:.1f} |")
    (pw, pc, pr), (sw, sc, sr) = reads.values()
    lines += ["", f"shardkit vs pandas + TensorDataset: **{(sr / sw) / (pr / pw):,.0f}×** the "
                  f"rows/s, **{(pc / pr) / (sc / sr):,.0f}×** less CPU per row. The baseline "
                  "re-parses the CSV every epoch and collates per row; shardkit reads typed "
                  "columns once per shard and gathers whole batches with numpy."]
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    write_block(path, BEGIN, END, f"{BEGIN}\n{block}\n{END}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench-out/csv"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--write-doc", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    csv = args.out / f"table-{args.rows}.csv"
    quarter = args.out / f"table-{args.rows // 4}.csv"
    for path, rows in ((csv, args.rows), (quarter, args.rows // 4)):
        if not path.exists():
            make_csv(path, rows)
    small = convert(quarter, args.out / "quarter")
    conv = convert(csv, args.out / "shards")
    conv["quarter_rss"] = small["peak_rss"]
    print(f"conversion: {conv['seconds']:.1f} s, peak RSS {conv['peak_rss'] / 1e6:.0f} MB")
    reads = {
        "pandas `read_csv` each epoch + `TensorDataset` + `DataLoader`":
            read_pandas(csv, args.epochs, args.batch_size),
        "shardkit `ShardLoader`": read_shardkit(args.out / "shards", args.epochs, args.batch_size),
    }
    block = report(args, csv.stat().st_size, conv, reads)
    print(block)
    if args.write_doc is not None:
        write_doc(args.write_doc, block)


if __name__ == "__main__":
    main()
