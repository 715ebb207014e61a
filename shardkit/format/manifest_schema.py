"""index.json validated completely on open (docs/format.md is the spec).

Every field that the reader, ``shardkit verify`` or ``shardkit info`` reads is checked here for
presence and type, so that a damaged manifest whose JSON still parses is one DatasetError
naming the file and the field (``index.json: shards[3].bytes is not a non-negative
integer``), never a KeyError or TypeError deep in a read.

The rules are tables. A dict is an object whose keys must all be present (a key ending in
``?`` may be absent; keys no rule names are allowed and ignored); `Is` is a test on one value,
`ListOf` a list, `Maybe` a value or null. `check_manifest` walks them for the dataset's kind,
then checks what ties fields together: the image shape against the config, a raw tar
shard's layout against the image size, a table's feature and label names against its columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardkit.config import (
    CODECS,
    COLOR_MODES,
    COMPRESSIONS,
    DEFAULT_PIXELS,
    FILTERS,
    FORMATS,
    PIXELS,
    RESIZE_MODES,
)
from shardkit.errors import DatasetError
from shardkit.format.samples import META_TYPES

__all__ = ["check_manifest", "valid_image_shape"]

_BLOCK = 512  # a tar header; a raw sample's .npy data (its magic first) follows one
_NPY_PREFIX = 10  # the magic, version and header length that start every .npy file
_MAX_INT = (1 << 63) - 1  # counts and offsets go through int64 arithmetic
_MAX_DIGITS = 18  # label digits that an int64 holds


@dataclass(frozen=True)
class Is:
    """A value that passes `test`; `what` names it in the message when it does not."""

    what: str
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class ListOf:
    """A list of values that each follow `item`, `size` of them when given."""

    item: Any
    size: int | None = None


@dataclass(frozen=True)
class Maybe:
    """Null, or a value that follows `rule`."""

    rule: Any


class _Bad(Exception):
    def __init__(self, at: str, problem: str) -> None:
        super().__init__(f"{at} {problem}")


def _natural(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT


def _one_of(*choices: str) -> Is:
    return Is(" or ".join(repr(c) for c in choices), lambda v: isinstance(v, str) and v in choices)


def valid_image_shape(shape: Any) -> bool:
    """[H, W, C] with positive H and W, or [null, null, C] (shapes vary); C is 1 or 3."""
    if not (isinstance(shape, list) and len(shape) == 3 and type(shape[2]) is int
            and shape[2] in (1, 3)):
        return False
    return shape[:2] == [None, None] or all(_natural(s) and s > 0 for s in shape[:2])


NATURAL = Is("a non-negative integer", _natural)
POSITIVE = Is("a positive integer", lambda v: _natural(v) and v > 0)
TEXT = Is("a string", lambda v: isinstance(v, str))
FLAG = Is("true or false", lambda v: isinstance(v, bool))
NUMBER = Is("a number", lambda v: type(v) in (int, float))
SHA256 = Is("64 lowercase hex digits",
            lambda v: isinstance(v, str) and len(v) == 64 and set(v) <= set("0123456789abcdef"))
FILE_NAME = Is("a plain file name", lambda v: isinstance(v, str) and bool(v) and not v.startswith(".")
               and not set(v) & set("/\\\0"))
IMAGE_SHAPE = Is("[H, W, C] or [null, null, C] with C 1 or 3", valid_image_shape)
FIELD = {"dtype": TEXT, "shape": ListOf(NATURAL)}

LAYOUT = {"stride": POSITIVE, "offset": NATURAL, "meta_offset": NATURAL,
          "label_offset?": NATURAL, "label_digits?": POSITIVE}
SHARD = {"file": FILE_NAME, "samples": NATURAL, "bytes": NATURAL, "sha256": SHA256, "layout?": LAYOUT}
TOP = {
    "format_version": NATURAL, "shardkit_version": TEXT, "kind": _one_of("images", "table"),
    "schema": {}, "config": {}, "classes": Maybe(ListOf(TEXT)), "class_counts": Maybe(ListOf(NATURAL)),
    "shards": ListOf(SHARD), "samples": NATURAL, "inputs": NATURAL, "failed": NATURAL,
    "fingerprint": SHA256, "extra?": {},
}

IMAGE_SCHEMA = {
    "image": {"dtype": _one_of("uint8"), "shape": IMAGE_SHAPE, "codec": _one_of(*CODECS),
              "layout": _one_of("HWC"), "member?": TEXT},
    "label?": FIELD, "key": FIELD, "source": FIELD, "orig_width": FIELD, "orig_height": FIELD,
    "parquet?": {"rows_per_group": POSITIVE},
}
# An image CSV's other columns, and `target`: a type the Parquet shards can hold.
CSV_FIELD = {**FIELD, "dtype": _one_of(*META_TYPES), "csv_column": NATURAL}
IMAGE_CONFIG = {
    "format": _one_of(*FORMATS), "codec": _one_of(*CODECS), "compression": _one_of(*COMPRESSIONS),
    "image": {"size": ListOf(POSITIVE, size=2), "resize": _one_of(*RESIZE_MODES),
              "mode": _one_of(*COLOR_MODES), "filter": _one_of(*FILTERS), "draft": FLAG},
    "seed": NATURAL, "shuffle": FLAG, "csv?": {"label_cols": ListOf(TEXT)},
    "pixels?": _one_of(*PIXELS),
}

COLUMN = {
    "name": TEXT, "role": _one_of("feature", "label", "text"),
    "dtype": _one_of("float32", "int64", "dictionary", "string"),
    "csv_kind": _one_of("int", "float", "string"), "categories?": ListOf(TEXT),
    "min": Maybe(NUMBER), "mean": Maybe(NUMBER), "max": Maybe(NUMBER), "nulls": NATURAL,
}
TABLE_SCHEMA = {
    "features": {"dtype": _one_of("float32"), "shape": ListOf(NATURAL, size=1), "names": ListOf(TEXT)},
    "columns": ListOf(COLUMN), "row": FIELD, "parquet": {"rows_per_group": POSITIVE},
    "label?": {"dtype": _one_of("int64", "float32"), "shape": ListOf(POSITIVE), "names": ListOf(TEXT)},
}
TABLE_CONFIG = {"format": _one_of("parquet"), "csv": {"label_cols": ListOf(TEXT)},
                "rows_per_shard": POSITIVE}


def check_manifest(data: dict[str, Any], where: str) -> None:
    """Raise DatasetError ``"{where}: {field} {problem}"`` at the first field of the parsed
    index.json `data` that is missing, of the wrong type, or at odds with another field."""
    try:
        _check(data, TOP, "")
        images = data["kind"] == "images"
        _check(data["schema"], IMAGE_SCHEMA if images else TABLE_SCHEMA, "", "schema")
        _check(data["config"], IMAGE_CONFIG if images else TABLE_CONFIG, "", "config")
        _check_counts(data)
        if images:
            _check_images(data)
        else:
            _check_table(data)
    except _Bad as exc:
        raise DatasetError(f"{where}: {exc}") from None


def _check(value: Any, rule: Any, at: str, key: str | int | None = None) -> None:
    """Check `value` (field `key` of the one at `at`; the path is only spelt out on error)."""
    if key is not None:
        at = f"{at}[{key}]" if isinstance(key, int) else f"{at}.{key}" if at else key
    if isinstance(rule, dict):
        if not isinstance(value, dict):
            raise _Bad(at, "is not an object")
        for name, item in rule.items():
            field = name.removesuffix("?")
            if field in value:
                if isinstance(item, Is):  # the common case, checked here without a call
                    if not item.test(value[field]):
                        raise _Bad(f"{at}.{field}" if at else field, f"is not {item.what}")
                else:
                    _check(value[field], item, at, field)
            elif field == name:
                raise _Bad(f"{at}.{field}" if at else field, "is missing")
    elif isinstance(rule, ListOf):
        if not isinstance(value, list):
            raise _Bad(at, "is not a list")
        if rule.size is not None and len(value) != rule.size:
            raise _Bad(at, f"has {len(value)} entries, not {rule.size}")
        for i, item in enumerate(value):
            _check(item, rule.item, at, i)
    elif isinstance(rule, Maybe):
        if value is not None:
            _check(value, rule.rule, at)
    elif not rule.test(value):
        raise _Bad(at, f"is not {rule.what}")


def _check_counts(data: dict[str, Any]) -> None:
    classes, counts = data["classes"], data["class_counts"]
    if counts is not None and (classes is None or len(counts) != len(classes)):
        raise _Bad("class_counts", "does not give one count per class")


def _check_images(data: dict[str, Any]) -> None:
    schema, config = data["schema"], data["config"]
    image, options = schema["image"], config["image"]
    for name, entry in schema.items():
        if not isinstance(entry, dict):
            raise _Bad(f"schema.{name}", "is not an object")
        if "csv_column" in entry:
            _check(entry, CSV_FIELD, "schema", name)
    if image["codec"] != config["codec"]:
        raise _Bad("schema.image.codec", f"is {image['codec']!r}, config.codec {config['codec']!r}")
    width, height = options["size"]
    channels = 3 if options["mode"] == "RGB" else 1
    shape = [None, None, channels] if options["resize"] == "shorter-side" else [height, width, channels]
    if image["shape"] != shape:
        raise _Bad("schema.image.shape", f"is {image['shape']}, config.image makes {shape}")
    labelled = data["classes"] is not None
    if ("label" in schema) != labelled:
        raise _Bad("schema.label", "is missing" if labelled else "is there, but classes is null")
    tar = config["format"] == "tar"
    for needed, at in ((not tar, "schema.parquet"), (tar, "schema.image.member"),
                       ("target" in schema, "config.csv")):
        parent, _, name = at.rpartition(".")
        if needed and name not in _at(data, parent):
            raise _Bad(at, "is missing")
    if "csv" in config:  # an image CSV: one label column gives classes or (fractions) a
        # target, several give targets
        count, targets = len(config["csv"]["label_cols"]), "target" in schema
        if (targets and count == 0) or (not targets and count > 1):
            raise _Bad("schema.target", f"is {'there' if targets else 'missing'}, but "
                                        f"config.csv.label_cols names {count} columns")
        if labelled != (count == 1 and not targets):
            raise _Bad("classes", f"is {'there' if labelled else 'null'}, but "
                                  f"config.csv.label_cols names {count} columns"
                                  + (" and schema.target is there" if targets else ""))
    if config.get("pixels", DEFAULT_PIXELS) != DEFAULT_PIXELS and (
            tar or config["codec"] != "raw" or None in shape):
        raise _Bad("config.pixels", f"is {config['pixels']!r}, which only raw Parquet shards of "
                                    "one shape hold")
    if tar and config["codec"] == "raw" and None not in shape:
        pixels = math.prod(image["shape"])
        for i, record in enumerate(data["shards"]):
            _check_layout(record.get("layout"), f"shards[{i}].layout", pixels, labelled)


def _at(data: dict[str, Any], path: str) -> Any:
    for name in path.split("."):
        data = data[name]
    return data


def _check_layout(layout: dict[str, int] | None, at: str, pixels: int, labelled: bool) -> None:
    """A raw tar sample's members must lie inside its `stride` bytes, where the reader looks
    for them: the .npy data (magic, header, pixels), the .cls digits, the .json header."""
    if layout is None:
        raise _Bad(at, "is missing (a raw tar shard has one)")
    for name in ("label_offset", "label_digits"):
        if (name in layout) != labelled:
            raise _Bad(f"{at}.{name}", "is missing" if labelled else "is there, but classes is null")
    stride, offset = layout["stride"], layout["offset"]
    spans = [(_BLOCK, offset - _BLOCK + pixels), (layout["meta_offset"], 2 * _BLOCK)]
    if labelled:
        spans.append((layout["label_offset"] - _BLOCK, _BLOCK + layout["label_digits"]))
    if offset < _BLOCK + _NPY_PREFIX or layout.get("label_digits", 1) > _MAX_DIGITS or any(
            start < 0 or start + size > stride for start, size in spans):
        raise _Bad(at, f"{layout} puts a member outside the sample's {stride} bytes")


def _check_table(data: dict[str, Any]) -> None:
    schema = data["schema"]
    columns: dict[str, dict[str, Any]] = {}
    for j, column in enumerate(schema["columns"]):
        if column["name"] in columns:
            raise _Bad(f"schema.columns[{j}].name", f"{column['name']!r} is listed twice")
        if (column["dtype"] == "dictionary") != ("categories" in column):
            raise _Bad(f"schema.columns[{j}]", "has categories without dtype 'dictionary', or "
                                               "the other way round")
        if column.get("categories", []) != sorted(set(column.get("categories", []))):
            raise _Bad(f"schema.columns[{j}].categories", "are not sorted distinct values")
        columns[column["name"]] = column
    features, label = schema["features"], schema.get("label")
    label_cols = data["config"]["csv"]["label_cols"]
    if (label["names"] if label else []) != label_cols:
        raise _Bad("schema.label", f"names {label['names'] if label else 'no column'}, "
                                   f"config.csv.label_cols {label_cols}")
    if features["shape"] != [len(features["names"])]:
        raise _Bad("schema.features.shape", f"is {features['shape']}, not [{len(features['names'])}]")
    _check_roles(features["names"], columns, "feature", ("float32", "int64", "dictionary"))
    if label is not None:
        _check_roles(label["names"], columns, "label", ("float32", "int64"))
        many = len(label["names"]) > 1
        if not label["names"] or label["shape"] != ([len(label["names"])] if many else []):
            raise _Bad("schema.label.shape", f"is {label['shape']} for {len(label['names'])} names")
    if data["classes"] is not None and (label is None or label["dtype"] != "int64"
                                        or len(label["names"]) != 1):
        raise _Bad("classes", "names classes, but the label is not one int64 column")


def _check_roles(names: list[str], columns: dict[str, dict[str, Any]], role: str,
                 dtypes: tuple[str, ...]) -> None:
    for k, name in enumerate(names):
        column = columns.get(name)
        if column is None or column["role"] != role or column["dtype"] not in dtypes:
            raise _Bad(f"schema.{'features' if role == 'feature' else role}.names[{k}]",
                       f"{name!r} is not a {role} column of schema.columns")
