"""`shardkit bench`: how fast can this machine feed a training loop, and at what CPU cost?

Each configuration (loader × worker count) runs in a fresh Python process with the page cache
warm, so one does not inherit another's open shards, memory or threads, and measures:

- samples/s and MB/s (uint8 pixels delivered to the loop) over all epochs;
- CPU seconds per sample: the process plus its DataLoader workers (`monitor.cpu_seconds`),
  read at the start and after the last epoch, when the workers have been joined;
- time to first batch: from constructing the loader to holding its first batch;
- peak RSS of the process (exact, ``ru_maxrss``) and of its workers together (sampled).

The baseline (``baseline=SRC``) is the loader people have today: a map-style Dataset that
opens each image with PIL, converts it and center-crops it to the dataset's size
(``ImageOps.fit``), batched by torch's DataLoader — the shape of ``ImageFolder`` and of
Keras' ``flow_from_directory``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shardkit import errors
from shardkit.config.common import as_integer, check_count, check_local_file
from shardkit.errors import ConfigError, InputError, ShardkitError, require
from shardkit.reader.decode import resolve_decode_threads

__all__ = ["BENCH_SCHEMA", "BenchOptions", "BenchReport", "LoaderRun", "run_bench"]

BENCH_SCHEMA = "shardkit.bench/1"


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What `run_bench` measures. baseline_limit caps the samples per epoch the (slow) raw
    baseline reads, spread evenly over the folder; target_rate is the samples/s a model
    consumes, for the verdict's "cores needed". storage_options and cache_dir: how a dataset
    at a URL is fetched (JSON values: they travel to the measuring processes)."""

    batch_size: int = 256
    workers: tuple[int, ...] = (0, 2, 4)
    epochs: int = 2
    baseline: str | None = None
    baseline_limit: int | None = 2048
    target_rate: float = 3000.0
    shuffle: bool = True
    seed: int = 0
    storage_options: dict[str, Any] | None = field(default=None, hash=False)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_size", check_count("batch_size", self.batch_size, 1))
        object.__setattr__(self, "epochs", check_count("epochs", self.epochs, 1))
        workers = tuple(as_integer(w) for w in self.workers)
        if not workers or len(set(workers)) != len(workers) or any(w is None or w < 0 for w in workers):
            raise ConfigError(f"workers must be distinct counts >= 0; got {self.workers}")
        object.__setattr__(self, "workers", workers)
        if self.baseline is not None and "://" in os.fspath(self.baseline):
            raise ConfigError(f"baseline {self.baseline}: the raw baseline reads a local image "
                              "folder (decoding each file as PIL does), not a URL")
        if self.baseline_limit is not None:
            object.__setattr__(self, "baseline_limit",
                               check_count("baseline_limit", self.baseline_limit, 1))
        if self.target_rate <= 0:
            raise ConfigError(f"target rate must be positive; got {self.target_rate}")
        try:
            json.dumps(self.storage_options)
        except (TypeError, ValueError):
            raise ConfigError("bench storage_options must be JSON values") from None


@dataclass(frozen=True, kw_only=True)
class LoaderRun:
    """One loader at one worker count, measured over all its epochs in a fresh process."""

    loader: str  # "shards" or "raw"
    workers: int
    epochs: int
    samples: int
    bytes: int
    seconds: float
    cpu_seconds: float
    first_batch_seconds: float
    peak_rss_bytes: int
    workers_peak_rss_bytes: int
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_sample(self) -> float:
        return self.cpu_seconds * 1000 / self.samples if self.samples else 0.0

    @property
    def cores(self) -> float:
        """CPU cores kept busy while it ran."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_second": self.samples_per_second,
                "cpu_ms_per_sample": self.cpu_ms_per_sample, "cores": self.cores,
                "mb_per_second": self.mb_per_second}


@dataclass(frozen=True, kw_only=True)
class BenchReport:
    """All runs, with the facts needed to read them."""

    dataset: str
    dataset_samples: int
    image_shape: list[int] | None
    baseline: str | None
    baseline_samples: int | None
    options: BenchOptions
    #: Baseline files left out because they do not decode, per reason (None: no baseline).
    baseline_skipped: dict[str, int] | None = None
    #: How the shards store images, and how many threads decode jpeg/png with 0 workers.
    codec: str = "raw"
    decode_threads: int = 1
    runs: list[LoaderRun]
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)

    def best(self, loader: str) -> LoaderRun | None:
        """The run of `loader` with the most samples/s."""
        runs = [r for r in self.runs if r.loader == loader]
        return max(runs, key=lambda r: r.samples_per_second) if runs else None

    def leanest(self, loader: str) -> LoaderRun | None:
        """The run of `loader` with the least CPU per sample."""
        runs = [r for r in self.runs if r.loader == loader]
        return min(runs, key=lambda r: r.cpu_ms_per_sample) if runs else None

    def verdict(self) -> str:
        """A plain sentence: rates, per-core rates, and the cores a model at target_rate needs.
        CPU time comes in clock ticks (10 ms): a tiny run may measure none, and says so."""
        best, lean = self.best("shards"), self.leanest("shards")
        assert best is not None and lean is not None  # run_bench always measures shards
        rate = self.options.target_rate
        text = (f"shards: {best.samples_per_second:,.0f} samples/s with {best.workers} workers, "
                f"{_per_core(lean.cpu_ms_per_sample)}")
        raw_best, raw_lean = self.best("raw"), self.leanest("raw")
        if raw_best is None or raw_lean is None:
            return (f"{text} — a model consuming {rate:,.0f} samples/s needs "
                    f"{rate * lean.cpu_ms_per_sample / 1000:.2f} cores of loading")
        cpu = raw_lean.cpu_ms_per_sample / lean.cpu_ms_per_sample if lean.cpu_ms_per_sample else 0.0
        more = ("shards' CPU per sample too small to measure" if not cpu
                else f"{_times(cpu)} the CPU per sample" if cpu >= 1
                else f"{_times(1 / cpu)} less CPU per sample")
        speed = best.samples_per_second / raw_best.samples_per_second \
            if raw_best.samples_per_second else 0.0
        pace = (f"{_times(speed)} slower" if speed >= 1 else f"{_times(1 / speed)} faster") \
            if speed else "too fast to time"
        return (f"{text}; raw folder: {raw_best.samples_per_second:,.0f} samples/s with "
                f"{raw_best.workers} workers, {_per_core(raw_lean.cpu_ms_per_sample)} ({more}, "
                f"{pace}) — a model consuming {rate:,.0f} samples/s needs "
                f"{rate * raw_lean.cpu_ms_per_sample / 1000:.1f} cores of decoding or "
                f"{rate * lean.cpu_ms_per_sample / 1000:.2f} cores with shards")

    def to_json(self) -> dict[str, Any]:
        return {"schema": BENCH_SCHEMA, "dataset": self.dataset, "dataset_samples": self.dataset_samples,
                "image_shape": self.image_shape, "baseline": self.baseline,
                "baseline_samples": self.baseline_samples,
                "baseline_skipped": self.baseline_skipped, "cpu_count": self.cpu_count,
                "codec": self.codec, "decode_threads": self.decode_threads,
                "batch_size": self.options.batch_size, "epochs": self.options.epochs,
                "shuffle": self.options.shuffle, "target_rate": self.options.target_rate,
                "runs": [r.to_json() for r in self.runs], "verdict": self.verdict()}

    def table(self) -> str:
        """A table for people, then the verdict."""
        shape = "×".join(map(str, self.image_shape)) if self.image_shape else "variable shape"
        lines = [f"{self.dataset}: {self.dataset_samples:,} samples ({shape} uint8), batch "
                 f"{self.options.batch_size}, {self.options.epochs} epochs, {self.cpu_count} CPUs, "
                 + ("through the shard cache (the first run fills it)" if "://" in self.dataset
                    else "page cache warm"),
                 f"{'loader':7} {'workers':>7} {'samples':>8} {'samples/s':>10} {'CPU-ms/sample':>13} "
                 f"{'cores':>6} {'MB/s':>8} {'1st batch':>9} {'RSS MB':>7} {'+workers':>8}"]
        for r in self.runs:
            lines.append(f"{r.loader:7} {r.workers:>7} {r.samples:>8,} {r.samples_per_second:>10,.0f} "
                         f"{r.cpu_ms_per_sample:>13.3f} {r.cores:>6.2f} {r.mb_per_second:>8,.1f} "
                         f"{r.first_batch_seconds:>8.2f}s {r.peak_rss_bytes / 1e6:>7,.0f} "
                         f"{r.workers_peak_rss_bytes / 1e6:>8,.0f}")
        if self.baseline is not None:
            lines.append(f"raw = PIL open + convert + ImageOps.fit per sample through DataLoader, "
                         f"{self.baseline_samples:,} samples per epoch of {self.baseline}")
        if self.codec != "raw":
            lines.append(f"shards = {self.codec}: with 0 workers decoded by {self.decode_threads} "
                         "threads of the loading process (ShardLoader); with k workers by a "
                         "DataLoader(ShardDataset) of k processes, one decoding thread each")
        else:
            lines.append("shards = raw: 0 workers is ShardLoader (threads of this process); k "
                         "workers a DataLoader(ShardDataset) of k processes")
        if self.baseline_skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.baseline_skipped.items()))
            lines.append(f"raw baseline: {sum(self.baseline_skipped.values()):,} files skipped, "
                         f"as convert would report them ({reasons})")
        return "\n".join([*lines, "", self.verdict()])


def _per_core(cpu_ms_per_sample: float) -> str:
    if cpu_ms_per_sample <= 0:
        return "too little CPU time to measure per core"
    return f"{1000 / cpu_ms_per_sample:,.0f} samples/s per core"


# ---------------------------------------------------------------- the parent: plan and run

def _times(ratio: float) -> str:
    """A ratio of at least 1 as "31×" or, below 10, "2.5×"."""
    return f"{ratio:,.0f}×" if ratio >= 10 else f"{ratio:.1f}×"


def run_bench(path: str | os.PathLike[str], options: BenchOptions) -> BenchReport:
    """Measure ShardLoader over the dataset at `path` (and the raw baseline) for each worker
    count. Raises DatasetError (not a dataset), InputError (baseline folder unusable),
    MissingExtraError (no torch) or ShardkitError (a measurement process failed)."""
    require("torch", "torch")
    from shardkit.config import ReadOptions
    from shardkit.reader.pipeline import open_source

    where, manifest, source = open_source(os.fspath(path), ReadOptions(
        storage_options=options.storage_options, cache_dir=options.cache_dir))
    if manifest.kind != "images":
        raise ConfigError(f"{path}: holds {manifest.kind!r}; shardkit bench measures image datasets")
    if not manifest.samples:
        raise InputError(f"{path}: holds no samples (its inputs all failed: see errors.jsonl); "
                         "nothing to measure")
    shape = manifest.image_shape
    files: list[tuple[str, int]] = []
    skipped: dict[str, int] = {}
    if options.baseline is not None:
        if shape is None:
            raise ConfigError(f"{path}: images have no fixed shape; the raw baseline needs one size")
        files, skipped = _baseline_files(options.baseline, options.baseline_limit, shape)
    # A URL's first epoch downloads (into cache_dir); later ones read the cache.
    shards = [Path(where) / s.file for s in manifest.shards] if source is None else []
    runs = []
    for workers in options.workers:
        common = {"workers": workers, "epochs": options.epochs, "batch_size": options.batch_size,
                  "shuffle": options.shuffle, "seed": options.seed,
                  "storage_options": options.storage_options, "cache_dir": options.cache_dir}
        _warm(shards)
        runs.append(_measure({**common, "loader": "shards", "path": os.fspath(path)}))
        if files:
            _warm([Path(f) for f, _ in files])
            runs.append(_measure({**common, "loader": "raw", "files": files, "shape": shape}))
    return BenchReport(dataset=where, dataset_samples=manifest.samples,
                       image_shape=list(shape) if shape else None, baseline=options.baseline,
                       baseline_samples=len(files) if files else None,
                       baseline_skipped=skipped if options.baseline is not None else None,
                       codec=manifest.codec, decode_threads=resolve_decode_threads(None),
                       options=options, runs=runs)


def _baseline_files(src: str, limit: int | None,
                    shape: Sequence[int]) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, label) of the images in `src`, listed as convert lists them, evenly thinned, and
    the files left out because they do not decode (failures per reason, as convert reports
    them): a folder with a broken file still gets a baseline."""
    from shardkit.config import ImageOptions
    from shardkit.conversion.images import ImageFailure, load_image, pillow_limits
    from shardkit.conversion.sources.imagefolder import list_image_folder

    listing = list_image_folder(src)
    records = listing.records
    skipped: dict[str, int] = {}
    for failure in listing.failures:
        skipped[failure.reason] = skipped.get(failure.reason, 0) + 1
    step = max(1, len(records) // limit) if limit else 1
    chosen = records[::step][:limit] if limit else records
    options = ImageOptions(size=(int(shape[1]), int(shape[0])), mode="RGB" if shape[2] == 3 else "L")
    files = []
    with pillow_limits():
        for record in chosen:
            try:
                load_image(record.path, options)
            except ImageFailure as failure:
                skipped[failure.reason] = skipped.get(failure.reason, 0) + 1
                continue
            files.append((record.path, record.label if record.label is not None else -1))
    if not files:
        raise InputError(f"{src}: no images that decode to read for the baseline")
    return files, skipped


def _warm(paths: Sequence[Path]) -> None:
    """Read the files once, so the runs measure the loader and not the disk."""
    buffer = bytearray(1 << 22)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def _measure(spec: dict[str, Any]) -> LoaderRun:
    # The spec goes through stdin: thousands of baseline paths would overflow one argument.
    result = subprocess.run([sys.executable, "-m", "shardkit.tools.bench_run"], input=json.dumps(spec),
                            capture_output=True, text=True, check=False)
    last = result.stdout.strip().splitlines()[-1:] or [""]
    if result.returncode != 0:
        raise _child_error(last[0]) or ShardkitError(
            f"measuring {spec['loader']} with {spec['workers']} workers failed "
            f"(exit {result.returncode}): {result.stderr.strip()[-1500:]}")
    return LoaderRun(**json.loads(last[0]))


def _child_error(line: str) -> ShardkitError | None:
    """The shardkit error a measuring process reported (`bench_run`), as its own class (a
    corrupt shard stays exit 6, a storage failure exit 9); None for anything else."""
    try:
        report = json.loads(line)
        kind = getattr(errors, report["error"])
        message = str(report["message"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not (isinstance(kind, type) and issubclass(kind, ShardkitError)):
        return None
    return kind(message)


def plot(report: BenchReport, path: str | os.PathLike[str]) -> None:
    """A PNG with two bar charts: samples/s and CPU-ms per sample, per loader and workers."""
    matplotlib: Any = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r.loader}, {r.workers} workers" for r in report.runs]
    colours = ["#2a7" if r.loader == "shards" else "#999" for r in report.runs]
    fig, (speed, cost) = plt.subplots(1, 2, figsize=(11, 0.5 * len(names) + 1.6))
    for ax, values, label, fmt in (
        (speed, [r.samples_per_second for r in report.runs], "samples/s (log)", "{:,.0f}"),
        (cost, [r.cpu_ms_per_sample for r in report.runs], "CPU-ms per sample (log)", "{:.3f}"),
    ):
        ax.barh(names, values, color=colours)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_xlim(right=max(values) * 3)  # room for the value labels
        ax.invert_yaxis()
        for y, value in enumerate(values):
            ax.text(value, y, " " + fmt.format(value), va="center", fontsize=8)
    cost.set_yticklabels([])
    shape = "×".join(map(str, report.image_shape or [])) or "variable"
    fig.suptitle(f"shardkit bench: {report.dataset_samples:,} samples, {shape}, "
                 f"batch {report.options.batch_size}, {report.cpu_count} CPUs", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(check_local_file("the plot", path), dpi=110)
    except OSError as exc:
        raise ConfigError(f"the plot {path}: cannot be written: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
