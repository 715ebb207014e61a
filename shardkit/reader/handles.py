"""Open shards for random-access batch assembly.

* Raw tar shards are memory-mapped; their images are one strided [N,H,W,C] view located by
  the manifest's layout and checked structurally on open (`shardkit.format.tar.RawView`).
* Raw Parquet shards are memory-mapped too: their image column is one [n,H,W,C] view per
  data page (`Pieces`), found by walking the page headers and checked against the footer and
  index.json on open (see `parquet.map_images`). A column stored any other way than bare
  (compressed, dictionary-encoded, Hugging Face's ``Array3D`` with ``config.pixels``...) is
  read once by pyarrow into an [N,H,W,C] array.
* jpeg/png shards keep their encoded payloads; a batch decodes the samples it needs.
  Raw shards of varying shapes hold one array per sample.

`ShardCache` keeps handles (least recently used first out) and opens the next ones in a
background thread, so a batch rarely waits for a shard.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from shardkit.config import DEFAULT_PIXELS
from shardkit.errors import ConfigError, CorruptShardError
from shardkit.format.files import check_shard
from shardkit.format.manifest import Manifest, ShardRecord
from shardkit.format.samples import (
    METADATA_FIELDS,
    TARGET_FIELD,
    check_labels,
    fields_from_json,
    image_payloads,
    member_order,
)
from shardkit.format.tar import RawView, member_label, member_meta
from shardkit.format.tar_members import iter_members
from shardkit.reader.decode import jpeg_headers
from shardkit.reader.gather import Pieces
from shardkit.reader.mapping import Lender, map_shard
from shardkit.reader.open_ahead import OpenAhead
from shardkit.reader.parquet import int64_values, map_images, read_parquet_shard, read_parquet_table
from shardkit.reader.targets import read_targets

__all__ = ["MAPPED_SHARDS", "ShardCache", "ShardHandle", "check_fields", "default_capacity",
           "metadata_fields", "open_shard"]


def metadata_fields(manifest: Manifest) -> tuple[str, ...]:
    """The fields a batch of this image dataset may carry: the standard ones, then an image
    CSV's columns in CSV order (its float targets come as ``label``)."""
    return METADATA_FIELDS + tuple(n for n, _ in manifest.csv_columns if n != TARGET_FIELD)


def check_fields(manifest: Manifest, fields: Sequence[str]) -> tuple[str, ...]:
    """`fields` as a tuple, when a batch of this dataset can carry them; else ConfigError
    listing the choices (none for a table)."""
    allowed = metadata_fields(manifest) if manifest.kind == "images" else ()
    unknown = set(fields) - set(allowed)
    if unknown:
        raise ConfigError(f"unknown fields {sorted(unknown)}; choose from {', '.join(allowed) or 'none'}")
    return tuple(fields)


class ShardHandle:
    """One opened shard: `images` (an [N,H,W,C] array, `Pieces`, or one array per sample when
    shapes vary), or `payloads` (stored jpeg/png files); `labels`; metadata read when asked.
    `lender`, when the images are views of the shard's mapping (`shardkit.reader.mapping`):
    what lends runs of them out as batches. `headers`: the payloads' `jpeg_headers` (jpeg
    shards)."""

    def __init__(self, *, path: str, images: np.ndarray | Pieces | list[np.ndarray] | None,
                 payloads: list[bytes] | None, labels: np.ndarray | None, metadata: Any,
                 lender: Lender | None = None, headers: np.ndarray | None = None) -> None:
        self.path = path
        self.images = images
        self.payloads = payloads
        self.headers = headers
        self.labels = labels
        self._metadata = metadata
        self.lender = lender

    def lend(self, local: np.ndarray) -> np.ndarray | None:
        """Images `local` (sorted) as a view of the mapping, for a batch to own, when they
        are consecutive and lie in one piece; else None (they are to be copied)."""
        if self.lender is None or not len(local) \
                or int(local[-1]) - int(local[0]) != len(local) - 1:
            return None
        first, end = int(local[0]), int(local[-1]) + 1
        images = self.images
        if isinstance(images, Pieces):
            piece = int(np.searchsorted(images.starts, first, side="right")) - 1
            if end > images.starts[piece + 1]:
                return None
            first, end = first - int(images.starts[piece]), end - int(images.starts[piece])
            images = images.arrays[piece]
        assert isinstance(images, np.ndarray)
        return self.lender.lend(images[first:end])

    def metadata(self, local: np.ndarray, field: str) -> list[Any]:
        values = self._metadata() if callable(self._metadata) else self._metadata
        self._metadata = values
        return [values[field][i] for i in local.tolist()]


def _columns(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    return {name: [row[name] for row in rows] for name in names}


def open_raw_tar(path: str, record: ShardRecord, shape: Sequence[int], classes: int | None,
                 fields: Sequence[str] = METADATA_FIELDS) -> ShardHandle:
    mapped = map_shard(path) if record.samples else None
    view = RawView(path, mapped if mapped is not None else b"", record, shape, classes)
    extra = fields[len(METADATA_FIELDS):]

    def metadata() -> dict[str, list[Any]]:
        return _columns([fields_from_json(key, meta, extra) for key, meta in view.metadata()], fields)

    return ShardHandle(path=path, images=view.images, payloads=None, labels=view.labels,
                       metadata=metadata, lender=Lender.of(mapped))


def open_parquet_raw(path: str, record: ShardRecord, shape: Sequence[int], labeled: bool,
                     fields: Sequence[str] = METADATA_FIELDS, *,
                     pixels: str = DEFAULT_PIXELS) -> ShardHandle:
    mapped = map_images(path, record, shape) if pixels == DEFAULT_PIXELS else None
    images: np.ndarray | Pieces
    labels: np.ndarray | None
    if mapped is None:  # a layout that cannot be mapped (compressed, Array3D): pyarrow copies it
        images, labels = read_parquet_shard(path, record.samples, shape, labeled, pixels=pixels)
    else:
        buffer, pages = mapped
        images = Pieces(pages)
        labels = int64_values(read_parquet_table(path, ["label"], record.samples).column("label")) \
            if labeled else None

    def metadata() -> dict[str, list[Any]]:
        meta = read_parquet_table(path, fields, record.samples)
        return {name: meta.column(name).to_pylist() for name in fields}

    return ShardHandle(path=path, images=images, payloads=None, labels=labels, metadata=metadata,
                       lender=Lender.of(buffer) if mapped is not None else None)


def open_encoded(path: str, record: ShardRecord, manifest: Manifest,
                 fields: Sequence[str]) -> ShardHandle:
    """jpeg/png shards (payloads kept encoded) and raw shards of varying shapes (one array
    per sample), tar or Parquet."""
    raw, labeled = manifest.codec == "raw", manifest.labeled
    stored: list[Any] = []
    labels: list[int] = []
    if manifest.format == "tar":
        rows: list[dict[str, Any]] = []
        order = member_order(manifest.codec, labeled)
        position, current = 0, ""
        for key, field, data in iter_members(path):
            if position == 0:
                current = key
            if key != current or field != order[position]:
                raise CorruptShardError(f"{path}: member {key}.{field} stands where sample "
                                        f"{current}'s .{order[position]} belongs")
            position = (position + 1) % len(order)
            if field == "cls":
                labels.append(member_label(path, key, data))
            elif field == "json":
                rows.append(fields_from_json(key, member_meta(path, key, data),
                                             fields[len(METADATA_FIELDS):]))
            else:
                stored.append(_npy(path, data) if raw else data)
        if position:
            raise CorruptShardError(f"{path}: sample {current} ends without its .{order[position]}")
        if len(rows) != record.samples:
            raise CorruptShardError(f"{path}: {len(rows)} .json members for {record.samples} samples")
        meta = _columns(rows, fields)
    else:
        columns = ["image", *fields, *(["label"] if labeled else []),
                   *(["width", "height"] if raw else [])]
        table = read_parquet_table(path, list(dict.fromkeys(columns)), record.samples)
        stored = image_payloads(table.column("image"))
        if raw:
            stored = [_pixels(path, data, h, w, manifest.channels) for data, h, w in zip(
                stored, table.column("height").to_pylist(), table.column("width").to_pylist(),
                strict=True)]
        labels = table.column("label").to_pylist() if labeled else []
        meta = {name: table.column(name).to_pylist() for name in fields}
    if len(stored) != record.samples or (labeled and len(labels) != record.samples):
        raise CorruptShardError(f"{path}: {len(stored)} samples, index.json says {record.samples}")
    return ShardHandle(path=path, images=stored if raw else None, payloads=None if raw else stored,
                       labels=np.asarray(labels, dtype=np.int64) if labeled else None, metadata=meta,
                       headers=jpeg_headers(stored) if manifest.codec == "jpeg" else None)


def _npy(path: str, data: bytes) -> np.ndarray:
    """A .npy member's uint8 H×W×C array (never unpickled)."""
    try:
        array: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptShardError(f"{path}: a .npy member does not load: {exc}") from None
    if array.dtype != np.uint8 or array.ndim != 3:
        raise CorruptShardError(f"{path}: a .npy member holds {array.dtype} {array.shape}")
    return array


def _pixels(path: str, data: bytes, height: int, width: int, channels: int) -> np.ndarray:
    if height * width * channels != len(data):
        raise CorruptShardError(f"{path}: an image of {len(data)} bytes is not "
                                f"{height}×{width}×{channels}")
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)


#: How many memory-mapped raw shards stay open by default. A mapping holds no memory of
#: its own (its pages are the page cache, which the kernel reclaims as it needs), so keeping
#: every shard of a dataset mapped costs address space, not RAM, and spares a dataset a little
#: larger than the read-ahead window from re-mapping every shard on every epoch (sequential
#: reads through an LRU cache that is one shard too small never hit).
MAPPED_SHARDS = 64


def default_capacity(manifest: Manifest, window: int | None) -> int:
    """Shards a ShardCache keeps open by default: the shuffle window + 2 (the shards being
    read and the next ones), or for memory-mapped shards up to MAPPED_SHARDS."""
    shards = len(manifest.shards)
    base = (window or shards) + 2
    return max(base, min(shards, MAPPED_SHARDS)) if manifest.mapped else base


def open_shard(folder: str, manifest: Manifest, number: int, *, verify: bool,
               fields: Sequence[str] = ()) -> ShardHandle:
    """Shard `number` of the image dataset in `folder`, checked against its record (size;
    sha256 with `verify`) and opened as the module docstring says. `fields`: the metadata
    fields its handle can give (default: the standard ones). Raises CorruptShardError."""
    record = manifest.shards[number]
    path = os.path.join(folder, record.file)
    check_shard(path, record, verify=verify)
    fields = METADATA_FIELDS + tuple(f for f in fields if f not in METADATA_FIELDS)
    shape = manifest.image_shape
    if manifest.codec != "raw" or shape is None:
        handle = open_encoded(path, record, manifest, fields)
    elif manifest.format == "tar":
        classes = len(manifest.classes) if manifest.classes is not None else None
        handle = open_raw_tar(path, record, shape, classes, fields)
    else:
        handle = open_parquet_raw(path, record, shape, manifest.labeled, fields,
                                  pixels=manifest.pixels)
    if manifest.targets:
        handle.labels = read_targets(path, record, manifest)
    check_labels(path, handle.labels, manifest.classes)
    return handle


class ShardCache(OpenAhead[ShardHandle]):
    """Opened shards of one image dataset (see `OpenAhead` and `open_shard`)."""

    def __init__(self, folder: str, manifest: Manifest, *, capacity: int, verify: bool) -> None:
        super().__init__(capacity)
        self.folder = folder
        self.manifest = manifest
        self.verify = verify
        self.fields = metadata_fields(manifest)

    def _load(self, number: int) -> ShardHandle:
        return open_shard(self.folder, self.manifest, number, verify=self.verify,
                          fields=self.fields)

    def _lent(self, opened: ShardHandle) -> bool:
        return opened.lender is not None and opened.lender.lent

    def _stale(self, opened: ShardHandle) -> bool:
        """A shard that lent batches serves another pass only as its file is (see
        `shardkit.reader.mapping`)."""
        return opened.lender is not None and not opened.lender.fresh()
