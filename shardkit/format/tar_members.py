"""The member walk of a tar shard (`iter_members`), which every reader of a jpeg/png tar shard
and `shardkit verify` go through.

The file is mapped read-only and its headers are walked by offset arithmetic; every header's
checksum is checked at once with numpy before the first member is yielded. A shard holds
regular members named ``<key>.<field>`` (`shardkit.format.tar`'s layout), then zero bytes to
the end of the file.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np

from shardkit.errors import CorruptShardError, UnsafeContentError
from shardkit.format.files import map_read_only
from shardkit.format.tar import (
    BLOCK,
    CHECKSUM_FIELD,
    END_OF_ARCHIVE,
    KNOWN_FIELDS,
    NAME_FIELD,
    PREFIX,
    PREFIX_FIELD,
    SIZE_FIELD,
    TYPEFLAG,
)

__all__ = ["iter_members"]


def iter_members(path: str | os.PathLike[str]) -> Iterator[tuple[str, str, bytes]]:
    """Yield (key, field, data) for each member of the tar file at `path`, in order.

    Refuses (UnsafeContentError) anything a shard must not hold: links and other members
    that are not regular files (pax and GNU extended headers included: shardkit never writes
    them, and they would rename or resize the member after them), absolute or parent-relative
    or nested names, unknown fields. A damaged file raises CorruptShardError naming it and,
    for damage inside it, the offset: a header whose checksum is wrong, a truncated header, a
    member running past the end of the file, a byte that is not zero after the first zero
    block (which ends the archive), an empty file, not a tar at all. Every header is checked
    before the first member is yielded. An OSError opening the file passes through.

    Two cases end the archive without an error: a file that ends where a header would start
    (cut at a member boundary: readers compare the sample count with index.json), and a
    header with a wrong checksum that starts the file's last 1,024 bytes, after a member,
    where the end-of-archive marker belongs (nothing after it is read; verify reports the
    marker).

    A file truncated by another process while it is mapped ends this process with SIGBUS, as
    the raw path's mapping does: a limit of reading through a mapping, not one handled here.
    """
    with open(path, "rb") as handle:
        try:
            mapped = map_read_only(handle)
        except ValueError:  # mmap refuses an empty file
            raise CorruptShardError(f"{path}: not a readable tar file: empty file") from None
    # Only bytes copied out of `mapped` leave it (slices of an mmap are bytes): no view of it
    # is alive when it closes, which would raise BufferError over the real error.
    with mapped:
        for offset, size in _member_headers(path, mapped):
            name = _text(mapped[offset:offset + NAME_FIELD])
            if mapped[offset + PREFIX]:  # a ustar name in two fields: prefix "/" name
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


#: Type flags of a regular file: b"0", and b"\0" (pre-POSIX tars). Contiguous (b"7") and GNU
#: sparse (b"S") members are refused: shardkit writes neither.
_REGULAR = (ord("0"), 0)
_ZERO_BLOCK = bytes(BLOCK)
#: Never a header's checksum: stands for a checksum field that holds no number.
_NO_CHECKSUM = 1 << 40


def _member_headers(path: str | os.PathLike[str], data: mmap.mmap) -> list[tuple[int, int]]:
    """(offset, size) of every member header up to the first zero block or the end of the
    file, or up to and including the first one that is not a regular file (which the caller
    refuses), each header's checksum checked, and nothing but zeros after a zero block.
    Raises CorruptShardError (the cases are `iter_members`'s)."""
    headers: list[tuple[int, int]] = []
    end, offset, damage, zero = len(data), 0, "", -1
    while True:
        if offset + BLOCK > end:
            if offset < end:
                damage = f"truncated header at offset {offset}"
            break
        if data[offset] == 0 and data[offset:offset + BLOCK] == _ZERO_BLOCK:
            zero = offset
            break
        size = _number(data[offset + SIZE_FIELD.start:offset + SIZE_FIELD.stop])
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
        del headers[bad:]  # where the end-of-archive marker belongs: the end, nothing after it read
        damage, zero = "", -1
    elif bad is not None:  # before any other damage: a garbage header's fields mean nothing
        damage = f"bad checksum in the header at offset {headers[bad][0]}"
    elif zero >= 0 and (after := _first_nonzero(data, zero)) is not None:
        damage = f"the zero block at offset {zero} ends the archive, but data follows at offset {after}"
    if damage:
        raise CorruptShardError(f"{path}: not a readable tar file: {damage}")
    return headers


def _first_nonzero(data: mmap.mmap, start: int) -> int | None:
    """Offset of the first byte of `data` from `start` on that is not zero; None if none is."""
    rest = np.frombuffer(data, np.uint8, offset=start)
    try:
        return start + int(np.argmax(rest != 0)) if rest.any() else None
    finally:
        del rest  # a view of the mapping: none may outlive this call (see iter_members)


def _first_bad_checksum(data: mmap.mmap, offsets: list[int]) -> int | None:
    """Index in `offsets` of the first header whose checksum field holds neither sum tarfile
    accepts: the unsigned and the signed sum of the header's bytes, the field itself counted
    as eight spaces."""
    if not offsets:
        return None
    blocks = np.frombuffer(data, np.uint8, count=len(data) // BLOCK * BLOCK).reshape(-1, BLOCK)
    try:
        headers = blocks[np.asarray(offsets) // BLOCK]  # a copy, which holds no view of `data`
    finally:
        del blocks  # a view of the mapping: none may outlive this call (see iter_members)
    field = headers[:, CHECKSUM_FIELD]
    unsigned = (headers.sum(axis=1, dtype=np.int64) - field.sum(axis=1, dtype=np.int64)
                + 8 * ord(" "))
    # Fields as `checksum_bytes` writes them (six octal digits, a NUL, a space) are read at
    # once; any other as `_number` reads it.
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
