"""Parquet shards that pyarrow, pandas, DuckDB and Hugging Face datasets read as they are.

One row per sample. Columns, in order: ``key`` (string), ``image`` (raw fixed-shape:
``fixed_size_binary(H*W*C)``, C-order uint8; jpeg/png or variable shapes: ``binary``),
``label`` (int64, labelled datasets only), ``source`` (string, path relative to SRC),
``orig_width`` / ``orig_height`` (int32, source size after orientation), and ``width`` /
``height`` (int32) when ``image`` is variable-size binary (jpeg/png, or varying shapes).
Row groups hold a fixed number of rows, chosen from the config, so they never depend on how
the work was split.

Parts are Arrow IPC files (uncompressed, memory-mapped when assembled, so joining them costs
no decode).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardkit.conversion.writers import EncodedSample
from shardkit.conversion.writers._common import hash_file

__all__ = ["ParquetPartWriter", "arrow_schema", "assemble_parquet"]


META_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(),
              "bool": pa.bool_(), "float32_list": pa.list_(pa.float32())}


def arrow_schema(*, pixel_bytes: int | None, labeled: bool,
                 meta: Sequence[tuple[str, str]] = ()) -> pa.Schema:
    """The shard schema; `pixel_bytes` is H*W*C for fixed-shape raw images, else None;
    `meta`: CSV columns (name, type) appended, nullable, after the fixed ones."""
    fields: list[pa.Field] = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary(pixel_bytes) if pixel_bytes else pa.binary(), nullable=False),
    ]
    if labeled:
        fields.append(pa.field("label", pa.int64(), nullable=False))
    fields += [
        pa.field("source", pa.string(), nullable=False),
        pa.field("orig_width", pa.int32(), nullable=False),
        pa.field("orig_height", pa.int32(), nullable=False),
    ]
    if pixel_bytes is None:
        fields += [pa.field("width", pa.int32(), nullable=False),
                   pa.field("height", pa.int32(), nullable=False)]
    fields += [pa.field(name, META_TYPES[kind]) for name, kind in meta]
    return pa.schema(fields)


class ParquetPartWriter:
    """Collects a part's samples and writes them as one Arrow IPC record batch."""

    def __init__(self, path: str, *, schema: pa.Schema) -> None:
        self._path = path
        self._schema = schema
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}

    def add(self, sample: EncodedSample) -> None:
        columns = self._columns
        columns["key"].append(sample.key)
        columns["image"].append(sample.payload)
        if "label" in columns:
            columns["label"].append(sample.label)
        columns["source"].append(sample.source)
        columns["orig_width"].append(sample.orig_size[0])
        columns["orig_height"].append(sample.orig_size[1])
        if "width" in columns:
            columns["width"].append(sample.shape[1])
            columns["height"].append(sample.shape[0])
        for name, value in sample.meta:
            columns[name].append(value)

    def close(self) -> None:
        batch = pa.record_batch(
            [pa.array(self._columns[f.name], type=f.type) for f in self._schema],
            schema=self._schema,
        )
        with pa.OSFile(self._path, "wb") as sink, pa.ipc.new_file(sink, self._schema) as ipc:
            ipc.write_batch(batch)
        self._columns = {}


def assemble_parquet(parts: Sequence[str], tmp_path: str, *, schema: pa.Schema,
                     rows_per_group: int, compression: str) -> tuple[int, str]:
    """Join part files into one Parquet file at `tmp_path` (fsynced); (bytes, sha256)."""
    column_compression = {name: "zstd" for name in schema.names}
    column_compression["image"] = compression
    stats = [name for name in schema.names if name != "image"]
    buffered: list[pa.RecordBatch] = []
    pending = 0
    with pq.ParquetWriter(
        tmp_path, schema, compression=column_compression, use_dictionary=False,
        write_statistics=stats, version="2.6", data_page_size=1 << 20,
    ) as writer:
        for part in parts:
            # The table's buffers keep the mapping alive; no copy is made here.
            table = pa.ipc.open_file(pa.memory_map(part, "r")).read_all()
            for batch in table.to_batches():
                buffered.append(batch)
                pending += batch.num_rows
            while pending >= rows_per_group:
                group = pa.Table.from_batches(buffered, schema=schema)
                writer.write_table(group.slice(0, rows_per_group), row_group_size=rows_per_group)
                rest = group.slice(rows_per_group)
                buffered, pending = rest.to_batches(), rest.num_rows
        if pending:
            writer.write_table(pa.Table.from_batches(buffered, schema=schema),
                               row_group_size=rows_per_group)
    with open(tmp_path, "rb+") as handle:
        os.fsync(handle.fileno())
    return hash_file(tmp_path)
