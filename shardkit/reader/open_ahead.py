"""Opened shards: the read-only memory map of a shard, and a least-recently-used cache that
opens the shards a reader announces next in a background thread."""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

__all__ = ["OpenAhead", "map_shard", "read_ahead"]

T = TypeVar("T")
B = TypeVar("B")


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

    def _dropped(self, number: int, future: Future[T]) -> None:
        """The cache let go of shard `number` (evicted, or closed; `future` may still be
        running). A subclass that holds something per opened shard lets go of it here."""

    def _evict(self) -> None:
        while len(self._open) > self.capacity:
            self._dropped(*self._open.popitem(last=False))

    def close(self) -> None:
        if self._pool is not None:
            # A loader's finaliser may run in the pool's own thread (the garbage collector
            # runs where it likes): that thread cannot wait for itself.
            own = threading.current_thread().name.startswith(self.thread_name)
            self._pool.shutdown(wait=not own, cancel_futures=True)
            self._pool = None
        dropped = list(self._open.items())
        self._open.clear()
        for number, future in dropped:
            self._dropped(number, future)


def read_ahead(cache: OpenAhead[Any], starts: np.ndarray, batches: Sequence[np.ndarray],
               assemble: Callable[[np.ndarray], B], *, lookahead: int = 2,
               keep_open: bool = False) -> Generator[B, None, None]:
    """`assemble(index)` for each of `batches` in order, first asking `cache` to open the
    shards of that batch and the next `lookahead` ones in the background. The cache is closed
    at the end unless `keep_open` (a later epoch in this process then finds its shards open)."""
    def shards_of(number: int) -> list[int]:
        shard_of = np.searchsorted(starts, batches[number], side="right") - 1
        # A batch is sorted: its shards are the values where shard_of changes.
        return shard_of[np.r_[True, shard_of[1:] != shard_of[:-1]]].tolist() if len(shard_of) else []

    ahead: dict[int, list[int]] = {}  # the shards of the batches within the look-ahead
    try:
        for number, index in enumerate(batches):
            ahead.pop(number - 1, None)
            for later in range(number, min(number + 1 + lookahead, len(batches))):
                if later not in ahead:
                    ahead[later] = shards_of(later)
            cache.prefetch(list(dict.fromkeys(s for later in sorted(ahead) for s in ahead[later])))
            yield assemble(index)
    finally:
        if not keep_open:
            cache.close()
