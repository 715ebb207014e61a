"""JPEG decode benchmark: the decode floor, conversion per image against it, and reading
jpeg shards with 1 and 2 decode threads against the Pillow path they replace.

Usage:
    python scripts/bench_decode.py [--out bench-out] [--src FOLDER] [--images 600]
                                   [--repeats 3] [--write-doc docs/performance.md]

--src: an image folder of JPEGs to measure (default: the photo-like corpus that
bench_convert.py generates under --out). Prints markdown tables; --write-doc puts them between
``<!-- decode:begin -->`` and ``<!-- decode:end -->`` in that file.

* Decode floor: simplejpeg (libjpeg-turbo) decoding the files, already in memory, at the DCT
  scale the resize needs (Pillow's draft scale: what conversion decodes at), CPU ms per image
  on one core; Pillow's open + draft + load of the same bytes beside it; and one process per
  usable CPU decoding at once, images/s against the one-core figure times as many (what the
  cores give together, before any conversion work).
* Conversion: `load_image` per image (decode, orient, resize; CPU ms) with the fast path
  and with Pillow only; the resize alone on the drafted image, per filter, with PSNR against
  a Lanczos resize of the full-resolution decode; `convert()` in this process (the whole
  process's CPU per image: decoding, writing, joining the shard), as a fraction of the floor;
  and `convert()` with one worker per usable CPU, images/s against the floor per core times
  the worker count (the issue's measure of "near the decode floor"). The default filter's
  resize beside the floor bounds that ratio: floor / (floor + resize).
* Reading: the corpus converted at 224 px, ``codec=jpeg`` (q90); every batch of 64 decoded
  into the batch array by `stream_batches` with 1 and 2 decode threads, and by Pillow one
  image at a time (the reader before shardkit.reader.decode). samples/s (wall) and CPU ms per
  sample (all threads).

Every configuration runs --repeats times, alternated, and tables show medians (min-max).
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import simplejpeg
from bench_convert import corpus
from docblock import write_block
from PIL import Image

import shardkit
from shardkit.config import ImageOptions, usable_cpus
from shardkit.conversion.images import _needed_size, load_image, pillow_limits
from shardkit.format.manifest import Manifest
from shardkit.reader.assign import Split, assign, shard_runs
from shardkit.reader.batches import stream_batches
from shardkit.reader.decode import DecodePool
from shardkit.reader.handles import ShardCache

SIZES = (150, 224)
BATCH = 64
BEGIN, END = "<!-- decode:begin -->", "<!-- decode:end -->"
FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
           "lanczos": Image.Resampling.LANCZOS}


def spread(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def alternate(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each run `repeats` times, round-robin; its results in order."""
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            out[name].append(run())
    return out


def cpu_ms_each(items: list[object], work: Callable[[object], object]) -> Callable[[], float]:
    def run() -> float:
        started = time.process_time()
        for item in items:
            work(item)
        return (time.process_time() - started) / len(items) * 1e3
    return run


# --------------------------------------------------------------------------- the floor


def draft_sizes(data: bytes, size: int) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """(what `load_image` asks Pillow's draft for, the (width, height) it decodes at) for a
    size×size centre crop (EXIF orientation does not change them for a square output)."""
    with Image.open(io.BytesIO(data)) as im:
        need = _needed_size(im.size, ImageOptions(size=(size, size)))
        if need is not None:
            im.draft(None, need)
        return need, im.size


def draft_size(data: bytes, size: int) -> tuple[int, int]:
    return draft_sizes(data, size)[1]


#: The decode jobs of a `decode_together` process (set by its pool's initializer).
_JOBS: list[tuple[bytes, tuple[int, int] | None, tuple[int, int]]] = []


def _take_jobs(jobs: list[tuple[bytes, tuple[int, int] | None, tuple[int, int]]]) -> None:
    _JOBS[:] = jobs


def _decode_share(share: tuple[int, int]) -> tuple[int, float, float]:
    start, step = share
    began = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process
    mine = _JOBS[start::step] * 2
    for data, _, (w, h) in mine:
        simplejpeg.decode_jpeg(data, min_height=h, min_width=w)
    return len(mine), began, time.perf_counter()


def decode_together(jobs: list[tuple[bytes, tuple[int, int] | None, tuple[int, int]]],
                    workers: int) -> Callable[[], float]:
    """images/s (wall) of `workers` processes decoding shares of `jobs` at the same time: the
    floor as this machine's cores deliver it together (shared caches, memory, the host)."""
    def run() -> float:
        with multiprocessing.Pool(workers, initializer=_take_jobs, initargs=(jobs,)) as pool:
            pool.map(abs, range(workers))  # started before the clock
            done = pool.map(_decode_share, [(k, workers) for k in range(workers)], chunksize=1)
        return sum(n for n, _, _ in done) / (max(e for _, _, e in done) - min(b for _, b, _ in done))
    return run


def floor_rows(datas: list[bytes], repeats: int) -> tuple[list[str], dict[int, float]]:
    rows, floors = [], {}
    workers = usable_cpus()
    for size in SIZES:
        jobs = [(d, *draft_sizes(d, size)) for d in datas]

        def turbo(job: object) -> None:
            data, _, (w, h) = job  # type: ignore[misc]
            simplejpeg.decode_jpeg(data, min_height=h, min_width=w)

        def pil(job: object) -> None:
            data, need, _ = job  # type: ignore[misc]
            with Image.open(io.BytesIO(data)) as im:
                if need is not None:
                    im.draft(None, need)
                im.load()

        got = alternate({"simplejpeg": cpu_ms_each(jobs, turbo), "pillow": cpu_ms_each(jobs, pil),
                         "together": decode_together(jobs, workers)}, repeats)
        floors[size] = statistics.median(got["simplejpeg"])
        together = statistics.median(got["together"])
        rows.append(f"| {size} | {spread(got['simplejpeg'])} | {1e3 / floors[size]:,.0f} | "
                    f"{spread(got['pillow'])} | {spread(got['together'], 0)} | "
                    f"{together / (1e3 / floors[size] * workers):.2f} |")
    return rows, floors


# --------------------------------------------------------------------------- conversion


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def centre_box(w: int, h: int) -> tuple[float, float, float, float]:
    side = float(min(w, h))
    return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


def resize_rows(datas: list[bytes], repeats: int) -> tuple[list[str], dict[int, float]]:
    """The resize alone, on the drafted decode, against a full-resolution Lanczos resize; and
    the default filter's median CPU ms per size."""
    rows, default = [], {}
    for size in SIZES:
        drafted, references = [], []
        for data in datas:
            w, h = draft_size(data, size)
            drafted.append(Image.fromarray(simplejpeg.decode_jpeg(data, min_height=h, min_width=w)))
            full = Image.fromarray(simplejpeg.decode_jpeg(data))
            references.append(np.asarray(full.resize((size, size), FILTERS["lanczos"],
                                                     box=centre_box(*full.size))))
        runs = {}
        for name, method in FILTERS.items():
            def work(im: object, method: Image.Resampling = method, size: int = size) -> object:
                assert isinstance(im, Image.Image)
                return im.resize((size, size), method, box=centre_box(*im.size))
            runs[name] = cpu_ms_each(list(drafted), work)
        got = alternate(runs, repeats)
        for name, method in FILTERS.items():
            quality = [psnr(np.asarray(im.resize((size, size), method, box=centre_box(*im.size))), ref)
                       for im, ref in zip(drafted, references, strict=True)]
            rows.append(f"| {size} | {name} | {spread(got[name])} | {statistics.median(quality):.2f} "
                        f"({min(quality):.2f}) |")
        default[size] = statistics.median(got[ImageOptions().filter])
    return rows, default


def conversion_rows(paths: list[Path], src: Path, out: Path, floors: dict[int, float],
                    repeats: int) -> list[str]:
    rows = []
    workers = usable_cpus()
    for size in SIZES:
        options = ImageOptions(size=(size, size))

        def load(fast: bool, options: ImageOptions = options) -> Callable[[], float]:
            def run() -> float:
                with pillow_limits():
                    return cpu_ms_each(list(paths), lambda p: load_image(p, options, fast=fast)[0]
                                       .tobytes())()
            return run

        def inline(size: int = size) -> float:
            # workers=0: every part in this thread, the shard joined on a thread beside it; the
            # whole process's CPU counts both.
            target = out / f"convert-{size}"
            shutil.rmtree(target, ignore_errors=True)
            started = time.process_time()
            summary = shardkit.convert(src, target, size=size, workers=0, progress=False)
            return (time.process_time() - started) / summary.samples * 1e3

        def pool(size: int = size) -> float:
            target = out / f"convert-{size}-pool"
            shutil.rmtree(target, ignore_errors=True)
            os.sync()
            started = time.perf_counter()
            summary = shardkit.convert(src, target, size=size, workers=workers, progress=False)
            return summary.samples / (time.perf_counter() - started)

        got = alternate({"pillow": load(False), "fast": load(True), "convert": inline,
                         "pool": pool}, repeats)
        convert_ms = statistics.median(got["convert"])
        floor_rate = 1e3 / floors[size] * workers
        rows.append(f"| {size} | {spread(got['pillow'])} | {spread(got['fast'])} | "
                    f"{spread(got['convert'])} | {floors[size]:.3f} | {floors[size] / convert_ms:.2f} | "
                    f"{spread(got['pool'], 0)} | {floor_rate:,.0f} | "
                    f"{statistics.median(got['pool']) / floor_rate:.2f} |")
    return rows


# --------------------------------------------------------------------------- reading


def sample_tree(paths: list[Path], src: Path, out: Path) -> Path:
    """A folder of symlinks to `paths` (class folders kept), for convert() to see only them."""
    tree = out / f"sample-{len(paths)}"
    shutil.rmtree(tree, ignore_errors=True)
    for path in paths:
        link = tree / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return tree


def jpeg_dataset(src: Path, out: Path) -> Path:
    target = out / "jpeg-224"
    if not (target / "index.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        shardkit.convert(src, target, size=224, codec="jpeg", quality=90, progress=False)
    return target


def read_rows(dataset: Path, repeats: int) -> list[str]:
    manifest = Manifest.read(dataset)
    sizes = [s.samples for s in manifest.shards]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    batches = list(assign(sizes, Split(rank=0, world=1), epoch=0, seed=0, batch_size=BATCH,
                          drop_last=False, shuffle=False, window=4))
    total = sum(len(b) for b in batches)
    cache = ShardCache(str(dataset), manifest, capacity=len(sizes) + 2, verify=False)

    def threaded(threads: int) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            decoder = DecodePool(threads)
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                for _ in stream_batches(cache, starts, batches, (), keep_open=True, decoder=decoder):
                    pass
            finally:
                decoder.close()
            return total / (time.perf_counter() - wall), (time.process_time() - cpu) / total * 1e3
        return run

    def pillow_path() -> tuple[float, float]:
        # The reader before shardkit.reader.decode: Pillow, one image at a time, then a copy
        # into the batch array.
        out = np.empty((BATCH, 224, 224, 3), np.uint8)
        wall, cpu = time.perf_counter(), time.process_time()
        for index in batches:
            for number, slots, local in shard_runs(starts, index):
                payloads = cache.get(number).payloads
                assert payloads is not None
                for slot, i in enumerate(local.tolist(), start=slots.start):
                    with Image.open(io.BytesIO(payloads[i]), formats=("JPEG", "PNG")) as im:
                        out[slot] = np.asarray(im.convert("RGB"))
        return total / (time.perf_counter() - wall), (time.process_time() - cpu) / total * 1e3

    threaded(1)()  # opens (and keeps) every shard, so no configuration pays for it
    runs: dict[str, Callable[[], tuple[float, float]]] = {"Pillow, 1 thread (before)": pillow_path}
    for threads in sorted({1, 2, usable_cpus()}):
        runs[f"shardkit.reader.decode, {threads} thread{'s' if threads > 1 else ''}"] = threaded(threads)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    cache.close()
    base = statistics.median(r[0] for r in results["Pillow, 1 thread (before)"])
    rows = []
    for name, got in results.items():
        rate = [r[0] for r in got]
        rows.append(f"| {name} | {spread(rate, 0)} | {statistics.median(rate) / base:.2f}× | "
                    f"{spread([r[1] for r in got])} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--src", type=Path, default=None)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-doc", type=Path, default=None)
    args = parser.parse_args()
    out: Path = args.out / "decode"
    out.mkdir(parents=True, exist_ok=True)
    src = args.src or corpus(args.out, args.images)
    paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    datas = [p.read_bytes() for p in paths]
    print(f"{len(paths)} JPEGs from {src}; {usable_cpus()} usable CPUs; {args.repeats} repeats", flush=True)

    floor, floors = floor_rows(datas, args.repeats)
    lines = [BEGIN, "## JPEG decoding", "",
             f"{len(paths)} JPEGs from `{src.name}`, {usable_cpus()} usable CPUs, medians of "
             f"{args.repeats} alternated runs (min-max). `python scripts/bench_decode.py`.", "",
             "Decode floor: the files (in memory) decoded at the DCT scale a centre-crop to "
             f"S px needs, one core; then {usable_cpus()} processes decoding at once (images/s, "
             "wall), against the per-core figure times as many: what the cores give together.", "",
             "| S | simplejpeg CPU ms/image | images/s per core | Pillow open+draft+load ms | "
             f"{usable_cpus()} processes at once, images/s | vs per core × {usable_cpus()} |",
             "|---|---|---|---|---|---|", *floor, ""]
    print("\n".join(lines), flush=True)
    resized, resize_ms = resize_rows(datas, args.repeats)
    default = ImageOptions().filter
    block = ["Resize alone (drafted decode → S×S centre crop), PSNR against a Lanczos resize of "
             "the full-resolution decode:", "",
             "| S | filter | CPU ms/image | PSNR dB median (min) |", "|---|---|---|---|",
             *resized, "",
             f"What the default filter ({default}, Pillow's: the image tests hold conversion to "
             "its pixels) leaves: decoding at the floor and resizing is the least any conversion "
             "spends per image, before reading, orienting or writing, so floor / (floor + resize) "
             "bounds the ratio to the floor below.", "",
             "| S | floor ms | resize ms | bound |", "|---|---|---|---|",
             *(f"| {size} | {floors[size]:.3f} | {resize_ms[size]:.3f} | "
               f"{floors[size] / (floors[size] + resize_ms[size]):.2f} |" for size in SIZES), ""]
    print("\n".join(block), flush=True)
    lines += block
    listed = sample_tree(paths, src, out)
    workers = usable_cpus()
    block = ["Conversion against the floor. Per image, CPU ms: `load_image` (decode + orient + "
             "resize) with Pillow only and with the fast path; `convert()` in this process "
             "(everything: listing, decode, resize, write, joining the shard, SHA-256, fsync); "
             f"floor / convert. Then `convert(workers={workers})` in images/s (wall, the whole "
             f"call with its pool's start-up), against the floor's images/s per core × {workers}.",
             "",
             "| S | load_image, Pillow | load_image, fast path | convert() | floor | floor/convert "
             f"| convert(workers={workers}) images/s | floor × {workers} images/s | ratio |",
             "|---|---|---|---|---|---|---|---|---|",
             *conversion_rows(paths, listed, out, floors, args.repeats), ""]
    print("\n".join(block), flush=True)
    lines += block
    dataset = jpeg_dataset(listed, out)
    block = [f"Reading `{dataset.name}` (224 px, jpeg q90, batches of {BATCH}): every batch decoded "
             "into the batch array.", "",
             "| decoder | samples/s | vs before | CPU ms/sample |", "|---|---|---|---|",
             *read_rows(dataset, args.repeats), "", END]
    print("\n".join(block), flush=True)
    lines += block
    if args.write_doc is not None:
        write_block(args.write_doc, BEGIN, END, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
