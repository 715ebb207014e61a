"""Opened shards: the size (and optional sha256) check on open, the read-only memory map of a
shard, and a least-recently-used cache that opens the shards a reader announces next in a
background thread."""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

from shardkit.errors import CorruptShardError
from shardkit.format.files import hash_file
from shardkit.format.manifest import ShardRecord

__all__ = ["OpenAhead", "check_labels", "check_size", "map_shard", "read_ahead"]

T = TypeVar("T")
B = TypeVar("B")


def check_size(path: str, record: ShardRecord, verify: bool) -> None:
    """Raise CorruptShardError, naming the file, when `path` is missing, has another size than
    index.json says, or (with `verify`) another sha256."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise CorruptShardError(f"{path}: missing (index.json lists it)") from None
    if size != record.bytes:
        raise CorruptShardError(f"{path}: {size} bytes on disk, index.json says {record.bytes} "
                                "(truncated or replaced?)")
    if verify and hash_file(path)[1] != record.sha256:
        raise CorruptShardError(f"{path}: sha256 differs from index.json (corrupted)")


def check_labels(path: str | os.PathLike[str], labels: np.ndarray | None,
                 classes: list[str] | None) -> None:
    """Raise CorruptShardError, naming the file, when an integer label names no class: a
    damaged digit is still a number, and a loss function fed it fails far from the cause."""
    if labels is None or classes is None or not len(labels) or labels.dtype.kind not in "iu":
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= len(classes):
        raise CorruptShardError(f"{path}: label {low if low < 0 else high} names no class "
                                f"({len(classes)} classes)")


def map_shard(path: str) -> mmap.mmap:
    """Map a shard read-only. On Linux the pages are populated at once (MAP_POPULATE): this
    runs in the prefetch thread, so the gathers in the hot loop take no page faults and a
    shard not yet in the page cache is read ahead in one go."""
    with open(path, "rb") as handle:
        if hasattr(mmap, "MAP_POPULATE"):
            return mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                             prot=mmap.PROT_READ)
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


class OpenAhead(Generic[T]):
    """Shards opened by `_load` (subclasses say how), at most `capacity` kept, least recently
    used evicted first; `prefetch` starts opening the next ones in one background thread."""

    thread_name = "shardkit-prefetch"

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._open: OrderedDict[int, Future[T]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _load(self, number: int) -> T:
        raise NotImplementedError

    def prefetch(self, numbers: Sequence[int]) -> None:
        """Start opening `numbers` in the background (if not open yet); at most `capacity`
        of them, so that none is evicted before it is used."""
        with self._lock:
            for number in numbers[:self.capacity]:
                if number in self._open:
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
                self._open[number] = self._pool.submit(self._load, number)
                self._evict()

    def get(self, number: int) -> T:
        """Shard `number`, opened now if nobody asked for it before."""
        with self._lock:
            future = self._open.get(number)
            if future is None:
                future = Future()
                future.set_result(self._load(number))
                self._open[number] = future
            self._open.move_to_end(number)
            self._evict()
        try:
            return future.result()
        except BaseException:
            with self._lock:  # not cached: the next epoch tries the file again
                if self._open.get(number) is future:
                    del self._open[number]
            raise

    def _evict(self) -> None:
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._open.clear()


def read_ahead(cache: OpenAhead[Any], starts: np.ndarray, batches: Sequence[np.ndarray],
               assemble: Callable[[np.ndarray], B], *, lookahead: int = 2,
               keep_open: bool = False) -> Generator[B, None, None]:
    """`assemble(index)` for each of `batches` in order, first asking `cache` to open the
    shards of that batch and the next `lookahead` ones in the background. The cache is closed
    at the end unless `keep_open` (a later epoch in this process then finds its shards open)."""
    shard_lists = [np.unique(np.searchsorted(starts, b, side="right") - 1).tolist() for b in batches]
    try:
        for number, index in enumerate(batches):
            upcoming = [s for later in shard_lists[number:number + 1 + lookahead] for s in later]
            cache.prefetch(list(dict.fromkeys(upcoming)))
            yield assemble(index)
    finally:
        if not keep_open:
            cache.close()
