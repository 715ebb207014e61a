"""Read Parquet shards: the fixed_size_binary image column becomes an array with no copy
beyond pyarrow's own read."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardkit.errors import CorruptShardError

__all__ = ["read_parquet_shard", "read_parquet_table"]


def read_parquet_table(path: str | os.PathLike[str], columns: Sequence[str],
                       samples: int) -> pa.Table:
    """Read `columns` of a shard, checking its row count against index.json."""
    try:
        table = pq.read_table(path, columns=list(columns), use_threads=False, memory_map=True)
    except (OSError, pa.ArrowException) as exc:
        raise CorruptShardError(f"{path}: not a readable Parquet file: {exc}") from None
    if table.num_rows != samples:
        raise CorruptShardError(f"{path}: {table.num_rows} rows, index.json says {samples}")
    return table


def fixed_images(column: pa.ChunkedArray, shape: Sequence[int]) -> np.ndarray:
    """[N,H,W,C] uint8 from a fixed_size_binary column."""
    array = column.combine_chunks()
    width = int(np.prod(shape))
    data = array.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8, count=len(array) * width, offset=array.offset * width)
    return flat.reshape((len(array), *(int(s) for s in shape)))


def read_parquet_shard(path: str | os.PathLike[str], samples: int, shape: Sequence[int],
                       labeled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(images [N,H,W,C] uint8, labels [N] int64 or None) of a fixed-shape raw Parquet shard."""
    columns = ["image", "label"] if labeled else ["image"]
    table = read_parquet_table(path, columns, samples)
    images = fixed_images(table.column("image"), shape)
    labels = table.column("label").to_numpy() if labeled else None
    return images, labels
