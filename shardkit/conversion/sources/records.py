"""What a source yields, and where the plan keeps it.

`InputRecord`: one input (where to read it, its name, label and fingerprint). `PlanFailure`:
an input rejected while listing. `RecordSpool`: the plan's list of inputs, spilled to disk
once it grows, so that planning a huge tree holds a bounded amount of memory.

A `RecordSpool` collects `InputRecord`s in listing order. Up to `CHUNK` of them stay in a
Python list; past that, every `CHUNK` records are written as one Arrow record batch to an
unnamed temporary file (created in `spill_dir`, e.g. beside OUT, and unlinked at once, so
nothing is left behind even after ``kill -9``), and read back through a memory map: the
records then cost page cache, not the process's memory. Reading one record back decodes only
that row. A seeded shuffle is a `Permuted` view (one int64 per input), not a reordered copy.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import pyarrow as pa

from shardkit.conversion.report import FailureRecord

__all__ = ["CHUNK", "InputRecord", "Permuted", "RecordSpool", "Selected", "plan_failure"]


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One input: where to read it, how to name it, its label, and what fingerprints it."""

    path: str
    source: str
    label: int | None
    size: int
    mtime_ns: int
    #: CSV inputs: the row number in the CSV, and the row's other columns (name, value).
    row: int | None = None
    meta: tuple[tuple[str, Any], ...] = ()


def plan_failure(source: str, reason: str, detail: str, row: int | None = None) -> FailureRecord:
    """An input rejected while listing, before any task ran (stage ``plan``)."""
    return FailureRecord(source=source, stage="plan", reason=reason, detail=detail, row=row)


#: Records kept in memory before the spool spills to disk, and rows per spilled batch.
CHUNK = 1 << 16

_SCHEMA = pa.schema([
    ("path", pa.string()), ("source", pa.string()), ("label", pa.int64()),
    ("size", pa.int64()), ("mtime_ns", pa.int64()), ("row", pa.int64()),
    ("meta", pa.string()),  # JSON [[name, value], ...]: typed CSV metadata, exact floats
])


class _Records(Sequence[InputRecord]):
    """A plan's input list: an index gives a record, a slice a list of them."""

    @overload
    def __getitem__(self, index: int) -> InputRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[InputRecord]: ...

    def __getitem__(self, index: int | slice) -> InputRecord | list[InputRecord]:
        return self._slice(index) if isinstance(index, slice) else self._item(index)

    def _item(self, index: int) -> InputRecord:
        raise NotImplementedError

    def _slice(self, index: slice) -> list[InputRecord]:
        raise NotImplementedError


class RecordSpool(_Records):
    """An append-only sequence of input records; see the module docstring. Fill it first,
    then read it: the first read of a spilled record seals it against more appends."""

    def __init__(self, spill_dir: str | os.PathLike[str] | None = None) -> None:
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)
        self._pending: list[InputRecord] = []
        self._batches: list[pa.RecordBatch] = []
        self._spilled = 0
        self._file: Any = None
        self._writer: Any = None
        self._map: mmap.mmap | None = None

    def append(self, record: InputRecord) -> None:
        if self._map is not None:
            raise RuntimeError("a sealed RecordSpool takes no more records")
        self._pending.append(record)
        if len(self._pending) >= CHUNK:
            self._spill()

    def __len__(self) -> int:
        return self._spilled + len(self._pending)

    def _slice(self, index: slice) -> list[InputRecord]:
        return [self._item(i) for i in range(*index.indices(len(self)))]

    def _item(self, index: int) -> InputRecord:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        if index >= self._spilled:
            return self._pending[index - self._spilled]
        self._seal()
        batch = self._batches[index // CHUNK]
        row = index % CHUNK
        return _record(*[batch.column(j)[row].as_py() for j in range(batch.num_columns)])

    def __iter__(self) -> Iterator[InputRecord]:
        if self._spilled:
            self._seal()
            for batch in self._batches:
                columns = [batch.column(j).to_pylist() for j in range(batch.num_columns)]
                for values in zip(*columns, strict=True):
                    yield _record(*values)
        yield from self._pending

    @property
    def spilled(self) -> int:
        """How many records live on disk (0 for a spool that never outgrew memory)."""
        return self._spilled

    def _spill(self) -> None:
        if self._writer is None:
            try:
                descriptor, name = tempfile.mkstemp(prefix=".shardkit-plan-", dir=self.spill_dir)
            except OSError:  # e.g. OUT's parent is not writable: the system's temporary folder
                descriptor, name = tempfile.mkstemp(prefix=".shardkit-plan-")
            os.unlink(name)  # the open descriptor keeps the data: nothing to clean up, ever
            self._file = os.fdopen(descriptor, "w+b")
            self._writer = pa.ipc.new_file(self._file, _SCHEMA)
        records, self._pending = self._pending, []
        self._writer.write_batch(pa.record_batch([
            pa.array([r.path for r in records], pa.string()),
            pa.array([r.source for r in records], pa.string()),
            pa.array([r.label for r in records], pa.int64()),
            pa.array([r.size for r in records], pa.int64()),
            pa.array([r.mtime_ns for r in records], pa.int64()),
            pa.array([r.row for r in records], pa.int64()),
            pa.array([json.dumps([list(kv) for kv in r.meta]) for r in records], pa.string()),
        ], schema=_SCHEMA))
        self._spilled += len(records)

    def _seal(self) -> None:
        """Finish the spill file and map it (once); the unspilled tail stays in memory."""
        if self._map is not None or self._writer is None:
            return
        self._writer.close()
        self._file.flush()
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        reader = pa.ipc.open_file(pa.py_buffer(self._map))
        self._batches = [reader.get_batch(k) for k in range(reader.num_record_batches)]

    def close(self) -> None:
        """Drop the records and the spill file (its space is freed at once). The spool is
        empty afterwards."""
        self._batches, self._pending, self._spilled = [], [], 0
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._writer = None


def _record(path: str, source: str, label: int | None, size: int, mtime_ns: int,
            number: int | None, meta: str) -> InputRecord:
    """The InputRecord of one spilled row (columns in `_SCHEMA` order)."""
    return InputRecord(path=path, source=source, label=label, size=size, mtime_ns=mtime_ns,
                       row=number, meta=tuple((k, v) for k, v in json.loads(meta)))


class Permuted(_Records):
    """`records` in the order `order` (a permutation of their indices), without copying them."""

    def __init__(self, records: Sequence[InputRecord], order: np.ndarray) -> None:
        if len(order) != len(records):
            raise ValueError(f"an order of {len(order)} for {len(records)} records")
        self.records, self.order = records, order

    def __len__(self) -> int:
        return len(self.records)

    def _slice(self, index: slice) -> list[InputRecord]:
        return [self.records[int(i)] for i in self.order[index]]

    def _item(self, index: int) -> InputRecord:
        return self.records[int(self.order[index])]


class Selected(Permuted):
    """The records at `indices` of `records` (a subset, in that order: a split's part), without
    copying them."""

    def __init__(self, records: Sequence[InputRecord], indices: np.ndarray) -> None:
        self.records, self.order = records, indices

    def __len__(self) -> int:
        return len(self.order)
