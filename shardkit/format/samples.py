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
  column is variable-size. Raw pixels are ``fixed_size_binary(H*W*C)`` (or binary); jpeg/png
  files are Hugging Face's ``Image`` storage, the struct {bytes, path} (`ENCODED_IMAGE`,
  path null; shards of earlier versions hold plain binary, which readers still take:
  `image_payloads`). The schema carries the ``huggingface`` metadata (`hf_features`) that
  Hugging Face ``datasets`` reads the columns' features from; it applies a feature only
  where the column's Arrow field is the feature's own (nullable, same type), so the label
  and jpeg/png image columns are nullable (they never hold nulls).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from shardkit.errors import CorruptShardError

__all__ = [
    "ENCODED_IMAGE",
    "HF_METADATA_KEY",
    "IMAGE_MEMBER",
    "JSON_KEYS",
    "METADATA_FIELDS",
    "META_TYPES",
    "TARGET_FIELD",
    "arrow_schema",
    "check_labels",
    "fields_from_json",
    "hf_features",
    "image_array",
    "image_payloads",
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


#: A Parquet jpeg/png image column: Hugging Face's ``Image`` storage (the file; path null).
ENCODED_IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
#: The Arrow schema metadata key Hugging Face ``datasets`` reads features from.
HF_METADATA_KEY = "huggingface"
_HF_VALUES = {"string": "string", "int32": "int32", "int64": "int64", "float64": "float64",
              "bool": "bool"}


def hf_features(*, codec: str, labeled: bool, classes: Sequence[str] | None, variable: bool,
                meta: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The columns' Hugging Face features (``datasets.Features.to_dict()``'s form), in column
    order: jpeg/png images are ``Image`` (datasets decodes them); raw pixels stay ``binary``
    (``Array3D`` would need nested lists of uint8 in the file, 4 bytes a pixel in Parquet,
    which no reader could map): ``np.frombuffer(row["image"], np.uint8).reshape(shape)``
    with index.json's shape. Labels are a ``ClassLabel`` with the class names."""
    def value(dtype: str) -> dict[str, Any]:
        return {"dtype": dtype, "_type": "Value"}

    features: dict[str, Any] = {"key": value("string"),
                                "image": {"_type": "Image"} if codec != "raw" else value("binary")}
    if labeled:
        features["label"] = {"names": list(classes), "_type": "ClassLabel"} if classes is not None \
            else value("int64")
    features.update({name: value(_FIXED[name][0]) for name in METADATA_FIELDS[1:]})
    if variable:
        features.update(width=value("int32"), height=value("int32"))
    for name, kind in meta:
        features[name] = {"feature": value("float32"), "_type": "Sequence"} \
            if kind == "float32_list" else value(_HF_VALUES[kind])
    return features


def arrow_schema(*, pixel_bytes: int | None, labeled: bool,
                 meta: Sequence[tuple[str, str]] = (), codec: str = "raw",
                 classes: Sequence[str] | None = None) -> pa.Schema:
    """A Parquet shard's Arrow schema: `pixel_bytes` is H*W*C for fixed-shape raw images, else
    None (variable-size binary plus ``width``/``height``); `meta`: CSV columns (name, type)
    appended, nullable, after the fixed ones. Its metadata holds the columns' Hugging Face
    features (`hf_features`; `codec` and `classes` decide the image's and label's)."""
    fields: list[pa.Field] = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", ENCODED_IMAGE) if codec != "raw" else
        pa.field("image", pa.binary(pixel_bytes) if pixel_bytes else pa.binary(), nullable=False),
    ]
    if labeled:
        fields.append(pa.field("label", pa.int64()))  # nullable: what ClassLabel's field is
    fields += [pa.field(name, _FIXED[name][1], nullable=False) for name in METADATA_FIELDS[1:]]
    if pixel_bytes is None:
        fields += [pa.field("width", pa.int32(), nullable=False),
                   pa.field("height", pa.int32(), nullable=False)]
    fields += [pa.field(name, META_TYPES[kind]) for name, kind in meta]
    features = hf_features(codec=codec, labeled=labeled, classes=classes,
                           variable=pixel_bytes is None, meta=meta)
    return pa.schema(fields, metadata={HF_METADATA_KEY: json.dumps({"info": {"features": features}})})


def image_array(payloads: Sequence[bytes], kind: pa.DataType) -> pa.Array:
    """The Parquet image column of `payloads` (stored files or raw pixels) as `kind`."""
    if kind != ENCODED_IMAGE:
        return pa.array(payloads, type=kind)
    files = pa.array(payloads, type=pa.binary())
    return pa.StructArray.from_arrays([files, pa.nulls(len(files), pa.string())],
                                      fields=list(ENCODED_IMAGE))


def image_payloads(column: pa.ChunkedArray | pa.Array) -> list[bytes]:
    """The stored bytes of a Parquet image column, one per row: the struct's files, or a
    binary column's values (raw, or jpeg/png shards of earlier versions)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return list(column.to_pylist())


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
