"""``shardkit verify``: check a dataset against its index.json, one line per problem.

What is checked (docs/format.md is the spec it is checked against):

1. ``index.json`` reads and validates (:meth:`Manifest.read`, which also checks that the
   shard records' samples add up to ``samples``), and names a format, codec and image shape
   this version knows.
2. Every listed shard exists, has the recorded size and (unless quick) sha256; a raw
   fixed-shape tar record's size is ``samples * stride + 1024``.
3. Every sample, one shard at a time. Tar: the safe member walk (no links, no unsafe names),
   members grouped per key as image, ``.cls``, ``.json``; keys increasing through the whole
   dataset; ``.npy`` headers read with ``numpy.lib.format`` (never unpickled) and matching the
   schema; jpeg/png decoding to the schema's shape; labels in range, all of one width, naming
   the class the ``.json`` names; raw fixed-shape samples exactly where the record's
   ``layout`` puts them. Parquet: columns and types, row groups, keys, labels, image sizes.
   The samples found must be the record's ``samples``.
4. Totals: ``samples + failed == inputs``; ``errors.jsonl`` holds one well-formed line per
   failed input; ``class_counts`` equals the labels found (when every shard could be read).
5. No ``shard-*.tar`` / ``shard-*.parquet`` file that index.json does not list.

Quick mode skips the sha256 and the pixel decoding of jpeg/png (their headers are still read).
A shard's walk stops at its first problem: one damage, one line (a size that is off also gets
the sample count the walk found, when it differs).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from shardkit.errors import CorruptShardError, DatasetError, UnsafeContentError
from shardkit.format.files import hash_file
from shardkit.format.manifest import ERRORS_NAME, INDEX_NAME, Manifest, ShardRecord
from shardkit.format.samples import ENCODED_IMAGE, META_TYPES
from shardkit.format.tar import iter_members

__all__ = ["verify_dataset"]

_BLOCK = 512
_END = 2 * _BLOCK  # the end-of-archive marker
_MEMBER = {"raw": "npy", "jpeg": "jpg", "png": "png"}
_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG"}
_CHANNELS = {"L": 1, "RGB": 3}
_ERROR_KEYS = ("index", "key", "path", "stage", "reason", "detail")


def verify_dataset(path: str | os.PathLike[str], *, quick: bool = False) -> list[str]:
    """Check the dataset folder `path` against its index.json.

    Returns one human-readable line per problem, each starting with the file it is about
    (``shard-00002.tar: ...``, ``errors.jsonl: ...``, ``index.json: ...``); an empty list
    means the dataset is sound. A missing or invalid index.json is the only problem reported
    (nothing else can be checked without it; that line gives its full path). Damaged shards
    are findings, never exceptions; only an I/O error outside the dataset's files (e.g. the
    folder being unreadable) raises.
    `quick` skips the sha256 of every shard and the decoding of jpeg/png pixels.
    """
    folder = Path(path)
    try:
        manifest = Manifest.read(folder)
        if manifest.kind == "table":  # tabular CSVs: shardkit.reader.table reads their shards
            from shardkit.reader.table import verify_table

            # No per-sample walk tallies a table's labels: class counts are not compared.
            return [*verify_table(folder, manifest, quick=quick),
                    *_check_totals(folder, manifest, _Tally(complete=False))]
        spec = _Spec.of(manifest)
    except DatasetError as exc:
        return [str(exc)]
    problems: list[str] = []
    tally = _Tally()
    for record in manifest.shards:
        problems += _check_shard(folder, spec, record, tally, quick=quick)
    problems += _check_totals(folder, manifest, tally)
    return problems


class _Problem(Exception):
    """One finding about the file being checked (the caller prefixes the file name)."""


@dataclass(frozen=True, kw_only=True)
class _Spec:
    """What index.json says every sample looks like."""

    format: str
    codec: str
    shape: tuple[int | None, ...]  # (H, W, C), or (None, None, C) when shapes vary
    classes: list[str] | None
    rows_per_group: int | None
    #: Image CSVs: the rows' other columns (name, type), stored after the fixed ones.
    csv_columns: tuple[tuple[str, str], ...] = ()

    @property
    def fixed(self) -> bool:
        return None not in self.shape

    @property
    def raw_fixed(self) -> bool:
        return self.codec == "raw" and self.fixed

    @property
    def pixel_bytes(self) -> int:
        """H*W*C (0 when shapes vary)."""
        return math.prod(s or 0 for s in self.shape)

    @property
    def channels(self) -> int:
        return int(self.shape[2] or 0)

    @classmethod
    def of(cls, manifest: Manifest) -> _Spec:
        """Raises DatasetError when index.json's config or schema is not one this version knows."""
        config, schema, classes = manifest.config, manifest.schema, manifest.classes
        fmt, codec, image = config.get("format"), config.get("codec"), schema.get("image")
        if fmt not in ("tar", "parquet") or codec not in _MEMBER:
            raise DatasetError(f"{INDEX_NAME}: config format/codec {fmt!r}/{codec!r} is not "
                               "tar or parquet / raw, jpeg or png")
        shape = image.get("shape") if isinstance(image, dict) else None
        if not (isinstance(image, dict) and image.get("dtype") == "uint8" and _valid_shape(shape)):
            raise DatasetError(f"{INDEX_NAME}: schema 'image' {image!r} is not uint8 [H, W, C] "
                               "or [null, null, C] with C 1 or 3")
        if fmt == "tar" and image.get("member") != _MEMBER[codec]:
            raise DatasetError(f"{INDEX_NAME}: schema 'image' member {image.get('member')!r}, "
                               f"codec {codec} stores {_MEMBER[codec]!r}")
        if classes is not None and not (isinstance(classes, list) and classes
                                        and all(isinstance(c, str) for c in classes)):
            raise DatasetError(f"{INDEX_NAME}: 'classes' is not a list of class names or null")
        rows = None
        if fmt == "parquet":
            parquet = schema.get("parquet")
            rows = parquet.get("rows_per_group") if isinstance(parquet, dict) else None
            if not isinstance(rows, int) or rows < 1:
                raise DatasetError(f"{INDEX_NAME}: schema 'parquet.rows_per_group' missing or not "
                                   "a positive int")
        csv_columns = tuple((str(k), str(v["dtype"])) for k, v in sorted(
            ((k, v) for k, v in schema.items() if isinstance(v, dict) and "csv_column" in v),
            key=lambda item: int(item[1]["csv_column"])))
        return cls(format=str(fmt), codec=str(codec), shape=tuple(cast(list[int | None], shape)),
                   classes=classes, rows_per_group=rows, csv_columns=csv_columns)


def _valid_shape(shape: Any) -> bool:
    if not (isinstance(shape, list) and len(shape) == 3 and shape[2] in _CHANNELS.values()):
        return False
    return shape[:2] == [None, None] or all(type(s) is int and s > 0 for s in shape[:2])


@dataclass
class _Tally:
    """What the walk has seen so far, across shards (one per verify_dataset call)."""

    labels: Counter[int] = field(default_factory=Counter)
    last_key: str = ""
    label_width: int | None = None
    complete: bool = True  # every shard was walked to its end without a problem


# --- one shard ---------------------------------------------------------------------------


def _check_shard(folder: Path, spec: _Spec, record: ShardRecord, tally: _Tally, *,
                 quick: bool) -> list[str]:
    name, path = record.file, folder / record.file
    layout = None
    problems = []
    if spec.format == "tar" and spec.raw_fixed:
        layout, problem = _record_layout(record, labeled=spec.classes is not None)
        problems += [f"{name}: {problem}"] if problem else []
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        tally.complete = False
        return [*problems, f"{name}: missing (index.json lists it)"]
    except OSError as exc:
        tally.complete = False
        return [*problems, f"{name}: unreadable: {exc.strerror or exc}"]
    if not path.is_file():
        tally.complete = False
        return [*problems, f"{name}: not a regular file"]
    if size != record.bytes:
        problems.append(f"{name}: {size} bytes on disk, index.json says {record.bytes}")
    elif not quick and hash_file(path)[1] != record.sha256:
        problems.append(f"{name}: sha256 differs from index.json (corrupted)")
    try:
        if spec.format == "tar":
            found = _walk_tar(path, spec, layout, tally, decode=not quick)
        else:
            found = _walk_parquet(path, spec, tally, decode=not quick)
    except _Problem as exc:
        tally.complete = False
        return [*problems, f"{name}: {exc}"]
    except (CorruptShardError, UnsafeContentError) as exc:
        tally.complete = False
        return [*problems, f"{name}: {str(exc).removeprefix(f'{path}: ')}"]
    except OSError as exc:
        tally.complete = False
        return [*problems, f"{name}: unreadable: {exc.strerror or exc}"]
    if found != record.samples:
        tally.complete = False
        problems.append(f"{name}: holds {found} samples, index.json says {record.samples}")
    return problems


def _record_layout(record: ShardRecord, *, labeled: bool) -> tuple[dict[str, int] | None, str]:
    """(the record's layout, "") when it is usable, else (None, what is wrong with it)."""
    layout: Any = record.layout
    needed = ["stride", "offset", "meta_offset", *(["label_offset", "label_digits"] if labeled else [])]
    if not (isinstance(layout, dict) and all(type(layout.get(k)) is int for k in needed)):
        return None, f"index.json gives no usable layout ({', '.join(needed)}) for this raw shard"
    if record.bytes != record.samples * layout["stride"] + _END:
        return None, (f"index.json says {record.samples} samples of layout stride {layout['stride']} "
                      f"bytes in {record.bytes} bytes (should be samples * stride + 1024)")
    return layout, ""


def _next_key(key: str, tally: _Tally) -> None:
    """Keys are plan positions: ASCII digits, at least six, increasing through the dataset."""
    if not (key.isascii() and key.isdigit() and len(key) >= 6):
        raise _Problem(f"key {key!r} is not a zero-padded sample number")
    if tally.last_key and int(key) <= int(tally.last_key):
        raise _Problem(f"key {key} is out of order (after {tally.last_key})")
    tally.last_key = key


def _check_label(key: str, label: Any, spec: _Spec, tally: _Tally) -> int:
    classes = spec.classes or []
    if type(label) is not int or not 0 <= label < len(classes):
        raise _Problem(f"sample {key}: label {label!r} is not a class index (0..{len(classes) - 1})")
    tally.labels[label] += 1
    return label


def _check_image(key: str, data: bytes, spec: _Spec, *, decode: bool) -> tuple[int, int]:
    """(height, width) of a stored jpeg/png, checked against the schema's shape."""
    try:
        with Image.open(io.BytesIO(data), formats=(_PIL_FORMAT[spec.codec],)) as im:
            if decode:
                im.load()
            height, width, mode = im.height, im.width, im.mode
    except Exception as exc:  # a decoder fed damaged bytes may raise anything: a finding, not a crash
        raise _Problem(f"sample {key}: {spec.codec} image does not decode: {exc}") from None
    got = (height, width, _CHANNELS.get(mode))
    if not _shape_ok(got, spec.shape):
        raise _Problem(f"sample {key}: image is {height}×{width} {mode}, the schema says "
                       f"{_shape_text(spec.shape)}")
    return height, width


def _shape_ok(got: Sequence[int | None], shape: Sequence[int | None]) -> bool:
    return len(got) == len(shape) and all(
        g is not None and g > 0 and (s is None or g == s) for g, s in zip(got, shape, strict=True))


def _shape_text(shape: Sequence[int | None]) -> str:
    return "×".join("?" if s is None else str(s) for s in shape) + " uint8"


# --- tar ---------------------------------------------------------------------------------


def _walk_tar(path: Path, spec: _Spec, layout: dict[str, int] | None, tally: _Tally, *,
              decode: bool) -> int:
    """Samples in a tar shard, each checked; raises _Problem at the first bad one."""
    labeled = spec.classes is not None
    order = (_MEMBER[spec.codec], *(("cls",) if labeled else ()), "json")
    count, position, key = 0, 0, ""
    sizes: list[int] = []
    npy_header, label = 0, -1
    for member_key, kind, data in iter_members(path):
        if position == 0:
            _next_key(member_key, tally)
            key, sizes = member_key, []
        elif member_key != key:
            raise _Problem(f"sample {key} has no .{order[position]} member")
        if kind != order[position]:
            raise _Problem(f"sample {key}: .{kind} member where its .{order[position]} belongs")
        sizes.append(len(data))
        if kind == "npy":
            npy_header = _check_npy(key, data, spec.shape)
        elif kind in ("jpg", "png"):
            _check_image(key, data, spec, decode=decode)
        elif kind == "cls":
            label = _check_label(key, _cls_value(key, data, tally), spec, tally)
        else:
            _check_meta(key, data, spec.classes[label] if spec.classes is not None else None)
        position += 1
        if position == len(order):
            if layout is not None:
                _check_layout(key, _sample_layout(npy_header, sizes, labeled=labeled), layout)
            count, position = count + 1, 0
    if position:
        raise _Problem(f"sample {key} has no .{order[position]} member")
    return count


def _check_npy(key: str, data: bytes, shape: Sequence[int | None]) -> int:
    """The .npy header's length, after checking it describes C-order uint8 of `shape` and
    is followed by exactly that many bytes. Only the header is parsed: nothing is unpickled."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            got, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            got, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]}")
    except ValueError as exc:
        raise _Problem(f"sample {key}: .npy header unreadable: {exc}") from None
    if dtype != np.uint8 or fortran or not _shape_ok(got, shape):
        order = "Fortran-order " if fortran else ""
        raise _Problem(f"sample {key}: .npy holds {order}{dtype} {got}, the schema says "
                       f"{_shape_text(shape)}")
    header, expected = stream.tell(), int(np.prod(got))
    if len(data) - header != expected:
        raise _Problem(f"sample {key}: .npy data is {len(data) - header} bytes, its header says "
                       f"{expected}")
    return header


def _cls_value(key: str, data: bytes, tally: _Tally) -> int:
    """The label of a .cls member: ASCII digits, the same width throughout the dataset."""
    if not (data.isascii() and data.isdigit()):
        raise _Problem(f"sample {key}: .cls {data[:20]!r} is not ASCII digits")
    if tally.label_width is None:
        tally.label_width = len(data)
    elif len(data) != tally.label_width:
        raise _Problem(f"sample {key}: .cls {data.decode()!r} is not {tally.label_width} digits "
                       "like the others")
    return int(data)


def _check_meta(key: str, data: bytes, class_name: str | None) -> None:
    try:
        meta = json.loads(data)
    except ValueError:
        raise _Problem(f"sample {key}: .json is not valid JSON") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("source"), str)
            and all(type(meta.get(side)) is int and meta[side] > 0 for side in ("width", "height"))):
        raise _Problem(f"sample {key}: .json lacks a source string and positive width/height")
    if class_name is not None and meta.get("class") != class_name:
        raise _Problem(f"sample {key}: .json says class {meta.get('class')!r}, its .cls says "
                       f"{class_name!r}")


def _sample_layout(npy_header: int, sizes: Sequence[int], *, labeled: bool) -> dict[str, int]:
    """Where a sample's bytes are, from its members' data sizes (each member is a 512-byte
    header and its data padded to whole blocks): the same numbers as a record's layout."""
    spans = [_BLOCK + size + -size % _BLOCK for size in sizes]
    found = {"offset": _BLOCK + npy_header}
    if labeled:
        found["label_offset"] = spans[0] + _BLOCK
        found["label_digits"] = sizes[1]
    found["meta_offset"] = sum(spans[:-1])
    found["stride"] = sum(spans)
    return found


def _check_layout(key: str, found: dict[str, int], layout: dict[str, int]) -> None:
    wrong = [f"{name} {value}, layout says {layout.get(name)}" for name, value in found.items()
             if layout.get(name) != value]
    if wrong:
        raise _Problem(f"sample {key} is not where index.json's layout puts it: {'; '.join(wrong)}")


# --- Parquet -----------------------------------------------------------------------------


def _walk_parquet(path: Path, spec: _Spec, tally: _Tally, *, decode: bool) -> int:
    """Rows in a Parquet shard, each checked; raises _Problem at the first bad one."""
    try:
        with pq.ParquetFile(path) as handle:
            _check_columns(handle.schema_arrow, spec)
            _check_row_groups(handle.metadata, spec)
            # Quick mode reads only the columns it checks values of; a full check reads them
            # all, so every page is decoded once.
            columns = None
            if not decode:
                columns = ["key", *(["label"] if spec.classes is not None else [])]
                if not spec.raw_fixed:
                    columns += ["image", *(["width", "height"] if not spec.fixed else [])]
            for batch in handle.iter_batches(batch_size=256, columns=columns, use_threads=False):
                nulls = [name for name, column in zip(batch.schema.names, batch.columns, strict=True)
                         if column.null_count and name not in dict(spec.csv_columns)]
                if nulls:
                    raise _Problem(f"column {nulls[0]} holds nulls")
                _check_rows(batch.to_pydict(), spec, tally, decode=decode)
            return int(handle.metadata.num_rows)
    except (OSError, pa.ArrowException) as exc:
        raise _Problem(f"not a readable Parquet file: {exc}") from None


def _check_columns(schema: pa.Schema, spec: _Spec) -> None:
    image = pa.binary(spec.pixel_bytes) if spec.raw_fixed else pa.binary()
    if spec.codec != "raw" and "image" in schema.names and schema.field("image").type == ENCODED_IMAGE:
        image = ENCODED_IMAGE  # jpeg/png as Hugging Face's Image (earlier shards: binary)
    expected: list[tuple[str, pa.DataType]] = [("key", pa.string()), ("image", image)]
    if spec.classes is not None:
        expected.append(("label", pa.int64()))
    expected += [("source", pa.string()), ("orig_width", pa.int32()), ("orig_height", pa.int32())]
    # width/height are needed when shapes vary; jpeg/png shards of one shape may carry them too.
    if not spec.fixed or (spec.codec != "raw" and "width" in schema.names):
        expected += [("width", pa.int32()), ("height", pa.int32())]
    expected += [(name, META_TYPES[kind]) for name, kind in spec.csv_columns]
    got = [(f.name, f.type) for f in schema]
    if got != expected:
        def text(fields: list[tuple[str, pa.DataType]]) -> str:
            return ", ".join(f"{name}: {kind}" for name, kind in fields)
        raise _Problem(f"columns are ({text(got)}), expected ({text(expected)})")


def _check_row_groups(metadata: pq.FileMetaData, spec: _Spec) -> None:
    groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    for number, rows in enumerate(groups):
        last = number == len(groups) - 1
        if rows > (spec.rows_per_group or 0) or (rows != spec.rows_per_group and not last):
            raise _Problem(f"row group {number} holds {rows} rows, schema.parquet.rows_per_group "
                           f"says {spec.rows_per_group}")


def _check_rows(rows: dict[str, list[Any]], spec: _Spec, tally: _Tally, *, decode: bool) -> None:
    for i, key in enumerate(rows["key"]):
        _next_key(key, tally)
        if "label" in rows:
            _check_label(key, rows["label"][i], spec, tally)
        if "orig_width" in rows and not (rows["orig_width"][i] > 0 and rows["orig_height"][i] > 0):
            raise _Problem(f"sample {key}: orig_width/orig_height are not positive")
        if "image" not in rows or spec.raw_fixed:
            continue  # fixed_size_binary already guarantees the size
        image: bytes = rows["image"][i]
        if isinstance(image, dict):  # jpeg/png as Hugging Face's Image: {bytes, path}
            image = image["bytes"]
        if spec.codec == "raw":
            height, width = rows["height"][i], rows["width"][i]
            if not (height > 0 and width > 0 and len(image) == height * width * spec.channels):
                raise _Problem(f"sample {key}: image is {len(image)} bytes, not {height}×{width}×"
                               f"{spec.channels}")
            continue
        height, width = _check_image(key, image, spec, decode=decode)
        if "width" in rows and (height, width) != (rows["height"][i], rows["width"][i]):
            raise _Problem(f"sample {key}: image is {height}×{width}, its width/height columns "
                           f"say {rows['height'][i]}×{rows['width'][i]}")


# --- totals ------------------------------------------------------------------------------


def _check_totals(folder: Path, manifest: Manifest, tally: _Tally) -> list[str]:
    problems = []
    if manifest.samples + manifest.failed != manifest.inputs:
        problems.append(f"{INDEX_NAME}: {manifest.samples} samples + {manifest.failed} failed != "
                        f"{manifest.inputs} inputs")
    problems += _check_errors(folder / ERRORS_NAME, manifest.failed)
    problems += _check_class_counts(manifest, tally)
    listed = {s.file for s in manifest.shards}
    unlisted = {p.name for p in [*folder.glob("shard-*.tar"), *folder.glob("shard-*.parquet")]}
    problems += [f"{name}: a shard file index.json does not list" for name in sorted(unlisted - listed)]
    return problems


def _check_class_counts(manifest: Manifest, tally: _Tally) -> list[str]:
    counts, classes = manifest.class_counts, manifest.classes
    if counts is None:
        return []
    if classes is None or not isinstance(counts, list) or len(counts) != len(classes):
        return [f"{INDEX_NAME}: class_counts {counts} does not give one count per class"]
    # A shard that could not be walked to its end has been reported already; its labels are
    # unknown, so comparing would only add a second line for the same damage.
    found = [tally.labels.get(i, 0) for i in range(len(classes))]
    if tally.complete and found != counts:
        return [f"{INDEX_NAME}: class_counts {counts}, the shards hold {found}"]
    return []


def _check_errors(path: Path, failed: int) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [f"{ERRORS_NAME}: missing (index.json says {failed} failed)"]
    except (OSError, ValueError) as exc:
        return [f"{ERRORS_NAME}: unreadable: {exc}"]
    problems = []
    for number, line in enumerate(lines, start=1):
        try:
            row: Any = json.loads(line)
        except ValueError:
            problems.append(f"{ERRORS_NAME}: line {number} is not JSON")
            continue
        missing = [k for k in _ERROR_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            problems.append(f"{ERRORS_NAME}: line {number} lacks {', '.join(missing)}")
    if len(lines) != failed:
        problems.append(f"{ERRORS_NAME}: {len(lines)} line{'' if len(lines) == 1 else 's'}, "
                        f"index.json says {failed} failed")
    return problems
