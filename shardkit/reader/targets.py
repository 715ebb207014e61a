"""Float targets of image CSVs with several label columns (``--label-col a,b``), or with one
column of fractions (``--label-col age``).

They are stored with each sample as the metadata field ``target`` (a list of float32, one per
label column, in ``config.csv.label_cols`` order): a key of the tar ``.json`` member, or a
``list<float32>`` Parquet column. Batches carry them as ``label`` float32 [B, K]. Each shard's
targets are read into a [N, K] array when the shard is opened, and kept with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shardkit.errors import CorruptShardError
from shardkit.format.manifest import Manifest, ShardRecord
from shardkit.format.samples import TARGET_FIELD
from shardkit.format.tar import member_meta
from shardkit.format.tar_members import iter_members
from shardkit.reader.parquet import read_parquet_table

__all__ = ["read_targets"]



def read_targets(path: str, record: ShardRecord, manifest: Manifest) -> np.ndarray:
    """The [N, K] float32 targets of one shard. Raises CorruptShardError naming the file."""
    width = len(manifest.config["csv"]["label_cols"])
    values: Any
    if manifest.config["format"] == "parquet":
        column = read_parquet_table(path, [TARGET_FIELD], record.samples).column(TARGET_FIELD)
        values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    else:
        values = [member_meta(path, key, data).get(TARGET_FIELD)
                  for key, field, data in iter_members(path) if field == "json"]
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):  # a .json member's target is missing or not numbers
        raise CorruptShardError(f"{path}: targets are not lists of {width} numbers") from None
    if array.size != record.samples * width:
        raise CorruptShardError(f"{path}: {array.size} target values, expected "
                                f"{record.samples} samples × {width}")
    return array.reshape(record.samples, width)
