"""Assemble whole batches from shards (numpy, no torch needed), with background prefetch.

A batch is a sorted array of sample indices (see `assign`); its samples from one shard are
therefore contiguous in the batch, and each such run costs one gather into the batch array.
No Python runs per sample for raw data; jpeg/png payloads are decoded one by one.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from shardkit.reader.assign import shard_runs
from shardkit.reader.fetch import ShardCache, decode_payload, gather
from shardkit.reader.opened import read_ahead

__all__ = ["assemble", "in_background", "stream_batches"]

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


def assemble(cache: ShardCache, starts: np.ndarray, index: np.ndarray, fields: Sequence[str],
             alloc: Allocator = _empty, *, encoded: bool = False) -> dict[str, Any]:
    """The batch holding samples `index` (sorted): image, label (if any), index, and any
    metadata `fields`. Images are one [B,H,W,C] uint8 array when shapes are fixed, else a list;
    with `encoded` (jpeg/png shards) a list of the stored files as 1-D uint8 arrays, for the
    caller to decode (on the GPU: see `to_device`)."""
    size = len(index)
    fixed = None if encoded else cache.shape
    images: Any = alloc((size, *fixed)) if fixed is not None else [None] * size
    labels = np.empty((size, cache.targets), dtype=np.float32) if cache.targets \
        else np.empty(size, dtype=np.int64) if cache.labeled else None
    meta: dict[str, list[Any]] = {f: [] for f in fields}
    channels = int(cache.manifest.schema["image"]["shape"][2])
    for number, slots, local in shard_runs(starts, index):
        handle = cache.get(number)
        if handle.images is not None:
            gather(handle.images, local, images[slots])
        else:
            assert handle.payloads is not None
            for slot, i in enumerate(local.tolist(), start=slots.start):
                data = handle.payloads[i]
                images[slot] = np.frombuffer(bytearray(data), np.uint8) if encoded \
                    else decode_payload(data, cache.codec, channels)
        if labels is not None:
            assert handle.labels is not None
            labels[slots] = handle.labels[local]
        for field in fields:
            meta[field].extend(handle.metadata(local, field))
    batch: dict[str, Any] = {"image": images, "index": index}
    if labels is not None:
        batch["label"] = labels
    batch.update(meta)
    return batch


def stream_batches(cache: ShardCache, starts: np.ndarray, batches: Sequence[np.ndarray],
                   fields: Sequence[str], *, alloc: Allocator | None = None,
                   lookahead: int = 2, keep_open: bool = False,
                   encoded: bool = False) -> Iterator[dict[str, Any]]:
    """Assemble `batches` in order, asking the cache to open the shards of the next
    `lookahead` batches in the background. The cache is closed at the end unless
    `keep_open` (a later epoch in the same process then finds its shards mapped)."""
    pool = alloc or BufferPool()
    return read_ahead(cache, starts, batches,
                      lambda index: assemble(cache, starts, index, fields, pool, encoded=encoded),
                      lookahead=lookahead, keep_open=keep_open)


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
