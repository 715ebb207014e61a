"""Open shards for random-access batch assembly, and gather batches out of them.

* Raw tar shards are memory-mapped; their images are one strided [N,H,W,C] view located by
  the manifest's layout, checked structurally on open (size, every sample's .npy magic and
  tar type flags, label digits). A batch costs one gather per shard it touches.
* Raw Parquet shards: the image column is read once (one copy) into an [N,H,W,C] array.
* jpeg/png shards keep their encoded payloads; a batch decodes the samples it needs.

Handles are cached (least recently used first out) and the next ones are opened in a
background thread, so a batch rarely waits for a shard.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from shardkit.errors import ConfigError, CorruptShardError
from shardkit.manifest import Manifest, ShardRecord
from shardkit.reader.opened import OpenAhead, check_size
from shardkit.reader.parquet import fixed_images, read_parquet_table
from shardkit.reader.tar import iter_members
from shardkit.reader.targets import has_targets, read_targets

__all__ = ["ShardCache", "ShardHandle", "check_fields", "default_capacity", "gather", "metadata_fields"]

_NPY_MAGIC = np.frombuffer(b"\x93NUMPY", dtype=np.uint8)
_TYPEFLAG = 156  # offset of the type flag in a tar header
_METADATA = ("key", "source", "orig_width", "orig_height")


def metadata_fields(manifest: Manifest) -> tuple[str, ...]:
    """The fields a batch of this image dataset may carry: the standard ones, then an image
    CSV's metadata columns (schema entries with a ``csv_column``), in CSV order."""
    schema = manifest.schema
    extra = sorted((spec["csv_column"], name) for name, spec in schema.items()
                   if isinstance(spec, dict) and "csv_column" in spec and name != "target")
    return _METADATA + tuple(name for _, name in extra)


def check_fields(manifest: Manifest, fields: Sequence[str]) -> tuple[str, ...]:
    """`fields` as a tuple, when a batch of this dataset can carry them; else ConfigError
    listing the choices (none for a table)."""
    allowed = metadata_fields(manifest) if manifest.kind == "images" else ()
    unknown = set(fields) - set(allowed)
    if unknown:
        raise ConfigError(f"unknown fields {sorted(unknown)}; choose from {', '.join(allowed) or 'none'}")
    return tuple(fields)


class ShardHandle:
    """One opened shard: images (array or encoded payloads), labels, and lazy metadata."""

    def __init__(self, *, path: str, images: np.ndarray | None, payloads: list[bytes] | None,
                 labels: np.ndarray | None, metadata: Any) -> None:
        self.path = path
        self.images = images
        self.payloads = payloads
        self.labels = labels
        self._metadata = metadata

    def metadata(self, local: np.ndarray, field: str) -> list[Any]:
        values = self._metadata() if callable(self._metadata) else self._metadata
        self._metadata = values
        return [values[field][i] for i in local.tolist()]


def _map(path: str) -> mmap.mmap:
    """Map a shard read-only. On Linux the pages are populated at once (MAP_POPULATE): this
    runs in the prefetch thread, so the gathers in the hot loop take no page faults and a
    shard not yet in the page cache is read ahead in one go."""
    with open(path, "rb") as handle:
        if hasattr(mmap, "MAP_POPULATE"):
            return mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                             prot=mmap.PROT_READ)
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def open_raw_tar(path: str, record: ShardRecord, shape: Sequence[int],
                 extra: Sequence[str] = ()) -> ShardHandle:
    layout = record.layout
    if layout is None:
        raise CorruptShardError(f"{path}: index.json gives no layout for this raw shard")
    n, stride, offset = record.samples, layout["stride"], layout["offset"]
    if record.bytes != n * stride + 1024:
        raise CorruptShardError(f"{path}: {n} samples of {stride} bytes do not make "
                                f"{record.bytes} bytes")
    if n == 0:
        return ShardHandle(path=path, images=np.empty((0, *shape), np.uint8), payloads=None,
                           labels=np.empty(0, np.int64),
                           metadata={f: [] for f in (*_METADATA, *extra)})
    buffer = np.frombuffer(_map(path), dtype=np.uint8)
    rows = np.lib.stride_tricks.as_strided(buffer, shape=(n, stride), strides=(stride, 1),
                                           writeable=False)
    json_header = layout["meta_offset"]
    headers = [0, json_header] + ([layout["label_offset"] - 512] if "label_offset" in layout else [])
    if not (rows[:, 512:518] == _NPY_MAGIC).all() or not all(
            (rows[:, h + _TYPEFLAG] == ord("0")).all() for h in headers):
        raise CorruptShardError(f"{path}: samples are not where index.json puts them "
                                "(corrupted or not a shardkit shard)")
    h, w, c = (int(v) for v in shape)
    images = np.lib.stride_tricks.as_strided(buffer[offset:], shape=(n, h, w, c),
                                             strides=(stride, w * c, c, 1), writeable=False)
    labels = None
    if "label_offset" in layout:
        start, digits = layout["label_offset"], layout["label_digits"]
        text = rows[:, start:start + digits].astype(np.int64) - ord("0")
        if ((text < 0) | (text > 9)).any():
            raise CorruptShardError(f"{path}: a .cls member does not hold {digits} digits")
        labels = text @ (10 ** np.arange(digits - 1, -1, -1, dtype=np.int64))

    def metadata() -> dict[str, list[Any]]:
        begin = json_header + 512
        metas = [json.loads(bytes(row[begin:])) for row in rows]
        keys = [bytes(row[:100]).split(b".", 1)[0].decode() for row in rows]
        return {"key": keys, "source": [m["source"] for m in metas],
                "orig_width": [m["width"] for m in metas], "orig_height": [m["height"] for m in metas],
                **{name: [m.get(name) for m in metas] for name in extra}}

    return ShardHandle(path=path, images=images, payloads=None, labels=labels, metadata=metadata)


def open_parquet_raw(path: str, record: ShardRecord, shape: Sequence[int],
                     labeled: bool, extra: Sequence[str] = ()) -> ShardHandle:
    table = read_parquet_table(path, ["image", "label"] if labeled else ["image"], record.samples)
    images = fixed_images(table.column("image"), shape)
    labels = table.column("label").to_numpy() if labeled else None

    def metadata() -> dict[str, list[Any]]:
        names = [*_METADATA, *extra]
        meta = read_parquet_table(path, names, record.samples)
        return {name: meta.column(name).to_pylist() for name in names}

    return ShardHandle(path=path, images=images, payloads=None, labels=labels, metadata=metadata)


def open_encoded(path: str, record: ShardRecord, fmt: str, labeled: bool,
                 extra: Sequence[str] = ()) -> ShardHandle:
    payloads: list[bytes] = []
    labels: list[int] = []
    meta: dict[str, list[Any]] = {name: [] for name in (*_METADATA, *extra)}
    if fmt == "tar":
        for key, field, data in iter_members(path):
            if field == "cls":
                labels.append(int(data))
            elif field == "json":
                item = json.loads(data)
                meta["key"].append(key)
                meta["source"].append(item["source"])
                meta["orig_width"].append(item["width"])
                meta["orig_height"].append(item["height"])
                for name in extra:
                    meta[name].append(item.get(name))
            else:
                payloads.append(data)
    else:
        columns = ["image", *_METADATA, *extra] + (["label"] if labeled else [])
        table = read_parquet_table(path, columns, record.samples)
        payloads = table.column("image").to_pylist()
        labels = table.column("label").to_pylist() if labeled else []
        meta = {name: table.column(name).to_pylist() for name in (*_METADATA, *extra)}
    if len(payloads) != record.samples or (labeled and len(labels) != record.samples):
        raise CorruptShardError(f"{path}: {len(payloads)} samples, index.json says {record.samples}")
    return ShardHandle(path=path, images=None, payloads=payloads,
                       labels=np.asarray(labels, dtype=np.int64) if labeled else None, metadata=meta)


def decode_payload(data: bytes, codec: str, channels: int) -> np.ndarray:
    """H×W×C uint8 from a stored jpeg/png payload."""
    with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as im:
        array = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return array[:, :, None] if array.ndim == 2 else array


_THREAD = threading.local()


def gather(images: np.ndarray, local: np.ndarray, out: np.ndarray) -> None:
    """out[:] = images[local] with one copy: a slice copy for a run of consecutive samples,
    else torch's index_select when torch is present (numpy would copy twice)."""
    if len(local) and int(local[-1]) - int(local[0]) == len(local) - 1:
        np.copyto(out, images[int(local[0]):int(local[-1]) + 1])
        return
    torch = _torch()
    if torch is None:
        out[...] = images[local]
        return
    if not getattr(_THREAD, "single", False):
        # A copy gains nothing from more threads but their spinning CPU time. This is
        # thread-local: the training thread keeps its own setting.
        torch.set_num_threads(1)
        _THREAD.single = True
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory map: we never write it
        source = torch.from_numpy(images)
    torch.index_select(source, 0, torch.from_numpy(local), out=torch.from_numpy(out))


_TORCH: list[Any] = []


def _torch() -> Any:
    """torch when it is installed (its gather copies once), else None."""
    if not _TORCH:
        try:
            import torch as module
        except ImportError:
            module = None  # type: ignore[assignment]
        _TORCH.append(module)
    return _TORCH[0]


#: How many memory-mapped raw tar shards stay open by default. A mapping holds no memory of
#: its own (its pages are the page cache, which the kernel reclaims as it needs), so keeping
#: every shard of a dataset mapped costs address space, not RAM, and spares a dataset a little
#: larger than the read-ahead window from re-mapping every shard on every epoch (sequential
#: reads through an LRU cache that is one shard too small never hit).
MAPPED_SHARDS = 64


def default_capacity(manifest: Manifest, window: int | None) -> int:
    """Shards a ShardCache keeps open by default: the shuffle window + 2 (the shards being
    read and the next ones), or for memory-mapped raw tar shards up to MAPPED_SHARDS."""
    shards = len(manifest.shards)
    base = (window or shards) + 2
    shape = manifest.schema.get("image", {}).get("shape", [None])
    if manifest.config.get("format") == "tar" and manifest.config.get("codec") == "raw" \
            and None not in shape:
        return max(base, min(shards, MAPPED_SHARDS))
    return base


class ShardCache(OpenAhead[ShardHandle]):
    """Opened shards of one dataset (see `OpenAhead`): raw tar memory-mapped, raw Parquet read
    into arrays, jpeg/png kept encoded."""

    def __init__(self, folder: str, manifest: Manifest, *, capacity: int, verify: bool) -> None:
        super().__init__(capacity)
        self.folder = folder
        self.manifest = manifest
        self.verify = verify
        shape = manifest.schema["image"]["shape"]
        self.shape = None if None in shape else tuple(int(s) for s in shape)
        self.codec = str(manifest.config["codec"])
        self.format = str(manifest.config["format"])
        self.labeled = manifest.classes is not None
        self.extra = metadata_fields(manifest)[len(_METADATA):]
        #: Image CSVs with several label columns: K float targets per sample, as ``labels``.
        self.targets = len(manifest.config["csv"]["label_cols"]) if has_targets(manifest) else 0

    def _load(self, number: int) -> ShardHandle:
        record = self.manifest.shards[number]
        path = os.path.join(self.folder, record.file)
        check_size(path, record, self.verify)
        if self.codec == "raw" and self.shape is not None:
            if self.format == "tar":
                handle = open_raw_tar(path, record, self.shape, self.extra)
            else:
                handle = open_parquet_raw(path, record, self.shape, self.labeled, self.extra)
        else:
            handle = open_encoded(path, record, self.format, self.labeled, self.extra)
        if self.targets:
            handle.labels = read_targets(path, record, self.manifest)
        return handle
