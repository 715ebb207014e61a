"""Hugging Face datasets on disk as a source: a folder of Parquet files (what the Hub holds,
``data/train-00000-of-00001.parquet``, or ``Dataset.to_parquet``), one Parquet file, or a
``Dataset.save_to_disk`` folder (``state.json``, ``dataset_info.json``, Arrow stream files).

* SRC is such a dataset when it is a ``.parquet`` file, a folder with ``state.json`` and
  ``dataset_info.json``, or a folder holding Parquet files and no image files. A
  ``DatasetDict`` folder (``dataset_dict.json``) is refused with its splits named: SRC is one
  split's folder.
* Splits in a folder of Parquet files are read from the names as the Hub reads them
  (`split_of`): ``<split>-00000-of-00002.parquet``, or train/validation/test words (and
  their variants: valid, val, dev, eval...) in a folder or file name. A folder holding
  more than one is refused with the splits named, unless ``--hf-split NAME`` picks one:
  merged, the test rows would be trained on.
* The image column (``--image-col``, default ``image``) is an ``Image`` feature, stored as
  the struct {bytes, path}: the encoded file, or when bytes is null the file at path
  (absolute, or relative to the data file's folder); a plain binary column works too. Or it
  holds the pixels: an ``Array3D`` of uint8 (``--pixels array3d`` shards among them) or
  nested lists of uint8 (``Sequence(Sequence(Sequence(Value("uint8"))))``), each row H×W×C
  with C 1-4 (L, LA, RGB, RGBA), handed to the image pipeline as an uncompressed file
  (`_pixels_file`) so it is resized, composited and checked like any image; a null row is
  ``missing_image`` (as for an Image column), a row of another shape or with null lists or
  values that input's ``decode_error``. A data file whose rows cannot be read is
  ``unreadable`` for each of its rows the task holds.
* The label column (``--label-col``, default ``label`` when there is one): a ``ClassLabel``
  feature (the ``huggingface`` schema metadata, or dataset_info.json) gives its names as the
  classes, in order; other integers give classes ``"0"`` .. ``"max"``; strings their sorted
  distinct values; floats holding whole numbers (pandas' integers with nulls) count as
  integers. A null or NaN label, or ClassLabel's -1, is a ``missing_label`` listing failure;
  another negative number, a fraction or a number past the classes is ``bad_label``. A
  column of another type (lists: several labels) is an InputError naming the file.
* Order: the data files sorted by path (save_to_disk: state.json's order), rows in file
  order. A sample's ``source`` is ``<data file>:<row>``; other columns are not carried.
* Only pyarrow reads them: the ``datasets`` package is not needed. Conversion tasks read
  the image bytes of their rows (`read_images`); with ``--shuffle`` each task's rows come
  from all over the files, so leave the shuffling to the reader.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from shardkit.config import ConvertConfig, CsvOptions, HfOptions
from shardkit.conversion.images import IMAGE_EXTENSIONS, ImageFailure
from shardkit.conversion.sources.csv import source_config
from shardkit.conversion.sources.imagefolder import Listing
from shardkit.conversion.sources.records import InputRecord, RecordSpool, plan_failure
from shardkit.errors import ConfigError, InputError
from shardkit.format.manifest import INDEX_NAME
from shardkit.format.samples import PARQUET_ERRORS

__all__ = ["hf_source_config", "is_hf_source", "list_hf_dataset", "read_images", "resolve_source"]

_SAVED = ("state.json", "dataset_info.json")


def is_hf_source(src: str | os.PathLike[str]) -> bool:
    """True when `src` is a Hugging Face dataset on disk (see the module docstring)."""
    path = Path(src)
    if path.is_file():
        return path.suffix == ".parquet"
    if not path.is_dir():
        return False
    if all((path / n).is_file() for n in _SAVED) or (path / "dataset_dict.json").is_file():
        return True
    return bool(_parquet_files(path))


def _parquet_files(root: Path) -> list[Path]:
    """The Parquet files under `root`, sorted; none when it holds an image (an image folder:
    the first image ends the walk). Hidden folders and shardkit datasets (index.json) are
    passed over."""
    found = []
    for folder, dirs, files in os.walk(root):
        if INDEX_NAME in files:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            extension = os.path.splitext(name)[1].lower()
            if extension in IMAGE_EXTENSIONS:
                return []
            if extension == ".parquet" and not name.startswith("."):
                found.append(Path(folder) / name)
    return sorted(found, key=lambda p: p.as_posix())


def resolve_source(src: str | os.PathLike[str], config: ConvertConfig) -> ConvertConfig:
    """`config` with the source's options: Hugging Face (`hf_source_config`) or CSV/folder
    (`source_config`)."""
    if is_hf_source(src):
        return hf_source_config(src, config)
    if config.hf is not None:
        raise ConfigError(f"{src}: is not a Hugging Face dataset (Parquet files or a "
                          "save_to_disk folder)")
    return source_config(src, config)


def hf_source_config(src: str | os.PathLike[str], config: ConvertConfig) -> ConvertConfig:
    """`config` with `HfOptions` from ``--image-col``/``--label-col`` (CsvOptions' fields);
    the other CSV options are a ConfigError."""
    csv = config.csv or CsvOptions()
    plain = dataclasses.replace(csv, image_col=None, label_cols=())
    if plain != CsvOptions() or len(csv.label_cols) > 1:
        raise ConfigError(f"{src}: a Hugging Face dataset takes --image-col and one --label-col; "
                          "the other CSV options do not apply")
    hf = config.hf or HfOptions()
    if csv.image_col is not None:
        hf = dataclasses.replace(hf, image_col=csv.image_col)
    if csv.label_cols:
        hf = dataclasses.replace(hf, label_col=csv.label_cols[0])
    return dataclasses.replace(config, csv=None, hf=hf)


def list_hf_dataset(src: str | os.PathLike[str], options: HfOptions, *,
                    spill_dir: str | os.PathLike[str] | None = None) -> Listing:
    """The rows of the dataset `src` as input records (see the module docstring). Raises
    InputError naming the file for a missing column or an unusable column type."""
    root = Path(src)
    files, features = _data_files(root, options.split)
    image_col = options.image_col or "image"
    label_col = options.label_col
    listing = Listing(records=RecordSpool(spill_dir), classes=None, image_col=image_col)
    labels: list[Any] = []
    for path in files:
        schema = _schema(path)
        _check_image_column(path, schema, image_col)
        if label_col is None and options.label_col is None and path == files[0] and "label" in schema.names:
            label_col = "label"
        if label_col is not None:
            _check_label_column(path, schema, label_col)
        values = _column(path, label_col).to_pylist() if label_col else [None] * _rows(path)
        st = path.stat()
        name = path.relative_to(root).as_posix() if path != root else path.name
        listing.extra_inputs += ((name, st.st_size, st.st_mtime_ns),)
        for row, value in enumerate(values):
            labels.append(value)
            listing.records.append(InputRecord(path=str(path.absolute()), source=f"{name}:{row}",
                                               label=None, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                               row=row))
    if label_col is not None:
        _label(listing, labels, features.get(label_col), label_col)
    if not listing.records and not listing.failures:
        raise InputError(f"{root}: the dataset has no rows")
    return listing


def _check_label_column(path: Path, schema: pa.Schema, name: str) -> None:
    if name not in schema.names:
        raise InputError(f"{path}: no label column {name!r}; columns: {', '.join(schema.names)}")
    kind = schema.field(name).type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind)
            or pa.types.is_large_string(kind)):
        raise InputError(f"{path}: label column {name!r} is {kind}; a label is one class: an "
                         "integer (a ClassLabel among them) or a string")


def _whole(value: Any) -> Any:
    """A float label as the integer it stands for (pandas writes an integer column with
    nulls as floats); NaN is no label; a fraction stays as it is (a bad label)."""
    if isinstance(value, float):
        if value != value:
            return None
        return int(value) if value.is_integer() else value
    return value


def _label(listing: Listing, values: list[Any], feature: Any, column: str) -> None:
    """Labels and classes of `listing`'s records from the column's `values`."""
    values = [_whole(v) for v in values]
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        classes = [str(n) for n in feature["names"]]
    elif all(isinstance(v, str) for v in values if v is not None):
        classes = sorted({v for v in values if v is not None})
    else:
        top = max((v for v in values if isinstance(v, int)), default=-1)
        classes = [str(i) for i in range(top + 1)]
    index = {name: i for i, name in enumerate(classes)}
    kept = RecordSpool(listing.records.spill_dir)
    for record, value in zip(listing.records, values, strict=True):
        label = index.get(value) if isinstance(value, str) else value
        if not isinstance(label, int) or not 0 <= label < len(classes):
            listing.failures.append(plan_failure(
                record.source, "missing_label" if label is None or label == -1 else "bad_label",
                f"{column} is {value!r}, not one of {len(classes)} classes", record.row))
            continue
        kept.append(dataclasses.replace(record, label=int(label)))
    listing.records.close()
    listing.records, listing.classes = kept, classes


def _data_files(root: Path, split: str | None) -> tuple[list[Path], dict[str, Any]]:
    """The data files of `root` in order (those of `split` in a folder of Parquet files), and
    the features (from the first file's ``huggingface`` schema metadata, or
    dataset_info.json)."""
    if root.is_file():
        if split is not None:
            raise ConfigError(f"{root}: --hf-split picks a split of a folder; this is one file")
        return [root], _features(root)
    if (root / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in root.iterdir() if (p / "state.json").is_file())
        if split in splits:
            return _data_files(root / split, None)  # a saved DatasetDict: the split's folder
        raise InputError(f"{root}: is a DatasetDict; convert one of its splits (--hf-split NAME, "
                         f"or its folder): {', '.join(splits) or '(none found)'}")
    if all((root / n).is_file() for n in _SAVED):
        if split is not None:
            raise ConfigError(f"{root}: --hf-split picks a split of a folder; this save_to_disk "
                              "folder is one split")
        try:
            state = json.loads((root / "state.json").read_text())
            files = [root / f["filename"] for f in state["_data_files"]]
            info = json.loads((root / "dataset_info.json").read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{root}: unreadable save_to_disk metadata: {exc}") from None
        return files, info.get("features") or {}
    files = _one_split(root, _parquet_files(root), split)
    if not files:
        raise InputError(f"{root}: no Parquet files")
    return files, _features(files[0])


#: The split names the Hub reads in file and folder names, as `datasets` does: each word
#: stands for its split when set off by the start or end of a name or by ``- . _``, a space
#: or a digit (``train.parquet``, ``data/valid/0.parquet``, ``my_test_file.parquet``).
_SPLIT_WORDS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_WORD_SPLIT = re.compile(r"(?:^|[-._ 0-9])(" + "|".join(
    w for words in _SPLIT_WORDS.values() for w in words) + r")(?=$|[-._ 0-9])")
#: The Hub's own shard names: ``<split>-00000-of-00003.parquet``, any split name.
_HUB_SHARD = re.compile(r"^([\w.]+?)-\d{5}-of-\d{5}")


def split_of(relative: str) -> str | None:
    """The split a data file belongs to by its path below SRC, or None: a split word in a
    folder's name (`_SPLIT_WORDS`, the outermost first), else the Hub's shard name
    (``<split>-00000-of-00002.parquet``), else a split word in the file's own name."""
    *folders, name = relative.split("/")
    for folder in folders:
        if (word := _word_split(folder)) is not None:
            return word
    hub = _HUB_SHARD.match(name)
    return hub.group(1) if hub else _word_split(os.path.splitext(name)[0])


def _word_split(name: str) -> str | None:
    found = _WORD_SPLIT.search(name)
    return next(s for s, words in _SPLIT_WORDS.items() if found.group(1) in words) if found else None


def _one_split(root: Path, files: list[Path], split: str | None) -> list[Path]:
    """`files` of the split `split`; with None, all of them when they make one split. A folder
    of several splits is refused naming them: merged, test rows would train."""
    groups: dict[str | None, list[Path]] = {}
    for path in files:
        groups.setdefault(split_of(path.relative_to(root).as_posix()), []).append(path)
    if split is not None:
        wanted = split if split in groups else next(
            (s for s, words in _SPLIT_WORDS.items() if split in words), split)
        if wanted not in groups:
            raise InputError(f"{root}: no split {split!r}; it holds {_splits_text(root, groups)}")
        return groups[wanted]
    if len(groups) > 1:
        raise InputError(f"{root}: holds {_splits_text(root, groups)}; convert one split: "
                         "--hf-split NAME (hf_split=NAME)")
    return files


def _splits_text(root: Path, groups: dict[str | None, list[Path]]) -> str:
    def files(paths: list[Path]) -> str:
        return f"{len(paths)} file{'s' if len(paths) > 1 else ''}"
    named = [f"{s} ({files(p)})" for s, p in sorted((s, p) for s, p in groups.items() if s is not None)]
    text = "the splits " + ", ".join(named) if named else ""
    if None in groups:
        first = groups[None][0].relative_to(root).as_posix()
        text += (" and " if text else "") + f"{files(groups[None])} with no split in its name ({first}...)"
    return text


def _features(path: Path) -> dict[str, Any]:
    metadata = _schema(path).metadata or {}
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
    except (KeyError, ValueError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def _schema(path: Path) -> pa.Schema:
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path)
        return _arrow_table(path).schema
    except PARQUET_ERRORS as exc:
        raise InputError(f"{path}: not a readable Parquet/Arrow file: {exc}") from None


def _arrow_table(path: Path) -> pa.Table:
    # save_to_disk writes Arrow streams; read from a memory map, the table copies nothing.
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def _rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return int(pq.ParquetFile(path).metadata.num_rows)
    return int(_arrow_table(path).num_rows)


def _column(path: Path, name: str) -> pa.ChunkedArray:
    if path.suffix == ".parquet":
        return pq.read_table(path, columns=[name]).column(name)
    return _arrow_table(path).column(name)


def _check_image_column(path: Path, schema: pa.Schema, name: str) -> None:
    if name not in schema.names:
        raise InputError(f"{path}: no image column {name!r} (--image-col); columns: "
                         f"{', '.join(schema.names)}")
    kind = schema.field(name).type
    binary = (pa.types.is_binary(kind) or pa.types.is_large_binary(kind))
    if (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0) or _is_pixels(kind):
        return
    if not binary:
        raise InputError(f"{path}: column {name!r} is {kind}, not an Image feature "
                         "(struct {bytes, path}), binary, or pixels (an Array3D, or lists of "
                         "lists of lists, of uint8)")



def read_images(records: Sequence[InputRecord],
                column: str) -> list[tuple[bytes | None, str | None] | ImageFailure]:
    """(encoded bytes, path) of each record's image in `column` of its data file (or the
    ImageFailure of a pixel row that is no image, or of every row of a data file that cannot
    be read): one read per file and row group, whatever the number of records."""
    out: list[tuple[bytes | None, str | None] | ImageFailure] = [(None, None)] * len(records)
    by_file: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_file.setdefault(record.path, []).append(i)
    for file, members in by_file.items():
        rows = np.asarray([records[i].row or 0 for i in members], dtype=np.int64)
        found: list[tuple[bytes | None, str | None] | ImageFailure]
        try:
            taken = _take(Path(file), column, rows)
            taken.validate(full=True)  # Arrow files are read with light checks only
            found = [_pixels_file(taken, row) for row in range(len(taken))] if _is_pixels(taken.type) \
                else list(_files(taken.to_pylist(), os.path.dirname(file)))
        except PARQUET_ERRORS as exc:
            found = [ImageFailure("read", "unreadable", f"{os.path.basename(file)}: {exc}")] * len(members)
        for i, value in zip(members, found, strict=True):
            out[i] = value
    return out


def _files(values: list[Any], folder: str) -> list[tuple[bytes | None, str | None]]:
    """(bytes, path) of an Image/binary column's values: the struct's bytes, else its path
    (relative to the data file's `folder`)."""
    found: list[tuple[bytes | None, str | None]] = []
    for value in values:
        if isinstance(value, dict):
            data, where = value.get("bytes"), value.get("path")
            found.append((data, None if data is not None or where is None else os.path.join(folder, where)))
        else:
            found.append((value, None))
    return found


def _is_pixels(kind: pa.DataType) -> bool:
    """Pixels: an Array3D (``datasets``' extension type, ours, or read bare) or any three
    levels of lists (large or not, nullable or not) over uint8."""
    kind = kind.storage_type if isinstance(kind, pa.ExtensionType) else kind
    for _ in range(3):
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
            return False
        kind = kind.value_type
    return bool(kind == pa.uint8())


def _pixels_file(column: pa.Array, row: int) -> tuple[bytes | None, str | None] | ImageFailure:
    """Row `row` of a pixel column (`_is_pixels`) as the bytes of an uncompressed image file
    (PGM/PPM for 1 or 3 channels, TIFF for 2 or 4); (None, None) for a null row (the task's
    ``missing_image``, as for an Image column); the ImageFailure of a row that is not H×W×C
    uint8 with C 1-4."""
    lists = column.slice(row, 1)
    lists = lists.storage if isinstance(lists, pa.ExtensionArray) else lists
    if lists.null_count:
        return None, None
    dims = [0, 0, 0]
    for depth, (held, holds) in enumerate((("image", "rows"), ("row", "pixels"), ("pixel", "channels"))):
        if lists.null_count:
            return _bad_pixels(f"a {held} is null")
        if not len(lists):
            break  # an empty level above: the dimensions left stay 0
        lengths = lists.value_lengths().to_numpy(zero_copy_only=False)
        if lengths.min() != lengths.max():
            return _bad_pixels(f"its {holds} per {held} differ ({lengths.min()} to {lengths.max()})")
        dims[depth] = int(lengths[0])
        lists = lists.flatten()
    height, width, channels = dims
    if lists.null_count:
        return _bad_pixels("a pixel value is null")
    if not (height and width and 1 <= channels <= 4):
        return _bad_pixels(f"it is {height}x{width}x{channels}, not HxWxC with H, W > 0 and C 1-4")
    pixels = lists.to_numpy(zero_copy_only=False).reshape(height, width, channels)
    if channels in (1, 3):
        header = b"P%d\n%d %d\n255\n" % (5 if channels == 1 else 6, width, height)
        return header + pixels.tobytes(), None
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="LA" if channels == 2 else "RGBA").save(buffer, format="TIFF")
    return buffer.getvalue(), None


def _bad_pixels(why: str) -> ImageFailure:
    return ImageFailure("decode", "decode_error", f"the image column's pixels are no image: {why}")


def _take(path: Path, column: str, rows: np.ndarray) -> pa.Array:
    if path.suffix != ".parquet":
        return _arrow_table(path).column(column).take(pa.array(rows)).combine_chunks()
    handle = pq.ParquetFile(path)
    sizes = [handle.metadata.row_group(g).num_rows for g in range(handle.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
    table = handle.read_row_groups(groups.tolist(), columns=[column])
    first = {int(g): int(sum(sizes[int(h)] for h in groups[:k])) for k, g in enumerate(groups)}
    local = [first[int(g)] + int(r - starts[g]) for r, g in
             zip(rows, np.searchsorted(starts, rows, side="right") - 1, strict=True)]
    return table.column(column).take(pa.array(local, pa.int64())).combine_chunks()
