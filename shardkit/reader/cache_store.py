"""The node-local shard cache on disk, shared by every process of a node through file locks.

Layout (docs/remote.md)::

    CACHE_DIR/
      .lock                        flock EX while making room and reserving space (short)
      <key>/                       key: sha256 of (dataset URL, sha256 of its index.json)[:32]
        dataset.json  index.json   what the folder holds, for people
        shards/shard-00000.tar     verified copies
        shards/.shard-00000.tar.part   a download in progress, preallocated to its full size
        locks/shard-00000.tar.pin  flock SH: a reader holds the shard; EX (non-blocking): evict
        locks/shard-00000.tar.get  flock EX: the one process downloading the shard

A copy appears under its final name only after its size and sha256, computed while it
streamed in, match index.json (then fsync and rename). Eviction deletes, least recently used
first, only copies no process holds a pin on and only files of this layout (``shards/`` of a
key folder); a ``.part`` file is deleted only when no process holds its ``.get`` lock, so a
crashed downloader's leftovers are cleaned up and a live one's never. flock locks are released
by the kernel when a process dies: no lock is ever stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from shardkit.errors import ConfigError
from shardkit.format.files import atomic_write_bytes, fsync_dir, publish
from shardkit.format.manifest import INDEX_NAME, ShardRecord
from shardkit.format.storage import Storage

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["CacheFolder", "cache_key", "cache_usage", "user_cache_dir"]

T = TypeVar("T")

_KEY = re.compile(r"^[0-9a-f]{32}$")


def user_cache_dir() -> str:
    """The platform's per-user cache folder + ``shardkit`` (XDG on Linux, ~/Library/Caches on
    macOS)."""
    import sys

    if sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "shardkit")


def cache_key(url: str, index_bytes: bytes) -> str:
    """The folder name of one dataset version: a dataset overwritten at the same URL (another
    index.json) gets another folder, so old copies are never served for it."""
    index_sha = hashlib.sha256(index_bytes).hexdigest()
    return hashlib.sha256(f"{url}\n{index_sha}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Entry:
    path: str
    lock: str  # the .pin lock of a copy, the .get lock of a .part file
    size: int
    mtime: float
    partial: bool


def _entries(root: str) -> Iterator[_Entry]:
    """Every copy and .part file under `root`'s key folders (nothing else is ours to count or
    delete)."""
    try:
        keys = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and _KEY.match(e.name)]
    except FileNotFoundError:
        return
    for key in keys:
        shards, locks = os.path.join(key.path, "shards"), os.path.join(key.path, "locks")
        try:
            files = list(os.scandir(shards))
        except FileNotFoundError:
            continue
        for entry in files:
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            partial = entry.name.startswith(".") and entry.name.endswith(".part")
            name = entry.name[1:-len(".part")] if partial else entry.name
            if entry.name.startswith(".") and not partial:
                continue
            lock = os.path.join(locks, name + (".get" if partial else ".pin"))
            yield _Entry(entry.path, lock, stat.st_size, stat.st_mtime, partial)


def cache_usage(root: str) -> int:
    """Bytes the cache at `root` holds (copies and reserved downloads)."""
    return sum(e.size for e in _entries(root))


def _try_exclusive(lock_path: str) -> int | None:
    """An fd holding `lock_path` exclusively, or None if someone holds it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@overload
def lock_fd(lock_path: str, mode: int) -> int: ...


@overload
def lock_fd(lock_path: str, mode: int, deadline: float,
            cancelled: Callable[[], bool] | None = None) -> int | None: ...


def lock_fd(lock_path: str, mode: int, deadline: float | None = None,
            cancelled: Callable[[], bool] | None = None) -> int | None:
    """An fd holding `lock_path` in `mode` (LOCK_SH/LOCK_EX). With a `deadline` (monotonic
    seconds) it polls: TimeoutError past the deadline rather than wait for ever, None as soon
    as `cancelled()` says so."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if deadline is None:
            fcntl.flock(fd, mode)
            return fd
        pause = 0.005
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if cancelled is not None and cancelled():
                    os.close(fd)
                    return None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock_path}: still locked by another process") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
    except BaseException:
        os.close(fd)
        raise


def unlock_fd(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class CacheFolder:
    """One dataset version's folder in the cache at `root`, with the space limit `limit`
    shared by every process using `root`."""

    def __init__(self, root: str, url: str, index_bytes: bytes, limit: int) -> None:
        if fcntl is None:  # pragma: no cover
            raise ConfigError("cache_dir: the shard cache needs POSIX file locks (fcntl)")
        self.root = os.path.abspath(root)
        self.limit = limit
        self.folder = os.path.join(self.root, cache_key(url, index_bytes))
        self.shards = os.path.join(self.folder, "shards")
        self.locks = os.path.join(self.folder, "locks")
        try:
            os.makedirs(self.shards, exist_ok=True)
            os.makedirs(self.locks, exist_ok=True)
            if not os.path.exists(os.path.join(self.folder, INDEX_NAME)):
                about = {"url": url, "index_sha256": hashlib.sha256(index_bytes).hexdigest()}
                atomic_write_bytes(os.path.join(self.folder, "dataset.json"),
                                   json.dumps(about, indent=1).encode() + b"\n")
                atomic_write_bytes(os.path.join(self.folder, INDEX_NAME), index_bytes)
        except OSError as exc:
            raise ConfigError(f"cache_dir {self.root}: cannot be used: {exc}") from None

    def sweep(self) -> int:
        """Delete the .part files of downloaders that died (no process holds their .get
        lock); the bytes freed."""
        freed = 0
        with self._whole_cache():
            for entry in _entries(self.root):
                if entry.partial and (fd := _try_exclusive(entry.lock)) is not None:
                    try:
                        Path(entry.path).unlink(missing_ok=True)
                        freed += entry.size
                    finally:
                        unlock_fd(fd)
        return freed

    def path(self, record: ShardRecord) -> str:
        return os.path.join(self.shards, record.file)

    def pin_lock(self, record: ShardRecord) -> str:
        return os.path.join(self.locks, record.file + ".pin")

    def get_lock(self, record: ShardRecord) -> str:
        return os.path.join(self.locks, record.file + ".get")

    def part(self, record: ShardRecord) -> str:
        return os.path.join(self.shards, f".{record.file}.part")

    def touch(self, record: ShardRecord) -> None:
        """Mark a copy as just used (its mtime orders eviction, for every process)."""
        with suppress(FileNotFoundError):
            os.utime(self.path(record))

    @contextmanager
    def _whole_cache(self) -> Iterator[None]:
        fd = lock_fd(os.path.join(self.root, ".lock"), fcntl.LOCK_EX)
        try:
            yield
        finally:
            unlock_fd(fd)

    def reserve(self, record: ShardRecord) -> int | None:
        """Make room for `record` by evicting unpinned copies (least recently used first) and
        leftover .part files, then create its .part file at full size: an open fd to write it,
        or None when the shards pinned now leave no room. The caller holds its .get lock."""
        with self._whole_cache():
            entries = list(_entries(self.root))
            used = sum(e.size for e in entries)
            victims = sorted((e for e in entries if e.path != self.part(record)),
                             key=lambda e: (not e.partial, e.mtime))
            for entry in victims:
                if used + record.bytes <= self.limit:
                    break
                fd = _try_exclusive(entry.lock)
                if fd is None:
                    continue  # pinned by a reader, or being downloaded
                try:
                    Path(entry.path).unlink(missing_ok=True)
                    used -= entry.size
                finally:
                    unlock_fd(fd)
            if used + record.bytes > self.limit:
                return None
            part = self.part(record)
            fd = _local(os.open, part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, where=part)
            try:
                _local(os.ftruncate, fd, record.bytes, where=part)
            except BaseException:
                os.close(fd)
                Path(part).unlink(missing_ok=True)
                raise
            return fd

    def download(self, storage: Storage, record: ShardRecord, fd: int,
                 cancelled: Callable[[], bool]) -> str | None:
        """Stream `record` into the reserved .part file `fd` (closed here), checking size and
        sha256 on the way, and rename it into place. None on success, else what was wrong
        (the .part file is then deleted). RemoteError / FileNotFoundError propagate."""
        digest = hashlib.sha256()
        got = 0
        part = self.part(record)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in storage.iter_chunks(record.file, record.bytes):
                    if cancelled():
                        Path(part).unlink(missing_ok=True)
                        return "cancelled"
                    digest.update(chunk)
                    _local(out.write, chunk, where=part)
                    got += len(chunk)
                if got == record.bytes and digest.hexdigest() == record.sha256:
                    _local(out.flush, where=part)
                    _local(os.fsync, out.fileno(), where=part)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
        if got != record.bytes:
            Path(part).unlink(missing_ok=True)
            return f"{got} bytes arrived, index.json says {record.bytes}"
        if digest.hexdigest() != record.sha256:
            Path(part).unlink(missing_ok=True)
            return "sha256 of the bytes that arrived differs from index.json"
        _local(publish, part, self.path(record), where=part)
        return None

    def discard(self, record: ShardRecord) -> None:
        """Delete a damaged copy and a leftover .part (caller holds the .get lock)."""
        Path(self.path(record)).unlink(missing_ok=True)
        Path(self.part(record)).unlink(missing_ok=True)
        fsync_dir(self.shards)


def _local(call: Callable[..., T], *args: Any, where: str) -> T:
    """`call(*args)`; an OSError of the cache's own disk (full, read-only, gone) becomes a
    ConfigError naming the file: the cache_dir cannot hold what it must."""
    try:
        return call(*args)
    except OSError as exc:
        raise ConfigError(f"cache_dir: cannot write {where}: {exc.strerror or exc}") from exc

