"""Open shards for random-access batch assembly, and gather batches out of them.

* Raw tar shards are memory-mapped; their images are one strided [N,H,W,C] view located by
  the manifest's layout, checked structurally on open (size, every sample's .npy magic and
  tar type flags, label digits). A batch costs one gather per shard it touches.
* Raw Parquet shards are memory-mapped too: their image column is one [n,H,W,C] view per
  data page (`Pieces`), found by walking the page headers and checked against the footer and
  index.json on open (see `parquet.map_images`). A column stored any other way than bare
  (compressed, dictionary-encoded...) is read once by pyarrow into an [N,H,W,C] array.
* jpeg/png shards keep their encoded payloads; a batch decodes the samples it needs
  (`shardkit.reader.decode`).

Handles are cached (least recently used first out) and the next ones are opened in a
background thread, so a batch rarely waits for a shard.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from shardkit.errors import ConfigError, CorruptShardError
from shardkit.format.manifest import Manifest, ShardRecord
from shardkit.format.tar import iter_members
from shardkit.reader.open_ahead import OpenAhead, check_size, map_shard
from shardkit.reader.parquet import int64_values, map_images, read_parquet_shard, read_parquet_table
from shardkit.reader.targets import has_targets, read_targets

__all__ = ["Pieces", "ShardCache", "ShardHandle", "check_fields", "default_capacity", "gather",
           "metadata_fields"]

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

    def __init__(self, *, path: str, images: np.ndarray | Pieces | None, payloads: list[bytes] | None,
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
    buffer = np.frombuffer(map_shard(path), dtype=np.uint8)
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
    pages = map_images(path, record, shape)
    images: np.ndarray | Pieces
    labels: np.ndarray | None
    if pages is None:  # a layout that cannot be mapped (compressed...): pyarrow copies it
        images, labels = read_parquet_shard(path, record.samples, shape, labeled)
    else:
        images = Pieces(pages)
        labels = int64_values(read_parquet_table(path, ["label"], record.samples).column("label")) \
            if labeled else None

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


_THREAD = threading.local()

# Shards are mapped read-only, and torch warns (once) when it wraps a read-only array. The
# tensors made here are only ever read (the source of a gather), so the warning says nothing
# to the user; it is silenced for this module's calls only, once, at import.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning, module=__name__)


class Pieces:
    """A shard's images as consecutive [n_i,H,W,C] arrays (say, one per Parquet data page),
    gathered from without joining them first.

    When the pieces are views of one flat uint8 buffer (a memory-mapped file) and torch is
    present, every image's byte offset in that buffer is known (`offsets`), and a shuffled
    batch is gathered from all the pieces with one `index_select` (see `gather`) instead of
    one call per piece.
    """

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = list(arrays)
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays], dtype=np.int64)
        self.offsets: np.ndarray | None = None
        self._rows: Any = None  # the buffer as overlapping rows, one starting at every byte
        base = self.arrays[0].base if self.arrays else None
        torch = _torch()
        if torch is None or not isinstance(base, np.ndarray) or base.ndim != 1 \
                or base.dtype != np.uint8 or not all(a.base is base and a.flags.c_contiguous
                                                     for a in self.arrays):
            return
        width = int(np.prod(self.arrays[0].shape[1:]))
        origin = _address(base)
        self.offsets = np.concatenate(
            [_address(a) - origin + width * np.arange(len(a), dtype=np.int64) for a in self.arrays])
        # Row k holds bytes k .. k+width-1, so row offsets[i] is image i. Only ever read.
        self._rows = torch.from_numpy(base).as_strided((len(base) - width + 1, width), (1, 1))

    def __len__(self) -> int:
        return int(self.starts[-1])


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def gather(images: np.ndarray | Pieces, local: np.ndarray, out: np.ndarray) -> None:
    """out[:] = images[local] with one copy: a slice copy for a run of consecutive samples,
    else torch's index_select when torch is present (numpy would copy twice). `local` is
    sorted (see `assign`), so with `Pieces` each piece's samples are one run of `out`."""
    if not len(local):
        return
    consecutive = int(local[-1]) - int(local[0]) == len(local) - 1
    torch = None if consecutive else _torch()
    if torch is not None:
        _one_thread(torch)
    if isinstance(images, Pieces):
        if torch is not None and images.offsets is not None:
            torch.index_select(images._rows, 0, torch.from_numpy(images.offsets[local]),
                               out=torch.from_numpy(out).view(len(local), -1))
            return
        cuts = np.searchsorted(local, images.starts).tolist()
        for piece, (begin, end) in enumerate(itertools.pairwise(cuts)):
            if end > begin:
                gather(images.arrays[piece], local[begin:end] - images.starts[piece],
                       out[begin:end])
        return
    if consecutive:
        np.copyto(out, images[int(local[0]):int(local[-1]) + 1])
    elif torch is None:
        out[...] = images[local]
    else:
        torch.index_select(torch.from_numpy(images), 0, torch.from_numpy(local),
                           out=torch.from_numpy(out))


def _one_thread(torch: Any) -> None:
    """Make torch's ops in this thread single-threaded: shardkit splits a batch's copies
    itself (`stream.Copier`), and torch's own threads would only add their spinning CPU time.

    torch.set_num_threads sets this thread's OpenMP count, but also the count that threads
    which have not run a torch op yet will take, and MKL's: that value is put back at once,
    from a short-lived thread, so the training thread's ops keep their threads.
    """
    if getattr(_THREAD, "single", False):
        return
    default = torch.get_num_threads()  # this thread's first op: the count new threads take
    torch.set_num_threads(1)
    restore = threading.Thread(target=torch.set_num_threads, args=(default,),
                               name="shardkit-threads")
    restore.start()
    restore.join()
    _THREAD.single = True


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


#: How many memory-mapped raw shards stay open by default. A mapping holds no memory of
#: its own (its pages are the page cache, which the kernel reclaims as it needs), so keeping
#: every shard of a dataset mapped costs address space, not RAM, and spares a dataset a little
#: larger than the read-ahead window from re-mapping every shard on every epoch (sequential
#: reads through an LRU cache that is one shard too small never hit).
MAPPED_SHARDS = 64


def default_capacity(manifest: Manifest, window: int | None) -> int:
    """Shards a ShardCache keeps open by default: the shuffle window + 2 (the shards being
    read and the next ones), or for memory-mapped shards (raw tar, raw Parquet with an
    uncompressed image column) up to MAPPED_SHARDS."""
    shards = len(manifest.shards)
    base = (window or shards) + 2
    shape = manifest.schema.get("image", {}).get("shape", [None])
    config = manifest.config
    mapped = config.get("format") == "tar" or (config.get("format") == "parquet"
                                               and config.get("compression") == "none")
    if mapped and config.get("codec") == "raw" and None not in shape:
        return max(base, min(shards, MAPPED_SHARDS))
    return base


class ShardCache(OpenAhead[ShardHandle]):
    """Opened shards of one dataset (see `OpenAhead`): raw shards memory-mapped (raw Parquet
    read into arrays when its image column cannot be mapped), jpeg/png kept encoded."""

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
