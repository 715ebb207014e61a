"""Tabular CSV → Parquet shards of typed columns: the source is `sources.csv` (a streamed CSV),
the writer is here, the commit is the one image conversions use (`commit.Commit`). Memory is
bounded by a row group, not the file.

Pass 1 (`shardkit.conversion.sources.csv.infer_columns`) fixes every column's type from the
whole file; pass 2 converts block by block and cuts the good rows into shards of exactly
``rows_per_shard`` rows (the last one shorter), so shard *k* always holds the same rows. Each
shard is written to the run's temporary folder, fsynced, published and journalled, exactly as
image shards are; ``errors.jsonl`` and ``index.json`` come last. Bad rows are reported with
their CSV row number. Column roles, order and statistics go into ``index.json``
(docs/format.md, "Tabular datasets").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardkit.config import ConvertConfig, CsvOptions
from shardkit.conversion.commit import Commit, Entry
from shardkit.conversion.report import ConvertSummary, FailureRecord
from shardkit.conversion.sources.csv import (
    BadRow,
    Column,
    CsvStream,
    infer_columns,
    kept_columns,
    typed_block,
)
from shardkit.errors import ConfigError, InputError, WorkerError
from shardkit.format.files import hash_file
from shardkit.format.manifest import Manifest, ShardRecord, fingerprint, shard_name

__all__ = ["TableLayout", "TablePlan", "TableWriter", "plan_table", "write_table"]

ROWS_PER_GROUP = 1 << 16
#: The column of a table shard holding each row's number in the CSV.
ROW_COLUMN = "row"


@dataclass(frozen=True, kw_only=True)
class TableLayout:
    """Which CSV columns become what: features (in CSV order), label(s), plain text."""

    features: list[Column]
    labels: list[Column]
    text: list[Column]
    keep_ints: bool

    @classmethod
    def of(cls, names: list[str], columns: dict[str, Column], options: CsvOptions,
           path: Path) -> TableLayout:
        chosen = kept_columns(names, options, path)
        if ROW_COLUMN in chosen or ROW_COLUMN in options.label_cols:
            raise InputError(f"{path}: a column named {ROW_COLUMN!r} would collide with the row "
                             f"numbers a table shard stores as {ROW_COLUMN!r}; rename it, or leave "
                             f"it out (--exclude {ROW_COLUMN})")
        labels = [columns[n] for n in options.label_cols]
        if len(labels) > 1 and any(c.kind == "string" for c in labels):
            raise ConfigError(f"{path}: several label columns must all be numeric (float32 "
                              "targets)")
        if len(labels) == 1 and labels[0].kind == "string" and labels[0].categories is None:
            raise InputError(f"{path}: label column {labels[0].name!r} has too many distinct values")
        features = [columns[n] for n in chosen
                    if columns[n].kind != "string" or columns[n].categories is not None]
        text = [columns[n] for n in chosen if columns[n] not in features]
        return cls(features=features, labels=labels, text=text, keep_ints=options.keep_ints)

    @property
    def classes(self) -> list[str] | None:
        if len(self.labels) == 1 and self.labels[0].categories is not None:
            return list(self.labels[0].categories)
        return None

    @property
    def label_dtype(self) -> str | None:
        if not self.labels:
            return None
        return "int64" if len(self.labels) == 1 and self.labels[0].kind != "float" else "float32"

    def arrow_type(self, column: Column) -> pa.DataType:
        if column in self.labels:
            return pa.int64() if self.label_dtype == "int64" else pa.float32()
        if column.kind == "string":
            return pa.dictionary(pa.int32(), pa.string()) if column.categories else pa.string()
        if column.kind == "int" and self.keep_ints:
            return pa.int64()
        return pa.float32()

    def types(self) -> dict[str, pa.DataType]:
        return {c.name: self.arrow_type(c) for c in self.stored()}

    def required(self) -> dict[str, str]:
        """Columns a row must have (else it is reported): the labels."""
        return {c.name: "missing_label" for c in self.labels}

    def stored(self) -> list[Column]:
        """Stored columns after ``row``: features, then labels, then plain text."""
        return [*self.features, *self.labels, *self.text]

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(ROW_COLUMN, pa.int64(), nullable=False),
                          *(pa.field(c.name, self.arrow_type(c)) for c in self.stored())])

    def row_bytes(self) -> int:
        return 8 + 4 * len(self.features) + 8 * max(1, len(self.labels))


@dataclass(frozen=True, kw_only=True)
class TablePlan:
    """What is known before reading a tabular CSV: its path, the resolved config (what decides
    the bytes) and the fingerprint of both."""

    path: Path
    config: ConvertConfig
    resolved: dict[str, Any]
    fingerprint: str
    #: A split's part: the CSV row numbers it keeps (sorted; None: every good row), and
    #: whether its error report lists the bad rows (the first part's does).
    rows: np.ndarray | None = None
    report_bad: bool = True


def plan_table(src: str | os.PathLike[str], config: ConvertConfig, *, subset: str | None = None,
               rows: np.ndarray | None = None, report_bad: bool = True) -> TablePlan:
    """The plan of converting the tabular CSV `src` (nothing is read but its size and mtime),
    or the part `subset` of a split, which keeps the CSV rows `rows`."""
    assert config.csv is not None and config.csv.image_col is None
    if config.shuffle:
        raise ConfigError("--shuffle applies to images; a tabular CSV keeps its row order "
                          "(ShardLoader(shuffle=True) shuffles when reading)")
    path = Path(src)
    try:
        st = path.stat()
    except OSError as exc:
        raise InputError(f"{path}: unreadable CSV: {exc}") from None
    # What decides a table's bytes: the CSV options and the shard size (image options, codec
    # and format do not apply: tables are always Parquet).
    resolved = {"format": "parquet", "kind": "table", "shard_bytes": config.shard_bytes,
                "samples_per_shard": config.samples_per_shard,
                "csv": ConvertConfig(csv=config.csv).to_json()["csv"]}
    if config.split is not None:
        resolved.update(split=ConvertConfig(split=config.split).to_json()["split"], subset=subset)
    return TablePlan(path=path, config=config, resolved=resolved, rows=rows, report_bad=report_bad,
                     fingerprint=fingerprint(resolved, None, [(path.name, st.st_size, st.st_mtime_ns)]))


def good_rows(plan: TablePlan) -> tuple[np.ndarray, np.ndarray | None]:
    """The CSV row numbers of the rows a conversion would keep, and their class labels (None
    unless one label column of classes): what a split is drawn from. Reads the CSV twice."""
    options = plan.config.csv
    assert options is not None
    stream = CsvStream(plan.path, options)
    layout = TableLayout.of(stream.names, infer_columns(stream), options, plan.path)
    rows: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    labels: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for table, numbers in stream.blocks():
        block = typed_block(table, numbers, layout.stored(), layout.types(), layout.required())
        rows.append(np.asarray(block.rows, dtype=np.int64))
        if layout.classes is not None:
            labels.append(block.columns[layout.labels[0].name].to_numpy(zero_copy_only=False))
    return np.concatenate(rows), np.concatenate(labels) if layout.classes is not None else None


def write_table(plan: TablePlan, commit: Commit, started: float) -> ConvertSummary:
    """Pass 1 fixes every column's type; pass 2 streams the rows into shards published through
    `commit` (see the module docstring). The error budget is checked by the caller."""
    options = plan.config.csv
    assert options is not None
    stream = CsvStream(plan.path, options)
    layout = TableLayout.of(stream.names, infer_columns(stream), options, plan.path)
    config = plan.config
    rows_per_shard = config.samples_per_shard or max(1, (config.shard_bytes or 0) // layout.row_bytes())
    writer = TableWriter(commit, layout, rows_per_shard, keep=plan.rows)
    bad = writer.run(stream)
    if not writer.rows and not bad:  # as an image CSV or folder holding nothing: refused
        raise InputError(f"{plan.path}: no rows (the CSV holds only its header)")
    if not plan.report_bad:
        bad = []  # a split's bad rows are reported once, by its first part
    failures = [FailureRecord(source=plan.path.name, stage="parse", reason=b.reason, detail=b.detail,
                              row=b.row) for b in sorted(bad, key=lambda b: b.row)]
    manifest = Manifest(
        kind="table", schema=writer.schema_json(), classes=layout.classes,
        class_counts=writer.class_counts(), shards=writer.records,
        inputs=writer.rows + len(failures), failed=len(failures),
        config={**plan.resolved, "rows_per_shard": rows_per_shard}, fingerprint=plan.fingerprint,
    )
    return commit.complete(manifest, failures, summary={
        "seconds": time.perf_counter() - started, "workers": 1, "reused_shards": writer.reused,
        "unit": "rows"})


class TableWriter:
    """Writes good rows into shards of `rows_per_shard` rows, row group by row group (so
    memory holds one row group, whatever the shard size), publishes and journals each shard,
    and keeps per-column statistics of what was stored. On resume, a shard whose journal
    entry matches is passed over (its rows still count in the statistics), not rewritten."""

    def __init__(self, commit: Commit, layout: TableLayout, rows_per_shard: int, *,
                 keep: np.ndarray | None = None) -> None:
        self.commit, self.tmp, self.layout = commit, commit.tmp, layout
        self.keep = keep  # a split's part: the CSV row numbers it holds
        self.rows_per_shard = rows_per_shard
        self.arrow = layout.schema()
        self.types = layout.types()
        self.required = layout.required()
        self.stats = {c.name: _Stats() for c in layout.stored()}
        self.records: list[ShardRecord] = []
        self.pending: list[pa.Table] = []
        self.buffered = 0  # rows in `pending`
        self.in_shard = 0  # rows already in the open shard
        self.rows = 0
        self.reused = 0
        self.counts = [0] * len(layout.classes or ())
        self.finished: dict[int, Entry] = {}
        self.writer: pq.ParquetWriter | None = None
        self.open = False  # a shard is open (being written, or passed over on resume)

    def run(self, stream: CsvStream) -> list[BadRow]:
        self.finished = self.commit.finished(_name)
        bad: list[BadRow] = []
        for table, rows in stream.blocks():
            block = typed_block(table, rows, self.layout.stored(), self.types, self.required)
            bad += block.bad
            if len(block.rows):
                arrays = [pa.array(block.rows, pa.int64()),
                          *(block.columns[c.name] for c in self.layout.stored())]
                good = pa.Table.from_arrays(arrays, schema=self.arrow)
                if self.keep is not None:
                    good = good.filter(pa.array(np.isin(np.asarray(block.rows), self.keep)))
                self._add(good)
        if self.buffered:
            self._write_group()
        if self.open or not self.records:  # the last, shorter shard; or one empty shard
            self._open_shard()
            self._close_shard()
        return bad + stream.malformed

    def _add(self, table: pa.Table) -> None:
        while table.num_rows:
            target = min(ROWS_PER_GROUP, self.rows_per_shard - self.in_shard)  # next group's rows
            take = min(target - self.buffered, table.num_rows)
            self.pending.append(table.slice(0, take))
            self.buffered += take
            table = table.slice(take)
            if self.buffered == target:
                self._write_group()

    def _write_group(self) -> None:
        group = pa.concat_tables(self.pending).combine_chunks()
        self.pending, self.buffered = [], 0
        self._tally(group)
        self._open_shard()
        if self.writer is not None:
            self.writer.write_table(group, row_group_size=ROWS_PER_GROUP)
        self.in_shard += group.num_rows
        if self.in_shard == self.rows_per_shard:
            self._close_shard()

    def _open_shard(self) -> None:
        if self.open:
            return
        self.open, self.in_shard = True, 0
        if len(self.records) in self.finished:
            return  # finished by the interrupted run: pass over its rows
        self.writer = pq.ParquetWriter(
            self.tmp / _name(len(self.records)), self.arrow,
            compression="zstd", write_statistics=True, version="2.6",
            use_dictionary=[c.name for c in self.layout.stored() if c.kind == "string"],
        )

    def _close_shard(self) -> None:
        number = len(self.records)
        name = _name(number)
        self.open = False
        if self.writer is None:
            record = self.finished[number].record
            if record.samples != self.in_shard:
                raise WorkerError(f"{name}: the interrupted run wrote {record.samples} rows, "
                                  f"this run has {self.in_shard}; convert with --overwrite")
            self.records.append(record)
            self.reused += 1
            self.in_shard = 0
            return
        self.writer.close()
        self.writer = None
        scratch = self.tmp / name
        with open(scratch, "rb+") as handle:
            os.fsync(handle.fileno())
        size, digest = hash_file(scratch)
        record = ShardRecord(file=name, samples=self.in_shard, bytes=size, sha256=digest)
        self.commit.publish(scratch, Entry(shard=number, record=record, failures=(), label_counts=()))
        self.records.append(record)
        self.in_shard = 0

    def _tally(self, shard: pa.Table) -> None:
        self.rows += shard.num_rows
        for name, stats in self.stats.items():
            stats.add(shard.column(name))
        if self.counts:
            label = shard.column(self.layout.labels[0].name).to_numpy()
            self.counts = (np.asarray(self.counts) + np.bincount(label, minlength=len(self.counts))).tolist()

    def class_counts(self) -> list[int] | None:
        return [int(c) for c in self.counts] if self.layout.classes is not None else None

    def schema_json(self) -> dict[str, Any]:
        layout = self.layout
        schema: dict[str, Any] = {
            "row": {"dtype": "int64", "shape": []},
            "features": {"dtype": "float32", "shape": [len(layout.features)],
                         "names": [c.name for c in layout.features]},
            "columns": [self._column_json(c) for c in layout.stored()],
            "parquet": {"rows_per_group": ROWS_PER_GROUP},
        }
        if layout.labels:
            many = len(layout.labels) > 1
            schema["label"] = {"dtype": layout.label_dtype, "shape": [len(layout.labels)] if many else [],
                               "names": [c.name for c in layout.labels]}
        return schema

    def _column_json(self, column: Column) -> dict[str, Any]:
        layout = self.layout
        role = "feature" if column in layout.features else "label" if column in layout.labels else "text"
        kind = self.types[column.name]
        dtype = "dictionary" if pa.types.is_dictionary(kind) else {"float": "float32"}.get(
            str(kind), str(kind))
        out: dict[str, Any] = {"name": column.name, "role": role, "dtype": dtype,
                               "csv_kind": column.kind, **self.stats[column.name].to_json()}
        if column.categories is not None and role != "label":
            out["categories"] = list(column.categories)
        return out


def _name(number: int) -> str:
    """Table shards are named as they are cut (their count is not known up front): five
    digits and more."""
    return shard_name(number, "parquet", 1)


class _Stats:
    """min/mean/max (numbers and category codes) and null count of a stored column. The
    figures are over the finite values (index.json stays strict JSON); infinities are counted."""

    def __init__(self) -> None:
        self.count, self.nulls, self.infinite, self.total = 0, 0, 0, 0.0
        self.low: float | None = None
        self.high: float | None = None

    def add(self, column: pa.ChunkedArray) -> None:
        self.nulls += column.null_count
        if pa.types.is_string(column.type):
            return
        if pa.types.is_dictionary(column.type):
            column = pa.chunked_array([c.indices for c in column.chunks], pa.int32())
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        values = values[~np.isnan(values)]
        finite = np.isfinite(values)
        self.infinite += int(len(values) - finite.sum())
        values = values[finite]
        if not len(values):
            return
        self.count += len(values)
        self.total += float(values.sum())
        low, high = float(values.min()), float(values.max())
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)

    def to_json(self) -> dict[str, Any]:
        mean = self.total / self.count if self.count else None
        figures = {"nulls": self.nulls, "min": self.low, "mean": mean, "max": self.high}
        return {**figures, "infinite": self.infinite} if self.infinite else figures

