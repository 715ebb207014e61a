"""Reading a remote dataset through the node-local shard cache (cache_store.py has the layout).

`RemoteCache` is what the reader holds per process: `path(k)` blocks until a verified local
copy of shard k exists and pins it (no process evicts it) until `release(k)`; `announce(seq)`
gives the shard sequence this rank will read, and background threads download the next
`prefetch_shards` of it while the reader works on the current one. Ranks and DataLoader
workers on a node share the cache folder: each shard is downloaded once per node.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from shardkit.config.common import check_count
from shardkit.errors import ConfigError, CorruptShardError, RemoteError
from shardkit.format.files import check_shard
from shardkit.format.manifest import Manifest, ShardRecord
from shardkit.format.storage import RetryPolicy, Storage, open_storage, read_index
from shardkit.reader.cache_store import CacheFolder, cache_usage, lock_fd, unlock_fd, user_cache_dir

__all__ = ["AHEAD_BYTES", "FREE_FRACTION", "RemoteCache", "default_prefetch"]

#: Default look-ahead in bytes: enough shards downloading at once that each request's latency
#: overlaps the others' transfers, so throughput is set by bandwidth (2 to 16 shards).
AHEAD_BYTES = 1 << 30
#: Default cache_limit: this fraction of the space free where the cache lives (plus what the
#: cache already holds), leaving the rest for checkpoints and logs.
FREE_FRACTION = 0.5
_MAX_THREADS = 8


@dataclass
class _Pin:
    fd: int
    readers: int
    prefetched: bool


class RemoteCache:
    """Verified local copies of one dataset version's shards.

    `storage`, `manifest` and `index_bytes` come from `open_storage` + `read_index` (or use
    `RemoteCache.open(url)`). `cache_dir` defaults to the user's cache folder; `cache_limit`
    (bytes, shared by every process using `cache_dir`) to FREE_FRACTION of the free space;
    `prefetch_shards` to AHEAD_BYTES worth of shards. `held` is how many shards the reader
    keeps pinned at once. A limit below (prefetch_shards + held) × the largest shard is a
    ConfigError up front. A shard that arrives with the wrong size or sha256 is fetched again,
    `download_attempts` times in all, then CorruptShardError names its URL; transport failures
    past the storage's retry budget are RemoteError. Create it in the process that uses it
    (DataLoader workers each make their own)."""

    def __init__(self, storage: Storage, manifest: Manifest, index_bytes: bytes, *,
                 cache_dir: str | os.PathLike[str] | None = None, cache_limit: int | None = None,
                 prefetch_shards: int | None = None, held: int = 2, verify: bool = False,
                 download_attempts: int = 3, room_wait: float = 300.0) -> None:
        cache_limit = None if cache_limit is None else check_count("cache_limit", cache_limit, 1)
        if prefetch_shards is not None:
            prefetch_shards = check_count("prefetch_shards", prefetch_shards, 0)
        held = check_count("held", held, 1)
        download_attempts = check_count("download_attempts", download_attempts, 1)
        self.storage, self.manifest, self.verify = storage, manifest, verify
        self.download_attempts, self.room_wait = download_attempts, room_wait
        root = os.path.abspath(os.fspath(cache_dir) if cache_dir is not None else user_cache_dir())
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cache_dir {root}: cannot be created: {exc}") from None
        largest = max((s.bytes for s in manifest.shards), default=0)
        limit = cache_limit if cache_limit is not None else _default_limit(root)
        ahead = prefetch_shards if prefetch_shards is not None else default_prefetch(manifest)
        if prefetch_shards is None and largest:
            ahead = max(0, min(ahead, limit // largest - held))
        need = (ahead + held) * largest
        if limit < need:
            origin = "cache_limit" if cache_limit is not None else \
                f"cache_limit (default: {FREE_FRACTION:.0%} of the free space in {root})"
            raise ConfigError(f"{origin} is {limit} bytes, smaller than reading needs: "
                              f"(prefetch_shards {ahead} + {held} held) × the largest shard "
                              f"({largest} bytes) = {need} bytes; raise cache_limit, or lower "
                              + ("prefetch_shards" if ahead else "cache_shards or the shuffle "
                                 "window (window=None holds every shard)"))
        self.limit, self.prefetch_shards, self.held = limit, ahead, held
        self.store = CacheFolder(root, storage.url, index_bytes, limit)
        self.store.sweep()
        self.downloads = 0
        self.downloaded_bytes = 0
        self._reset_process_state()

    @classmethod
    def open(cls, url: str, *, storage_options: Mapping[str, Any] | None = None,
             retry: RetryPolicy | None = None, **options: Any) -> RemoteCache:
        """Fetch `url`'s index.json and make its cache (options as for the constructor)."""
        storage = open_storage(url, storage_options=storage_options, retry=retry)
        manifest, index_bytes = read_index(storage)
        return cls(storage, manifest, index_bytes, **options)

    @property
    def folder(self) -> str:
        """Where the verified copies are (``folder/<record.file>``)."""
        return self.store.shards

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pins: dict[int, _Pin] = {}
        self._verified: set[int] = set()
        self._inflight: dict[int, Future[None]] = {}
        self._sequence: list[int] = []
        self._cursor = 0
        self._wanted: frozenset[int] = frozenset()
        self._demanded: dict[int, int] = {}
        self._failed: dict[int, Exception] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's pins and threads are not ours
            for pin in self._pins.values():
                os.close(pin.fd)  # the parent still holds its lock through its own copy
            self._reset_process_state()
        if self._closed:
            raise ConfigError("this RemoteCache is closed")

    # --- what the reader calls -------------------------------------------------------------

    def announce(self, sequence: Sequence[int]) -> None:
        """The shard numbers this reader will ask for, in order (its whole epoch); the next
        `prefetch_shards` of them start downloading now and as `path` moves along."""
        self._check_process()
        for number in sequence:
            self._record(number)
        with self._lock:
            self._sequence, self._cursor = [int(n) for n in sequence], 0
            self._failed.clear()  # a new epoch tries again what failed in the last one
            self._schedule_locked()

    def path(self, number: int) -> str:
        """The local path of a verified copy of shard `number`, pinned until `release`."""
        self._check_process()
        record = self._record(number)
        with self._lock:
            self._advance_locked(number)
            pin = self._pins.get(number)
            if pin is not None:
                pin.readers += 1
                pin.prefetched = False
            self._schedule_locked()
        if pin is None:
            with self._lock:
                failure = self._failed.pop(number, None)
                if failure is not None:
                    raise failure
                self._demanded[number] = self._demanded.get(number, 0) + 1
            try:
                fd = self._acquire(number, demand=True)
            finally:
                with self._lock:
                    self._demanded[number] -= 1
                    if not self._demanded[number]:
                        del self._demanded[number]
            assert fd is not None  # a demand download either succeeds or raises
            with self._lock:
                pin = self._pins.get(number)
                if pin is not None:  # a prefetch thread got there first
                    unlock_fd(fd)
                    pin.readers += 1
                    pin.prefetched = False
                else:
                    self._pins[number] = _Pin(fd, 1, False)
        self.store.touch(record)
        return self.store.path(record)

    def release(self, number: int) -> None:
        """The reader is done with shard `number` (it may now be evicted)."""
        self._check_process()
        with self._lock:
            pin = self._pins.get(number)
            if pin is None or pin.readers == 0:
                raise ValueError(f"shard {number} is not held")
            pin.readers -= 1
            if pin.readers == 0:
                if number in self._wanted:  # read again soon: stays pinned as look-ahead
                    pin.prefetched = True
                else:
                    del self._pins[number]
                    unlock_fd(pin.fd)

    def close(self) -> None:
        """Stop the downloads and release every pin."""
        if self._pid != os.getpid() or self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for pin in self._pins.values():
                unlock_fd(pin.fd)
            self._pins.clear()

    def __enter__(self) -> RemoteCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- pins and downloads ----------------------------------------------------------------

    def _record(self, number: int) -> ShardRecord:
        if not 0 <= number < len(self.manifest.shards):
            raise ValueError(f"shard {number} out of range (the dataset has "
                             f"{len(self.manifest.shards)})")
        return self.manifest.shards[number]

    def _intact(self, number: int) -> bool:
        """Whether a good copy is in place: size always, sha256 once when `verify`."""
        record = self.manifest.shards[number]
        try:
            check_shard(self.store.path(record), record, verify=self.verify and number not in self._verified)
        except CorruptShardError:
            return False
        self._verified.add(number)
        return True

    def _acquire(self, number: int, *, demand: bool) -> int | None:
        """A pin fd on a verified copy (downloaded if need be); None when a prefetch gave up
        (no room yet, or no longer wanted)."""
        fd = lock_fd(self.store.pin_lock(self.manifest.shards[number]), _fcntl().LOCK_SH)
        try:
            if self._intact(number) or self._fetch(number, demand=demand):
                return fd
        except BaseException:
            unlock_fd(fd)
            raise
        unlock_fd(fd)
        return None

    def _fetch(self, number: int, *, demand: bool) -> bool:
        record = self.manifest.shards[number]
        url = self.storage.url_of(record.file)
        def cancelled() -> bool:
            return not demand and not self._still_wanted(number)

        try:
            get = lock_fd(self.store.get_lock(record), _fcntl().LOCK_EX, self._lock_deadline(record),
                          cancelled)
        except TimeoutError:
            raise RemoteError(f"{url}: another process has been downloading it for too long") from None
        if get is None:
            return False
        try:
            if self._intact(number):
                return True  # downloaded by another process while we waited
            self.store.discard(record)  # a damaged copy, or a crashed downloader's .part
            problem: str | None = "not downloaded"
            for _ in range(self.download_attempts):
                fd = self._room(record, demand)
                if fd is None:
                    return False
                try:
                    problem = self.store.download(self.storage, record, fd, cancelled)
                except FileNotFoundError:
                    raise CorruptShardError(f"{url}: missing (index.json lists it)") from None
                if problem is None:
                    with self._lock:
                        self.downloads += 1
                        self.downloaded_bytes += record.bytes
                    self._verified.add(number)
                    return True
                if problem == "cancelled":
                    return False
            raise CorruptShardError(f"{url}: {problem} (downloaded {self.download_attempts} times)")
        finally:
            unlock_fd(get)

    def _room(self, record: ShardRecord, demand: bool) -> int | None:
        """The reserved .part fd; a prefetch takes None for an answer, a demand download
        first gives up this cache's own look-ahead, then waits (bounded) for other readers."""
        deadline, pause = time.monotonic() + self.room_wait, 0.01
        while (fd := self.store.reserve(record)) is None:
            if not demand:
                return None
            if self._drop_lookahead():
                continue
            if time.monotonic() > deadline:
                raise ConfigError(f"cache_limit {self.limit} bytes: no room for {record.file} "
                                  f"({record.bytes} bytes) in {self.room_wait:.0f} s: shards "
                                  f"pinned by the readers sharing {self.store.root} fill it")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
        return fd

    def _lock_deadline(self, record: ShardRecord) -> float:
        """How long another downloader may take at most (its retries are bounded too)."""
        policy = self.storage.retry
        chunks = 1 + record.bytes // self.storage.chunk_bytes
        per_chunk = policy.attempts * (policy.timeout + policy.max_delay)
        return time.monotonic() + chunks * per_chunk * self.download_attempts

    # --- look-ahead ------------------------------------------------------------------------

    def _still_wanted(self, number: int) -> bool:
        """Whether a background download of `number` should go on: it is ahead of the reader,
        or the reader is waiting for it right now."""
        return not self._closed and (number in self._wanted or number in self._demanded)

    def _advance_locked(self, number: int) -> None:
        # Not in the announced order: fetched on demand, the look-ahead stays put.
        with suppress(ValueError):
            self._cursor = self._sequence.index(number, self._cursor) + 1

    def _schedule_locked(self) -> None:
        """Pin-and-download the next `prefetch_shards` distinct shards after the cursor; let go
        of look-ahead pins that are no longer ahead."""
        window: dict[int, None] = {}
        for number in self._sequence[self._cursor:]:
            if len(window) >= self.prefetch_shards:
                break
            window.setdefault(number, None)
        self._wanted = frozenset(window)
        for number, pin in list(self._pins.items()):
            if pin.prefetched and pin.readers == 0 and number not in self._wanted:
                del self._pins[number]
                unlock_fd(pin.fd)
        for number in window:
            if number in self._pins or number in self._inflight or self._closed:
                continue
            if self._pool is None:
                threads = max(1, min(self.prefetch_shards, _MAX_THREADS))
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shardkit-download")
            self._inflight[number] = self._pool.submit(self._prefetch, number)

    def _prefetch(self, number: int) -> None:
        """Background: download shard `number` and hold it pinned until the reader takes it.
        A failure (past the retry budget) is raised by `path(number)`, once."""
        pause = 0.02
        try:
            while self._still_wanted(number):
                fd = self._acquire(number, demand=False)
                if fd is not None:
                    with self._lock:
                        if number in self._pins or not self._still_wanted(number):
                            unlock_fd(fd)
                        else:
                            self._pins[number] = _Pin(fd, 0, True)
                    return
                time.sleep(pause)  # no room until the reader releases a shard
                pause = min(pause * 2, 0.5)
        except Exception as exc:  # the retry budget is spent: path() raises it
            with self._lock:
                self._failed[number] = exc
        finally:
            with self._lock:
                self._inflight.pop(number, None)

    def _drop_lookahead(self) -> bool:
        """Unpin the furthest look-ahead shard nobody reads yet and shrink the look-ahead by
        one (other readers' pins crowd the cache); False when there is none."""
        with self._lock:
            ahead = [n for n, p in self._pins.items() if p.prefetched and p.readers == 0]
            if not ahead:
                return False
            order = {n: i for i, n in enumerate(self._sequence[self._cursor:])}
            number = max(ahead, key=lambda n: order.get(n, -1))
            pin = self._pins.pop(number)
            unlock_fd(pin.fd)
            self.prefetch_shards = max(0, self.prefetch_shards - 1)
            self._wanted = self._wanted - {number}
            return True


def _fcntl() -> Any:
    import fcntl

    return fcntl


def _default_limit(root: str) -> int:
    return int(FREE_FRACTION * (shutil.disk_usage(root).free + cache_usage(root)))


def default_prefetch(manifest: Manifest) -> int:
    """prefetch_shards by default: AHEAD_BYTES worth of this dataset's shards, 2 to 16."""
    if not (shards := manifest.shards):
        return 0
    mean = max(1, sum(s.bytes for s in shards) // len(shards))
    return min(len(shards), max(2, min(16, math.ceil(AHEAD_BYTES / mean))))
