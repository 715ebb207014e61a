"""Tar shards: where a fixed-shape raw sample keeps its members (`raw_layout`, which the
writer lays out and the reader checks index.json's layouts against), and reading them:
whole-shard strided arrays for fixed-shape raw data, a checked member walk for everything
else. Nothing is ever unpickled; unsafe members are refused."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from shardkit.errors import CorruptShardError, UnsafeContentError
from shardkit.format.manifest import ShardRecord

__all__ = ["BLOCK", "check_raw_layout", "iter_members", "label_digits", "member_label", "member_meta",
           "npy_header", "raw_layout", "read_raw_shard"]

#: The member extensions a shardkit tar shard may hold.
KNOWN_FIELDS = frozenset({"npy", "jpg", "png", "cls", "json"})
_NPY_MAGIC = np.frombuffer(b"\x93NUMPY", dtype=np.uint8)
BLOCK = 512
_END = 2 * BLOCK


def npy_header(shape: Sequence[int]) -> bytes:
    """The .npy (version 1.0) header for a C-order uint8 array of `shape`."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    )
    return buffer.getvalue()


def label_digits(classes: int) -> int:
    """Width of the zero-padded ``.cls`` text: every label of a dataset has the same width, so
    a reader can parse a shard's labels with array arithmetic (``int("007") == 7``)."""
    return len(str(max(classes - 1, 0)))


def raw_layout(shape: Sequence[int], classes: int | None, blocks: int) -> dict[str, int]:
    """Where fixed-shape raw samples keep their bytes (docs/format.md, "Fixed layout").

    Sample ``i`` starts at ``i * stride``; its pixels at ``+ offset``; its label's ASCII
    digits (``label_digits`` of them) at ``+ label_offset`` when `classes` is not None; its
    JSON member's header at ``+ meta_offset``.
    """
    header = len(npy_header(shape))
    payload = header + int(np.prod(shape))
    npy_span = BLOCK + payload + -payload % BLOCK
    layout = {"offset": BLOCK + header}
    stride = npy_span
    if classes is not None:
        layout["label_offset"] = npy_span + BLOCK
        layout["label_digits"] = label_digits(classes)
        stride += 2 * BLOCK
    layout["meta_offset"] = stride
    layout["stride"] = stride + BLOCK + blocks * BLOCK
    return layout


def check_raw_layout(path: str | os.PathLike[str], record: ShardRecord, shape: Sequence[int],
                     classes: int | None) -> dict[str, int]:
    """`record`'s layout, when it is the one `raw_layout` gives samples of `shape` with
    `classes` classes (None: unlabelled); else CorruptShardError naming the file. An intact
    shard read through a changed layout would give plausible wrong bytes (pixels one byte
    off, a .cls member's name for its digits): only this arithmetic tells."""
    layout = record.layout
    if layout is None:
        raise CorruptShardError(f"{path}: index.json gives no fixed layout for this shard")
    blocks = (layout.get("stride", 0) - layout.get("meta_offset", 0)) // BLOCK - 1
    expected = raw_layout(shape, classes, blocks)
    if blocks < 1 or layout != expected:
        wrong = sorted(k for k in {*layout, *expected} if layout.get(k) != expected.get(k))
        raise CorruptShardError(f"{path}: index.json's layout is not where samples of shape "
                                f"{tuple(shape)} keep their members ({', '.join(wrong)})")
    return layout


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
