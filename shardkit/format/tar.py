"""Tar shards: the member layout, defined once for the writer, the reader and verify.

Each sample is a run of members sharing a key: ``<key>.npy`` (raw codec; numpy's .npy
format, never pickled) or ``<key>.jpg`` / ``<key>.png``, then ``<key>.cls`` (label as ASCII
digits, zero-padded to one width per dataset) when the dataset has labels, then
``<key>.json`` (metadata). Headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644,
USTAR) so the same samples give the same bytes. WebDataset reads these shards as they are.

For fixed-shape raw shards every sample occupies the same number of bytes: the JSON member is
padded with trailing spaces (valid JSON whitespace) to a whole number of blocks fixed per shard
from an upper bound computed at plan time. Sample ``i``'s pixels then start at
``i * stride + offset``; both numbers are in the shard's manifest record (`raw_layout`), and
`RawView` locates a whole shard's pixels and labels by that arithmetic alone.

Reading never unpickles anything. Readers of jpeg/png shards and verify walk the members with
`shardkit.format.tar_members.iter_members`, which refuses unsafe ones.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from shardkit.errors import CorruptShardError
from shardkit.format.manifest import ShardRecord

__all__ = [
    "BLOCK",
    "CHECKSUM_FIELD",
    "END_OF_ARCHIVE",
    "KNOWN_FIELDS",
    "NAME_FIELD",
    "NPY_MAGIC",
    "PREFIX",
    "PREFIX_FIELD",
    "SIZE_FIELD",
    "TYPEFLAG",
    "RawView",
    "checksum_bytes",
    "json_blocks",
    "label_digits",
    "member_label",
    "member_meta",
    "npy_header",
    "padding",
    "raw_layout",
    "sample_json",
    "tar_header",
]

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
#: The member extensions a shardkit tar shard may hold.
KNOWN_FIELDS = frozenset({"npy", "jpg", "png", "cls", "json"})
NPY_MAGIC = b"\x93NUMPY"
#: Offset of the type flag in a tar header; b"0" is a regular file.
TYPEFLAG = 156
#: A ustar header's name field (at offset 0), and its prefix field (joined before the name).
NAME_FIELD = 100
PREFIX, PREFIX_FIELD = 345, 155
#: A header's size field (a number of bytes) and checksum field (see `checksum_bytes`).
SIZE_FIELD = slice(124, 136)
CHECKSUM_FIELD = slice(148, 156)
#: Placeholder wide enough for any image dimension, used to bound JSON sizes at plan time.
_WIDEST_INT = 9_999_999_999


def tar_header(name: str, size: int) -> bytes:
    """The fixed USTAR header of a regular member (same bytes for the same name and size).

    The bytes are tarfile's own (`_tarfile_header`); the common case, an ASCII name of at
    most 100 bytes and a size under 8 GiB, is assembled here without building a TarInfo,
    which costs about as much per image as writing its pixels.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not encoded.isascii() or not 0 <= size < 0o77777777777:
        return _tarfile_header(name, size)
    size_field = b"%011o\0" % size
    head = encoded.ljust(100, b"\0") + _MODE_UID_GID + size_field
    checksum = _FIXED_SUM + sum(encoded) + sum(size_field)
    return head + _MTIME + checksum_bytes(checksum) + _AFTER_CHECKSUM


def checksum_bytes(checksum: int) -> bytes:
    """A header's checksum field as tarfile writes it: six octal digits, a NUL and a space.
    The checksum is the sum of the header's bytes, the field itself counted as eight spaces."""
    return b"%06o\0 " % checksum


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


# The fields of `tar_header` that do not depend on the name or size, as tarfile writes them.
_MODE_UID_GID = b"0000644\0" + b"0000000\0" + b"0000000\0"
_MTIME = b"00000000000\0"
_AFTER_CHECKSUM = (tarfile.REGTYPE + bytes(100) + tarfile.POSIX_MAGIC + bytes(64)
                   + bytes(16 + 155 + 12))  # user and group names, devices, prefix
_FIXED_SUM = sum(_MODE_UID_GID) + sum(_MTIME) + sum(b" " * 8) + sum(_AFTER_CHECKSUM)


def padding(size: int) -> bytes:
    """Zero bytes that bring a member of `size` bytes to a whole number of blocks."""
    return bytes(-size % BLOCK)


def npy_header(shape: Sequence[int]) -> bytes:
    """The .npy (version 1.0) header for a C-order uint8 array of `shape`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    )
    return buffer.getvalue()


def sample_json(source: str, class_name: str | None, width: int, height: int,
                extra: Iterable[tuple[str, Any]] = ()) -> bytes:
    """The metadata member: source path (relative to SRC), class name, original size (the
    sample fields ``orig_width``/``orig_height`` are stored as ``width``/``height``), and (CSV
    inputs) the row's other columns."""
    meta: dict[str, object] = {"source": source, "width": width, "height": height}
    if class_name is not None:
        meta["class"] = class_name
    meta.update(extra)
    # allow_nan=False: JSON has no Infinity or NaN, and a member with them is not JSON to any
    # strict reader (the sources turn them into null or a failed row first).
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def json_blocks(items: Iterable[tuple[str, str | None, tuple[tuple[str, Any], ...]]]) -> int:
    """Blocks every sample's JSON is padded to, from (source, class name, CSV columns) known
    at plan time."""
    longest = max((len(sample_json(s, c, _WIDEST_INT, _WIDEST_INT, m)) for s, c, m in items),
                  default=1)
    return max(1, math.ceil(longest / BLOCK))


def label_digits(classes: int) -> int:
    """Width of the zero-padded ``.cls`` text: every label of a dataset has the same width, so
    a reader can parse a shard's labels with array arithmetic (``int("007") == 7``)."""
    return len(str(max(classes - 1, 0)))


def raw_layout(shape: Sequence[int], classes: int | None, blocks: int) -> dict[str, int]:
    """Where fixed-shape raw samples keep their bytes (see the module docstring).

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


class RawView:
    """The one raw-tar opener: a fixed-shape raw shard located in `buffer` (a memory map or
    the bytes of the whole file) by its record's layout, and checked structurally (every
    sample's .npy magic and tar type flags, the label digits). Raises CorruptShardError.

    images: [N,H,W,C] uint8, a strided read-only view of `buffer` (no copy); labels: [N]
    int64 or None; `metadata()` parses the JSON members (key, source, orig_width,
    orig_height and `extra` CSV columns) when asked.
    """

    def __init__(self, path: str | os.PathLike[str], buffer: Any, record: ShardRecord,
                 shape: Sequence[int], classes: int | None) -> None:
        layout = check_raw_layout(path, record, shape, classes)
        n, stride = record.samples, layout["stride"]
        if record.bytes != n * stride + len(END_OF_ARCHIVE):
            raise CorruptShardError(f"{path}: {n} samples of {stride} bytes do not make "
                                    f"{record.bytes} bytes")
        flat = np.frombuffer(buffer, dtype=np.uint8) if n else np.zeros(stride, np.uint8)
        if len(flat) < n * stride:
            raise CorruptShardError(f"{path}: {len(flat)} bytes, index.json says {record.bytes}")
        self.path, self.layout, self.samples = str(path), layout, n
        self.rows = np.lib.stride_tricks.as_strided(flat, shape=(n, stride), strides=(stride, 1),
                                                    writeable=False)
        self._check_members()
        h, w, c = (int(v) for v in shape)
        self.images = np.lib.stride_tricks.as_strided(
            flat[layout["offset"]:], shape=(n, h, w, c), strides=(stride, w * c, c, 1),
            writeable=False)
        self.labels = self._labels() if "label_offset" in layout else None

    def _check_members(self) -> None:
        layout, rows = self.layout, self.rows
        headers = {"npy": 0, "json": layout["meta_offset"],
                   **({"cls": layout["label_offset"] - BLOCK} if "label_offset" in layout else {})}
        magic = np.frombuffer(NPY_MAGIC, dtype=np.uint8)
        if not (rows[:, BLOCK:BLOCK + len(magic)] == magic).all() or not all(
                (rows[:, h + TYPEFLAG] == ord("0")).all() for h in headers.values()):
            raise CorruptShardError(f"{self.path}: samples are not where index.json puts them "
                                    "(corrupted or not a shardkit shard)")
        self._check_names(headers)

    def _check_names(self, headers: dict[str, int]) -> None:
        """Every member named ``<key>.<field>`` (the npy, cls, json a sample's place holds),
        the key of one width, ASCII digits, the same for a sample's members, and no ustar
        prefix: what iter_members and verify ask of every other shard."""
        rows = self.rows
        if not len(rows):
            return
        width = bytes(rows[0, :NAME_FIELD]).find(b".")
        keys = rows[:, :max(width, 0)]
        bad = width < 6 or not ((keys >= ord("0")) & (keys <= ord("9"))).all()
        for field, h in headers.items():
            if bad:
                break
            tail = np.frombuffer(f".{field}".encode().ljust(NAME_FIELD - width, b"\0"), np.uint8)
            names = rows[:, h:h + NAME_FIELD]
            bad = not ((names[:, :width] == keys).all() and (names[:, width:] == tail).all()
                       and (rows[:, h + PREFIX:h + PREFIX + PREFIX_FIELD] == 0).all())
        if bad:
            raise CorruptShardError(f"{self.path}: a member is not named <key>.npy, .cls or .json "
                                    "as its place in the sample says (corrupted or not a shardkit "
                                    "shard)")

    def _labels(self) -> np.ndarray:
        start, digits = self.layout["label_offset"], self.layout["label_digits"]
        text = self.rows[:, start:start + digits].astype(np.int64) - ord("0")
        if ((text < 0) | (text > 9)).any():
            raise CorruptShardError(f"{self.path}: a .cls member does not hold {digits} digits")
        return text @ (10 ** np.arange(digits - 1, -1, -1, dtype=np.int64))

    def metadata(self) -> list[tuple[str, dict[str, Any]]]:
        """(key, parsed JSON member) of every sample. Raises CorruptShardError."""
        begin = self.layout["meta_offset"] + BLOCK
        keys = [bytes(row[:100]).split(b".", 1)[0].decode(errors="replace") for row in self.rows]
        return [(key, member_meta(self.path, key, bytes(row[begin:])))
                for key, row in zip(keys, self.rows, strict=True)]


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
