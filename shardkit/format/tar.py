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

Reading never unpickles anything, and `iter_members` refuses unsafe members.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from shardkit.errors import CorruptShardError, UnsafeContentError
from shardkit.format.manifest import ShardRecord

__all__ = [
    "BLOCK",
    "END_OF_ARCHIVE",
    "KNOWN_FIELDS",
    "NPY_MAGIC",
    "TYPEFLAG",
    "RawView",
    "iter_members",
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
#: Placeholder wide enough for any image dimension, used to bound JSON sizes at plan time.
_WIDEST_INT = 9_999_999_999


def tar_header(name: str, size: int) -> bytes:
    """The fixed USTAR header of a regular member (same bytes for the same name and size).

    The bytes are tarfile's own (`_tarfile_header`); the common case, an ASCII name of at
    most 100 bytes and a size under 8 GiB, is assembled here without building a TarInfo,
    which cost a conversion about as much per image as writing its pixels.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not encoded.isascii() or not 0 <= size < 0o77777777777:
        return _tarfile_header(name, size)
    size_field = b"%011o\0" % size
    head = encoded.ljust(100, b"\0") + _MODE_UID_GID + size_field
    checksum = _FIXED_SUM + sum(encoded) + sum(size_field)
    return head + _MTIME + b"%06o\0 " % checksum + _AFTER_CHECKSUM


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


def iter_members(path: str | os.PathLike[str]) -> Iterator[tuple[str, str, bytes]]:
    """Yield (key, field, data) for each member, up to the end-of-archive block.

    Refuses (UnsafeContentError) anything a shard must not hold: links and other members
    that are not regular files (pax and GNU extended headers included: shardkit never writes
    them, and tarfile applied them unasked), absolute or parent-relative or nested names,
    unknown fields. A damaged file (a header whose checksum is wrong, a truncated header, a
    member running past the end of the file, an empty file, not a tar at all) raises
    CorruptShardError naming it; an OSError opening it passes through.

    The file is mapped and walked by offset arithmetic, and every header's checksum is
    checked at once with numpy before the first member is yielded: tarfile parsed each header
    in Python, holding the GIL most of a second for a shard of 18,000 members.
    """
    with open(path, "rb") as handle:
        try:
            mapped = _map(handle)
        except ValueError:  # mmap refuses an empty file
            raise CorruptShardError(f"{path}: not a readable tar file: empty file") from None
    with mapped:
        for offset, size in _member_headers(path, mapped):
            name = _text(mapped[offset:offset + NAME_FIELD])
            if mapped[offset + PREFIX]:  # a ustar name split in two (tarfile's rule)
                name = f"{_text(mapped[offset + PREFIX:offset + PREFIX + PREFIX_FIELD])}/{name}"
            if mapped[offset + TYPEFLAG] not in _REGULAR:
                raise UnsafeContentError(f"{path}: member {name!r} is not a regular file")
            if name.startswith("/") or "/" in name or ".." in name or "\\" in name:
                raise UnsafeContentError(f"{path}: member name {name!r} is not a plain key")
            key, _, field = name.partition(".")
            if field not in KNOWN_FIELDS:
                raise UnsafeContentError(f"{path}: member {name!r} has an unknown field")
            start = offset + BLOCK
            yield key, field, mapped[start:start + size]


#: Type flags of a regular file: b"0", and b"\0" (pre-POSIX tars). tarfile also took "7"
#: (contiguous) and "S" (GNU sparse) for regular files; shardkit writes neither.
_REGULAR = (ord("0"), 0)
_ZERO_BLOCK = bytes(BLOCK)
#: A header's size and checksum fields.
_SIZE, _CHECKSUM, _CHECKSUM_END = 124, 148, 156
#: Never a header's checksum: stands for a checksum field that holds no number.
_NO_CHECKSUM = 1 << 40


def _map(handle: io.BufferedReader) -> mmap.mmap:
    """`handle`'s file mapped read-only; on Linux its pages are mapped at once (as
    `shardkit.reader.mapping` does): every member is copied out of it, so none is spared."""
    if hasattr(mmap, "MAP_POPULATE"):
        return mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                         prot=mmap.PROT_READ)
    return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _member_headers(path: str | os.PathLike[str], data: mmap.mmap) -> list[tuple[int, int]]:
    """(offset, size) of every member header up to the end-of-archive block, or up to and
    including the first one that is not a regular file (which the caller refuses), each
    header's checksum checked. Raises CorruptShardError.

    Where tarfile's stream mode met a bad header after the first (a wrong checksum, a number
    field that is not one, a truncated block), it silently took it for the end of the
    archive, and a shard cut or damaged there read as a shorter one; here that is
    CorruptShardError. But a bad header where a shard's end-of-archive blocks belong (the
    file's last two blocks, after a member) still ends the archive: no member is lost, and
    verify reports the marker. (In a file without the marker, a small last member whose
    header is damaged then goes unread, as with tarfile: readers count the samples.) As with
    tarfile, the first zero block ends the walk whatever follows it, and so does a file that
    ends exactly where a header would start.
    """
    headers: list[tuple[int, int]] = []
    end, offset, damage = len(data), 0, ""
    while True:
        if offset + BLOCK > end:
            if offset < end:
                damage = f"truncated header at offset {offset}"
            break
        if data[offset] == 0 and data[offset:offset + BLOCK] == _ZERO_BLOCK:
            break
        size = _number(data[offset + _SIZE:offset + _SIZE + 12])
        headers.append((offset, size if size is not None else -1))
        if size is None or size < 0:
            damage = f"invalid size field in the header at offset {offset}"
            break
        if data[offset + TYPEFLAG] not in _REGULAR:
            break
        offset += BLOCK + size + -size % BLOCK
        if offset > end:
            damage = (f"unexpected end of data: the member at offset {headers[-1][0]} ends at byte "
                      f"{offset}, the file has {end} bytes")
            break
    bad = _first_bad_checksum(data, [offset for offset, _ in headers])
    if bad is not None and 0 < headers[bad][0] == end - len(END_OF_ARCHIVE):
        del headers[bad:]  # the end of the archive, as tarfile took it; nothing after is read
        damage = ""
    elif bad is not None:  # before any other damage: a garbage header's fields mean nothing
        damage = f"bad checksum in the header at offset {headers[bad][0]}"
    if damage:
        raise CorruptShardError(f"{path}: not a readable tar file: {damage}")
    return headers


def _first_bad_checksum(data: mmap.mmap, offsets: list[int]) -> int | None:
    """Index in `offsets` of the first header whose checksum field holds neither sum tarfile
    accepts: the unsigned and the signed sum of the header's bytes, the field itself counted
    as eight spaces."""
    if not offsets:
        return None
    blocks = np.frombuffer(data, np.uint8, count=len(data) // BLOCK * BLOCK).reshape(-1, BLOCK)
    headers = blocks[np.asarray(offsets) // BLOCK]
    field = headers[:, _CHECKSUM:_CHECKSUM_END]
    unsigned = (headers.sum(axis=1, dtype=np.int64) - field.sum(axis=1, dtype=np.int64)
                + 8 * ord(" "))
    # tarfile writes the field as six octal digits, a NUL and a space: read those at once,
    # anything else as tarfile would.
    digits = field[:, :6].astype(np.int64) - ord("0")
    written = (((digits >= 0) & (digits < 8)).all(axis=1) & (field[:, 6] == 0)
               & (field[:, 7] == ord(" ")))
    stored = digits @ (8 ** np.arange(5, -1, -1, dtype=np.int64))
    for row in np.flatnonzero(~written):
        value = _number(field[row].tobytes())
        stored[row] = value if value is not None and abs(value) < _NO_CHECKSUM else _NO_CHECKSUM
    wrong = np.flatnonzero(stored != unsigned)
    if len(wrong):
        high = (headers[wrong] >= 0x80).sum(axis=1) - (field[wrong] >= 0x80).sum(axis=1)
        wrong = wrong[stored[wrong] != unsigned[wrong] - 0x100 * high]  # the signed sum
    return int(wrong[0]) if len(wrong) else None


def _number(field: bytes) -> int | None:
    """A header's number field as tarfile reads it: octal digits up to a NUL (spaces around
    them allowed, none at all meaning 0), or GNU base-256 after a first byte 0x80 (positive)
    or 0xff (negative). None for anything else."""
    if field[-1] == 0:  # as tarfile writes it: digits filling the field, then a NUL
        try:
            return int(field[:-1], 8)
        except ValueError:  # fewer digits, base-256, not a number: the general rule below
            pass
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    try:
        return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except ValueError:  # UnicodeDecodeError included
        return None


def _text(field: bytes) -> str:
    """A header's name or prefix field as tarfile decodes it (up to the first NUL)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


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
