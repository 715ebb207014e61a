"""Assemble whole batches from shards (numpy, no torch needed), with background prefetch.

A batch is a sorted array of sample indices (see `assign`); its samples from one shard are
therefore contiguous in the batch, and each such run costs one gather into the batch array.
No Python runs per sample for raw data; jpeg/png payloads are decoded straight into the
batch array by a `DecodePool` (one thread per core in the training process).
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from shardkit.config import usable_cpus
from shardkit.errors import ConfigError
from shardkit.reader.assign import shard_runs
from shardkit.reader.decode import DecodePool
from shardkit.reader.handles import ShardCache, gather
from shardkit.reader.open_ahead import read_ahead

__all__ = ["Copier", "assemble", "in_background", "resolve_copy_threads", "stream_batches"]

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
    """

    def __init__(self, threads: int, *, min_bytes: int = 1 << 20) -> None:
        self.threads = max(1, threads)
        self.min_bytes = min_bytes  # smaller batches are copied by the calling thread alone
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, copies: Sequence[Copy]) -> None:
        size = sum(out.nbytes for _, _, out in copies)
        if self.threads == 1 or size < self.min_bytes:
            gather_all(copies)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="shardkit-copy")
        mine, *theirs = split_copies(copies, self.threads)
        futures = [self._pool.submit(gather_all, part) for part in theirs]
        try:
            gather_all(mine)
        finally:
            # Every helper is done before the batch (or its buffer, after an error) moves on.
            wait(futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def resolve_copy_threads(value: int | None) -> int:
    """The number of copying threads (see `Copier`) for a `copy_threads` option: None means
    two, or one on a single CPU. Raises ConfigError below 1."""
    if value is None:
        return min(2, usable_cpus())
    if value < 1:
        raise ConfigError(f"copy_threads must be >= 1; got {value}")
    return int(value)


def assemble(cache: ShardCache, starts: np.ndarray, index: np.ndarray, fields: Sequence[str],
             alloc: Allocator = _empty, *, encoded: bool = False,
             copier: Copier | None = None, decoder: DecodePool | None = None) -> dict[str, Any]:
    """The batch holding samples `index` (sorted): image, label (if any), index, and any
    metadata `fields`. Images are one [B,H,W,C] uint8 array when shapes are fixed, else a list;
    with `encoded` (jpeg/png shards) a list of the stored files as 1-D uint8 arrays, for the
    caller to decode (on the GPU: see `to_device`). jpeg/png payloads are otherwise decoded
    by `decoder` (default: in this thread) into the batch array."""
    size = len(index)
    fixed = None if encoded else cache.shape
    images: Any = alloc((size, *fixed)) if fixed is not None else [None] * size
    labels = np.empty((size, cache.targets), dtype=np.float32) if cache.targets \
        else np.empty(size, dtype=np.int64) if cache.labeled else None
    meta: dict[str, list[Any]] = {f: [] for f in fields}
    channels = int(cache.manifest.schema["image"]["shape"][2])
    copies: list[Copy] = []
    payloads: list[Any] = []
    targets: list[int] = []  # the batch slot of each of `payloads`
    where: list[str] = []
    for number, slots, local in shard_runs(starts, index):
        handle = cache.get(number)
        if handle.images is not None:
            copies.append((handle.images, local, images[slots]))
        else:
            assert handle.payloads is not None
            rows = local.tolist()
            if encoded:
                for slot, i in enumerate(rows, start=slots.start):
                    images[slot] = np.frombuffer(bytearray(handle.payloads[i]), np.uint8)
            else:
                payloads.extend(handle.payloads[i] for i in rows)
                targets.extend(range(slots.start, slots.stop))
                where.extend(f"{handle.path}: sample {i}" for i in rows)
        if labels is not None:
            assert handle.labels is not None
            labels[slots] = handle.labels[local]
        for field in fields:
            meta[field].extend(handle.metadata(local, field))
    (copier or gather_all)(copies)
    if payloads:
        decoder = decoder or DecodePool(1)
        if fixed is not None:
            decoder.decode_batch(payloads, [images[slot] for slot in targets], channels, where)
        else:
            for slot, array in zip(targets, decoder.decode_list(payloads, channels, where), strict=True):
                images[slot] = array
    batch: dict[str, Any] = {"image": images, "index": index}
    if labels is not None:
        batch["label"] = labels
    batch.update(meta)
    return batch


def stream_batches(cache: ShardCache, starts: np.ndarray, batches: Sequence[np.ndarray],
                   fields: Sequence[str], *, alloc: Allocator | None = None,
                   lookahead: int = 2, keep_open: bool = False, encoded: bool = False,
                   threads: int = 1, decode_threads: int | None = None,
                   ) -> Generator[dict[str, Any], None, None]:
    """Assemble `batches` in order, asking the cache to open the shards of the next
    `lookahead` batches in the background, each batch's copies spread over `threads`
    threads and its jpeg/png payloads decoded on `decode_threads` threads (None: one per
    usable CPU). The cache is closed at the end unless `keep_open` (a later epoch in the
    same process then finds its shards mapped)."""
    pool = alloc or BufferPool()
    copier = Copier(threads)
    decoder = DecodePool(decode_threads)
    try:
        yield from read_ahead(
            cache, starts, batches,
            lambda index: assemble(cache, starts, index, fields, pool, encoded=encoded, copier=copier,
                                   decoder=decoder),
            lookahead=lookahead, keep_open=keep_open)
    finally:
        copier.close()
        decoder.close()


_DONE = object()


def in_background(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Run `items` in a thread, `depth` items ahead of the consumer. Exceptions are re-raised
    in the consumer; stopping early stops the thread."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_DONE)
        except BaseException as exc:
            slots.put(exc)

    thread = threading.Thread(target=produce, name="shardkit-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
        close = getattr(items, "close", None)
        if close is not None:
            close()
