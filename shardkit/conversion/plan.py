"""Plan a conversion: list the inputs, order them, fix the shards and their parts up front.

Shard *k* always means the same inputs for the same source and config, so any worker count,
a retry or a resumed run produce the same bytes. Work is cut finer than shards: a *part* is up
to `PART_SAMPLES` consecutive samples of one shard, so that a dataset of one shard still keeps
every worker busy and the progress bar moves.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardkit.config import ARRAY3D_VALUES, ConvertConfig, RunOptions
from shardkit.conversion.report import FailureRecord
from shardkit.conversion.sources.image_csv import list_image_csv
from shardkit.conversion.sources.imagefolder import Listing, list_image_folder
from shardkit.conversion.sources.records import InputRecord, Permuted, RecordSpool, Selected
from shardkit.format import tar
from shardkit.format.manifest import fingerprint, shard_name
from shardkit.format.storage import Storage

__all__ = ["PART_SAMPLES", "Plan", "list_inputs", "make_plan", "plan_of", "rows_per_group"]

PART_SAMPLES = 64
#: Target bytes of image data per Parquet row group: large enough for whole-batch reads.
ROW_GROUP_BYTES = 64 * 1024 * 1024
#: Typical compressed size relative to raw pixels, used to turn --shard-size into a count.
_CODEC_RATIO = {"raw": 1.0, "jpeg": 1 / 8, "png": 1 / 2}
#: Raw pixels as Array3D: a dictionary index byte and two bits of repetition level a value.
_ARRAY3D_RATIO = 1.25


@dataclass(frozen=True, kw_only=True)
class Plan:
    config: ConvertConfig
    #: In plan order: a spool that spills to disk past `records.CHUNK` inputs, seen through
    #: the seeded permutation when shuffled (see shardkit.conversion.sources.records).
    records: Sequence[InputRecord]
    classes: list[str] | None
    failures: list[FailureRecord]
    samples_per_shard: int
    fingerprint: str
    #: CSV metadata columns (name, type) carried by every sample; empty for folders.
    meta_types: tuple[tuple[str, str], ...] = ()
    #: The part of a split this plan converts (None: the whole source).
    subset: str | None = None
    #: A Hugging Face source: the column of the images inside its data files.
    image_col: str | None = None
    #: A remote source: the storage tasks read the inputs through (records' paths are URLs).
    source: Storage | None = None

    @property
    def resolved(self) -> dict[str, Any]:
        """The config as index.json records it (and the fingerprint hashes it)."""
        resolved = self.config.to_json()
        return resolved if self.subset is None else {**resolved, "subset": self.subset}

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    @property
    def inputs(self) -> int:
        return len(self.records) + len(self.failures)

    @property
    def shard_count(self) -> int:
        return math.ceil(len(self.records) / self.samples_per_shard)

    @property
    def key_width(self) -> int:
        return max(6, len(str(max(len(self.records) - 1, 0))))

    def shard_file(self, shard: int) -> str:
        return shard_name(shard, self.config.format, self.shard_count)

    def shard_slice(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, len(self.records)))

    def parts(self, shard: int) -> Iterator[range]:
        """Consecutive runs of at most PART_SAMPLES plan indices covering the shard."""
        whole = self.shard_slice(shard)
        for start in range(whole.start, whole.stop, PART_SAMPLES):
            yield range(start, min(start + PART_SAMPLES, whole.stop))

    def class_name(self, record: InputRecord) -> str | None:
        if self.classes is None or record.label is None:
            return None
        return self.classes[record.label]

    def close(self) -> None:
        """Free the spilled input list (see `RecordSpool`); the plan's records are gone after."""
        records = self.records.records if isinstance(self.records, Permuted) else self.records
        if isinstance(records, RecordSpool):
            records.close()

    def json_blocks(self, records: Sequence[InputRecord]) -> int:
        """Blocks each tar JSON member of a shard holding `records` is padded to (see
        format.tar)."""
        return tar.json_blocks((r.source, self.class_name(r), r.meta) for r in records)


def make_plan(src: str | os.PathLike[str], config: ConvertConfig, *,
              spill_dir: str | os.PathLike[str] | None = None, run: RunOptions | None = None,
              source: Storage | None = None) -> Plan:
    """List `src`, apply the optional seeded shuffle and size the shards. A long input list
    spills to an unnamed file in `spill_dir` (default: the system's temporary folder)."""
    return plan_of(list_inputs(src, config, spill_dir=spill_dir, run=run, source=source), config)


def list_inputs(src: str | os.PathLike[str], config: ConvertConfig, *,
                spill_dir: str | os.PathLike[str] | None = None, run: RunOptions | None = None,
                source: Storage | None = None) -> Listing:
    """The inputs of `src`, in listing order (the source the config names); with `source`
    (`sources.remote.remote_source`), inputs read through it under `run`'s storage options."""
    if source is not None:
        from shardkit.conversion.sources.remote import list_remote

        return list_remote(src, config, source, run or RunOptions(), spill_dir=spill_dir)
    if config.hf is not None:
        from shardkit.conversion.sources.hf import list_hf_dataset

        return list_hf_dataset(src, config.hf, spill_dir=spill_dir)
    if config.csv is not None:
        assert config.csv.image_col is not None  # tabular CSVs are converted by shardkit.conversion.tabular
        return list_image_csv(src, config.csv, spill_dir=spill_dir)
    return list_image_folder(src, spill_dir=spill_dir)


def plan_of(listing: Listing, config: ConvertConfig, *, select: np.ndarray | None = None,
            failures: Sequence[FailureRecord] | None = None, subset: str | None = None) -> Plan:
    """The plan of `listing`'s inputs, or of those at `select` (a split's part `subset`,
    carrying `failures` instead of the listing's)."""
    # The fingerprint hashes the inputs in listing order, before the shuffle.
    listed: Sequence[InputRecord] = listing.records if select is None else Selected(listing.records, select)
    records = listed
    if config.shuffle:
        order = np.random.default_rng(config.seed).permutation(len(listed))
        records = Permuted(listed, order) if select is None else Selected(listing.records, select[order])
    plan = Plan(
        config=config, records=records, classes=listing.classes,
        failures=list(listing.failures if failures is None else failures),
        samples_per_shard=_samples_per_shard(config, listing.classes is not None),
        fingerprint="", meta_types=listing.meta_types, subset=subset, image_col=listing.image_col,
        source=listing.source,
    )
    digest = fingerprint(plan.resolved, listing.classes, itertools.chain(
        listing.extra_inputs, ((r.source, r.size, r.mtime_ns) for r in listed)))
    return dataclasses.replace(plan, fingerprint=digest)


def sample_bytes_estimate(config: ConvertConfig, labeled: bool) -> int:
    """Bytes one sample takes in a shard: exact for fixed-shape raw tar, else an estimate."""
    opts = config.image
    shape = opts.fixed_shape or (opts.size[0] * 4 // 3, opts.size[0], opts.channels)
    if config.format == "tar" and config.codec == "raw" and opts.fixed_shape:
        return tar.raw_layout(shape, 1 if labeled else None, 1)["stride"]
    pixels = int(np.prod(shape))
    ratio = _ARRAY3D_RATIO if config.pixels == "array3d" else _CODEC_RATIO[config.codec]
    return max(1, int(pixels * ratio))


def _samples_per_shard(config: ConvertConfig, labeled: bool) -> int:
    if config.samples_per_shard is not None:
        return config.samples_per_shard
    assert config.shard_bytes is not None  # ConvertConfig guarantees one of the two
    return max(1, config.shard_bytes // sample_bytes_estimate(config, labeled))


def rows_per_group(config: ConvertConfig, labeled: bool) -> int:
    """Parquet rows per row group, fixed by the config alone (an Array3D row group holds at
    most ARRAY3D_VALUES pixel values: its offsets are int32)."""
    rows = int(min(max(ROW_GROUP_BYTES // sample_bytes_estimate(config, labeled), 64), 1 << 16))
    shape = config.image.fixed_shape
    if config.pixels == "array3d" and shape is not None:
        rows = min(rows, ARRAY3D_VALUES // math.prod(shape))
    return rows
