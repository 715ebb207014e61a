"""Remote reading benchmark: a dataset in S3 read through the node-local shard cache, vs the
same dataset on local disk, in one run.

S3 is moto's server on 127.0.0.1 (in its own process, so that it takes no GIL from the
reader), the dataset uploaded through shardkit's storage layer. Each round, alternated, makes
new loaders (`ShardLoader`, defaults: shuffled, window 4, batches of 256) and reads:

  local           the folder on local disk (page cache warm): epoch 1, then later epochs
  s3, cold cache  ``s3://…`` with an empty ``cache_dir``: epoch 1 downloads every shard
                  (look-ahead along the known order), later epochs read the cache
  s3, warm cache  a new loader over the filled cache (a restarted job): epoch 1

Reported: medians over the rounds [ranges] of samples/s and MB/s of pixels delivered, and the
ratios to local reading of the same epochs in the same round (target for cached epochs: ≥ 0.9).

Usage: python scripts/bench_remote.py [--samples 8000] [--size 112] [--rounds 7] [--epochs 6]
       [--out bench-out/remote] [--write-doc docs/performance.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from docblock import write_block

import shardkit
from shardkit.format.manifest import INDEX_NAME, Manifest
from shardkit.format.storage import open_storage
from shardkit.tools.synth import make_image_folder

BEGIN, END = "<!-- remote:begin -->", "<!-- remote:end -->"
BATCH = 256
OPTIONS = {"key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}


def prepare(root: Path, samples: int, size: int) -> Path:
    """Photo-like JPEGs (160-320 px), each hard-linked 10 times, converted to raw tar shards
    of 8 MB at `size`."""
    out = root / f"tar-{size}-{samples}"
    if (out / INDEX_NAME).exists():
        return out
    pristine, tree = root / f"pristine-{samples}", root / f"src-{samples}"
    shutil.rmtree(pristine, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    make_image_folder(pristine, classes=10, per_class=max(1, samples // 100), min_side=160,
                      max_side=320, seed=5)
    for image in sorted(pristine.rglob("*.jpg")):
        for copy in range(10):
            target = tree / image.parent.name / f"{image.stem}_{copy}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(image, target)
    summary = shardkit.convert(tree, out, size=size, shard_size="8MB", shuffle=True, seed=0,
                               progress=False)
    print(f"converted {out}: {summary.line()}", flush=True)
    return out


class Moto:
    """moto's S3 server in a child process on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                         "-p", str(port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)

    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, **OPTIONS}

    def upload(self, folder: Path, url: str) -> None:
        """Shards first, index.json last, through shardkit's storage layer."""
        from botocore.session import Session

        Session().create_client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                aws_access_key_id="testing",
                                aws_secret_access_key="testing").create_bucket(Bucket="bench")
        storage = open_storage(url, storage_options=self.options(), writable=True)
        for record in Manifest.read(folder).shards:
            storage.upload(folder / record.file, record.file)
        storage.upload(folder / INDEX_NAME, INDEX_NAME)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def timed_epochs(loader: Any, epochs: int) -> list[tuple[float, int, int]]:
    """(seconds, samples, pixel bytes) of each epoch."""
    out = []
    for _ in range(epochs):
        began, samples, nbytes = time.perf_counter(), 0, 0
        for batch in loader:
            samples += len(batch["index"])
            nbytes += batch["image"].nelement()
        out.append((time.perf_counter() - began, samples, nbytes))
    return out


Rows = dict[str, list[tuple[float, int, int]]]  # per round: (seconds, samples, bytes)


def measure(folder: Path, url: str, options: dict[str, Any], cache: Path, rounds: int,
            epochs: int) -> Rows:
    rows: Rows = {"local, epoch 1": [], "local, later epochs": [], "s3, cold cache: epoch 1": [],
                  "s3, cold cache: later epochs (from the cache)": [], "s3, warm cache: epoch 1": []}

    def later(runs: list[tuple[float, int, int]]) -> tuple[float, int, int]:
        return (sum(r[0] for r in runs), sum(r[1] for r in runs), sum(r[2] for r in runs))

    for round_ in range(rounds + 1):  # round 0 warms up (imports, page cache, moto)
        local = timed_epochs(shardkit.ShardLoader(folder, BATCH), epochs)
        shutil.rmtree(cache, ignore_errors=True)
        cold = timed_epochs(shardkit.ShardLoader(url, BATCH, storage_options=options,
                                                 cache_dir=str(cache)), epochs)
        warm = timed_epochs(shardkit.ShardLoader(url, BATCH, storage_options=options,
                                                 cache_dir=str(cache)), 1)
        measured = {"local, epoch 1": local[0], "local, later epochs": later(local[1:]),
                    "s3, cold cache: epoch 1": cold[0],
                    "s3, cold cache: later epochs (from the cache)": later(cold[1:]),
                    "s3, warm cache: epoch 1": warm[0]}
        print(f"round {round_}: " + ", ".join(f"{name} {s / t:,.0f}/s" for name, (t, s, _)
                                              in measured.items()), flush=True)
        if round_:
            for name, value in measured.items():
                rows[name].append(value)
    return rows


def report(args: argparse.Namespace, folder: Path, rows: Rows) -> str:
    manifest = Manifest.read(folder)

    def med(values: list[float], digits: int = 0) -> str:
        return (f"{statistics.median(values):,.{digits}f} "
                f"[{min(values):,.{digits}f}–{max(values):,.{digits}f}]")

    rate = {name: [s / t for t, s, _ in runs] for name, runs in rows.items()}
    mbps = {name: [b / t / 1e6 for t, _, b in runs] for name, runs in rows.items()}
    local = {"epoch 1": rate["local, epoch 1"], "later": rate["local, later epochs"]}
    versus = {"local, epoch 1": local["epoch 1"], "local, later epochs": local["later"],
              "s3, cold cache: epoch 1": local["epoch 1"],
              "s3, cold cache: later epochs (from the cache)": local["later"],
              "s3, warm cache: epoch 1": local["epoch 1"]}
    lines = [
        "## Reading from object storage (`scripts/bench_remote.py`)",
        "",
        f"{manifest.samples:,} samples of {args.size}×{args.size}×3 uint8 in {len(manifest.shards)} raw "
        f"tar shards ({manifest.bytes / 1e6:,.0f} MB); S3 is moto's server on 127.0.0.1 in its own "
        f"process; `ShardLoader` defaults (shuffled, window 4, batches of {BATCH}). Each round makes "
        f"new loaders and reads {args.epochs} epochs locally, then {args.epochs} from `s3://` with "
        "an empty cache, then one with a new loader over the filled cache; medians of "
        f"{args.rounds} alternated rounds after a warm-up [ranges]; ratios to the local epochs of "
        f"the same round. {os.cpu_count()} CPUs. Command: `python scripts/bench_remote.py "
        f"--samples {args.samples} --size {args.size} --rounds {args.rounds} --epochs {args.epochs}`.",
        "",
        "| reading | samples/s | MB/s | vs local (same epochs, same round) |",
        "|---|---:|---:|---:|",
    ]
    for name in rows:
        ratios = [r / base for r, base in zip(rate[name], versus[name], strict=True)]
        lines.append(f"| {name} | {med(rate[name])} | {med(mbps[name])} | {med(ratios, 2)}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per loader and round (>= 2)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/remote"))
    parser.add_argument("--write-doc", type=Path, default=None)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the later epochs read the cache)")
    folder = prepare(args.out, args.samples, args.size)
    moto = Moto()
    try:
        url = "s3://bench/ds"
        moto.upload(folder, url)
        rows = measure(folder, url, moto.options(), args.out / "cache", args.rounds, args.epochs)
    finally:
        moto.stop()
        shutil.rmtree(args.out / "cache", ignore_errors=True)
    block = report(args, folder, rows)
    print(block)
    if args.write_doc:
        write_block(args.write_doc, BEGIN, END, f"{BEGIN}\n{block}\n{END}\n")


if __name__ == "__main__":
    main()
