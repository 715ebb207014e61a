"""Helpers shared by the writers: hashing copies and durable temporary files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import BinaryIO

from shardkit.format.files import hash_file

__all__ = ["copy_hashed", "hash_file"]

_CHUNK = 4 * 1024 * 1024


def copy_hashed(sources: Iterable[str], out: BinaryIO, digest: hashlib._Hash) -> int:
    """Append each file in `sources` to `out`, feeding `digest`; return bytes copied."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    total = 0
    for source in sources:
        with open(source, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                chunk = view[:count]
                digest.update(chunk)
                out.write(chunk)
                total += count
    return total
