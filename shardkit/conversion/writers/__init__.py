"""Shard writers: encoded samples → part files → one shard file.

A conversion task encodes a *part* (a run of consecutive samples of one shard) with a part
writer; once every part of a shard is done, `assemble` joins them into the shard's temporary
file and returns its size and sha256 (fixed-layout raw tar joined on this machine skips the
part files: `tar.TarInPlace`). The bytes of a shard depend only on its samples, never on how
they were split into parts, so the output is the same for any number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["EncodedSample"]


@dataclass(frozen=True, slots=True)
class EncodedSample:
    """One converted sample, ready to be written.

    payload: raw uint8 pixels (H×W×C, C-order) for the raw codec, else JPEG/PNG bytes.
    """

    key: str
    label: int | None
    class_name: str | None
    payload: bytes
    shape: tuple[int, int, int]
    source: str
    orig_size: tuple[int, int]
    #: CSV inputs: the row's other columns, (name, value) in CSV order.
    meta: tuple[tuple[str, Any], ...] = ()
