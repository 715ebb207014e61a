"""A converted dataset as numpy arrays (no torch needed): ``shardkit.open(path)``.

Shards are opened exactly as the torch loader opens them (`handles.open_shard`), and
`Dataset.batches` reads through the same set-up (`pipeline.Reading`) with the same options.
A dataset at a URL is read through the node-local shard cache (docs/remote.md).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shardkit.config import ReadOptions
from shardkit.config.common import as_integer, check_count
from shardkit.errors import ConfigError, CorruptShardError, DatasetError
from shardkit.keywords import read_options
from shardkit.reader.assign import samples_per_rank
from shardkit.reader.batches import assemble, in_background
from shardkit.reader.handles import ShardCache, metadata_fields, open_shard
from shardkit.reader.pipeline import Reading, open_source
from shardkit.reader.remote_cache import RemoteCache
from shardkit.reader.remote_read import pinned_copy
from shardkit.reader.table import TableShard, read_table_shard

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from shardkit.format.manifest import ShardRecord
    from shardkit.keywords import ReadKeywords

__all__ = ["Dataset", "ShardData", "open_dataset"]


@dataclass(frozen=True)
class ShardData:
    """One shard's samples. images: [N,H,W,C] uint8 array when shapes are fixed, else a list
    of H×W×C arrays. labels: [N] int64 (or [N,K] float32 targets) or None. index: [N]
    positions in the dataset."""

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray | None
    index: np.ndarray


class Dataset:
    """A shardkit dataset on disk or at a URL: its manifest and its shards, read as numpy
    arrays. `options` (a `ReadOptions`) are the defaults of `batches`; for a URL they also say
    where the bytes come from (storage_options, cache_dir, cache_limit, prefetch_shards)."""

    def __init__(self, path: str | os.PathLike[str], options: ReadOptions | None = None) -> None:
        self.options = options or ReadOptions()
        where, manifest, self._source = open_source(os.fspath(path), self.options)
        #: The dataset's folder (a Path), or its URL (a str).
        self.path: Path | str = Path(where) if self._source is None else where
        self.manifest = manifest
        self._remote: RemoteCache | None = None  # made on the first shard read, per process
        #: Class names (index = label), or None.
        self.classes: list[str] | None = manifest.classes
        self.format, self.codec = manifest.format, manifest.codec
        #: (H, W, C) when every image has that shape, else None.
        self.shape: tuple[int, int, int] | None = manifest.image_shape
        #: True for a tabular CSV conversion (features and labels, no images).
        self.is_table = manifest.kind == "table"
        starts = np.cumsum([0] + [s.samples for s in manifest.shards])
        self._starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return self.manifest.samples

    def _record(self, number: int) -> ShardRecord:
        """Shard `number`'s entry in index.json; IndexError naming the valid range unless
        0 <= number < shards (a negative number is not counted from the end: every method
        that takes a shard number refuses it alike)."""
        shards = self.manifest.shards
        if (index := as_integer(number)) is None or not 0 <= index < len(shards):
            valid = f"0 to {len(shards) - 1}" if shards else "none: the dataset holds no shards"
            raise IndexError(f"{self.path}: no shard {number!r}; shard numbers are {valid}")
        return shards[index]

    def _shard(self, number: int) -> AbstractContextManager[str]:
        """The folder holding shard `number` (checked by `_record`) as a local file while
        the block runs: the dataset's own, or the cache's, with the copy pinned."""
        if self._source is None:
            return nullcontext(str(self.path))
        if self._remote is None:
            self._remote = self._source.cache(self.manifest, held=1, verify=self.options.verify)
        return pinned_copy(self._remote, number)

    def read_table(self, number: int) -> TableShard:
        """Shard `number` of a table: features float32 [N, F] and labels. IndexError for a
        number not in 0 .. shards - 1."""
        if not self.is_table:
            raise DatasetError(f"{self.path}: holds images; use read_shard")
        record = self._record(number)
        with self._shard(number) as folder:
            return read_table_shard(os.path.join(folder, record.file), record.samples,
                                    self.manifest)

    def read_shard(self, number: int) -> ShardData:
        """Every sample of shard `number` (0 .. shards - 1), in stored order. Raises
        IndexError for another number (negative ones too), CorruptShardError on disagreement
        with index.json (size, structure or count)."""
        if self.is_table:
            raise DatasetError(f"{self.path}: holds a table; use read_table or batches")
        self._record(number)
        index = np.arange(self._starts[number], self._starts[number + 1], dtype=np.int64)
        with self._shard(number) as folder:
            cache = ShardCache(folder, self.manifest, capacity=1, verify=False)
            try:
                batch = assemble(cache, self._starts, index, ())
            finally:
                cache.close()
        return ShardData(images=batch["image"], labels=batch.get("label"), index=index)

    def samples(self) -> Iterator[dict[str, Any]]:
        """Every sample in stored order: {"image", "label" (if any), "index"}."""
        for number in range(len(self.manifest.shards)):
            shard = self.read_shard(number)
            for i, image in enumerate(shard.images):
                sample: dict[str, Any] = {"image": image, "index": int(shard.index[i])}
                if shard.labels is not None:
                    sample["label"] = shard.labels[i].tolist()
                yield sample

    def batches(self, batch_size: int, options: ReadOptions | None = None, *, epoch: int = 0,
                start: int = 0, **keywords: Unpack[ReadKeywords]) -> Iterator[dict[str, Any]]:
        """Whole batches as numpy arrays: {"image" [B,H,W,C] uint8, "label" [B] int64 (if
        labelled), "index" [B] int64, and any metadata `fields`}; for a table, {"features"
        [B,F] float32, "label" (if labelled), "index"}.

        Options as ``ShardLoader`` takes them (a `ReadOptions` and/or keywords, the same
        defaults; default: the ones the dataset was opened with); rank and world size default
        to 0 of 1. `epoch` picks the order, `start` resumes after that many samples of this
        rank's epoch. Where a remote dataset's bytes come from is fixed when it is opened.

        Raises ConfigError (at the call, before any reading) for a bad option, an `epoch`
        that is not an integer >= 0, or a `start` outside 0 .. the samples of this rank's
        epoch (``start`` equal to them gives an empty, finished pass).
        """
        chosen = read_options(options or self.options, dict(keywords))
        epoch, start = check_count("epoch", epoch, 0), check_count("start", start, 0)
        if self._source is not None:
            self._source.check(chosen)
        reading = Reading(str(self.path), self.manifest, chosen, batch_size,
                          rank=chosen.rank or 0, world=chosen.world_size or 1, source=self._source)
        per_rank = samples_per_rank(reading.total, reading.world, drop_last=chosen.drop_last,
                                    batch_size=reading.batch_size)
        if start > per_rank:
            raise ConfigError(f"start must be at most {per_rank} (the samples of this rank's "
                              f"epoch); got {start}")
        if not chosen.prefetch:
            return reading.stream(reading.order(epoch=epoch, start=start), epoch=epoch, keep_open=False)
        demand = threading.Event()
        stream = reading.stream(reading.order(epoch=epoch, start=start), epoch=epoch,
                                keep_open=False, demand=demand)
        return in_background(stream, depth=chosen.prefetch, demand=demand)

    def metadata(self, number: int) -> list[dict[str, Any]]:
        """Per-sample metadata of shard `number`, the same names for tar and Parquet: key,
        source, orig_width, orig_height, an image CSV's columns, and label and class
        (labelled datasets). IndexError for a number not in 0 .. shards - 1 (negative ones
        too)."""
        if self.is_table:
            raise DatasetError(f"{self.path}: holds a table; it has no per-sample metadata")
        fields = metadata_fields(self.manifest)
        local = np.arange(self._record(number).samples)
        with self._shard(number) as folder:
            handle = open_shard(folder, self.manifest, number, verify=False, fields=fields)
            columns = {name: handle.metadata(local, name) for name in fields}
        if handle.labels is not None:
            columns["label"] = handle.labels.tolist()
            if self.classes is not None:
                classes = self.classes
                if any(not 0 <= i < len(classes) for i in columns["label"]):
                    raise CorruptShardError(f"{handle.path}: a label is not a class index")
                columns["class"] = [classes[i] for i in columns["label"]]
        return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def open_dataset(path: str | os.PathLike[str], options: ReadOptions | None = None,
                 **keywords: Unpack[ReadKeywords]) -> Dataset:
    """Open the dataset in `path`: a folder with index.json, or its URL (``s3://bucket/ds``,
    ``gs://...``, ``https://...``, any fsspec URL; only index.json is fetched now, shards when
    read). `options` and/or keywords (`ReadOptions`' fields) are the defaults of `batches`;
    for a URL, ``storage_options``, ``cache_dir``, ``cache_limit`` and ``prefetch_shards`` say
    how its bytes are fetched and kept. Raises DatasetError (not a dataset), ConfigError (an
    unusable URL or option), MissingExtraError (the URL's extra), RemoteError (unreachable)."""
    return Dataset(path, read_options(options, dict(keywords)))
