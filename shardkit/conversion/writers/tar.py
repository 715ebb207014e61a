"""Tar shard writer: encoded samples → part files of members → one shard with the end marker.

The layout (member order, fixed headers, padded JSON, fixed strides for raw samples) is
`shardkit.format.tar`'s; this module only writes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import BinaryIO

from shardkit.conversion.writers import EncodedSample
from shardkit.format.files import copy_hashed
from shardkit.format.samples import IMAGE_MEMBER
from shardkit.format.tar import (
    BLOCK,
    END_OF_ARCHIVE,
    label_digits,
    npy_header,
    padding,
    sample_json,
    tar_header,
)

__all__ = ["TarAssembly", "TarPartWriter", "assemble_tar"]


class TarPartWriter:
    """Writes the members of consecutive samples (no end-of-archive marker) to a part file."""

    def __init__(self, path: str, *, codec: str, json_blocks: int, classes: int | None) -> None:
        self._handle: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._digits = label_digits(classes) if classes is not None else 0
        self._ext = IMAGE_MEMBER[codec]
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
        write(padding(size))
        if sample.label is not None:
            text = f"{sample.label:0{self._digits}d}".encode()
            write(tar_header(f"{sample.key}.cls", len(text)))
            write(text + padding(len(text)))
        meta = sample_json(sample.source, sample.class_name, *sample.orig_size, sample.meta)
        if len(meta) > self._json_size:
            raise RuntimeError(f"metadata of {sample.key} outgrew its planned size")
        write(tar_header(f"{sample.key}.json", self._json_size))
        write(meta + b" " * (self._json_size - len(meta)))

    def close(self) -> None:
        self._handle.flush()
        self._handle.close()


class TarAssembly:
    """One shard joined from its part files, appended in order as they become available,
    then the end-of-archive marker (fsynced); the sha256 is taken on the way."""

    def __init__(self, tmp_path: str) -> None:
        self._out: BinaryIO = open(tmp_path, "wb")  # noqa: SIM115 - closed in finish()/close()
        self._digest = hashlib.sha256()
        self._size = 0

    def append(self, part: str) -> None:
        self._size += copy_hashed((part,), self._out, self._digest)

    def finish(self) -> tuple[int, str]:
        """Write the end marker, fsync and close; (bytes, sha256 hex) of the shard."""
        self._out.write(END_OF_ARCHIVE)
        self._digest.update(END_OF_ARCHIVE)
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        return self._size + len(END_OF_ARCHIVE), self._digest.hexdigest()

    def close(self) -> None:
        self._out.close()


def assemble_tar(parts: Sequence[str], tmp_path: str) -> tuple[int, str]:
    """Join part files and the end-of-archive marker into `tmp_path` (fsynced).

    Returns (bytes, sha256 hex) of the shard.
    """
    assembly = TarAssembly(tmp_path)
    try:
        for part in parts:
            assembly.append(part)
        return assembly.finish()
    finally:
        assembly.close()
