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
  column is variable-size. Raw pixels are ``fixed_size_binary(H*W*C)`` (or binary), or with
  ``pixels="array3d"`` Hugging Face's ``Array3D`` (`Array3DType`: nested lists); jpeg/png
  files are Hugging Face's ``Image`` storage, the struct {bytes, path} (`ENCODED_IMAGE`,
  path null; shards of earlier versions hold plain binary, which readers still take:
  `image_payloads`). The schema carries the ``huggingface`` metadata (`hf_features`) that
  Hugging Face ``datasets`` reads the columns' features from; it applies a feature only
  where the column's Arrow field is the feature's own (nullable, same type), so the label
  and jpeg/png image columns are nullable (they never hold nulls).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from shardkit.config import DEFAULT_PIXELS
from shardkit.errors import CorruptShardError

__all__ = [
    "ARRAY3D_LEAF",
    "ARRAY3D_NAME",
    "ARRAY3D_STORAGE",
    "ENCODED_IMAGE",
    "HF_METADATA_KEY",
    "IMAGE_MEMBER",
    "JSON_KEYS",
    "METADATA_FIELDS",
    "META_TYPES",
    "PARQUET_ERRORS",
    "TARGET_FIELD",
    "Array3DType",
    "array3d_column",
    "array3d_pixels",
    "arrow_schema",
    "check_array3d_field",
    "check_labels",
    "fields_from_json",
    "hf_features",
    "image_array",
    "image_payloads",
    "image_schema",
    "member_order",
    "part_schema",
]

#: What pyarrow raises for a damaged Parquet or Arrow file: its own errors, OSError, ValueError
#: (UnicodeDecodeError for a column name in the footer that is not UTF-8; JSON that a
#: registered extension type cannot parse), and TypeError (a registered extension type's
#: deserialiser, e.g. ``datasets``' Array3D, given other metadata). Readers of shards and of
#: Hugging Face sources alike catch these.
PARQUET_ERRORS = (OSError, ValueError, TypeError, pa.ArrowException)
#: The tar member (extension) holding the image, per codec.
IMAGE_MEMBER = {"raw": "npy", "jpeg": "jpg", "png": "png"}


def member_order(codec: str, labeled: bool) -> tuple[str, ...]:
    """A tar sample's members, in the order they stand: its run of consecutive members
    sharing its key (a member out of its place would pair one sample's image with another's
    label)."""
    return (IMAGE_MEMBER[codec], *(("cls",) if labeled else ()), "json")

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


#: The extension name ``datasets`` gives its Array3D type, and the storage it declares.
ARRAY3D_NAME = "datasets.features.features.Array3DExtensionType"
ARRAY3D_STORAGE = pa.list_(pa.list_(pa.list_(pa.uint8())))
#: The Parquet leaf column of an Array3D image (per-column writer settings name leaves).
ARRAY3D_LEAF = "image" + ".list.element" * 3


class Array3DType(pa.ExtensionType):  # type: ignore[misc]  # pyarrow is untyped
    """Hugging Face ``datasets``' ``Array3D(shape, "uint8")`` column type, written here
    without importing ``datasets``: its extension name and serialisation, over its storage
    (variable-size lists of lists of lists of uint8, as ``datasets`` declares it). Never
    registered with pyarrow (``datasets`` registers its own class under this name, and a
    second registration fails): a file read in a process that has imported ``datasets`` gives
    ``datasets``' type, in any other its storage type."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(s) for s in shape)
        pa.ExtensionType.__init__(self, ARRAY3D_STORAGE, ARRAY3D_NAME)

    def __arrow_ext_serialize__(self) -> bytes:
        return json.dumps((self.shape, "uint8")).encode()

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> Array3DType:
        return cls(json.loads(serialized)[0])


def hf_features(*, codec: str, labeled: bool, classes: Sequence[str] | None, variable: bool,
                meta: Sequence[tuple[str, str]] = (),
                array3d: Sequence[int] | None = None) -> dict[str, Any]:
    """The columns' Hugging Face features (``datasets.Features.to_dict()``'s form), in column
    order: jpeg/png images are ``Image`` (datasets decodes them); raw pixels are ``Array3D``
    of the stored shape when stored as one (`array3d`: the shape), else ``binary`` (the
    default layout, which the reader maps: ``np.frombuffer(row["image"],
    np.uint8).reshape(shape)`` with index.json's shape). Labels are a ``ClassLabel`` with the
    class names."""
    def value(dtype: str) -> dict[str, Any]:
        return {"dtype": dtype, "_type": "Value"}

    image = {"_type": "Image"} if codec != "raw" else value("binary") if array3d is None else \
        {"shape": list(array3d), "dtype": "uint8", "_type": "Array3D"}
    features: dict[str, Any] = {"key": value("string"), "image": image}
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


def arrow_schema(*, shape: Sequence[int] | None, labeled: bool,
                 meta: Sequence[tuple[str, str]] = (), codec: str = "raw",
                 classes: Sequence[str] | None = None, pixels: str = DEFAULT_PIXELS) -> pa.Schema:
    """A Parquet shard's Arrow schema: `shape` is (H, W, C) for fixed-shape raw images, else
    None (variable-size binary plus ``width``/``height``); `pixels` how fixed-shape raw pixels
    are stored (``bytes``: fixed_size_binary(H*W*C); ``array3d``: `Array3DType`); `meta`: CSV
    columns (name, type) appended, nullable, after the fixed ones. Its metadata holds the
    columns' Hugging Face features (`hf_features`; `codec` and `classes` decide the image's
    and label's)."""
    array3d = shape if shape is not None and pixels == "array3d" else None
    image = pa.field("image", ENCODED_IMAGE) if codec != "raw" else \
        pa.field("image", Array3DType(array3d)) if array3d is not None else \
        pa.field("image", pa.binary(math.prod(shape)) if shape else pa.binary(), nullable=False)
    fields: list[pa.Field] = [pa.field("key", pa.string(), nullable=False), image]
    if labeled:
        fields.append(pa.field("label", pa.int64()))  # nullable: what ClassLabel's field is
    fields += [pa.field(name, _FIXED[name][1], nullable=False) for name in METADATA_FIELDS[1:]]
    if shape is None:
        fields += [pa.field("width", pa.int32(), nullable=False),
                   pa.field("height", pa.int32(), nullable=False)]
    fields += [pa.field(name, META_TYPES[kind]) for name, kind in meta]
    features = hf_features(codec=codec, labeled=labeled, classes=classes,
                           variable=shape is None, meta=meta, array3d=array3d)
    return pa.schema(fields, metadata={HF_METADATA_KEY: json.dumps({"info": {"features": features}})})


def part_schema(schema: pa.Schema) -> pa.Schema:
    """The schema a shard's Arrow part files are written in: `schema` with an `Array3DType`
    image column as fixed_size_binary(H*W*C), so parts hold each image's bytes once (and an
    unregistered extension type never has to be read back from them); `array3d_column` turns
    it into the shard's column."""
    field = schema.field("image")
    if not isinstance(field.type, Array3DType):
        return schema
    return schema.set(schema.get_field_index("image"),
                      pa.field("image", pa.binary(math.prod(field.type.shape)), nullable=False))


def array3d_column(column: pa.ChunkedArray | pa.Array, kind: Array3DType) -> pa.Array:
    """A fixed_size_binary(H*W*C) column as `kind`'s nested lists, over the same bytes (the
    three offset arrays are the only new memory). Offsets are int32, as ``datasets``' type has
    them: a row group of a shard stays far below 2**31 pixel values."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    rows, (height, width, channels) = len(array), kind.shape
    pixels = height * width * channels
    nested: pa.Array = pa.Array.from_buffers(pa.uint8(), rows * pixels, [None, array.buffers()[1]],
                                             offset=array.offset * pixels)
    for count, step in ((rows * height * width, channels), (rows * height, width), (rows, height)):
        offsets = pa.array(np.arange(0, count * step + 1, step, dtype=np.int32))
        nested = pa.ListArray.from_arrays(offsets, nested)
    return pa.ExtensionArray.from_storage(kind, nested)


def array3d_pixels(column: pa.ChunkedArray | pa.Array, shape: Sequence[int]) -> np.ndarray:
    """[N,H,W,C] uint8 of an ``Array3D`` column (`Array3DType`, ``datasets``' own, or their
    storage type): a view of the values of a one-chunk column, else the chunks copied into
    one array (never concatenated as Arrow arrays, whose int32 offsets a large shard would
    overflow). ValueError when its type is not `ARRAY3D_STORAGE`, a list is null, or a
    list's length is not `shape`'s."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    dims = tuple(int(s) for s in shape)
    views = [_array3d_chunk(chunk, dims) for chunk in chunks]
    if len(views) == 1:
        return views[0]
    images = np.empty((sum(len(v) for v in views), *dims), dtype=np.uint8)
    at = 0
    for view in views:
        images[at:at + len(view)] = view
        at += len(view)
    return images


def _array3d_chunk(array: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if array.type != ARRAY3D_STORAGE:
        raise ValueError(f"the image column is {array.type}, not {ARRAY3D_STORAGE} (Array3D)")
    rows = len(array)
    if not rows:
        return np.zeros((0, *shape), dtype=np.uint8)
    for depth, size in enumerate(shape):
        if array.null_count:
            raise ValueError("the image column holds nulls")
        if np.any(np.diff(array.offsets.to_numpy()) != size):  # offsets of this slice, no copy
            raise ValueError(f"an image's dimension {depth} is not {size} as index.json's "
                             "shape says")
        array = array.flatten()  # the values this slice's lists cover
    if array.null_count:
        raise ValueError("the image column holds nulls")
    pixels: np.ndarray = array.to_numpy()  # zero-copy: uint8 with no nulls
    return pixels.reshape(rows, *shape)


def check_array3d_field(field: pa.Field, shape: Sequence[int]) -> None:
    """ValueError unless `field` declares ``datasets``' Array3D of `shape` and uint8: as an
    extension type (`Array3DType`, or ``datasets``' own where it is registered) or, read where
    it is not, as the extension name and metadata pyarrow leaves on the field. A wrong
    declaration still reads, but ``datasets`` refuses the file."""
    if isinstance(field.type, pa.ExtensionType):
        name, serialized = field.type.extension_name, field.type.__arrow_ext_serialize__()
    else:
        meta = field.metadata or {}
        name = meta.get(b"ARROW:extension:name", b"").decode("utf-8", "replace")
        serialized = meta.get(b"ARROW:extension:metadata", b"")
    try:
        declared = json.loads(serialized)
    except ValueError:
        declared = None
    if name != ARRAY3D_NAME or declared != [list(shape), "uint8"]:
        raise ValueError(f"the image column is declared {name or 'no extension'} "
                         f"{serialized[:80]!r}, not {ARRAY3D_NAME} of {list(shape)} uint8")


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
