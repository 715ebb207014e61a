"""Read tar shards: whole-shard strided arrays for fixed-shape raw data, a checked member
walk for everything else. Nothing is ever unpickled; unsafe members are refused."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from shardkit.errors import CorruptShardError, UnsafeContentError
from shardkit.format.manifest import ShardRecord

__all__ = ["iter_members", "member_label", "member_meta", "read_raw_shard"]

#: The member extensions a shardkit tar shard may hold.
KNOWN_FIELDS = frozenset({"npy", "jpg", "png", "cls", "json"})
_NPY_MAGIC = np.frombuffer(b"\x93NUMPY", dtype=np.uint8)
_END = 1024


def read_raw_shard(path: str | os.PathLike[str], record: ShardRecord,
                   shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """(images [N,H,W,C] uint8, labels [N] int64 or None) of a fixed-shape raw tar shard.

    The shard is read with one ``readinto``; images are a strided view of that buffer.
    Raises CorruptShardError when its size or structure disagrees with `record`.
    """
    layout = record.layout
    if layout is None:
        raise CorruptShardError(f"{path}: index.json gives no fixed layout for this shard")
    n, stride, offset = record.samples, layout["stride"], layout["offset"]
    expected = n * stride + _END
    if record.bytes != expected:
        raise CorruptShardError(f"{path}: index.json says {record.bytes} bytes, but "
                                f"{n} samples of {stride} bytes need {expected}")
    buffer = np.empty(expected, dtype=np.uint8)
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != expected:
            raise CorruptShardError(f"{path}: {size} bytes on disk, index.json says {expected}")
        got = handle.readinto(buffer.data)
    if got != expected:
        raise CorruptShardError(f"{path}: short read ({got} of {expected} bytes)")
    rows = np.lib.stride_tricks.as_strided(buffer, shape=(n, stride), strides=(stride, 1))
    # Every sample starts with the .npy member's tar header; its data (the .npy magic) follows.
    if n and not (rows[:, 512:518] == _NPY_MAGIC).all():
        raise CorruptShardError(f"{path}: a sample's .npy member is not where index.json puts it")
    h, w, c = (int(v) for v in shape)
    images = np.lib.stride_tricks.as_strided(
        buffer[offset:], shape=(n, h, w, c), strides=(stride, w * c, c, 1), writeable=False
    )
    labels = None
    if "label_offset" in layout:
        start, digits = layout["label_offset"], layout["label_digits"]
        text = rows[:, start:start + digits].astype(np.int64) - ord("0")
        if n and ((text < 0) | (text > 9)).any():
            raise CorruptShardError(f"{path}: a .cls member does not hold {digits} digits")
        labels = text @ (10 ** np.arange(digits - 1, -1, -1, dtype=np.int64))
    return images, labels


def iter_members(path: str | os.PathLike[str]) -> Iterator[tuple[str, str, bytes]]:
    """Yield (key, field, data) for each member, refusing anything a shard must not hold:
    links and other non-regular members, absolute or parent-relative or nested names,
    unknown fields."""
    try:
        with tarfile.open(path, mode="r|") as archive:
            for member in archive:
                name = member.name
                if not member.isreg():
                    raise UnsafeContentError(f"{path}: member {name!r} is not a regular file")
                if name.startswith("/") or "/" in name or ".." in name or "\\" in name:
                    raise UnsafeContentError(f"{path}: member name {name!r} is not a plain key")
                key, _, field = name.partition(".")
                if field not in KNOWN_FIELDS:
                    raise UnsafeContentError(f"{path}: member {name!r} has an unknown field")
                handle = archive.extractfile(member)
                if handle is None:
                    raise UnsafeContentError(f"{path}: member {name!r} has no data")
                yield key, field, handle.read()
    except tarfile.TarError as exc:
        raise CorruptShardError(f"{path}: not a readable tar file: {exc}") from None


def member_label(path: str | os.PathLike[str], key: str, data: bytes) -> int:
    """The label a ``.cls`` member holds: ASCII digits. Raises CorruptShardError naming the file."""
    if not (data.isascii() and data.isdigit()):
        raise CorruptShardError(f"{path}: sample {key}: .cls {data[:20]!r} is not ASCII digits")
    return int(data)


def member_meta(path: str | os.PathLike[str], key: str, data: bytes) -> dict[str, Any]:
    """The metadata a ``.json`` member holds: an object with (at least) ``source``, ``width``
    and ``height``. Raises CorruptShardError naming the file."""
    try:
        meta = json.loads(data)
    except ValueError:
        raise CorruptShardError(f"{path}: sample {key}: .json is not valid JSON") from None
    if not (isinstance(meta, dict) and all(name in meta for name in ("source", "width", "height"))):
        raise CorruptShardError(f"{path}: sample {key}: .json lacks source, width or height")
    return meta
