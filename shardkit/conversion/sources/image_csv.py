"""Image CSVs (Kaggle-style ``train.csv``): one row per image, a path column, a label column
and any other columns, which travel with each sample as typed metadata.

* Paths are relative to `root` (default: the CSV's folder) or absolute; ``source`` keeps the
  path as written in the CSV. Order is CSV order.
* Labels: a string column gives classes = its sorted distinct values, labels their indices;
  an integer column gives labels as written (classes ``"0"`` .. ``"max"``); a column of
  fractions (Keras' ``class_mode="raw"``), or several numeric columns, give float32 targets,
  stored as the metadata field ``target`` (no classes); no label column gives an unlabelled
  dataset.
* Other columns become metadata typed as the CSV source infers them (int64, float64, string):
  every one, or those ``--columns`` names, less those ``--exclude`` names.
* A bad row (see `shardkit.conversion.sources.csv`), an empty path or a negative integer label is a
  listing failure carrying its row number; a missing or undecodable image is reported by the
  conversion task with the row number too. Nothing is dropped silently.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from shardkit.config import CsvOptions
from shardkit.conversion.report import FailureRecord
from shardkit.conversion.sources.csv import Column, CsvStream, infer_columns, kept_columns, typed_block
from shardkit.conversion.sources.imagefolder import Listing
from shardkit.conversion.sources.records import InputRecord, RecordSpool, plan_failure
from shardkit.errors import ConfigError, InputError

__all__ = ["RESERVED_COLUMNS", "LocalPaths", "Paths", "list_image_csv"]

#: Column names the output itself uses; a CSV metadata column may not take them.
RESERVED_COLUMNS = frozenset({"key", "image", "label", "source", "orig_width", "orig_height",
                              "width", "height", "class", "parquet", "index", "features",
                              "target"})
_META_TYPES = {"int": ("int64", pa.int64()), "float": ("float64", pa.float64()),
               "string": ("string", pa.string())}


def list_image_csv(src: str | os.PathLike[str], options: CsvOptions, *,
                   spill_dir: str | os.PathLike[str] | None = None, paths: Paths | None = None) -> Listing:
    """The rows of an image CSV as input records (see the module docstring). `paths` says
    where a row's path points (default: local files under `root`; a row whose path it
    cannot place is a listing failure, ``outside_root``)."""
    path = Path(src)
    assert options.image_col is not None  # the caller selects image CSVs by it
    stream = CsvStream(path, options)
    kept = kept_columns(stream.names, options, path)
    columns = infer_columns(stream)
    meta = [columns[n] for n in kept]
    # one column of fractions is a float target too (Keras' class_mode="raw"), as several are
    fractions = len(options.label_cols) == 1 and columns[options.label_cols[0]].kind == "float"
    if fractions:  # said, since a classification CSV with a stray "2.5" lands here too
        warnings.warn(f"{path}: label column {options.label_cols[0]!r} holds fractions: its "
                      "values are float32 targets (label float32 [B, 1], no classes); write "
                      "class labels as integers or text", UserWarning, stacklevel=2)
    targets = list(options.label_cols) if len(options.label_cols) > 1 or fractions else []
    label = options.label_cols[0] if options.label_cols and not targets else None
    clash = sorted(c.name for c in meta if c.name in RESERVED_COLUMNS)
    if clash:
        unnamed = "label" in clash and not options.label_cols
        hint = " (the labels? name it: --label-col label)" if unnamed else ""
        raise InputError(f"{path}: column(s) {', '.join(clash)} would collide with the output's "
                         f"own fields; rename them, or leave them out (--exclude){hint}")
    wanted, types, required, classes = _typed_columns(options, columns, meta, label, targets, path)
    if paths is None:
        if options.root is not None and not Path(options.root).is_dir():
            raise InputError(f"{path}: --root {options.root} is not a folder (the rows' paths "
                             "are read below it)")
        paths = LocalPaths(Path(options.root) if options.root is not None else path.parent)
    meta_types = tuple((c.name, _META_TYPES[c.kind][0]) for c in meta)
    listing = Listing(records=RecordSpool(spill_dir), classes=classes,
                      meta_types=meta_types + ((("target", "float32_list"),) if targets else ()))
    failures: list[tuple[int, FailureRecord]] = []
    for table, rows in stream.blocks():
        block = typed_block(table, rows, wanted, types, required)
        failures += [(b.row, plan_failure(path.name, b.reason, b.detail, b.row)) for b in block.bad]
        values = {name: array.to_pylist() for name, array in block.columns.items()}
        for i, row in enumerate(block.rows.tolist()):
            infinite = next((n for n in targets if values[n][i] is not None
                             and not np.isfinite(values[n][i])), None)
            if infinite is not None:  # a number, but no target to train on (nor JSON's)
                failures.append((row, plan_failure(path.name, "bad_label", f"column {infinite!r}: "
                                                   f"{values[infinite][i]} is not a finite target", row)))
                continue
            record = _record(paths, values, i, row, options.image_col, label, meta, targets)
            if record is None:
                written = values[options.image_col][i]
                failures.append((row, plan_failure(path.name, "outside_root", f"{written!r} is not "
                                                   f"under the images' root {paths.base}", row)))
            else:
                listing.records.append(record)
    failures += [(b.row, plan_failure(path.name, b.reason, b.detail, b.row)) for b in stream.malformed]
    if label is not None and classes is None:
        listing.classes = _integer_classes(listing, failures, path)
    listing.failures = [f for _, f in sorted(failures, key=lambda item: item[0])]
    st = path.stat()
    listing.extra_inputs = ((path.name, st.st_size, st.st_mtime_ns),)
    if not listing.records and not listing.failures:
        raise InputError(f"{path}: no rows")
    return listing


def _typed_columns(options: CsvOptions, columns: dict[str, Column], meta: list[Column],
                   label: str | None, targets: list[str],
                   path: Path) -> tuple[list[Column], dict[str, Any], dict[str, str], list[str] | None]:
    """The columns a block is typed by (image path, metadata, the label or the float
    targets), their Arrow types, the reasons of rows missing a required one, and a string
    label's classes."""
    assert options.image_col is not None
    wanted = [Column(options.image_col, "string"), *meta]
    types: dict[str, Any] = {options.image_col: pa.string(),
                             **{c.name: _META_TYPES[c.kind][1] for c in meta}}
    required = {options.image_col: "missing_path"}
    classes = None
    if label is not None:
        classes = _string_classes(columns[label], path)
        wanted.append(Column(label, columns[label].kind, columns[label].categories))
        types[label] = pa.int64()
        required[label] = "missing_label"
    for name in targets:
        if columns[name].kind == "string":
            raise ConfigError(f"{path}: label column {name!r} holds text; several label columns "
                              "must all be numeric (float32 targets)")
        wanted.append(Column(name, "float"))
        types[name] = pa.float32()
        required[name] = "missing_label"
    return wanted, types, required, classes


def _string_classes(column: Column, path: Path) -> list[str] | None:
    if column.kind == "int":
        return None  # decided after reading, from the largest label
    if column.categories is None:
        raise InputError(f"{path}: label column {column.name!r} has too many distinct values")
    return list(column.categories)


def _integer_classes(listing: Listing, failures: list[tuple[int, FailureRecord]],
                     path: Path) -> list[str]:
    """Integer labels: drop rows with negative labels (reported); classes "0".."max"."""
    kept = RecordSpool(listing.records.spill_dir)
    top = -1
    for record in listing.records:
        if record.label is not None and record.label < 0:
            failures.append((record.row or 0, plan_failure(
                path.name, "bad_label", f"label {record.label} is negative", record.row)))
        else:
            kept.append(record)
            top = max(top, record.label if record.label is not None else -1)
    listing.records.close()
    listing.records = kept
    if top >= 1 << 20:
        raise InputError(f"{path}: integer label {top} is too large to be a class index")
    return [str(i) for i in range(top + 1)]


class Paths(Protocol):
    """Where an image CSV's paths point: `locate` a path as written (None: nowhere it may
    read), `stat` the located file as (size, mtime or version; -1 when it is missing)."""

    @property
    def base(self) -> str: ...

    def locate(self, written: str) -> str | None: ...

    def stat(self, target: str) -> tuple[int, int]: ...


class LocalPaths:
    """Local files: a relative path starts from `root`, an absolute one stands."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = str(root.absolute())

    def locate(self, written: str) -> str:
        # Strings, not Path objects: pathlib interns every path component it parses, which
        # would keep every file name of a huge CSV in memory for the life of the process.
        return written if os.path.isabs(written) else os.path.join(self.root, written)

    def stat(self, target: str) -> tuple[int, int]:
        try:
            st = os.stat(target)
        except OSError:  # missing or unreadable: the conversion task reports it
            return -1, 0
        return st.st_size, st.st_mtime_ns


def _record(paths: Paths, values: dict[str, list[Any]], i: int, row: int, image_col: str,
            label: str | None, meta: list[Column], targets: list[str]) -> InputRecord | None:
    written = str(values[image_col][i])
    target = paths.locate(written)
    if target is None:
        return None
    size, mtime = paths.stat(target)
    return InputRecord(
        path=target, source=written,
        label=int(values[label][i]) if label is not None else None, size=size, mtime_ns=mtime,
        row=row, meta=tuple((c.name, _plain(values[c.name][i])) for c in meta)
        + ((("target", [values[n][i] for n in targets]),) if targets else ()),
    )


def _plain(value: Any) -> Any:
    """JSON-safe metadata: NaN (an empty numeric field) and ±inf (JSON has no infinity)
    become None, in tar and Parquet shards alike."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
