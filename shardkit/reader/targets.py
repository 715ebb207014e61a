"""Float targets of image CSVs with several label columns (``--label-col a,b``).

They are stored with each sample as the metadata field ``target`` (a list of float32, one per
label column, in ``config.csv.label_cols`` order): a key of the tar ``.json`` member, or a
``list<float32>`` Parquet column. Batches carry them as ``label`` float32 [B, K]. Each shard's
targets are read once into a [N, K] array (kept for the few most recent shards).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from shardkit.errors import CorruptShardError
from shardkit.manifest import Manifest
from shardkit.reader.parquet import read_parquet_table
from shardkit.reader.tar import iter_members

__all__ = ["TARGET_FIELD", "TargetCache", "has_targets"]

TARGET_FIELD = "target"


def has_targets(manifest: Manifest) -> bool:
    return manifest.kind == "images" and TARGET_FIELD in manifest.schema


class TargetCache:
    """Per-shard [N, K] float32 target arrays of one dataset, gathered into batches."""

    def __init__(self, folder: str, manifest: Manifest, *, capacity: int = 4) -> None:
        self.folder, self.manifest, self.capacity = folder, manifest, max(1, capacity)
        self.width = len(manifest.config["csv"]["label_cols"])
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def load(self, number: int) -> np.ndarray:
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        record = self.manifest.shards[number]
        path = os.path.join(self.folder, record.file)
        values: Any
        if self.manifest.config["format"] == "parquet":
            column = read_parquet_table(path, [TARGET_FIELD], record.samples).column(TARGET_FIELD)
            values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        else:
            values = [json.loads(data)[TARGET_FIELD] for _key, field, data in iter_members(path)
                      if field == "json"]
        array = np.asarray(values, dtype=np.float32)
        if array.size != record.samples * self.width:
            raise CorruptShardError(f"{path}: {array.size} target values, expected "
                                    f"{record.samples} samples × {self.width}")
        self._open[number] = array.reshape(record.samples, self.width)
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return self._open[number]

    def gather(self, starts: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Targets [B, K] of the samples `index` (sorted)."""
        out = np.empty((len(index), self.width), dtype=np.float32)
        shard_of = np.searchsorted(starts, index, side="right") - 1
        for number in np.unique(shard_of).tolist():
            where = shard_of == number
            out[where] = self.load(number)[index[where] - starts[number]]
        return out
