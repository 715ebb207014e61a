"""Atomic publication of files: write to a temporary name, fsync, rename, fsync the folder.

A file under its final name is always complete: a crash leaves at worst a temporary file,
never a partial one under the final name (unlike click's atomic helper, an exception here
removes the temporary file and publishes nothing).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_dir", "publish"]


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
