"""Tar shard writer: encoded samples → part files of members → one shard with the end marker;
or, for fixed-layout raw samples joined on this machine, the members written into the shard's
own file and placed there (`TarInPlace`).

The layout (member order, fixed headers, padded JSON, fixed strides for raw samples) is
`shardkit.format.tar`'s; this module only writes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import BinaryIO

from shardkit.conversion.writers import EncodedSample
from shardkit.format.files import CHUNK, copy_hashed
from shardkit.format.samples import IMAGE_MEMBER, member_order
from shardkit.format.tar import (
    BLOCK,
    END_OF_ARCHIVE,
    label_digits,
    npy_header,
    padding,
    sample_json,
    tar_header,
)

__all__ = ["TarAssembly", "TarInPlace", "TarPartWriter", "assemble_tar"]


class TarPartWriter:
    """Writes the members of consecutive samples (no end-of-archive marker) to a part file,
    or (`offset` >= 0) into an existing shard file from that byte on (`TarInPlace`)."""

    def __init__(self, path: str, *, codec: str, json_blocks: int, classes: int | None,
                 offset: int = -1) -> None:
        # closed in close()
        self._handle: BinaryIO = open(path, "r+b" if offset >= 0 else "wb")  # noqa: SIM115
        if offset >= 0:
            self._handle.seek(offset)
        self._start = max(offset, 0)
        self._digits = label_digits(classes) if classes is not None else 0
        self._ext = IMAGE_MEMBER[codec]
        self._json_size = json_blocks * BLOCK
        self._npy_headers: dict[tuple[int, int, int], bytes] = {}
        # The members of a sample, in the format's order (`member_order`, defined once).
        writers = {self._ext: self._image, "cls": self._label, "json": self._meta}
        self._members = [writers[field] for field in member_order(codec, classes is not None)]
        self.written = 0  # bytes, once closed

    def add(self, sample: EncodedSample) -> None:
        for member in self._members:
            member(sample)

    def _image(self, sample: EncodedSample) -> None:
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

    def _label(self, sample: EncodedSample) -> None:
        if sample.label is None:  # every input of a labelled dataset has one, or failed
            raise RuntimeError(f"sample {sample.key} of a labelled dataset has no label")
        text = f"{sample.label:0{self._digits}d}".encode()
        self._handle.write(tar_header(f"{sample.key}.cls", len(text)))
        self._handle.write(text + padding(len(text)))

    def _meta(self, sample: EncodedSample) -> None:
        meta = sample_json(sample.source, sample.class_name, *sample.orig_size, sample.meta)
        if len(meta) > self._json_size:
            raise RuntimeError(f"metadata of {sample.key} outgrew its planned size")
        self._handle.write(tar_header(f"{sample.key}.json", self._json_size))
        self._handle.write(meta + b" " * (self._json_size - len(meta)))

    def close(self) -> None:
        try:
            self._handle.flush()
            self.written = self._handle.tell() - self._start
        finally:
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


class TarInPlace:
    """One shard whose samples the part tasks wrote straight into its (pre-sized) file, each
    part from the offset it has when no sample before it failed: no part file, no copy.

    `place` takes the parts in order. A part behind a short one (a failed input) is moved
    down to follow it, so the shard has the same bytes as `TarAssembly` would join; the
    sha256 is taken on the way. `finish` cuts what the failures left at the end and writes
    the end-of-archive marker.
    """

    def __init__(self, tmp_path: str) -> None:
        self._path = tmp_path
        self._file = open(tmp_path, "r+b", buffering=0)  # noqa: SIM115 - closed in finish()/close()
        self._digest = hashlib.sha256()
        self._size = 0
        self._buffer = bytearray(CHUNK)

    def place(self, offset: int, nbytes: int) -> None:
        """Take the `nbytes` a part wrote from `offset`. Parts come in order and never start
        below the end so far (a part that did would have written over the one before it)."""
        if offset < self._size:
            raise ValueError(f"{self._path}: a part at byte {offset} overlaps the {self._size} "
                             f"bytes placed before it")
        view = memoryview(self._buffer)
        done = 0
        while done < nbytes:
            self._file.seek(offset + done)
            count = self._file.readinto(view[:min(len(view), nbytes - done)])
            if not count:
                raise OSError(f"{self._path}: {nbytes - done} bytes of a part are missing")
            chunk = view[:count]
            self._digest.update(chunk)
            if offset != self._size:  # behind a short part: move down (never overlapping ahead)
                self._write(chunk, self._size + done)
            done += count
        self._size += nbytes

    def finish(self) -> tuple[int, str]:
        """Cut, write the end marker, fsync and close; (bytes, sha256 hex) of the shard."""
        try:
            self._file.truncate(self._size)
            self._write(memoryview(END_OF_ARCHIVE), self._size)
            self._digest.update(END_OF_ARCHIVE)
            os.fsync(self._file.fileno())
        finally:
            self.close()
        return self._size + len(END_OF_ARCHIVE), self._digest.hexdigest()

    def _write(self, data: memoryview, at: int) -> None:
        self._file.seek(at)
        while data:  # an unbuffered write may take less than it is given (a full disk)
            written = self._file.write(data)
            if not written:
                raise OSError(f"{self._path}: the disk took none of {len(data)} bytes")
            data = data[written:]

    def close(self) -> None:
        self._file.close()


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
