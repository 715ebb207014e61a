"""A converted dataset as numpy arrays (no torch needed): ``shardkit.open(path)``.

Shards are opened exactly as the torch loader opens them (`handles.open_shard`), and
`Dataset.batches` reads through the same set-up (`pipeline.Reading`) with the same options.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shardkit.config import ReadOptions
from shardkit.errors import CorruptShardError, DatasetError
from shardkit.keywords import read_options
from shardkit.reader.batches import assemble, in_background
from shardkit.reader.handles import ShardCache, metadata_fields, open_shard
from shardkit.reader.pipeline import Reading, open_manifest
from shardkit.reader.table import TableShard, read_table_shard

if TYPE_CHECKING:
    from typing_extensions import Unpack

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
    """A shardkit dataset on disk: its manifest and its shards, read as numpy arrays."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.manifest = manifest = open_manifest(str(self.path))
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

    def read_table(self, number: int) -> TableShard:
        """Shard `number` of a table: features float32 [N, F] and labels."""
        if not self.is_table:
            raise DatasetError(f"{self.path}: holds images; use read_shard")
        record = self.manifest.shards[number]
        return read_table_shard(str(self.path / record.file), record.samples, self.manifest)

    def read_shard(self, number: int) -> ShardData:
        """Every sample of shard `number`, in stored order. Raises CorruptShardError on
        disagreement with index.json (size, structure or count)."""
        if self.is_table:
            raise DatasetError(f"{self.path}: holds a table; use read_table or batches")
        index = np.arange(self._starts[number], self._starts[number + 1], dtype=np.int64)
        cache = ShardCache(str(self.path), self.manifest, capacity=1, verify=False)
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
        defaults); rank and world size default to 0 of 1. `epoch` picks the order, `start`
        resumes after that many samples of this rank's epoch.
        """
        chosen = read_options(options, dict(keywords))
        reading = Reading(str(self.path), self.manifest, chosen, batch_size,
                          rank=chosen.rank or 0, world=chosen.world_size or 1)
        if not chosen.prefetch:
            return reading.stream(reading.order(epoch=epoch, start=start), epoch=epoch, keep_open=False)
        demand = threading.Event()
        stream = reading.stream(reading.order(epoch=epoch, start=start), epoch=epoch,
                                keep_open=False, demand=demand)
        return in_background(stream, depth=chosen.prefetch, demand=demand)

    def metadata(self, number: int) -> list[dict[str, Any]]:
        """Per-sample metadata of shard `number`, the same names for tar and Parquet: key,
        source, orig_width, orig_height, an image CSV's columns, and label and class
        (labelled datasets)."""
        if self.is_table:
            raise DatasetError(f"{self.path}: holds a table; it has no per-sample metadata")
        fields = metadata_fields(self.manifest)
        handle = open_shard(str(self.path), self.manifest, number, verify=False, fields=fields)
        local = np.arange(self.manifest.shards[number].samples)
        columns = {name: handle.metadata(local, name) for name in fields}
        if handle.labels is not None:
            columns["label"] = handle.labels.tolist()
            if self.classes is not None:
                classes = self.classes
                if any(not 0 <= i < len(classes) for i in columns["label"]):
                    raise CorruptShardError(f"{handle.path}: a label is not a class index")
                columns["class"] = [classes[i] for i in columns["label"]]
        return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def open_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Open the dataset in `path` (a folder with index.json). Raises DatasetError."""
    return Dataset(path)
