"""Opened shards: a least-recently-used cache that opens the shards a reader announces next
in a background thread, and the loop that announces them."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

from shardkit.errors import ShardkitError
from shardkit.reader.assign import shard_runs

__all__ = ["OpenAhead", "read_ahead"]

T = TypeVar("T")
B = TypeVar("B")


class OpenAhead(Generic[T]):
    """Shards opened by `_load` (subclasses say how), at most `capacity` kept, least recently
    used evicted first; `prefetch` starts opening the next ones in one background thread."""

    thread_name = "shardkit-prefetch"

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._open: OrderedDict[int, Future[T]] = OrderedDict()
        self._checking: dict[int, Future[T]] = {}  # what `renew` is checking, by shard
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        #: Passes reading through this cache now (`read_ahead`): batches are lent only while
        #: there is one, since two passes read the same samples.
        self.passes = 0

    def _check_process(self) -> None:
        """In a forked child (a DataLoader worker of a dataset read in the parent first) the
        parent's thread and the shards it was still opening are not there: start afresh."""
        if self._pid != os.getpid():
            self._open, self._checking = OrderedDict(), {}
            self._lock, self._pool, self._pid = threading.Lock(), None, os.getpid()
            self.passes = 0

    def _load(self, number: int) -> T:
        raise NotImplementedError

    def prefetch(self, numbers: Sequence[int]) -> None:
        """Start opening `numbers` in the background (if not open yet); at most `capacity`
        of them, so that none is evicted before it is used."""
        self._check_process()
        with self._lock:
            for number in numbers[:self.capacity]:
                if number in self._open:
                    continue
                self._open[number] = self._submit(self._load, number)
                self._evict()

    def _submit(self, job: Callable[..., T], *args: Any) -> Future[T]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        return self._pool.submit(job, *args)

    def get(self, number: int) -> T:
        """Shard `number`, opened now if nobody asked for it before."""
        self._check_process()
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

    def begin_pass(self) -> None:
        """A pass starts reading through this cache (counted in `passes`), after `renew`."""
        self.renew()
        with self._lock:
            self.passes += 1

    def end_pass(self) -> None:
        with self._lock:
            self.passes -= 1

    def renew(self) -> None:
        """Before a pass: the opened shards that `_lent` says were lent out of are checked in
        the background, and those `_stale` says may not serve the pass are opened again."""
        self._check_process()
        with self._lock:
            for number, future in list(self._open.items()):
                if future.done() and not future.cancelled() and future.exception() is None \
                        and self._lent(future.result()):
                    self._checking[number] = future
                    self._open[number] = self._submit(self._renewed, number)

    def _renewed(self, number: int) -> T:
        with self._lock:
            future = self._checking.pop(number, None)
        if future is None:  # closed meanwhile, and let go of there
            raise ShardkitError(f"shard {number}: the cache was closed")
        if not self._stale(future.result()):
            return future.result()
        self._dropped(number, future)
        return self._load(number)

    def _lent(self, opened: T) -> bool:
        """Whether `opened` lent anything out in the last pass; a subclass says."""
        return False

    def _stale(self, opened: T) -> bool:
        """Whether `opened`, which lent something out, may not serve another pass."""
        return False

    def _dropped(self, number: int, future: Future[T]) -> None:
        """The cache let go of shard `number` (evicted, or closed; `future` may still be
        running). A subclass that holds something per opened shard lets go of it here."""

    def _evict(self) -> None:
        while len(self._open) > self.capacity:
            self._dropped(*self._open.popitem(last=False))

    def close(self) -> None:
        self._check_process()
        if self._pool is not None:
            # A loader's finaliser may run in the pool's own thread (the garbage collector
            # runs where it likes): that thread cannot wait for itself.
            own = threading.current_thread().name.startswith(self.thread_name)
            self._pool.shutdown(wait=not own, cancel_futures=True)
            self._pool = None
        with self._lock:  # checks that never ran: their shards are let go of here
            unchecked, self._checking = self._checking, {}
        dropped = [*self._open.items(), *unchecked.items()]
        self._open.clear()
        for number, future in dropped:
            self._dropped(number, future)


def read_ahead(cache: OpenAhead[Any], starts: np.ndarray, batches: Sequence[np.ndarray],
               assemble: Callable[[np.ndarray], B], *, lookahead: int = 2,
               keep_open: bool = False) -> Generator[B, None, None]:
    """`assemble(index)` for each of `batches` in order, first asking `cache` to open the
    shards of that batch and the next `lookahead` ones in the background (after letting go of
    the shards that may not serve a new pass: `OpenAhead.begin_pass`). The cache is closed
    at the end unless `keep_open` (a later epoch in this process then finds its shards open)."""
    def shards_of(number: int) -> list[int]:
        return [shard for shard, _, _ in shard_runs(starts, batches[number])]

    ahead: dict[int, list[int]] = {}  # the shards of the batches within the look-ahead
    asked: list[int] = []
    cache.begin_pass()
    try:
        for number, index in enumerate(batches):
            ahead.pop(number - 1, None)
            for later in range(number, min(number + 1 + lookahead, len(batches))):
                if later not in ahead:
                    ahead[later] = shards_of(later)
            wanted = list(dict.fromkeys(s for later in sorted(ahead) for s in ahead[later]))
            if wanted != asked:  # batches of one shard ask for the same ones again and again
                cache.prefetch(wanted)
                asked = wanted
            yield assemble(index)
    finally:
        cache.end_pass()
        if not keep_open:
            cache.close()
