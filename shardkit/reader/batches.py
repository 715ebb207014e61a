"""Assemble whole batches from shards (numpy, no torch needed), with background prefetch.

A batch is a sorted array of sample indices (see `assign`); its samples from one shard are
therefore contiguous in the batch, and each such run costs one gather into the batch array.
No Python runs per sample for raw data; jpeg/png payloads are decoded straight into the
batch array by a `DecodePool` (one thread per core in the training process).
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import suppress
from typing import Any

import numpy as np

from shardkit.errors import ConfigError, ShardkitError
from shardkit.reader.assign import shard_runs
from shardkit.reader.decode import DecodePool
from shardkit.reader.gather import gather
from shardkit.reader.handles import ShardCache
from shardkit.reader.helpers import Helpers, Share
from shardkit.reader.open_ahead import read_ahead

__all__ = ["BufferPool", "Copier", "Prefetcher", "assemble", "in_background",
           "resolve_copy_threads", "start_assembly", "stream_batches"]

Allocator = Callable[[tuple[int, ...]], np.ndarray]


def _empty(shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, dtype=np.uint8)


class BufferPool:
    """Batch arrays that are reused once nobody else holds them.

    Large fresh allocations cost a page fault per 4 kB on first write (a 38 MB batch of
    224 px images: ~9,400 faults), which is as much work as the copy itself. A buffer is
    handed out again only when the pool holds the last reference to it: a batch the caller
    (or a tensor made from it, or any view of it) still holds is never overwritten.
    """

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._buffers: list[np.ndarray] = []

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        for i in range(len(self._buffers)):
            # References: the list, and getrefcount's argument.
            if self._buffers[i].shape == shape and sys.getrefcount(self._buffers[i]) == 2:
                return self._buffers[i]
        fresh = np.empty(shape, dtype=np.uint8)
        if len(self._buffers) < self.keep:
            self._buffers.append(fresh)
        return fresh


Copy = tuple[Any, np.ndarray, np.ndarray]  # (shard images, sorted local indices, out slice)


def gather_all(copies: Sequence[Copy]) -> None:
    for images, local, out in copies:
        gather(images, local, out)


def split_copies(copies: Sequence[Copy], parts: int) -> list[list[Copy]]:
    """`copies` cut into `parts` lists of (nearly) as many samples each, in order; a copy
    that straddles a cut is split in two."""
    total = sum(len(local) for _, local, _ in copies)
    share = -(-total // parts)
    out: list[list[Copy]] = [[]]
    room = share
    for images, local, dest in copies:
        while len(local):
            if room == 0:
                out.append([])
                room = share
            take = min(room, len(local))
            out[-1].append((images, local[:take], dest[:take]))
            local, dest, room = local[take:], dest[take:], room - take
    return out


class Copier:
    """Runs a batch's copies on `threads` threads: the calling one and `threads - 1` helpers.

    One core copies about half as fast as memory allows here: a batch-sized copy into a
    destination not in the cache stalls on ordinary stores (glibc's memcpy switches to
    non-temporal stores only above its x86_non_temporal_threshold, 181.5 MiB on the machine
    measured). Two threads copying halves of a 150 px batch deliver ~1.7x; the CPU time is
    the same.

    `demand`, when given, is set while the consumer of the batches waits for one: the helpers
    are used only then. A training loop that is busy with the last batch (copying it to the
    device, say) has a core of its own in use, and a helper would only compete with it.
    """

    def __init__(self, threads: int, *, min_bytes: int = 1 << 20,
                 demand: threading.Event | None = None) -> None:
        self.threads = max(1, threads)
        self.min_bytes = min_bytes  # smaller batches are copied by the calling thread alone
        self.demand = demand
        self.helpers = Helpers(self.threads, "shardkit-copy")

    def __call__(self, copies: Sequence[Copy]) -> None:
        size = sum(out.nbytes for _, _, out in copies)
        if self.threads == 1 or size < self.min_bytes or (
                self.demand is not None and not self.demand.is_set()):
            gather_all(copies)
            return
        # Pieces of about 1 MiB, taken by whichever thread is free (see `Helpers`).
        parts = max(self.threads, min(32, size >> 20))
        self.helpers.run([functools.partial(gather_all, part) for part in split_copies(copies, parts)])

    def close(self) -> None:
        self.helpers.close()


def resolve_copy_threads(value: int | None) -> int:
    """The number of copying threads (see `Copier`) for a `copy_threads` option: None means
    one. A training loop that does anything with its batches on the CPU (copying them to
    the device from pageable memory, say) keeps a core busy, and a second copying thread then
    only competes with it and pays a hand-over per batch: measured in the peer benchmark's
    loop (docs/performance.md), one thread was faster at every size and batch size tried.
    Two help a loop that leaves the CPU idle. Raises ConfigError below 1."""
    if value is None:
        return 1
    if value < 1:
        raise ConfigError(f"copy_threads must be >= 1; got {value}")
    return int(value)


def assemble(cache: ShardCache, starts: np.ndarray, index: np.ndarray, fields: Sequence[str],
             alloc: Allocator = _empty, *, encoded: bool = False, copier: Copier | None = None,
             decoder: DecodePool | None = None, lend: bool = False) -> dict[str, Any]:
    """The batch holding samples `index` (sorted), whole: `start_assembly`, then its
    decoding finished."""
    batch, decoding = start_assembly(cache, starts, index, fields, alloc, encoded=encoded,
                                     copier=copier, decoder=decoder, lend=lend)
    if decoding is not None:
        decoding.finish()
    return batch


def start_assembly(cache: ShardCache, starts: np.ndarray, index: np.ndarray,
                   fields: Sequence[str], alloc: Allocator = _empty, *, encoded: bool = False,
                   copier: Copier | None = None, decoder: DecodePool | None = None,
                   lend: bool = False) -> tuple[dict[str, Any], Share | None]:
    """The batch holding samples `index` (sorted): image, label (if any), index, and any
    metadata `fields`. Images are one [B,H,W,C] uint8 array when shapes are fixed, else a list;
    with `encoded` (jpeg/png shards) a list of the stored files as 1-D uint8 arrays, for the
    caller to decode (on the GPU: see `to_device`). jpeg/png payloads are otherwise decoded
    by `decoder` (default: in this thread) straight into the batch array: for fixed shapes
    that decoding is only started, and returned beside the batch (None when there is none),
    for the caller to finish before the batch is used. With `lend`,
    consecutive samples of one mapped run of a raw shard are a view of its mapping, lent to
    the batch (see `shardkit.reader.mapping`: the caller's to change as a copy would be; for
    tar shards its samples are not adjacent in memory), unless another pass reads the same
    cache (its batches would hold the same samples)."""
    manifest = cache.manifest
    size = len(index)
    fixed = None if encoded else manifest.image_shape
    runs = [(cache.get(number), slots, local) for number, slots, local in shard_runs(starts, index)]
    # Consecutive samples of one mapped shard (a stored-order read) are lent, not copied.
    images: Any = runs[0][0].lend(runs[0][2]) \
        if lend and fixed is not None and len(runs) == 1 and cache.passes == 1 else None
    lent = images is not None
    if not lent:
        images = alloc((size, *fixed)) if fixed is not None else [None] * size
    labels = np.empty((size, manifest.targets), dtype=np.float32) if manifest.targets \
        else np.empty(size, dtype=np.int64) if manifest.labeled else None
    meta: dict[str, list[Any]] = {f: [] for f in fields}
    copies: list[Copy] = []
    payloads: list[Any] = []
    headers: list[np.ndarray] | None = []  # their `jpeg_headers` rows, run by run
    targets: list[int] = []  # the batch slot of each of `payloads`
    where: list[str] = []
    for handle, slots, local in runs:
        rows = local.tolist()
        if isinstance(handle.images, list):  # raw images of varying shapes
            for slot, i in enumerate(rows, start=slots.start):
                # a copy, as a gather makes for fixed shapes: the batch is the caller's to
                # change, and the shard stays open for the next epoch
                images[slot] = np.array(handle.images[i])
        elif handle.images is not None:
            if not lent:
                copies.append((handle.images, local, images[slots]))
        elif encoded:
            assert handle.payloads is not None
            for slot, i in enumerate(rows, start=slots.start):
                images[slot] = np.frombuffer(bytearray(handle.payloads[i]), np.uint8)
        else:
            assert handle.payloads is not None
            payloads.extend(handle.payloads[i] for i in rows)
            if headers is not None and handle.headers is not None:
                headers.append(handle.headers[local])
            else:
                headers = None
            targets.extend(range(slots.start, slots.stop))
            where.extend(f"{handle.path}: sample {i}" for i in rows)
        if labels is not None:
            assert handle.labels is not None
            labels[slots] = handle.labels[local]
        for field in fields:
            meta[field].extend(handle.metadata(local, field))
    (copier or gather_all)(copies)
    known = np.concatenate(headers) if headers else None
    decoding = _decode(decoder or DecodePool(1), payloads, images, targets, where,
                       manifest.channels, fixed is not None, known) if payloads else None
    batch: dict[str, Any] = {"image": images, "index": index}
    if labels is not None:
        batch["label"] = labels
    batch.update(meta)
    return batch, decoding


def _decode(decoder: DecodePool, payloads: list[Any], images: Any, targets: list[int],
            where: list[str], channels: int, fixed: bool,
            headers: np.ndarray | None) -> Share | None:
    """Decode `payloads` (`headers`: their `jpeg_headers`, if known) into their batch slots
    (`targets`): straight into the batch array when shapes are fixed (started on the
    decoder's threads: what is returned finishes it), else as one array each, now."""
    if fixed:
        return decoder.start_batch(payloads, [images[slot] for slot in targets], channels, where,
                                   headers)
    for slot, array in zip(targets, decoder.decode_list(payloads, channels, where), strict=True):
        images[slot] = array
    return None


def stream_batches(cache: ShardCache, starts: np.ndarray, batches: Sequence[np.ndarray],
                   fields: Sequence[str], *, alloc: Allocator | None = None,
                   lookahead: int = 2, keep_open: bool = False, encoded: bool = False,
                   copier: Copier | None = None, decoder: DecodePool | None = None,
                   lend: bool = False) -> Generator[dict[str, Any], None, None]:
    """Assemble `batches` in order, asking the cache to open the shards of the next
    `lookahead` batches in the background, each batch's copies made by `copier` and its
    jpeg/png payloads decoded by `decoder` (default: this thread alone); `lend`: see
    `assemble`. The cache is closed at the end unless `keep_open` (a later epoch in the same
    process then finds its shards mapped). A batch's decoding runs on the decoder's helper
    threads while this thread prepares the next batch (`_one_behind`)."""
    pool = alloc or BufferPool()
    return _one_behind(read_ahead(
        cache, starts, batches,
        lambda index: start_assembly(cache, starts, index, fields, pool, encoded=encoded,
                                     copier=copier, decoder=decoder, lend=lend),
        lookahead=lookahead, keep_open=keep_open))


def _one_behind(started: Generator[tuple[dict[str, Any], Share | None], None, None],
                ) -> Generator[dict[str, Any], None, None]:
    """The batches of `started`, in order, each once its decoding is finished. A batch that
    is still decoding is handed on only after the next one was started, so the helper threads
    go from one batch's images to the next without waiting for this thread's bookkeeping (a
    few images' time per batch), and this thread decodes images of the next batch while it
    waits for the helpers' last images of this one. A batch with nothing to decode passes at
    once; an error while starting the next batch is raised after the batch before it."""
    held: tuple[dict[str, Any], Share] | None = None
    ready: tuple[dict[str, Any], Share] | None
    try:
        while True:
            try:
                batch, decoding = next(started)
            except StopIteration:
                break
            except BaseException:
                if held is not None:
                    ready, held = held, None
                    ready[1].finish()
                    yield ready[0]
                raise
            ready, held = held, (batch, decoding) if decoding is not None else None
            if ready is not None:
                ready[1].finish(then=decoding)
                yield ready[0]
            if decoding is None:
                yield batch
        if held is not None:
            ready, held = held, None
            ready[1].finish()
            yield ready[0]
    finally:
        if held is not None:  # left early, or failed: no helper writes into it afterwards
            held[1].cancel()
        started.close()


_DONE = object()


class _Pass:
    """One `Prefetcher.run`: its items, and its own hand-over slots and flags, so that a pass
    never sees another pass's items."""

    def __init__(self, items: Iterable[Any], depth: int) -> None:
        self.items = items
        self.slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()  # the consumer left: the thread stops iterating `items`
        self.left = threading.Event()  # the thread no longer iterates `items`
        self.over = False  # both sides left it and `items` was closed (consumer side only)


class Prefetcher:
    """One background thread for the life of a loader, running one pass after another
    `depth` items ahead of the consumer: no thread is started per epoch (a new thread can
    take milliseconds to be scheduled on a busy machine, which a short epoch feels), and
    threads that keep per-thread state (torch's thread count) keep it.

    `run(items)` yields what iterating `items` in the thread gives; exceptions are re-raised
    in the consumer; leaving the loop early stops the pass. One pass runs at a time: a run
    that starts (its first ``next``) while an earlier one is still open ends the earlier one
    first (the thread leaves it, its `items` are closed), and the earlier iterator then
    simply ends. `items` are closed in the consumer's thread, only once the background
    thread has left them. `demand` is set while the consumer waits for an item that is not
    there yet (see `Copier`). `close` ends the thread.
    """

    def __init__(self, depth: int = 2, demand: threading.Event | None = None) -> None:
        self.depth, self.demand = max(1, depth), demand
        self._jobs: queue.Queue[_Pass | None] = queue.Queue()
        self._closing = threading.Event()  # nobody consumes any more: the thread ends
        self._thread: threading.Thread | None = None
        self._current: _Pass | None = None  # the open pass, if any

    def _work(self) -> None:
        while (run := self._jobs.get()) is not None:
            try:
                for item in run.items:
                    handed = self._put(run, item)
                    item = None  # the consumer's now: held here, a lent batch would look in use
                    if not handed:
                        break
                else:
                    self._put(run, _DONE)
            except BaseException as exc:  # handed to the consumer
                self._put(run, exc)
            finally:
                run.left.set()

    def _put(self, run: _Pass, item: Any) -> bool:
        """Hand `item` over; False when the consumer left `run` (or nobody consumes any more):
        the thread then stops iterating its items."""
        while not self._closing.is_set() and not run.stop.is_set():
            try:
                run.slots.put(item, timeout=0.1)
                return not run.stop.is_set()  # left meanwhile: assemble nothing more for it
            except queue.Full:
                continue
        return False

    def run(self, items: Iterable[Any]) -> Generator[Any, None, None]:
        if self._thread is None:
            self._closing.clear()
            self._thread = threading.Thread(target=self._work, name="shardkit-batches", daemon=True)
            self._thread.start()
        if self._current is not None:
            self._finish(self._current)  # an earlier pass still open: this one replaces it
        run = self._current = _Pass(items, self.depth)
        self._jobs.put(run)
        try:
            while (item := self._next(run)) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._finish(run)

    def _next(self, run: _Pass) -> Any:
        """`run`'s next item, or _DONE once it is over (at its end, or ended by a later run)."""
        while not run.over:
            waiting = run.slots.empty()
            if waiting and self.demand is not None:
                self.demand.set()
            try:
                return run.slots.get(timeout=0.1)
            except queue.Empty:
                if run.left.is_set() and run.slots.empty():  # left without a last word: closed
                    raise ShardkitError("the batches' background thread was closed during a "
                                        "pass (its loader was closed)") from None
            finally:
                if waiting and self.demand is not None:
                    self.demand.clear()
        return _DONE

    def _finish(self, run: _Pass) -> None:
        """Leave `run`: the thread stops it and leaves its items, which are then closed here."""
        if run.over:
            return
        run.over = True
        run.stop.set()
        thread = self._thread
        while not run.left.is_set() and thread is not None and thread.is_alive():
            with suppress(queue.Empty):  # freed slots let a put that waits return, and see `stop`
                while True:
                    run.slots.get_nowait()
            run.left.wait(0.01)
        if self._current is run:
            self._current = None
        close = getattr(run.items, "close", None)
        if close is not None and run.left.is_set():
            close()
        # Else the thread is still inside `items` but no longer runs (the interpreter is
        # exiting and stopped its daemon threads): closing them would raise "generator
        # already executing"; the process's end lets them go.

    def close(self) -> None:
        if self._thread is not None:
            self._closing.set()
            self._jobs.put(None)
            if self._thread is not threading.current_thread():
                # A loader's finaliser may run in this very thread (the garbage collector
                # runs where it likes): it ends by itself once it reads the None.
                self._thread.join()
            self._thread = None


def in_background(items: Iterable[Any], depth: int = 2,
                  demand: threading.Event | None = None) -> Iterator[Any]:
    """Run `items` in a thread of its own (see `Prefetcher`), ended with the pass."""
    prefetcher = Prefetcher(depth, demand)
    try:
        yield from prefetcher.run(items)
    finally:
        prefetcher.close()
