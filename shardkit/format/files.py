"""Atomic publication of files: write to a temporary name, fsync, rename, fsync the folder.

A file under its final name is always complete: a crash leaves at worst a temporary file,
never a partial one under the final name (unlike click's atomic helper, an exception here
removes the temporary file and publishes nothing).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_dir", "hash_file", "publish"]

_CHUNK = 4 * 1024 * 1024


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Atomically rename an already fsynced `tmp` onto `final` and make it durable."""
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        publish(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def hash_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in 4 MB chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            total += count
    return total, digest.hexdigest()
