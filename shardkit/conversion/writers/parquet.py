"""Parquet shard writer: samples → Arrow IPC part files → one Parquet file.

The columns are `shardkit.format.samples.arrow_schema`'s. Row groups hold a fixed number of
rows, chosen from the config, so they never depend on how the work was split.

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
from shardkit.format.files import hash_file
from shardkit.format.samples import (
    ARRAY3D_LEAF,
    Array3DType,
    array3d_column,
    image_array,
    part_schema,
)

__all__ = ["ParquetPartWriter", "assemble_parquet"]


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
            [image_array(self._columns[f.name], f.type) if f.name == "image" else
             pa.array(self._columns[f.name], type=f.type) for f in self._schema],
            schema=self._schema,
        )
        with pa.OSFile(self._path, "wb") as sink, pa.ipc.new_file(sink, self._schema) as ipc:
            ipc.write_batch(batch)
        self._columns = {}


def assemble_parquet(parts: Sequence[str], tmp_path: str, *, schema: pa.Schema,
                     rows_per_group: int, compression: str) -> tuple[int, str]:
    """Join part files (written in `part_schema(schema)`) into one Parquet file at `tmp_path`
    (fsynced); (bytes, sha256)."""
    image = schema.field("image").type
    array3d = image if isinstance(image, Array3DType) else None
    # The leaf that holds the image bytes: Array3D's values, an Image struct's bytes (its path
    # leaf, null, keeps the writer's default), or the plain binary column itself.
    image_leaf = ARRAY3D_LEAF if array3d is not None else \
        "image.bytes" if pa.types.is_struct(image) else "image"
    column_compression = {name: "zstd" for name in schema.names if name != "image"}
    column_compression[image_leaf] = compression
    # An Array3D leaf is dictionary-encoded: 256 values at most, so a byte an index where
    # PLAIN stores uint8 as 4-byte INT32 (1.25x the pixels on disk against 4.25x).
    dictionary = [ARRAY3D_LEAF] if array3d is not None else False
    stats = [name for name in schema.names if name != "image"]
    parts_schema = part_schema(schema)

    def write(group: pa.Table) -> None:
        if array3d is not None:
            group = group.set_column(group.schema.get_field_index("image"), schema.field("image"),
                                     array3d_column(group.column("image"), array3d))
        writer.write_table(group, row_group_size=rows_per_group)

    buffered: list[pa.RecordBatch] = []
    pending = 0
    with pq.ParquetWriter(
        tmp_path, schema, compression=column_compression, use_dictionary=dictionary,
        write_statistics=stats, version="2.6", data_page_size=1 << 20,
    ) as writer:
        for part in parts:
            # The table's buffers keep the mapping alive; no copy is made here.
            table = pa.ipc.open_file(pa.memory_map(part, "r")).read_all()
            for batch in table.to_batches():
                buffered.append(batch)
                pending += batch.num_rows
            while pending >= rows_per_group:
                group = pa.Table.from_batches(buffered, schema=parts_schema)
                write(group.slice(0, rows_per_group))
                rest = group.slice(rows_per_group)
                buffered, pending = rest.to_batches(), rest.num_rows
        if pending:
            write(pa.Table.from_batches(buffered, schema=parts_schema))
    with open(tmp_path, "rb+") as handle:
        os.fsync(handle.fileno())
    return hash_file(tmp_path)
