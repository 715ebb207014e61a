"""What an image sample holds, defined once: its fields and dtypes, how index.json's schema
describes them, and where tar and Parquet shards keep each one.

Fields of every sample: ``image`` (uint8 H×W×C), ``label`` (int64, labelled datasets),
``key`` (zero-padded position), ``source`` (path relative to SRC), ``orig_width`` /
``orig_height`` (int32, the source's size after orientation), and an image CSV's other
columns (typed, in CSV order; several label columns are the float32 list ``target``).

* Tar: the image is ``<key>.npy`` / ``.jpg`` / ``.png`` (`IMAGE_MEMBER`), the label
  ``<key>.cls``, the rest keys of ``<key>.json`` (`JSON_KEYS`: the original size is stored as
  ``width`` / ``height`` there, with the class name as ``class``).
* Parquet: one column per field (`arrow_schema`), plus ``width`` / ``height`` when the image
  column is variable-size binary.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from shardkit.errors import CorruptShardError

__all__ = [
    "IMAGE_MEMBER",
    "JSON_KEYS",
    "METADATA_FIELDS",
    "META_TYPES",
    "TARGET_FIELD",
    "arrow_schema",
    "check_labels",
    "fields_from_json",
    "image_schema",
]

#: The tar member (extension) holding the image, per codec.
IMAGE_MEMBER = {"raw": "npy", "jpeg": "jpg", "png": "png"}
#: The standard metadata fields a batch may carry (``fields=``), after which come an image
#: CSV's columns.
METADATA_FIELDS = ("key", "source", "orig_width", "orig_height")
#: Where the tar ``.json`` member keeps each metadata field (``key`` is the member name).
JSON_KEYS = {"source": "source", "orig_width": "width", "orig_height": "height"}
#: Image CSVs with several label columns: their float32 values, one list per sample.
TARGET_FIELD = "target"
#: Types of an image CSV's columns, by the name index.json gives them.
META_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(),
              "bool": pa.bool_(), "float32_list": pa.list_(pa.float32())}
_FIXED = {"key": ("string", pa.string()), "source": ("string", pa.string()),
          "orig_width": ("int32", pa.int32()), "orig_height": ("int32", pa.int32())}


def image_schema(*, fmt: str, codec: str, shape: Sequence[int] | None, channels: int,
                 labeled: bool, meta_types: Sequence[tuple[str, str]],
                 rows_per_group: int | None) -> dict[str, Any]:
    """index.json's ``schema`` of an image dataset (docs/format.md)."""
    image: dict[str, Any] = {"dtype": "uint8", "layout": "HWC", "codec": codec,
                             "shape": list(shape) if shape else [None, None, channels]}
    schema: dict[str, Any] = {"image": image}
    if labeled:
        schema["label"] = {"dtype": "int64", "shape": []}
    for name in METADATA_FIELDS:
        schema[name] = {"dtype": _FIXED[name][0], "shape": []}
    if fmt == "tar":
        image["member"] = IMAGE_MEMBER[codec]
        if labeled:
            schema["label"]["member"] = "cls"
        for name in METADATA_FIELDS:
            schema[name]["member"] = "__key__" if name == "key" else "json"
    else:
        schema["parquet"] = {"rows_per_group": rows_per_group}
    for position, (name, kind) in enumerate(meta_types):
        schema[name] = {"dtype": kind, "shape": [], "csv_column": position,
                        **({"member": "json"} if fmt == "tar" else {})}
    return schema


def arrow_schema(*, pixel_bytes: int | None, labeled: bool,
                 meta: Sequence[tuple[str, str]] = ()) -> pa.Schema:
    """A Parquet shard's Arrow schema: `pixel_bytes` is H*W*C for fixed-shape raw images, else
    None (variable-size binary plus ``width``/``height``); `meta`: CSV columns (name, type)
    appended, nullable, after the fixed ones."""
    fields: list[pa.Field] = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary(pixel_bytes) if pixel_bytes else pa.binary(), nullable=False),
    ]
    if labeled:
        fields.append(pa.field("label", pa.int64(), nullable=False))
    fields += [pa.field(name, _FIXED[name][1], nullable=False) for name in METADATA_FIELDS[1:]]
    if pixel_bytes is None:
        fields += [pa.field("width", pa.int32(), nullable=False),
                   pa.field("height", pa.int32(), nullable=False)]
    fields += [pa.field(name, META_TYPES[kind]) for name, kind in meta]
    return pa.schema(fields)


def fields_from_json(key: str, meta: dict[str, Any], extra: Sequence[str]) -> dict[str, Any]:
    """A tar sample's metadata fields from its ``.json`` member (as `tar.member_meta` reads
    it): the standard fields, then `extra` (CSV columns; None where the member lacks them)."""
    fields: dict[str, Any] = {"key": key}
    fields.update({name: meta[stored] for name, stored in JSON_KEYS.items()})
    fields.update({name: meta.get(name) for name in extra})
    return fields


def check_labels(path: str | os.PathLike[str], labels: np.ndarray | None,
                 classes: list[str] | None) -> None:
    """CorruptShardError, naming the file, when an integer label names no class: a damaged
    digit is still a number, and a loss function fed it fails far from the cause."""
    if labels is None or classes is None or not len(labels) or labels.dtype.kind not in "iu":
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= len(classes):
        raise CorruptShardError(f"{path}: label {low if low < 0 else high} names no class "
                                f"({len(classes)} classes)")
