"""A converted dataset as numpy arrays, shard by shard (no torch needed)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardkit.errors import CorruptShardError, DatasetError
from shardkit.format.manifest import Manifest
from shardkit.format.tar import iter_members, read_raw_shard
from shardkit.reader.assign import Split, assign
from shardkit.reader.batches import in_background, resolve_copy_threads, stream_batches
from shardkit.reader.decode import decode
from shardkit.reader.handles import ShardCache, check_fields, default_capacity
from shardkit.reader.parquet import read_parquet_shard, read_parquet_table
from shardkit.reader.table import TableCache, TableShard, read_table_shard, stream_table_batches

__all__ = ["Dataset", "ShardData", "open_dataset"]


@dataclass(frozen=True)
class ShardData:
    """One shard's samples. images: [N,H,W,C] uint8 array when shapes are fixed, else a list
    of H×W×C arrays. labels: [N] int64 or None. index: [N] positions in the dataset."""

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray | None
    index: np.ndarray


class Dataset:
    """A shardkit dataset on disk: its manifest and its shards, read as numpy arrays."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        if self.manifest.kind not in ("images", "table"):
            raise DatasetError(f"{self.path}: holds {self.manifest.kind!r}, not images or a table")
        starts = np.cumsum([0] + [s.samples for s in self.manifest.shards])
        self._starts = [int(v) for v in starts]

    def __len__(self) -> int:
        return self.manifest.samples

    @property
    def classes(self) -> list[str] | None:
        return self.manifest.classes

    @property
    def format(self) -> str:
        return str(self.manifest.config["format"])

    @property
    def codec(self) -> str:
        return str(self.manifest.config["codec"])

    @property
    def shape(self) -> tuple[int, int, int] | None:
        shape = self.manifest.schema["image"]["shape"]
        return None if None in shape else (int(shape[0]), int(shape[1]), int(shape[2]))

    @property
    def is_table(self) -> bool:
        """True for a tabular CSV conversion (features and labels, no images)."""
        return self.manifest.kind == "table"

    def read_table(self, number: int) -> TableShard:
        """Shard `number` of a table: features float32 [N, F] and labels."""
        if not self.is_table:
            raise DatasetError(f"{self.path}: holds images; use read_shard")
        record = self.manifest.shards[number]
        return read_table_shard(str(self.path / record.file), record.samples, self.manifest)

    def read_shard(self, number: int) -> ShardData:
        """Every sample of shard `number`. Raises CorruptShardError on disagreement with
        index.json (size, structure or count)."""
        if self.is_table:
            raise DatasetError(f"{self.path}: holds a table; use read_table or batches")
        record = self.manifest.shards[number]
        path = self.path / record.file
        labeled = self.manifest.classes is not None
        index = np.arange(self._starts[number], self._starts[number + 1], dtype=np.int64)
        if not path.exists():
            raise CorruptShardError(f"{path}: missing (index.json lists it)")
        if self.codec == "raw" and self.shape is not None:
            if self.format == "tar":
                images, labels = read_raw_shard(path, record, self.shape)
            else:
                images, labels = read_parquet_shard(path, record.samples, self.shape, labeled)
            return ShardData(images=images, labels=labels, index=index)
        decoded, labels_list = self._decode_shard(path, record.samples, labeled)
        labels_array = np.asarray(labels_list, dtype=np.int64) if labeled else None
        return ShardData(images=decoded, labels=labels_array, index=index)

    def _decode_shard(self, path: Path, samples: int,
                      labeled: bool) -> tuple[list[np.ndarray], list[int]]:
        images: list[np.ndarray] = []
        labels: list[int] = []
        if self.format == "tar":
            for _key, field, data in iter_members(path):
                if field == "cls":
                    labels.append(int(data))
                elif field != "json":
                    images.append(_decode_payload(data, field, self.shape))
        else:
            columns = ["image", "label"] if labeled else ["image"]
            if self.codec == "raw":
                columns += ["height", "width"]
            table = read_parquet_table(path, columns, samples)
            for row in table.to_pylist():
                images.append(_decode_payload(row["image"], self.codec, self.shape, row))
                if labeled:
                    labels.append(row["label"])
        if len(images) != samples or (labeled and len(labels) != samples):
            raise CorruptShardError(f"{path}: {len(images)} samples, index.json says {samples}")
        return images, labels

    def samples(self) -> Iterator[dict[str, Any]]:
        """Every sample in stored order: {"image", "label" (if any), "index"}."""
        for number in range(len(self.manifest.shards)):
            shard = self.read_shard(number)
            for i, image in enumerate(shard.images):
                sample: dict[str, Any] = {"image": image, "index": int(shard.index[i])}
                if shard.labels is not None:
                    sample["label"] = int(shard.labels[i])
                yield sample

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, rank: int = 0, world_size: int = 1,
                window: int | None = 4, fields: Sequence[str] = (), start: int = 0,
                verify: bool = False, prefetch: bool = True,
                copy_threads: int | None = None) -> Iterator[dict[str, Any]]:
        """Whole batches as numpy arrays: {"image" [B,H,W,C] uint8, "label" [B] int64 (if
        labelled), "index" [B] int64, and any metadata `fields`}; for a table, {"features"
        [B,F] float32, "label" (if labelled), "index"}.

        Order, rank split and resume (`start` samples into this rank's epoch) follow
        `shardkit.reader.assign`; `prefetch` assembles the next batches in a thread, and
        `copy_threads` threads (default: 2, or 1 on a single CPU) copy each batch's samples.
        """
        sizes = [s.samples for s in self.manifest.shards]
        split = Split(rank=rank, world=world_size)
        batches = list(assign(sizes, split, epoch=epoch, seed=seed, batch_size=batch_size,
                              drop_last=drop_last, shuffle=shuffle, window=window, start=start))
        fields = check_fields(self.manifest, fields)
        starts = np.asarray(self._starts, dtype=np.int64)
        capacity = default_capacity(self.manifest, window)
        stream: Iterator[dict[str, Any]]
        if self.is_table:
            stream = stream_table_batches(TableCache(str(self.path), self.manifest, capacity=capacity),
                                          starts, batches)
        else:
            cache = ShardCache(str(self.path), self.manifest, capacity=capacity, verify=verify)
            stream = stream_batches(cache, starts, batches, fields,
                                    threads=resolve_copy_threads(copy_threads))
        return in_background(stream) if prefetch else stream

    def metadata(self, number: int) -> list[dict[str, Any]]:
        """Per-sample metadata of one shard (source path, original size, class)."""
        path = self.path / self.manifest.shards[number].file
        if self.format == "tar":
            return [dict(json.loads(data)) for _key, field, data in iter_members(path) if field == "json"]
        table = read_parquet_table(path, ["key", "source", "orig_width", "orig_height"],
                                   self.manifest.shards[number].samples)
        rows: list[dict[str, Any]] = table.to_pylist()
        return rows


def _decode_payload(data: bytes, field: str, shape: tuple[int, int, int] | None,
                    row: dict[str, Any] | None = None) -> np.ndarray:
    if field in ("npy", "raw"):
        if field == "npy":
            array: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            assert row is not None
            array = np.frombuffer(data, dtype=np.uint8).reshape(row["height"], row["width"], -1)
        return array
    return decode(data)  # as stored: L stays one channel, anything else becomes RGB


def open_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Open the dataset in `path` (a folder with index.json). Raises DatasetError."""
    return Dataset(path)
