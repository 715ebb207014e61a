"""Conversion benchmark: shardkit.convert against the Pool + PIL + webdataset.ShardWriter script
users write by hand today, side by side, on the same photo-like JPEGs, page cache warm.

Usage:
    python scripts/bench_convert.py [--out bench-out] [--images 600] [--repeats 3]
                                    [--quick] [--write-doc docs/performance.md] [--profile]

Prints markdown tables. With --write-doc, writes them (and how they were measured) into the
file between ``<!-- conversion:begin -->`` and ``<!-- conversion:end -->``, leaving the rest
of the file alone (or creates it with a ``# Performance`` title). `make bench` runs it.

Every configuration runs --repeats times, round-robin (so drift hits all alike), and each
table shows medians. Wall time covers the whole job as a user runs it: starting the process
pool, decoding, resizing, writing the shards. CPU time is the parent process's own
``process_time()`` delta plus the workers' CPU: for the baseline the workers return a
``process_time()`` delta per image, for shardkit ``ConvertSummary.task_cpu_seconds``.

webdataset is imported only where the baseline runs: it imports torch, and shardkit's
forkserver workers re-import the calling script's top level, so a top-level
``import webdataset`` here would add torch's import time to every shardkit worker start.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import inspect
import io
import multiprocessing
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from docblock import write_block
from PIL import Image, ImageOps

import shardkit
import shardkit.tools.synth
from shardkit.tools.synth import make_image_folder

SIZES = (150, 224)
WORKER_COUNTS = (1, 2)
CODECS = ("raw", "jpeg", "png")
QUALITY = 90
SAMPLES_PER_SHARD = 256
CHUNKSIZE = 8
SEED = 20240601
BEGIN, END = "<!-- conversion:begin -->", "<!-- conversion:end -->"
TARGET = 2.0


# --------------------------------------------------------------------------- corpus


def _make_class(job: tuple[str, int, int]) -> None:
    folder, count, seed = job
    make_image_folder(folder, classes=1, per_class=count, min_side=300, max_side=1200, seed=seed)


def corpus_arguments(doc: str | None, argv: list[str] | None, *, what: str, quick_images: int,
                     repeats: int) -> tuple[argparse.Namespace, int, int]:
    """The command line of a benchmark over the corpus below (--out, --images, --repeats,
    --quick, --write-doc): (arguments, images, repeats), --quick's smaller defaults applied."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument("--out", default="bench-out", help="work folder (corpus cached here)")
    parser.add_argument("--images", type=int, default=None, help="corpus size (default 600)")
    parser.add_argument("--repeats", type=int, default=None, help=f"runs each (default {repeats})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {quick_images} images, 1 repeat")
    parser.add_argument("--write-doc", metavar="PATH", help=f"write the {what} block here")
    args = parser.parse_args(argv)
    images = args.images if args.images is not None else (quick_images if args.quick else 600)
    runs = args.repeats if args.repeats is not None else (1 if args.quick else repeats)
    if images < 2 or runs < 1:
        parser.error("--images must be >= 2 and --repeats >= 1")
    return args, images, runs


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """End a server a benchmark started in its own process group: SIGTERM, then SIGKILL
    after 10 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def corpus(out: Path, images: int) -> Path:
    """The cached corpus folder for `images` images (generated once, atomically).

    The folder name carries a hash of the generator's source, so a change to
    `shardkit.tools.synth` makes a new corpus instead of reusing a stale one.
    """
    classes = 4 if images >= 40 else 2
    recipe = f"{inspect.getsource(shardkit.tools.synth)}|{images}|{classes}|{SEED}".encode()
    src = out / f"src-{images}-{hashlib.sha256(recipe).hexdigest()[:8]}"
    if src.is_dir():
        return src
    counts = [images // classes + (1 if c < images % classes else 0) for c in range(classes)]
    tmp = src.with_name(src.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"generating {images} photo-like JPEGs (300-1200 px, {classes} classes) in {src} ...",
          flush=True)
    started = time.perf_counter()
    jobs = [(str(tmp / f"gen{c}"), n, SEED + c) for c, n in enumerate(counts)]
    with multiprocessing.Pool(min(classes, os.cpu_count() or 1)) as pool:
        pool.map(_make_class, jobs)
    for c in range(classes):
        (tmp / f"gen{c}" / "class_0").rename(tmp / f"class_{c}")
        (tmp / f"gen{c}").rmdir()
    tmp.rename(src)
    print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
    return src


def one_image_corpus(src: Path) -> Path:
    """A one-image, one-class copy of the corpus's first image: measures per-run fixed cost."""
    tiny = src.with_name(src.name + "-one")
    first = min((src / "class_0").glob("*.jpg"))
    target = tiny / "class_0" / first.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, target)
    return tiny


@dataclass(frozen=True)
class Corpus:
    src: Path
    items: list[tuple[str, int]]  # (path, label)
    total_bytes: int
    mean_megapixels: float
    min_side: int
    max_side: int
    classes: int


def inspect_and_warm(src: Path) -> Corpus:
    """List the corpus, read every file once (warm page cache) and describe it."""
    folders = sorted(p for p in src.iterdir() if p.is_dir())
    items = [(str(f), label) for label, folder in enumerate(folders)
             for f in sorted(folder.glob("*.jpg"))]
    total = 0
    pixels = []
    sides = []
    for path, _ in items:
        with open(path, "rb") as handle:
            total += len(handle.read())
        with Image.open(path) as im:
            pixels.append(im.width * im.height)
            sides.extend(im.size)
    return Corpus(src=src, items=items, total_bytes=total,
                  mean_megapixels=float(np.mean(pixels)) / 1e6, min_side=min(sides),
                  max_side=max(sides), classes=len(folders))


# --------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float  # parent + workers, seconds
    bytes: int
    samples: int


def _baseline_load(job: tuple[str, int]) -> tuple[np.ndarray, float]:
    """What a user's Pool worker does: open, RGB, ImageOps.fit (shardkit's default filter,
    so both sides resample alike), to numpy."""
    path, size = job
    start = time.process_time()
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    fitted = ImageOps.fit(rgb, (size, size), Image.Resampling.BILINEAR)
    array = np.asarray(fitted)
    return array, time.process_time() - start


def run_baseline(corpus: Corpus, dst: Path, size: int, workers: int) -> Run:
    """multiprocessing.Pool workers decode and resize; the parent feeds webdataset.ShardWriter."""
    import webdataset as wds  # see the module docstring: not at the top level

    _fresh(dst)
    jobs = [(path, size) for path, _ in corpus.items]
    labels = [label for _, label in corpus.items]
    worker_cpu = 0.0
    samples = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    with multiprocessing.Pool(workers) as pool:
        sink = wds.ShardWriter(str(dst / "base-%05d.tar"), maxcount=SAMPLES_PER_SHARD, verbose=0)
        for index, (array, cpu) in enumerate(pool.imap(_baseline_load, jobs, chunksize=CHUNKSIZE)):
            sink.write({"__key__": f"{index:06d}", "npy": array, "cls": labels[index]})
            worker_cpu += cpu
            samples += 1
        sink.close()
    wall = time.perf_counter() - t0
    parent_cpu = time.process_time() - cpu0
    written = sum(p.stat().st_size for p in dst.glob("base-*.tar"))
    return Run(wall=wall, cpu=parent_cpu + worker_cpu, bytes=written, samples=samples)


def run_shardkit(corpus: Corpus, dst: Path, size: int, workers: int, draft: bool,
                 codec: str = "raw") -> Run:
    _fresh(dst)
    cpu0, t0 = time.process_time(), time.perf_counter()
    summary = shardkit.convert(
        corpus.src, dst, size=size, workers=workers, draft=draft, codec=codec, quality=QUALITY,
        format="tar", samples_per_shard=SAMPLES_PER_SHARD, overwrite=True, progress=False,
    )
    wall = time.perf_counter() - t0
    parent_cpu = time.process_time() - cpu0
    if summary.failed or summary.samples != len(corpus.items):
        raise RuntimeError(f"shardkit converted {summary.samples} of {len(corpus.items)} "
                           f"({summary.failed} failed); see {summary.errors_path}")
    # With workers=0 the tasks run in this process: their CPU is already in parent_cpu.
    cpu = parent_cpu + (summary.task_cpu_seconds if workers > 0 else 0.0)
    return Run(wall=wall, cpu=cpu, bytes=summary.bytes, samples=summary.samples)


def _fresh(dst: Path) -> None:
    """An empty output folder, with earlier runs' dirty pages written back (untimed)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    os.sync()


# Configuration key: (pipeline, size, workers, draft, codec); pipeline "shardkit" or "baseline",
# with ":fixed" appended for the runs on the one-image corpus (the per-run fixed cost).
Key = tuple[str, int, int, bool, str]


def configurations() -> list[Key]:
    keys: list[Key] = []
    for size in SIZES:
        for workers in WORKER_COUNTS:
            keys.append(("shardkit", size, workers, True, "raw"))
            keys.append(("shardkit", size, workers, False, "raw"))
            keys.append(("baseline", size, workers, False, "raw"))
        keys.append(("shardkit", size, 0, True, "raw"))
        for codec in CODECS[1:]:
            keys.append(("shardkit", size, 2, True, codec))
    for workers in WORKER_COUNTS:
        keys.append(("shardkit:fixed", SIZES[0], workers, True, "raw"))
        keys.append(("baseline:fixed", SIZES[0], workers, False, "raw"))
    return keys


def run_one(key: Key, corpus: Corpus, tiny: Corpus, work: Path) -> Run:
    pipeline, size, workers, draft, codec = key
    data = tiny if pipeline.endswith(":fixed") else corpus
    if pipeline.startswith("baseline"):
        return run_baseline(data, work / "baseline", size, workers)
    return run_shardkit(data, work / "shardkit", size, workers, draft, codec)


def measure(corpus: Corpus, tiny: Corpus, work: Path, repeats: int) -> dict[Key, list[Run]]:
    keys = configurations()
    print("warm-up (untimed): one run of each pipeline ...", flush=True)
    run_one(("shardkit", SIZES[0], 2, True, "raw"), corpus, tiny, work)
    run_one(("baseline", SIZES[0], 2, False, "raw"), corpus, tiny, work)
    runs: dict[Key, list[Run]] = {key: [] for key in keys}
    for repeat in range(repeats):
        started = time.perf_counter()
        for key in keys:
            runs[key].append(run_one(key, corpus, tiny, work))
        print(f"repeat {repeat + 1}/{repeats}: {len(keys)} configurations in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    for sub in ("baseline", "shardkit"):
        shutil.rmtree(work / sub, ignore_errors=True)
    return runs


def cpu_steal_seconds() -> float | None:
    """CPU time the hypervisor gave to others so far (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = handle.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    wall: float
    wall_min: float
    wall_max: float
    cpu_ms: float
    bytes_per_sample: float
    images: int

    @property
    def rate(self) -> float:
        return self.images / self.wall


def summarise(runs: dict[Key, list[Run]]) -> dict[Key, Result]:
    results = {}
    for key, measured in runs.items():
        results[key] = Result(
            wall=statistics.median(r.wall for r in measured),
            wall_min=min(r.wall for r in measured),
            wall_max=max(r.wall for r in measured),
            cpu_ms=statistics.median(r.cpu / r.samples * 1000 for r in measured),
            bytes_per_sample=statistics.median(r.bytes / r.samples for r in measured),
            images=measured[0].samples,
        )
    return results


def _label(key: Key) -> str:
    pipeline, _, _, draft, _ = key
    if pipeline == "baseline":
        return "baseline: Pool + PIL + wds.ShardWriter"
    return f"shardkit, draft {'on' if draft else 'off'}"


def tables(results: dict[Key, Result]) -> dict[str, str]:
    out: dict[str, str] = {}

    def sk(size: int, workers: int, draft: bool = True, codec: str = "raw") -> Result:
        return results[("shardkit", size, workers, draft, codec)]

    def base(size: int, workers: int) -> Result:
        return results[("baseline", size, workers, False, "raw")]

    lines = ["| size | workers | pipeline | wall s | wall min–max s | images/s | "
             "images/s per worker | CPU-ms/image | images/s vs baseline | CPU vs baseline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size in SIZES:
        for workers in WORKER_COUNTS:
            b = base(size, workers)
            keys: tuple[tuple[str, int, int, bool, str], ...] = (
                ("shardkit", size, workers, True, "raw"),
                ("shardkit", size, workers, False, "raw"),
                ("baseline", size, workers, False, "raw"))
            for key in keys:
                r = results[key]
                is_base = key[0] == "baseline"
                speed = "1×" if is_base else f"**{r.rate / b.rate:.2f}×**"
                cpu = "1×" if is_base else f"{b.cpu_ms / r.cpu_ms:.2f}× less"
                lines.append(
                    f"| {size} px | {workers} | {_label(key)} | {r.wall:.2f} | "
                    f"{r.wall_min:.2f}–{r.wall_max:.2f} | {r.rate:,.0f} | "
                    f"{r.rate / workers:,.0f} | {r.cpu_ms:.2f} | {speed} | {cpu} |")
    out["throughput"] = "\n".join(lines)

    lines = ["| size | pipeline | 1 worker images/s | 2 workers images/s | scaling 1→2 |",
             "|---|---|---|---|---|"]
    for size in SIZES:
        for draft in (True, False):
            one, two = sk(size, 1, draft), sk(size, 2, draft)
            lines.append(f"| {size} px | shardkit, draft {'on' if draft else 'off'} | "
                         f"{one.rate:,.0f} | {two.rate:,.0f} | {two.rate / one.rate:.2f}× |")
        one, two = base(size, 1), base(size, 2)
        lines.append(f"| {size} px | baseline | {one.rate:,.0f} | {two.rate:,.0f} | "
                     f"{two.rate / one.rate:.2f}× |")
    out["scaling"] = "\n".join(lines)

    lines = ["| size | workers | images/s draft off | images/s draft on | draft gain | "
             "CPU-ms/image off → on |", "|---|---|---|---|---|---|"]
    for size in SIZES:
        for workers in WORKER_COUNTS:
            on, off = sk(size, workers, True), sk(size, workers, False)
            lines.append(f"| {size} px | {workers} | {off.rate:,.0f} | {on.rate:,.0f} | "
                         f"{on.rate / off.rate:.2f}× | {off.cpu_ms:.2f} → {on.cpu_ms:.2f} |")
    out["draft"] = "\n".join(lines)

    lines = ["| size | codec | bytes/sample | vs raw | images/s (2 workers, draft on) | "
             "CPU-ms/image |", "|---|---|---|---|---|---|"]
    for size in SIZES:
        raw = sk(size, 2).bytes_per_sample
        for codec in CODECS:
            r = sk(size, 2, True, codec)
            label = "raw (.npy)" if codec == "raw" else ("jpeg q90" if codec == "jpeg" else codec)
            lines.append(f"| {size} px | {label} | {r.bytes_per_sample:,.0f} | "
                         f"{r.bytes_per_sample / raw:.3f}× | {r.rate:,.0f} | {r.cpu_ms:.2f} |")
        b = base(size, 2)
        lines.append(f"| {size} px | baseline wds raw (.npy) | {b.bytes_per_sample:,.0f} | "
                     f"{b.bytes_per_sample / raw:.3f}× | {b.rate:,.0f} | {b.cpu_ms:.2f} |")
    out["bytes"] = "\n".join(lines)

    lines = ["| size | shardkit, draft on | wall s | images/s | CPU-ms/image |",
             "|---|---|---|---|---|"]
    for size in SIZES:
        for workers in (0, 1):
            r = sk(size, workers)
            how = ("workers=0: all work in one process (CPU = its process_time)" if workers == 0
                   else "workers=1: parent process_time + task_cpu_seconds")
            lines.append(f"| {size} px | {how} | {r.wall:.2f} | {r.rate:,.0f} | {r.cpu_ms:.2f} |")
    out["inline"] = "\n".join(lines)

    lines = ["| workers | shardkit wall s | baseline wall s |", "|---|---|---|"]
    for workers in WORKER_COUNTS:
        s = results[("shardkit:fixed", SIZES[0], workers, True, "raw")]
        b = results[("baseline:fixed", SIZES[0], workers, False, "raw")]
        lines.append(f"| {workers} | {s.wall:.3f} | {b.wall:.3f} |")
    out["fixed"] = "\n".join(lines)
    return out


def reading(results: dict[Key, Result]) -> list[str]:
    """Plain-language bullets, every number taken from `results`."""

    def rate(pipeline: str, size: int, workers: int, draft: bool = False,
             codec: str = "raw") -> Result:
        return results[(pipeline, size, workers, draft, codec)]

    bullets = []
    for size in SIZES:
        sk2, b2 = rate("shardkit", size, 2, True), rate("baseline", size, 2)
        ratio = sk2.rate / b2.rate
        verdict = ""
        if size == 150:
            verdict = (f" — {'meets' if ratio >= TARGET else 'misses'} the ≥{TARGET:g}× target")
        bullets.append(
            f"At {size} px with 2 workers, shardkit converts {sk2.rate:,.0f} images/s against "
            f"the hand-written baseline's {b2.rate:,.0f}: **{ratio:.2f}×**{verdict}, using "
            f"{sk2.cpu_ms:.2f} CPU-ms per image against {b2.cpu_ms:.2f} "
            f"({b2.cpu_ms / sk2.cpu_ms:.2f}× less CPU).")
    for size in SIZES:
        gains = [rate("shardkit", size, w, True).rate / rate("shardkit", size, w, False).rate
                 for w in WORKER_COUNTS]
        nodraft = rate("shardkit", size, 2, False).rate / rate("baseline", size, 2).rate
        if abs(nodraft - 1) < 0.1:
            rest = ("about the same speed: the rest of shardkit's pipeline (orientation, mode "
                    "checks, tar parts, SHA-256, fsync) costs about what the hand-written one "
                    "does, and the speed-up comes from draft")
        elif nodraft > 1:
            rest = "so part of the speed-up comes from the rest of the pipeline, not draft"
        else:
            rest = ("so the rest of shardkit's run (its fixed cost included, see below) is "
                    "slower than the hand-written one")
        bullets.append(
            f"JPEG `draft()` gives {gains[0]:.2f}× (1 worker) and {gains[1]:.2f}× (2 workers) "
            f"at {size} px. With draft off, shardkit runs at {nodraft:.2f}× the baseline "
            f"(2 workers), {rest}.")
    size = SIZES[0]
    fixed_s = rate("shardkit:fixed", size, 2, True).wall
    fixed_b = rate("baseline:fixed", size, 2).wall
    full_s, full_b = rate("shardkit", size, 2, True), rate("baseline", size, 2)
    bullets.append(
        f"Every run also pays a fixed cost, measured by converting a single image with 2 "
        f"workers: {fixed_s:.2f} s for shardkit (listing, forking a pool from the forkserver "
        f"this process already runs, publishing with fsync, index.json; a fresh process, as "
        f"the CLI is, pays about 0.2 s more once, while the forkserver imports numpy, Pillow "
        f"and pyarrow) against {fixed_b:.2f} s "
        f"for the baseline (a forked Pool). That is {fixed_s / full_s.wall:.0%} of shardkit's "
        f"{full_s.wall:.2f} s on this {full_s.images:,}-image corpus at {size} px, so the "
        f"images/s ratio grows with the corpus, towards the CPU-per-image ratio "
        f"({full_b.cpu_ms / full_s.cpu_ms:.2f}×) when both keep every core busy.")
    scal = []
    for size in SIZES:
        s = rate("shardkit", size, 2, True).rate / rate("shardkit", size, 1, True).rate
        b = rate("baseline", size, 2).rate / rate("baseline", size, 1).rate
        scal.append(f"{s:.2f}× for shardkit and {b:.2f}× for the baseline at {size} px")
    bullets.append(f"Going from 1 to 2 worker processes on {os.cpu_count()} cores gives "
                   + "; ".join(scal) + " (2.00× would be perfect scaling).")
    parts = []
    for size in SIZES:
        raw = rate("shardkit", size, 2, True).bytes_per_sample
        jpeg = rate("shardkit", size, 2, True, "jpeg").bytes_per_sample
        png = rate("shardkit", size, 2, True, "png").bytes_per_sample
        parts.append(f"at {size} px JPEG q90 takes {jpeg / raw:.2f}× and PNG {png / raw:.2f}× "
                     f"the bytes of raw ({raw / 1000:,.1f} kB/sample)")
    bullets.append("On disk, " + "; ".join(parts) + ". Raw costs more disk and nothing to "
                   "decode at training time; JPEG must be decoded again every epoch.")
    return bullets


# --------------------------------------------------------------------------- report


def describe(corpus: Corpus, repeats: int, quick: bool, timing: tuple[float, float | None]
             ) -> list[str]:
    import webdataset as wds

    cores = os.cpu_count()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    start_method = multiprocessing.get_start_method()
    return [
        f"- Machine: {cores} CPU cores (`os.cpu_count()`; {affinity} usable by this process), "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"Pillow {PIL.__version__}, numpy {np.__version__}, webdataset {wds.__version__}, "
        f"shardkit {shardkit.__version__}.",
        f"- Corpus: {len(corpus.items):,} synthetic photo-like JPEGs "
        f"(`shardkit.tools.synth.make_image_folder`, quality 90: gradients, shapes, blur and "
        f"texture), sides {corpus.min_side}-{corpus.max_side} px at random, mean "
        f"{corpus.mean_megapixels:.2f} megapixels, {corpus.total_bytes / 1e6:,.1f} MB in "
        f"{corpus.classes} class folders. Synthetic images, not real photographs."
        + (" **`--quick` smoke-test corpus: numbers are not representative.**" if quick else ""),
        "- Page cache warm: every input file is read once before timing, and each pipeline "
        "does one untimed warm-up run. Before each timed run the output folder is emptied and "
        "`os.sync()` writes back earlier runs' data (untimed).",
        f"- Each configuration ran {repeats} time{'s' if repeats != 1 else ''}, round-robin "
        "across configurations; the tables show medians (the throughput table also the "
        f"fastest and slowest run). The timed runs took {timing[0]:.0f} s"
        + ("." if timing[1] is None else
           f"; CPU time stolen by the hypervisor meanwhile (`/proc/stat`): {timing[1]:.1f} s "
           f"(of {timing[0] * (os.cpu_count() or 1):.0f} CPU-seconds)."),
        f"- shardkit: `shardkit.convert(src, out, size=S, workers=W, draft=on|off, codec=..., "
        f"format=\"tar\", samples_per_shard={SAMPLES_PER_SHARD})` with its defaults otherwise "
        "(centre crop, bilinear, EXIF orientation, mode normalisation). Wall time is the whole "
        "call: listing, starting its process pool (forkserver), converting, joining parts into "
        "shards with SHA-256 and fsync, writing `index.json`.",
        f"- Baseline (what users write with webdataset today): `multiprocessing.Pool(W)` "
        f"(default start method here: {start_method}), `pool.imap(..., chunksize={CHUNKSIZE})`; "
        "each worker does `Image.open(p).convert(\"RGB\")`, `ImageOps.fit(im, (S, S), "
        "Image.Resampling.BILINEAR)` (shardkit's default filter), `np.asarray`; the parent "
        "writes `{\"__key__\", \"npy\", "
        f"\"cls\"}} to `webdataset.ShardWriter(\".../base-%05d.tar\", maxcount="
        f"{SAMPLES_PER_SHARD})`. No draft, no fsync. Wall time includes starting the pool.",
        "- The script imports webdataset (which imports torch) only inside the baseline: with "
        "forkserver, each shardkit worker re-imports the calling script's top level, so a "
        "top-level `import torch` in the caller adds its import time to every shardkit worker "
        "start.",
        "- CPU-ms/image = (parent process CPU + worker CPU) / images. Baseline workers return "
        "a `time.process_time()` delta per image; shardkit's worker CPU is "
        "`ConvertSummary.task_cpu_seconds`, which covers decoding, resizing and writing the "
        "samples (raw tar: straight into the shard's file); the parent's covers listing, "
        "planning and joining each shard on a thread (SHA-256 and fsync; raw tar is hashed in "
        "place, other codecs' part files copied). The `workers=0` rows, where everything runs "
        "in one process, check that accounting. Neither side counts worker start-up CPU.",
        "- images/s per worker = images/s ÷ worker processes; all sizes are W×H = S×S "
        "uint8 RGB.",
        "- Command: `make bench` (runs `python scripts/bench_convert.py --out bench-out "
        "--write-doc docs/performance.md`).",
    ]


def render(corpus: Corpus, results: dict[Key, Result], repeats: int, quick: bool,
           timing: tuple[float, float | None]) -> str:
    t = tables(results)
    parts = [
        BEGIN,
        "## Conversion",
        "",
        "_Generated by `scripts/bench_convert.py`; edit the script, not the text between the "
        "conversion markers._",
        "",
        "### How it was measured",
        "",
        *describe(corpus, repeats, quick, timing),
        "",
        "### Throughput and CPU per image (raw codec, tar)",
        "",
        t["throughput"],
        "",
        "### Scaling from 1 to 2 workers",
        "",
        t["scaling"],
        "",
        "### What `draft()` buys",
        "",
        t["draft"],
        "",
        "### Bytes on disk per sample",
        "",
        "shardkit with 2 workers, draft on; the ratio is to shardkit raw at the same size. "
        "Samples also carry a `.cls` and a padded `.json` member.",
        "",
        t["bytes"],
        "",
        "### Fixed cost per run",
        "",
        f"The same measurement on a one-image copy of the corpus ({SIZES[0]} px): start-up "
        "and finishing cost that does not depend on the number of images.",
        "",
        t["fixed"],
        "",
        "### CPU accounting check",
        "",
        t["inline"],
        "",
        "### Reading the results",
        "",
        *(f"- {b}" for b in reading(results)),
        END,
    ]
    return "\n".join(parts) + "\n"


def write_doc(path: Path, block: str) -> None:
    write_block(path, BEGIN, END, block)


def profile(corpus: Corpus, work: Path, size: int) -> None:
    """cProfile shardkit.convert in-process (workers=0) and the baseline's worker function."""
    for name, call in (
        ("shardkit.convert(workers=0, draft on)",
         lambda: run_shardkit(corpus, work / "profile", size, 0, True)),
        ("baseline worker function, in-process",
         lambda: [_baseline_load((p, size)) for p, _ in corpus.items]),
    ):
        profiler = cProfile.Profile()
        profiler.enable()
        call()
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(15)
        print(f"\n## profile: {name}, {size} px\n")
        print(stream.getvalue())
    shutil.rmtree(work / "profile", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", default="bench-out", help="work folder (corpus cached here)")
    parser.add_argument("--images", type=int, default=None, help="corpus size (default 600)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration "
                        "(default 3; medians reported)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 32 images, 1 repeat (numbers not representative)")
    parser.add_argument("--write-doc", metavar="PATH", help="write the conversion block here")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile shardkit (workers=0) and the baseline at 150 px")
    args = parser.parse_args(argv)
    images = args.images if args.images is not None else (32 if args.quick else 600)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if images < 2 or repeats < 1:
        parser.error("--images must be >= 2 and --repeats >= 1")

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = corpus(out, images)
    data = inspect_and_warm(src)
    tiny = inspect_and_warm(one_image_corpus(src))
    work = out / "runs"
    steal0, timed0 = cpu_steal_seconds(), time.perf_counter()
    runs = measure(data, tiny, work, repeats)
    steal1, timed = cpu_steal_seconds(), time.perf_counter() - timed0
    steal = steal1 - steal0 if steal0 is not None and steal1 is not None else None
    results = summarise(runs)
    block = render(data, results, repeats, args.quick, (timed, steal))
    print()
    print(block)
    if args.write_doc:
        write_doc(Path(args.write_doc), block)
        print(f"wrote {args.write_doc}")
    if args.profile:
        profile(data, work, SIZES[0])
    shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
