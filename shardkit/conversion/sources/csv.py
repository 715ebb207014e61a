"""CSV sources: stream a CSV as blocks of typed columns, with every row numbered.

A CSV is read twice, both times streamed by pyarrow's CSV reader (memory bounded by the block
size, not the file): pass 1 (`infer_columns`) decides each column's type from the whole
file, so a value's type never depends on the block it lands in; pass 2 (`CsvStream`) yields
blocks converted to those types. Rules (docs/format.md, "CSV inputs"):

* Every field is first read as text. Empty fields and the usual NA spellings (``NA``,
  ``NaN``, ``null``, ``#N/A``, ...) are nulls.
* A column is numeric when more than half of its non-null values are decimal numbers
  (``-1``, ``2.5``, ``.5``, ``1e-3``, ``inf``; surrounding spaces ignored), integer when all
  those numbers are integers; otherwise it is a string column, whose categories are its
  sorted distinct values. A column without a single value (every field empty) is an
  integer column of nulls, so an empty label column gives ``missing_label`` rows, as one
  empty label field does, not a type error.
* A row is *bad* when its field count differs from the header's (``wrong_field_count``),
  when a numeric column holds text (``not_a_number``), when an integer stored as int64 (an
  integer label, image CSV metadata, ``--keep-ints``) lies outside int64's range
  (``out_of_range``: the row is left out rather than the column retyped, so a column's type
  never depends on one value), when its label is empty (``missing_label``) or when every
  field is empty (``empty_row``). Bad rows are reported with their row number and skipped;
  nothing is dropped silently.
* Row numbers count records from 1, the header included: the first data row is row 2, as in
  a spreadsheet. A quoted field holding newlines does not add rows, in the header either.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from shardkit.config import ConvertConfig, CsvOptions
from shardkit.errors import ConfigError, InputError

__all__ = [
    "MAX_CATEGORIES",
    "BadRow",
    "Column",
    "CsvStream",
    "TypedBlock",
    "infer_columns",
    "is_csv",
    "read_header",
    "source_config",
    "typed_block",
]

#: Numbers as pandas reads them: decimal or exponent notation, and inf / infinity (any case);
#: NaN spellings are null values already. Matched after trimming surrounding whitespace.
NUMBER_RE = r"(?i)^[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity)$"
INT_RE = r"^[-+]?\d+$"
#: What an int64 column holds; an integer outside is an ``out_of_range`` row.
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
#: String columns with more distinct values are kept as plain text, not categories.
MAX_CATEGORIES = 1 << 16
BLOCK_BYTES = 1 << 20


def is_csv(src: str | os.PathLike[str]) -> bool:
    """True when SRC names a CSV file (by its extension, any case)."""
    return Path(src).suffix.lower() == ".csv" and not Path(src).is_dir()


@dataclass(frozen=True, slots=True)
class Column:
    """One CSV column: its name, kind (``int``, ``float`` or ``string``) and, for a string
    column with at most MAX_CATEGORIES distinct values, the sorted values."""

    name: str
    kind: str
    categories: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row left out of the output, and why."""

    row: int
    reason: str
    detail: str


@dataclass(slots=True)
class TypedBlock:
    """Good rows of one block: typed columns (name → array) and their row numbers."""

    columns: dict[str, pa.Array]
    rows: np.ndarray
    bad: list[BadRow] = field(default_factory=list)


def read_header(path: Path, options: CsvOptions) -> tuple[list[str], bool]:
    """(column names, whether the first record is a header). Raises InputError."""
    try:
        with open(path, encoding=options.encoding, newline="") as handle:
            first = next(csv.reader(handle, delimiter=options.delimiter), None)
    except FileNotFoundError:
        raise InputError(f"{path}: CSV file does not exist") from None
    except (OSError, UnicodeDecodeError, LookupError, csv.Error) as exc:
        raise InputError(f"{path}: unreadable CSV: {exc}") from None
    if not first:
        raise InputError(f"{path}: empty CSV (no header and no rows)")
    first[0] = first[0].lstrip("\ufeff")  # a UTF-8 byte order mark
    header = {"yes": True, "no": False}.get(options.header)
    if header is None:
        header = not all(pc.match_substring_regex(pa.array(first), NUMBER_RE).to_pylist())
    names = [n.strip() for n in first] if header else [f"c{i}" for i in range(len(first))]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated or "" in names:
        raise InputError(f"{path}: the header has empty or repeated column names {duplicated}")
    return names, header


class CsvStream:
    """The records of a CSV as blocks of text columns, each row with its number."""

    def __init__(self, path: Path, options: CsvOptions) -> None:
        self.path = path
        self.options = options
        self.names, self.header = read_header(path, options)
        self._taken: list[int] = []  # numbers of malformed rows not yet passed
        self.malformed: list[BadRow] = []

    def _on_invalid(self, row: Any) -> str:
        number = int(row.number)
        self._taken.append(number)
        self.malformed.append(BadRow(number, "wrong_field_count",
                                     f"{row.actual_columns} fields, expected "
                                     f"{row.expected_columns}: {str(row.text)[:200]!r}"))
        return "skip"

    def blocks(self) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """(text table, row numbers) per block; malformed rows go to `malformed`."""
        self._taken, self.malformed = [], []
        # The header is skipped as one parsed record, not one line: a quoted header field
        # may hold newlines (and pyarrow still counts it in the row numbers it reports).
        read = pacsv.ReadOptions(use_threads=False, block_size=BLOCK_BYTES,
                                 column_names=self.names,
                                 skip_rows_after_names=1 if self.header else 0,
                                 encoding=self.options.encoding)
        parse = pacsv.ParseOptions(delimiter=self.options.delimiter, newlines_in_values=True,
                                   ignore_empty_lines=False, invalid_row_handler=self._on_invalid)
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in self.names},
                                       strings_can_be_null=True)
        try:
            reader = pacsv.open_csv(self.path, read_options=read, parse_options=parse,
                                    convert_options=convert)
            following = 2 if self.header else 1
            for batch in reader:
                table = pa.Table.from_batches([batch])
                rows = self._number(following, table.num_rows)
                if len(rows):
                    following = int(rows[-1]) + 1
                yield table, rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{self.path}: unreadable CSV: {exc}") from None

    def _number(self, following: int, count: int) -> np.ndarray:
        """Numbers of `count` good rows from `following` on, skipping malformed rows (all of
        a block's malformed rows are known once the block has been parsed)."""
        taken = np.asarray(sorted(t for t in self._taken if t >= following), dtype=np.int64)
        candidates = np.arange(following, following + count + len(taken), dtype=np.int64)
        rows = candidates[~np.isin(candidates, taken)][:count]
        self._taken = [t for t in self._taken if t > (rows[-1] if count else following)]
        return rows


def infer_columns(stream: CsvStream) -> dict[str, Column]:
    """Pass 1: every column's kind and categories, decided from the whole file."""
    counts = {n: [0, 0, 0] for n in stream.names}  # non-null, numbers, integers
    values: dict[str, set[str] | None] = {n: set() for n in stream.names}
    for table, _rows in stream.blocks():
        for name in stream.names:
            text = table.column(name)
            trimmed = _trimmed(text)  # fields of spaces count as empty when deciding numbers
            tally = counts[name]
            tally[0] += len(trimmed) - trimmed.null_count
            tally[1] += pc.sum(pc.match_substring_regex(trimmed, NUMBER_RE)).as_py() or 0
            tally[2] += pc.sum(pc.match_substring_regex(trimmed, INT_RE)).as_py() or 0
            seen = values[name]
            if seen is not None:
                seen.update(v for v in pc.unique(text).to_pylist() if v is not None)
                if len(seen) > MAX_CATEGORIES:
                    values[name] = None
    columns = {}
    for name in stream.names:
        present, numbers, ints = counts[name]
        if 2 * numbers > present or present == 0:
            kind = "int" if ints == numbers else "float"  # no value at all: int (of nulls)
            columns[name] = Column(name, kind)
        else:
            seen = values[name]
            columns[name] = Column(name, "string", tuple(sorted(seen)) if seen is not None else None)
    return columns


def typed_block(table: pa.Table, rows: np.ndarray, columns: list[Column],
                arrow_types: dict[str, pa.DataType], required: dict[str, str]) -> TypedBlock:
    """Convert one text block: each column of `columns` to ``arrow_types[name]`` (numbers,
    dictionary codes or text); rows with text in a numeric column, an integer outside int64
    where the column is stored as integers, no field at all, or an empty `required` column
    (name → reason) become BadRows."""
    bad = np.zeros(table.num_rows, dtype=bool)
    reasons: dict[int, BadRow] = {}
    empty = np.ones(table.num_rows, dtype=bool)
    for column in table.columns:
        empty &= column.is_null().to_numpy(zero_copy_only=False)
    _mark(reasons, bad, empty, rows, "empty_row", lambda i: "every field is empty")
    out: dict[str, pa.Array] = {}
    for column in columns:
        text = table.column(column.name).combine_chunks()
        numeric = column.kind in ("int", "float")
        if numeric:
            text = _trimmed(text)  # before the checks: a field of spaces is an empty number
        nulls = text.is_null().to_numpy(zero_copy_only=False)
        if column.name in required:
            _mark(reasons, bad, nulls, rows, required[column.name],
                  lambda i, c=column.name: f"column {c!r} is empty")
        if numeric:
            ok = pc.fill_null(pc.match_substring_regex(text, NUMBER_RE), True)
            wrong = ~ok.to_numpy(zero_copy_only=False)
            _mark(reasons, bad, wrong, rows, "not_a_number",
                  lambda i, c=column.name, t=text: f"column {c!r}: {t[i].as_py()!r} is not a number")
            clean = pc.if_else(ok, text, pa.scalar(None, pa.string()))
            target = arrow_types[column.name]
            if pa.types.is_floating(target) or column.kind == "float":
                number = pc.cast(clean, pa.float64())
            else:
                number = _int64(clean, column.name, rows, reasons, bad)
            out[column.name] = pc.cast(number, target)
        else:
            out[column.name] = _categorical(text, column, arrow_types[column.name])
    keep = pa.array(~bad)
    good = {name: pc.filter(array, keep) for name, array in out.items()}
    return TypedBlock(columns=good, rows=rows[~bad], bad=[reasons[i] for i in sorted(reasons)])


def _int64(text: pa.Array, name: str, rows: np.ndarray, reasons: dict[int, BadRow],
           bad: np.ndarray) -> pa.Array:
    """Integer text as int64; a row whose value lies outside int64's range is marked bad
    (``out_of_range``) and its value is null."""
    try:
        return pc.cast(text, pa.int64())
    except pa.ArrowInvalid:  # some value does not fit: find which (rare; a Python loop)
        pass
    values = text.to_pylist()
    fits = np.array([v is None or _INT64_MIN <= int(v) <= _INT64_MAX for v in values], dtype=bool)
    _mark(reasons, bad, ~fits, rows, "out_of_range",
          lambda i: f"column {name!r}: {values[i]} does not fit a 64-bit integer "
                    f"({_INT64_MIN} to {_INT64_MAX})")
    return pc.cast(pc.if_else(pa.array(fits), text, pa.scalar(None, pa.string())), pa.int64())


def _trimmed(text: Any) -> Any:
    """Text of a would-be numeric column without surrounding whitespace, as pandas parses
    ``" 3"`` and ``"4 "`` as numbers; a field of only spaces becomes null (empty)."""
    trimmed = pc.utf8_trim_whitespace(text)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


def _categorical(text: pa.Array, column: Column, target: pa.DataType) -> pa.Array:
    if column.categories is None or pa.types.is_string(target):
        return text
    dictionary = pa.array(column.categories, pa.string())
    codes = pc.index_in(text, value_set=dictionary)
    if pa.types.is_dictionary(target):
        return pa.DictionaryArray.from_arrays(pc.cast(codes, target.index_type), dictionary)
    return pc.cast(codes, target)


def _mark(reasons: dict[int, BadRow], bad: np.ndarray, mask: np.ndarray, rows: np.ndarray,
          reason: str, detail: Any) -> None:
    """Record the first reason of each newly bad row (few rows: a Python loop is fine)."""
    for i in np.flatnonzero(mask & ~bad).tolist():
        reasons[i] = BadRow(int(rows[i]), reason, detail(i))
    bad |= mask


def kept_columns(names: list[str], options: CsvOptions, path: Path) -> list[str]:
    """The columns of a CSV (`names`, in CSV order) that travel with its rows beside the image
    and label columns: every other one, or those `--columns` names, less those `--exclude`
    names (a tabular CSV's features, an image CSV's metadata). ConfigError for a name the
    CSV does not have."""
    named = [*options.label_cols, *([options.image_col] if options.image_col else [])]
    check_columns(names, [*named, *options.columns, *options.exclude], path)
    return [n for n in names if n not in named and n not in options.exclude
            and (not options.columns or n in options.columns)]


def check_columns(names: list[str], wanted: list[str], path: Path) -> None:
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ConfigError(f"{path}: no such column {', '.join(map(repr, missing))}; the CSV "
                          f"has {', '.join(names)}")


def source_config(src: str | os.PathLike[str], config: ConvertConfig) -> ConvertConfig:
    """`config` with CSV options when SRC is a CSV file (defaults: a tabular CSV); CSV
    options for a folder are a ConfigError."""
    if is_csv(src):
        return config if config.csv is not None else dataclasses.replace(config, csv=CsvOptions())
    if config.csv is not None and config.csv != CsvOptions():
        raise ConfigError(f"{src}: CSV options (--image-col, --label-col, ...) need a .csv SRC")
    return dataclasses.replace(config, csv=None) if config.csv is not None else config
