"""Tabular datasets (``kind: "table"``): shards read column-wise into a float32 [N, F] feature
matrix, and batches gathered out of it with no Python per row (numpy only).

Feature order is ``schema.features.names`` (CSV column order). Numbers become float32 (nulls
NaN); dictionary (string) columns become their category codes (the index into the column's
``categories`` in index.json; nulls NaN). Labels are int64 [N] (one integer or string
column) or float32 [N] / [N, K] (numeric targets).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardkit.errors import CorruptShardError
from shardkit.format.files import check_shard, hash_file
from shardkit.format.manifest import Manifest
from shardkit.format.samples import check_labels
from shardkit.reader.assign import shard_runs
from shardkit.reader.open_ahead import OpenAhead, read_ahead
from shardkit.reader.parquet import read_parquet_table

__all__ = ["TableCache", "TableShard", "assemble_table", "read_table_shard",
           "stream_table_batches", "verify_table"]


@dataclass(frozen=True, slots=True)
class TableShard:
    features: np.ndarray  # float32 [N, F]
    labels: np.ndarray | None  # int64 [N] or float32 [N] / [N, K]


def _codes(column: pa.ChunkedArray, categories: list[str]) -> np.ndarray:
    """Global category codes (float, NaN for nulls) of a dictionary column; the file's own
    dictionary may be ordered or trimmed differently, so codes are remapped."""
    out = []
    everything = pa.array(categories, pa.string())
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            remap = pc.index_in(chunk.dictionary, value_set=everything).to_numpy(zero_copy_only=False)
            local = chunk.indices.to_numpy(zero_copy_only=False)
        else:
            remap = np.arange(len(categories), dtype=np.float64)
            local = pc.index_in(chunk, value_set=everything).to_numpy(zero_copy_only=False)
        nulls = np.isnan(local) if local.dtype.kind == "f" else np.zeros(len(local), bool)
        codes = np.full(len(local), np.nan, dtype=np.float32)
        codes[~nulls] = np.asarray(remap, dtype=np.float64)[local[~nulls].astype(np.int64)]
        out.append(codes)
    return np.concatenate(out) if out else np.empty(0, np.float32)


def read_table_shard(path: str, samples: int, manifest: Manifest) -> TableShard:
    """One shard as a feature matrix and labels. Raises CorruptShardError."""
    schema = manifest.schema
    names = list(schema["features"]["names"])
    label = schema.get("label")
    label_names = list(label["names"]) if label else []
    columns = {c["name"]: c for c in schema["columns"]}
    table = read_parquet_table(path, names + label_names, samples)
    features = np.empty((samples, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        column = table.column(name)
        if "categories" in columns[name]:
            features[:, j] = _codes(column, columns[name]["categories"])
        else:
            features[:, j] = column.to_numpy().astype(np.float32)
    labels = None
    if label:
        parts = [table.column(n).to_numpy() for n in label_names]
        labels = (np.stack(parts, axis=1) if label["shape"] else parts[0]).astype(label["dtype"])
        check_labels(path, labels, manifest.classes)
    return TableShard(features=features, labels=labels)


class TableCache(OpenAhead[TableShard]):
    """Opened table shards (see `OpenAhead`); with `verify`, each one's sha256 is checked
    against index.json when it is opened."""

    thread_name = "shardkit-table"

    def __init__(self, folder: str, manifest: Manifest, *, capacity: int, verify: bool) -> None:
        super().__init__(capacity)
        self.folder, self.manifest, self.verify = folder, manifest, verify

    def _load(self, number: int) -> TableShard:
        record = self.manifest.shards[number]
        path = os.path.join(self.folder, record.file)
        check_shard(path, record, verify=self.verify)
        return read_table_shard(path, record.samples, self.manifest)


def assemble_table(cache: TableCache, starts: np.ndarray, index: np.ndarray) -> dict[str, Any]:
    """The batch of samples `index` (sorted): features [B, F] float32, label, index."""
    size = len(index)
    features: np.ndarray | None = None
    labels: np.ndarray | None = None
    for number, slots, local in shard_runs(starts, index):
        shard = cache.get(number)
        if features is None:
            features = np.empty((size, shard.features.shape[1]), dtype=np.float32)
            if shard.labels is not None:
                labels = np.empty((size, *shard.labels.shape[1:]), dtype=shard.labels.dtype)
        np.take(shard.features, local, axis=0, out=features[slots])
        if labels is not None and shard.labels is not None:
            np.take(shard.labels, local, axis=0, out=labels[slots])
    if features is None:
        width = len(cache.manifest.schema["features"]["names"])
        features = np.empty((0, width), dtype=np.float32)
    batch: dict[str, Any] = {"features": features, "index": index}
    if labels is not None:
        batch["label"] = labels
    return batch


def stream_table_batches(cache: TableCache, starts: np.ndarray, batches: Sequence[np.ndarray], *,
                         lookahead: int = 2,
                         keep_open: bool = False) -> Generator[dict[str, Any], None, None]:
    """Assemble `batches` in order, opening the shards of the next ones in the background."""
    return read_ahead(cache, starts, batches, lambda index: assemble_table(cache, starts, index),
                      lookahead=lookahead, keep_open=keep_open)


def verify_table(folder: Any, manifest: Manifest, *, quick: bool = False) -> list[str]:
    """`shardkit verify` for a table's shards: each one's size, sha256 (unless `quick`), row
    count, columns and feature read. One line per problem; `shardkit.tools.verify` checks the
    totals and errors.jsonl for every kind of dataset."""
    from pathlib import Path

    problems: list[str] = []
    root = Path(folder)
    names = [c["name"] for c in manifest.schema.get("columns", [])]
    for record in manifest.shards:
        path = root / record.file
        try:
            if path.stat().st_size != record.bytes:
                raise CorruptShardError(f"{path.stat().st_size} bytes, index.json says {record.bytes}")
            if not quick and hash_file(path)[1] != record.sha256:
                raise CorruptShardError("sha256 differs from index.json")
            table = read_parquet_table(path, ["row", *names], record.samples)
            if table.column_names != ["row", *names]:
                raise CorruptShardError(f"columns {table.column_names}, expected {['row', *names]}")
            read_table_shard(str(path), record.samples, manifest)
        except (OSError, CorruptShardError, ValueError, KeyError) as exc:
            problems.append(f"{record.file}: {exc}")
    return problems
