"""Conversion into object storage vs into a local folder: the same corpus, options and workers,
into moto's S3 server on 127.0.0.1 and onto local disk, in the same run.

Usage:
    python scripts/bench_remote_write.py [--out bench-out] [--images 600] [--repeats 5]
                                         [--quick] [--write-doc docs/performance.md]

moto runs as its own process (``moto_server``), so that its request handling does not share
this process's interpreter with the conversion's upload threads. Each configuration runs
--repeats times, round-robin after one untimed warm-up each (which also checks that both
write the same shards); the table shows medians and ranges. A third row times the uploads
alone: `Storage.upload` of a shard-sized file, the ceiling this endpoint sets. With
--write-doc the block goes between ``<!-- remote-write:begin -->`` and
``<!-- remote-write:end -->`` of the file (appended when missing). `make bench` runs it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from docblock import write_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import (  # scripts/ is not a package
    corpus,
    corpus_arguments,
    inspect_and_warm,
    stop_process_group,
)

import shardkit
from shardkit.conversion.out_remote import UPLOADS
from shardkit.format.storage import open_storage

BEGIN, END = "<!-- remote-write:begin -->", "<!-- remote-write:end -->"
SIZE = 224
WORKERS = 2
#: Many shards of 10 MB (uploads overlap the work), and a few of 39 MB (multipart uploads).
SHARDINGS = (64, 256)
#: s3fs uploads a file in one PUT below twice its chunk size (the storage layer's 16 MiB).
MULTIPART_ABOVE = 32 * 1024 * 1024


@dataclass(frozen=True)
class Run:
    wall: float
    client_cpu: float  # this process: planning, committing, the upload threads
    task_cpu: float  # the workers' decoding, resizing, encoding
    server_cpu: float  # moto_server handling the requests


@contextmanager
def moto_process(folder: Path) -> Iterator[tuple[dict[str, Any], psutil.Process]]:
    """moto's S3 server in its own process on a free port of 127.0.0.1, a bucket ``bench``;
    yields the storage_options that reach it, and the server's process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "moto.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                               stderr=subprocess.STDOUT, preexec_fn=os.setpgrp)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"moto_server did not start; see {folder / 'moto.log'}") from None
                time.sleep(0.1)
        options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench",
                   "client_kwargs": {"region_name": "us-east-1"}}
        from botocore.session import Session

        Session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                aws_access_key_id="bench",
                                aws_secret_access_key="bench").create_bucket(Bucket="bench")
        yield options, psutil.Process(process.pid)
    finally:
        stop_process_group(process)
        log.close()


def convert_once(src: Path, dst: str, per_shard: int, options: dict[str, Any] | None,
                 server: psutil.Process) -> tuple[Run, str, dict[str, Any]]:
    """(the run's times, the shards' sha256 list, index.json) of one fresh conversion into `dst`."""
    extra = {"storage_options": options, "overwrite": True} if options else {}
    if not options:
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
    served = sum(server.cpu_times()[:2])
    cpu = time.process_time()
    started = time.perf_counter()
    summary = shardkit.convert(src, dst, size=SIZE, samples_per_shard=per_shard, workers=WORKERS,
                               progress=False, **extra)
    run = Run(wall=time.perf_counter() - started, client_cpu=time.process_time() - cpu,
              task_cpu=summary.task_cpu_seconds, server_cpu=sum(server.cpu_times()[:2]) - served)
    index = json.loads(open_storage(dst, storage_options=options).read_bytes("index.json"))
    return run, json.dumps([s["sha256"] for s in index["shards"]]), index


def upload_only(options: dict[str, Any], size: int, repeats: int) -> list[float]:
    """Seconds to upload one file of `size` bytes (what a shard costs the store), `repeats` times."""
    storage = open_storage("s3://bench/upload-only", storage_options=options, writable=True)
    with tempfile.NamedTemporaryFile(prefix="shardkit-bench-") as handle:
        handle.write(os.urandom(size))
        handle.flush()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            storage.upload(handle.name, "shard.bin")
            times.append(time.perf_counter() - started)
    storage.delete(["shard.bin"])
    return times


Key = tuple[int, str]  # (samples per shard, "local" or "s3")


def measure(src: Path, work: Path, options: dict[str, Any], server: psutil.Process,
            repeats: int) -> tuple[dict[Key, list[Run]], dict[int, dict[str, Any]]]:
    """Round-robin runs of every (sharding, OUT); each sharding's index.json."""
    runs = {(n, where): (str(work / f"local-{n}") if where == "local" else f"s3://bench/ds-{n}",
                         None if where == "local" else options)
            for n in SHARDINGS for where in ("local", "s3")}
    print("warm-up (untimed): one run of each ...", flush=True)
    outputs = {key: convert_once(src, dst, key[0], opts, server) for key, (dst, opts) in runs.items()}
    for n in SHARDINGS:
        if outputs[(n, "local")][1] != outputs[(n, "s3")][1]:
            raise RuntimeError("the local and S3 conversions wrote different shards")
    timed: dict[Key, list[Run]] = {key: [] for key in runs}
    for repeat in range(repeats):
        for key, (dst, opts) in runs.items():
            timed[key].append(convert_once(src, dst, key[0], opts, server)[0])
        print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{n}/{where} {timed[(n, where)][-1].wall:.2f} s" for n, where in runs), flush=True)
    return timed, {n: outputs[(n, "local")][2] for n in SHARDINGS}


def _median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def render(data: Any, timed: dict[Key, list[Run]], indexes: dict[int, dict[str, Any]],
           uploads: list[float], upload_bytes: int, repeats: int, quick: bool) -> str:
    import moto
    import s3fs

    images = len(data.items)
    rows = []
    for n in SHARDINGS:
        shards = indexes[n]["shards"]
        largest = max(s["bytes"] for s in shards)
        kind = f"{len(shards)} shards of ≤ {largest / 1e6:.1f} MB" + \
            (" (multipart)" if largest > MULTIPART_ABOVE else "")
        local = _median(timed[(n, "local")], "wall")
        for where, label in (("local", "local folder"), ("s3", "s3:// (moto)")):
            runs = timed[(n, where)]
            walls = [r.wall for r in runs]
            wall = statistics.median(walls)
            rows.append(f"| {n} ({kind}) | {label} | {wall:.2f} | {min(walls):.2f}–{max(walls):.2f} | "
                        f"{images / wall:,.0f} | {local / wall:.2f}× | {_median(runs, 'client_cpu'):.2f} | "
                        f"{_median(runs, 'task_cpu'):.2f} | {_median(runs, 'server_cpu'):.2f} |")
    upload = statistics.median(uploads)
    total = indexes[SHARDINGS[0]]["shards"]
    lines = [
        BEGIN,
        "## Conversion into object storage",
        "",
        "_Generated by `scripts/bench_remote_write.py`; edit the script, not the text between the "
        "remote-write markers._",
        "",
        f"- Machine: {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the end), "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"s3fs {s3fs.__version__}, moto {moto.__version__} (`moto_server`, its own process on "
        f"127.0.0.1), shardkit {shardkit.__version__}.",
        f"- Corpus: the {images:,} photo-like JPEGs of `scripts/bench_convert.py` "
        f"({data.total_bytes / 1e6:,.1f} MB), page cache warm"
        + (". **`--quick`: numbers are not representative.**" if quick else "."),
        f"- All: `shardkit.convert(src, OUT, size={SIZE}, samples_per_shard=N, workers={WORKERS})` "
        f"(raw tar, {sum(s['bytes'] for s in total) / 1e6:,.1f} MB in all). S3: shards assembled "
        f"in a local scratch folder and uploaded as each commits, {UPLOADS} at a time, then "
        "errors.jsonl and index.json; `overwrite=True` (deleting the previous run's objects) is "
        "inside the timing. Same shards as local (checked).",
        f"- {repeats} timed run{'s' if repeats != 1 else ''} of each row, round-robin after one "
        "untimed warm-up each; medians. CPU: this process (planning, committing, the upload "
        "threads), the workers' tasks, and moto_server.",
        "",
        "| samples per shard | OUT | wall s (median) | min–max s | images/s | vs local | client CPU s "
        "| tasks' CPU s | moto_server CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- Upload alone: one {upload_bytes / 1e6:.1f} MB file through `Storage.upload` takes "
        f"{upload:.2f} s (median of {len(uploads)}, {min(uploads):.2f}–{max(uploads):.2f}): "
        f"{upload_bytes / upload / 1e6:,.0f} MB/s to this endpoint, one stream.",
        "- Reading: the tasks' work is the same into either OUT. What S3 adds is (1) the upload "
        "of the shards that finish last, which nothing overlaps: with few large shards that is "
        "a large share of the bytes, with many it is one shard's; (2) here, moto_server's CPU "
        "on the same two cores as the workers, which a real store's is not; (3) a few requests "
        "per shard (the journal entry, a HEAD for the ETag) and the listing and deletions of "
        "`--overwrite`. moto keeps objects in memory: this measures shardkit's side and moto's "
        "request handling, not a network.",
        "- Command: `make bench` (runs `python scripts/bench_remote_write.py --out bench-out "
        "--write-doc docs/performance.md`).",
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, images, repeats = corpus_arguments(__doc__, argv, what="remote-write", quick_images=40,
                                             repeats=5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = inspect_and_warm(corpus(out, images))
    work = out / "remote-write-runs"
    with moto_process(out / "moto") as (options, server):
        timed, indexes = measure(data.src, work, options, server, repeats)
        largest = max(s["bytes"] for s in indexes[SHARDINGS[-1]]["shards"])
        uploads = upload_only(options, largest, max(3, repeats))
    shutil.rmtree(work, ignore_errors=True)
    block = render(data, timed, indexes, uploads, largest, repeats, args.quick)
    print()
    print(block)
    if args.write_doc:
        write_block(Path(args.write_doc), BEGIN, END, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
