"""Tar shards that WebDataset reads as they are, laid out so a reader can find pixels by
arithmetic.

Each sample is a run of members sharing a key: ``<key>.npy`` (raw codec; numpy's .npy
format, never pickled) or ``<key>.jpg`` / ``<key>.png``, then ``<key>.cls`` (label as ASCII
digits, zero-padded to one width per dataset) when the dataset has labels, then
``<key>.json`` (metadata). Headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644,
USTAR) so the same samples give the same bytes.

For fixed-shape raw shards every sample occupies the same number of bytes: the JSON member is
padded with trailing spaces (valid JSON whitespace) to a whole number of blocks fixed per shard
from an upper bound computed at plan time. Sample ``i``'s pixels then start at
``i * stride + offset``; both numbers are written into the shard's manifest record.
"""

from __future__ import annotations

import hashlib
import math
import os
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

from shardkit.conversion.writers import EncodedSample
from shardkit.conversion.writers._common import copy_hashed
from shardkit.format.tar import BLOCK, label_digits, npy_header, raw_layout

__all__ = [
    "BLOCK",
    "END_OF_ARCHIVE",
    "TarPartWriter",
    "assemble_tar",
    "json_blocks",
    "label_digits",
    "npy_header",
    "raw_layout",
    "sample_json",
]

END_OF_ARCHIVE = bytes(2 * BLOCK)
#: Placeholder wide enough for any image dimension, used to bound JSON sizes at plan time.
_WIDEST_INT = 9_999_999_999
_PAYLOAD_EXT = {"raw": "npy", "jpeg": "jpg", "png": "png"}


def tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def sample_json(source: str, class_name: str | None, width: int, height: int,
                extra: Iterable[tuple[str, Any]] = ()) -> bytes:
    """The metadata member: source path (relative to SRC), class name, original size, and
    (CSV inputs) the row's other columns."""
    import json

    meta: dict[str, object] = {"source": source, "width": width, "height": height}
    if class_name is not None:
        meta["class"] = class_name
    meta.update(extra)
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def json_blocks(items: Iterable[tuple[str, str | None, tuple[tuple[str, Any], ...]]]) -> int:
    """Blocks every sample's JSON is padded to, from (source, class name, CSV columns) known
    at plan time."""
    longest = max((len(sample_json(s, c, _WIDEST_INT, _WIDEST_INT, m)) for s, c, m in items),
                  default=1)
    return max(1, math.ceil(longest / BLOCK))


class TarPartWriter:
    """Writes the members of consecutive samples (no end-of-archive marker) to a part file."""

    def __init__(self, path: str, *, codec: str, json_blocks: int, classes: int | None) -> None:
        self._handle: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._digits = label_digits(classes) if classes is not None else 0
        self._ext = _PAYLOAD_EXT[codec]
        self._json_size = json_blocks * BLOCK
        self._npy_headers: dict[tuple[int, int, int], bytes] = {}

    def add(self, sample: EncodedSample) -> None:
        write = self._handle.write
        if self._ext == "npy":
            header = self._npy_headers.get(sample.shape)
            if header is None:
                header = self._npy_headers[sample.shape] = npy_header(sample.shape)
            size = len(header) + len(sample.payload)
            write(tar_header(f"{sample.key}.npy", size))
            write(header)
        else:
            size = len(sample.payload)
            write(tar_header(f"{sample.key}.{self._ext}", size))
        write(sample.payload)
        write(_padding(size))
        if sample.label is not None:
            text = f"{sample.label:0{self._digits}d}".encode()
            write(tar_header(f"{sample.key}.cls", len(text)))
            write(text + _padding(len(text)))
        meta = sample_json(sample.source, sample.class_name, *sample.orig_size, sample.meta)
        if len(meta) > self._json_size:
            raise RuntimeError(f"metadata of {sample.key} outgrew its planned size")
        write(tar_header(f"{sample.key}.json", self._json_size))
        write(meta + b" " * (self._json_size - len(meta)))

    def close(self) -> None:
        self._handle.flush()
        self._handle.close()


def assemble_tar(parts: Sequence[str], tmp_path: str) -> tuple[int, str]:
    """Join part files and the end-of-archive marker into `tmp_path` (fsynced).

    Returns (bytes, sha256 hex) of the shard.
    """
    digest = hashlib.sha256()
    with open(tmp_path, "wb") as out:
        size = copy_hashed(parts, out, digest)
        out.write(END_OF_ARCHIVE)
        digest.update(END_OF_ARCHIVE)
        out.flush()
        os.fsync(out.fileno())
    return size + len(END_OF_ARCHIVE), digest.hexdigest()
