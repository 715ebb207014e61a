"""The per-sample walk of `shardkit verify` (`verify.py`): every member of a tar shard, every
row of a Parquet shard, checked against what index.json says a sample looks like (`Spec`).
A walk raises `Problem` at the first bad sample; nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import math
import os
import tokenize
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from shardkit.config import DEFAULT_PIXELS
from shardkit.format.manifest import Manifest
from shardkit.format.samples import (
    PARQUET_ERRORS,
    array3d_pixels,
    arrow_schema,
    check_array3d_field,
    member_order,
)
from shardkit.format.tar import BLOCK, END_OF_ARCHIVE
from shardkit.format.tar_members import iter_members

__all__ = ["Problem", "Spec", "Tally", "walk_parquet", "walk_tar"]

_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG"}
_CHANNELS = {"L": 1, "RGB": 3}


class Problem(Exception):
    """One finding about the file being checked (the caller prefixes the file name)."""


@dataclass(frozen=True, kw_only=True)
class Spec:
    """What index.json says every sample looks like."""

    format: str
    codec: str
    shape: tuple[int | None, ...]  # (H, W, C), or (None, None, C) when shapes vary
    classes: list[str] | None
    rows_per_group: int | None
    #: Image CSVs: the rows' other columns (name, type), stored after the fixed ones.
    csv_columns: tuple[tuple[str, str], ...] = ()
    #: How Parquet shards hold fixed-shape raw pixels (``bytes`` or ``array3d``).
    pixels: str = DEFAULT_PIXELS

    @property
    def fixed(self) -> bool:
        return None not in self.shape

    @property
    def raw_fixed(self) -> bool:
        return self.codec == "raw" and self.fixed

    @property
    def array3d(self) -> bool:
        """Raw pixels stored as nested lists (``--pixels array3d``)."""
        return self.raw_fixed and self.pixels == "array3d"

    @property
    def dims(self) -> tuple[int, ...]:
        """(H, W, C), 0 where shapes vary."""
        return tuple(s or 0 for s in self.shape)

    @property
    def pixel_bytes(self) -> int:
        """H*W*C (0 when shapes vary)."""
        return math.prod(self.dims)

    @property
    def channels(self) -> int:
        return int(self.shape[2] or 0)

    @classmethod
    def of(cls, manifest: Manifest) -> Spec:
        """The spec of an image dataset whose index.json has been validated (Manifest.read)."""
        parquet = manifest.schema.get("parquet")
        return cls(format=manifest.format, codec=manifest.codec,
                   shape=tuple(manifest.schema["image"]["shape"]), classes=manifest.classes,
                   rows_per_group=parquet["rows_per_group"] if parquet else None,
                   csv_columns=manifest.csv_columns, pixels=manifest.pixels)


@dataclass
class Tally:
    """What the walk has seen so far, across shards (one per verify_dataset call)."""

    labels: Counter[int] = field(default_factory=Counter)
    last_key: str = ""
    label_width: int | None = None
    complete: bool = True  # every shard was walked to its end without a problem




def _next_key(key: str, tally: Tally) -> None:
    """Keys are plan positions: ASCII digits, at least six, increasing through the dataset."""
    if not (key.isascii() and key.isdigit() and len(key) >= 6):
        raise Problem(f"key {key!r} is not a zero-padded sample number")
    if tally.last_key and int(key) <= int(tally.last_key):
        raise Problem(f"key {key} is out of order (after {tally.last_key})")
    tally.last_key = key


def _check_label(key: str, label: Any, spec: Spec, tally: Tally) -> int:
    classes = spec.classes or []
    if type(label) is not int or not 0 <= label < len(classes):
        raise Problem(f"sample {key}: label {label!r} is not a class index (0..{len(classes) - 1})")
    tally.labels[label] += 1
    return label


def _check_image(key: str, data: bytes, spec: Spec, *, decode: bool) -> tuple[int, int]:
    """(height, width) of a stored jpeg/png, checked against the schema's shape."""
    try:
        with Image.open(io.BytesIO(data), formats=(_PIL_FORMAT[spec.codec],)) as im:
            if decode:
                im.load()
            height, width, mode = im.height, im.width, im.mode
    except Exception as exc:  # a decoder fed damaged bytes may raise anything: a finding, not a crash
        raise Problem(f"sample {key}: {spec.codec} image does not decode: {exc}") from None
    got = (height, width, _CHANNELS.get(mode))
    if not _shape_ok(got, spec.shape):
        raise Problem(f"sample {key}: image is {height}×{width} {mode}, the schema says "
                       f"{_shape_text(spec.shape)}")
    return height, width


def _shape_ok(got: Sequence[int | None], shape: Sequence[int | None]) -> bool:
    return len(got) == len(shape) and all(
        g is not None and g > 0 and (s is None or g == s) for g, s in zip(got, shape, strict=True))


def _shape_text(shape: Sequence[int | None]) -> str:
    return "×".join("?" if s is None else str(s) for s in shape) + " uint8"


# --- tar ---------------------------------------------------------------------------------


def walk_tar(path: Path, spec: Spec, layout: dict[str, int] | None, tally: Tally, *,
              decode: bool) -> int:
    """Samples in a tar shard, each checked; raises Problem at the first bad one."""
    labeled = spec.classes is not None
    order = member_order(spec.codec, labeled)
    count, position, key = 0, 0, ""
    sizes: list[int] = []
    npy_header, label = 0, -1
    for member_key, kind, data in iter_members(path):
        if position == 0:
            _next_key(member_key, tally)
            key, sizes = member_key, []
        elif member_key != key:
            raise Problem(f"sample {key} has no .{order[position]} member")
        if kind != order[position]:
            raise Problem(f"sample {key}: .{kind} member where its .{order[position]} belongs")
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
        raise Problem(f"sample {key} has no .{order[position]} member")
    _check_end(path)
    return count


def _check_end(path: Path) -> None:
    """The archive ends with two zero blocks, as tar readers other than ours need."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - len(END_OF_ARCHIVE)))
        if size < len(END_OF_ARCHIVE) or handle.read() != END_OF_ARCHIVE:
            raise Problem("does not end with the tar end-of-archive marker (two zero blocks)")


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
    except (ValueError, SyntaxError, tokenize.TokenError) as exc:  # numpy parses it as Python
        raise Problem(f"sample {key}: .npy header unreadable: {exc}") from None
    if dtype != np.uint8 or fortran or not _shape_ok(got, shape):
        order = "Fortran-order " if fortran else ""
        raise Problem(f"sample {key}: .npy holds {order}{dtype} {got}, the schema says "
                       f"{_shape_text(shape)}")
    header, expected = stream.tell(), int(np.prod(got))
    if len(data) - header != expected:
        raise Problem(f"sample {key}: .npy data is {len(data) - header} bytes, its header says "
                       f"{expected}")
    return header


def _cls_value(key: str, data: bytes, tally: Tally) -> int:
    """The label of a .cls member: ASCII digits, the same width throughout the dataset."""
    if not (data.isascii() and data.isdigit()):
        raise Problem(f"sample {key}: .cls {data[:20]!r} is not ASCII digits")
    if tally.label_width is None:
        tally.label_width = len(data)
    elif len(data) != tally.label_width:
        raise Problem(f"sample {key}: .cls {data.decode()!r} is not {tally.label_width} digits "
                       "like the others")
    return int(data)


def _check_meta(key: str, data: bytes, class_name: str | None) -> None:
    try:
        meta = json.loads(data)
    except ValueError:
        raise Problem(f"sample {key}: .json is not valid JSON") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("source"), str)
            and all(type(meta.get(side)) is int and meta[side] > 0 for side in ("width", "height"))):
        raise Problem(f"sample {key}: .json lacks a source string and positive width/height")
    if class_name is not None and meta.get("class") != class_name:
        raise Problem(f"sample {key}: .json says class {meta.get('class')!r}, its .cls says "
                       f"{class_name!r}")


def _sample_layout(npy_header: int, sizes: Sequence[int], *, labeled: bool) -> dict[str, int]:
    """Where a sample's bytes are, from its members' data sizes (each member is a 512-byte
    header and its data padded to whole blocks): the same numbers as a record's layout."""
    spans = [BLOCK + size + -size % BLOCK for size in sizes]
    found = {"offset": BLOCK + npy_header}
    if labeled:
        found["label_offset"] = spans[0] + BLOCK
        found["label_digits"] = sizes[1]
    found["meta_offset"] = sum(spans[:-1])
    found["stride"] = sum(spans)
    return found


def _check_layout(key: str, found: dict[str, int], layout: dict[str, int]) -> None:
    wrong = [f"{name} {value}, layout says {layout.get(name)}" for name, value in found.items()
             if layout.get(name) != value]
    if wrong:
        raise Problem(f"sample {key} is not where index.json's layout puts it: {'; '.join(wrong)}")


# --- Parquet -----------------------------------------------------------------------------


def walk_parquet(path: Path, spec: Spec, tally: Tally, *, decode: bool) -> int:
    """Rows in a Parquet shard, each checked; raises Problem at the first bad one."""
    try:
        with pq.ParquetFile(path) as handle:
            _check_columns(handle.schema_arrow, spec)
            _check_row_groups(handle.metadata, spec)
            # Quick mode reads only the columns it checks values of; a full check reads them
            # all, so every page is decoded once.
            columns = None
            if not decode:
                columns = ["key", *(["label"] if spec.classes is not None else [])]
                if not spec.raw_fixed or spec.array3d:
                    columns += ["image", *(["width", "height"] if not spec.fixed else [])]
            for batch in handle.iter_batches(batch_size=256, columns=columns, use_threads=False):
                nulls = [name for name, column in zip(batch.schema.names, batch.columns, strict=True)
                         if column.null_count and name not in dict(spec.csv_columns)]
                if nulls:
                    raise Problem(f"column {nulls[0]} holds nulls")
                if spec.array3d:  # nested lists of any length: each image's shape is checked here
                    try:
                        array3d_pixels(batch.column("image"), spec.dims)
                    except ValueError as exc:
                        raise Problem(str(exc)) from None
                    batch = batch.drop_columns(["image"])
                _check_rows(batch.to_pydict(), spec, tally, decode=decode)
            return int(handle.metadata.num_rows)
    except PARQUET_ERRORS as exc:
        raise Problem(f"not a readable Parquet file: {exc}") from None


def _check_columns(schema: pa.Schema, spec: Spec) -> None:
    expected_schema = arrow_schema(shape=spec.dims if spec.raw_fixed else None,
                                   labeled=spec.classes is not None, meta=spec.csv_columns,
                                   codec=spec.codec, pixels=spec.pixels)

    def stored(field: pa.Field) -> pa.DataType:  # an extension type (Array3D) by its storage
        return field.type.storage_type if isinstance(field.type, pa.ExtensionType) else field.type

    expected = [(f.name, stored(f)) for f in expected_schema]
    got = [(f.name, stored(f)) for f in schema]
    if spec.codec != "raw" and ("image", pa.binary()) in got:  # jpeg/png of earlier versions
        expected = [(n, pa.binary() if n == "image" else k) for n, k in expected]
    if got != expected:
        def text(fields: list[tuple[str, pa.DataType]]) -> str:
            return ", ".join(f"{name}: {kind}" for name, kind in fields)
        raise Problem(f"columns are ({text(got)}), expected ({text(expected)})")
    if spec.array3d:
        try:
            check_array3d_field(schema.field("image"), spec.dims)
        except ValueError as exc:
            raise Problem(str(exc)) from None


def _check_row_groups(metadata: pq.FileMetaData, spec: Spec) -> None:
    groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    for number, rows in enumerate(groups):
        last = number == len(groups) - 1
        if rows > (spec.rows_per_group or 0) or (rows != spec.rows_per_group and not last):
            raise Problem(f"row group {number} holds {rows} rows, schema.parquet.rows_per_group "
                           f"says {spec.rows_per_group}")


def _check_rows(rows: dict[str, list[Any]], spec: Spec, tally: Tally, *, decode: bool) -> None:
    for i, key in enumerate(rows["key"]):
        _next_key(key, tally)
        if "label" in rows:
            _check_label(key, rows["label"][i], spec, tally)
        if "orig_width" in rows and not (rows["orig_width"][i] > 0 and rows["orig_height"][i] > 0):
            raise Problem(f"sample {key}: orig_width/orig_height are not positive")
        if "image" not in rows or spec.raw_fixed:
            continue  # fixed_size_binary already guarantees the size
        image: bytes = rows["image"][i]
        if isinstance(image, dict):  # jpeg/png as Hugging Face's Image: {bytes, path}
            image = image["bytes"]
        if spec.codec == "raw":
            height, width = rows["height"][i], rows["width"][i]
            if not (height > 0 and width > 0 and len(image) == height * width * spec.channels):
                raise Problem(f"sample {key}: image is {len(image)} bytes, not {height}×{width}×"
                               f"{spec.channels}")
            continue
        height, width = _check_image(key, image, spec, decode=decode)
        if "width" in rows and (height, width) != (rows["height"][i], rows["width"][i]):
            raise Problem(f"sample {key}: image is {height}×{width}, its width/height columns "
                           f"say {rows['height'][i]}×{rows['width'][i]}")
