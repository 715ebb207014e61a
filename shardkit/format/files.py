"""Files: atomic publication (write to a temporary name, fsync, rename, fsync the folder),
streamed hashing, the one check of a shard file against its index.json record, and the one
read-only mapping of a file (`map_read_only`).

A file under its final name is always complete: a crash leaves at worst a temporary file,
never a partial one under the final name (unlike click's atomic helper, an exception here
removes the temporary file and publishes nothing).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from shardkit.errors import CorruptShardError

if TYPE_CHECKING:
    from shardkit.format.manifest import ShardRecord

__all__ = ["CHUNK", "atomic_write_bytes", "check_shard", "copy_hashed", "fsync_dir", "hash_file",
           "map_read_only", "publish"]

#: The buffer size of every streamed copy and hash of shard bytes.
CHUNK = 4 * 1024 * 1024


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
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            total += count
    return total, digest.hexdigest()


def copy_hashed(sources: Iterable[str], out: BinaryIO, digest: hashlib._Hash) -> int:
    """Append each file in `sources` to `out`, feeding `digest`; return bytes copied."""
    buffer = bytearray(CHUNK)
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


def check_shard(path: str | os.PathLike[str], record: ShardRecord, *, verify: bool) -> None:
    """The one check of a shard file against its index.json record: CorruptShardError, naming
    the file, when it is missing, is not a regular file, has another size, or (with `verify`)
    another sha256. Other I/O errors (permissions...) raise CorruptShardError too."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CorruptShardError(f"{path}: missing (index.json lists it)") from None
    except OSError as exc:
        raise CorruptShardError(f"{path}: unreadable: {exc.strerror or exc}") from None
    if not os.path.isfile(path):
        raise CorruptShardError(f"{path}: not a regular file")
    if st.st_size != record.bytes:
        raise CorruptShardError(f"{path}: {st.st_size} bytes on disk, index.json says "
                                f"{record.bytes}")
    if verify:
        try:
            digest = hash_file(path)[1]
        except OSError as exc:
            raise CorruptShardError(f"{path}: unreadable: {exc.strerror or exc}") from None
        if digest != record.sha256:
            raise CorruptShardError(f"{path}: sha256 differs from index.json (corrupted)")


def map_read_only(handle: BinaryIO) -> mmap.mmap:
    """The whole file open in `handle`, mapped shared and read-only; where the system has
    MAP_POPULATE (Linux) its page tables are filled at once (the callers read all of it),
    and where it has no MAP_SHARED, mmap's portable read-only mapping.

    ValueError for an empty file (mmap maps none); other failures raise OSError. A file cut
    by another process while it is mapped ends this process with SIGBUS when a page past its
    new end is read: a limit of mapping a file, not one this function lifts."""
    if not hasattr(mmap, "MAP_SHARED"):
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ,
                     flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
