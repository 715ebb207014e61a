"""PyTorch reading: `ShardDataset` (an IterableDataset of whole batches) and `ShardLoader`
(what training loops iterate: exact ``len``, ``set_epoch``, tiny ``state_dict``).

For raw shards the fast path is ``num_workers=0``: batches are assembled in a background
thread of the training process (the gather releases the GIL), with no extra copy through
shared memory. Worker processes pay off when samples must be decoded (jpeg/png).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from shardkit.errors import ConfigError, DatasetError, require
from shardkit.format.manifest import Manifest
from shardkit.reader.assign import Split, assign, batches_per_rank, padding, samples_per_rank
from shardkit.reader.batches import in_background, resolve_copy_threads, stream_batches
from shardkit.reader.decode import resolve_decode_threads
from shardkit.reader.handles import ShardCache, check_fields, default_capacity
from shardkit.reader.table import TableCache, stream_table_batches

torch: Any = require("torch", "torch")
_IterableDataset: Any = torch.utils.data.IterableDataset

__all__ = ["ShardDataset", "ShardLoader"]

STATE_FORMAT = "shardkit.loader/1"


def _distributed() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


class ShardDataset(_IterableDataset):  # type: ignore[misc]
    """An IterableDataset yielding whole batches (dicts of tensors) of one rank.

    Use with ``DataLoader(ds, batch_size=None, num_workers=k)``: each worker yields every
    k-th batch, so the DataLoader's round-robin gives the same sequence for any k. The object
    holds only plain values (no open files), so it is cheap to send to worker processes.
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, rank: int | None = None,
                 world_size: int | None = None, fields: Sequence[str] | None = None,
                 window: int | None = 4, verify: bool = False,
                 cache_shards: int | None = None, decode: str = "cpu",
                 copy_threads: int | None = None, decode_threads: int | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.manifest = Manifest.read(self.path)
        if self.manifest.kind not in ("images", "table"):
            raise DatasetError(f"{path}: holds {self.manifest.kind!r}, not images or a table")
        self.table = self.manifest.kind == "table"
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive; got {batch_size}")
        if rank is None or world_size is None:
            auto_rank, auto_world = _distributed()
            rank = auto_rank if rank is None else rank
            world_size = auto_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of {world_size}")
        self.decode = _check_decode(decode, self.manifest, path)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.fields = check_fields(self.manifest, fields or ())
        self.window, self.verify = window, verify
        self.copy_threads = resolve_copy_threads(copy_threads)
        self.decode_threads = resolve_decode_threads(decode_threads)
        self.cache_shards = cache_shards or default_capacity(self.manifest, window)
        self.epoch = 0
        self.start = 0
        self.sizes = [s.samples for s in self.manifest.shards]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        # Shards stay open between epochs in the training process (workers start afresh).
        self._cache: Any = None  # a ShardCache, or a TableCache for tables

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # open files and threads do not travel to worker processes
        return state

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        return batches_per_rank(self.total, self.world_size, drop_last=self.drop_last,
                                batch_size=self.batch_size)

    def batches(self, worker: int = 0, workers: int = 1) -> list[np.ndarray]:
        """The index arrays this worker yields this epoch (from `start`)."""
        split = Split(rank=self.rank, world=self.world_size, worker=worker, workers=workers)
        return list(assign(self.sizes, split, epoch=self.epoch, seed=self.seed,
                           batch_size=self.batch_size, drop_last=self.drop_last,
                           shuffle=self.shuffle, window=self.window, start=self.start))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        in_process = info is None  # shards stay open between epochs only in this process
        batches = self.batches(worker, workers)
        if self.table:
            cache = self._cache or TableCache(self.path, self.manifest, capacity=self.cache_shards)
            stream = stream_table_batches(cache, self.starts, batches, keep_open=in_process)
        else:
            cache = self._cache or ShardCache(self.path, self.manifest, verify=self.verify,
                                              capacity=self.cache_shards)
            # Worker processes already copy and decode in parallel; in the training process a
            # batch's copies and decoding are split over threads.
            stream = stream_batches(cache, self.starts, batches, self.fields, keep_open=in_process,
                                    encoded=self.decode == "device",
                                    threads=self.copy_threads if in_process else 1,
                                    decode_threads=self.decode_threads if in_process else 1)
        self._cache = cache if in_process else None
        try:
            for batch in stream:
                yield _to_tensors(batch)
        finally:
            # Now, not when a held traceback lets go of this generator: the copying threads
            # stop, and shards are closed unless they are kept for the next epoch.
            stream.close()


def _check_decode(decode: str, manifest: Manifest, path: object) -> str:
    """``cpu``: batches hold decoded pixels. ``device``: a jpeg dataset's batches hold the
    stored JPEG files, which `to_device` decodes on the accelerator."""
    if decode not in ("cpu", "device"):
        raise ConfigError(f"decode must be 'cpu' or 'device'; got {decode!r}")
    if decode == "device":
        codec = manifest.config.get("codec")
        shape = manifest.schema.get("image", {}).get("shape", [None])
        if manifest.kind != "images" or codec != "jpeg" or None in shape:
            raise ConfigError(f"{path}: decode='device' needs images converted with --codec jpeg "
                              f"to one size (this dataset: codec {codec}, shape {shape})")
    return decode


def _to_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, np.ndarray):
            out[name] = torch.from_numpy(value)
        elif name == "image":
            out[name] = [torch.from_numpy(np.ascontiguousarray(v)) for v in value]
        elif name in ("orig_width", "orig_height"):
            out[name] = torch.tensor(value, dtype=torch.int64)
        else:
            out[name] = value
    return out


class ShardLoader:
    """Iterate a converted dataset in whole batches: dicts with ``image`` uint8 [B,H,W,C],
    ``label`` int64 [B] (labelled datasets), ``index`` int64 [B] (position in stored order),
    and metadata when `fields` asks (key, source, orig_width, orig_height, and an image
    CSV's other columns), as lists. A table (a
    converted tabular CSV) gives ``features`` float32 [B,F] (order: the manifest's
    ``schema.features.names``), ``label`` (int64 [B], or float32 [B] / [B,K]) and ``index``.

    ``len(loader)`` is the exact number of batches this rank yields per epoch; every rank
    yields the same number (``drop_last`` drops the tail evenly, otherwise ``padding``
    samples are repeated). After a full pass the epoch advances by itself; ``set_epoch``
    sets it. ``state_dict()`` is a few numbers; ``load_state_dict`` makes the next pass yield
    exactly the rest of the saved epoch. Rank and world size come from torch.distributed when
    it is initialised, unless given.

    Memory: at most `cache_shards` shards are open at once (default ``window + 2``; for raw
    tar shards, which are memory-mapped so that their pages are the kernel's page cache, not
    copies, up to 64). With ``num_workers=0`` they stay open between epochs: a dataset of at
    most `cache_shards` shards is read from memory from the second epoch on.

    Threads: with ``num_workers=0`` a background thread assembles the next `prefetch`
    batches, and `copy_threads` threads (default 2, or 1 on a single CPU) share each batch's
    copies (batches of 1 MiB or more): one core copies a batch at about half the speed
    memory allows. jpeg/png payloads are decoded straight into the batch by
    `decode_threads` threads (default one per CPU; libjpeg-turbo runs without the GIL), so
    ``num_workers=0`` uses every core. In DataLoader worker processes each worker copies and
    decodes alone.
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, num_workers: int = 0,
                 rank: int | None = None, world_size: int | None = None, pin_memory: bool = False,
                 fields: Sequence[str] | None = None, window: int | None = 4,
                 verify: bool = False, prefetch: int = 2, cache_shards: int | None = None,
                 decode: str = "cpu", copy_threads: int | None = None,
                 decode_threads: int | None = None) -> None:
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0; got {num_workers}")
        self.dataset = ShardDataset(path, batch_size, shuffle=shuffle, seed=seed,
                                    drop_last=drop_last, rank=rank, world_size=world_size,
                                    fields=fields, window=window, verify=verify,
                                    cache_shards=cache_shards, decode=decode,
                                    copy_threads=copy_threads, decode_threads=decode_threads)
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch = max(1, prefetch)
        self._consumed = 0

    @property
    def batch_size(self) -> int:
        return self.dataset.batch_size

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def padding(self) -> int:
        """Samples repeated per epoch (over all ranks) so that every rank gets as many."""
        return padding(self.dataset.total, self.dataset.world_size, drop_last=self.dataset.drop_last)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch."""
        ds = self.dataset
        return samples_per_rank(ds.total, ds.world_size, drop_last=ds.drop_last,
                                batch_size=ds.batch_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at the beginning of `epoch` (its own seeded order)."""
        self.dataset.epoch = int(epoch)
        self.dataset.start = 0

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands: enough to resume at the exact next sample."""
        ds = self.dataset
        return {"format": STATE_FORMAT, "fingerprint": ds.manifest.fingerprint, "seed": ds.seed,
                "epoch": ds.epoch, "samples": ds.start + self._consumed,
                "world_size": ds.world_size, "shuffle": ds.shuffle, "drop_last": ds.drop_last,
                "window": ds.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next pass yields the rest of its epoch. Raises
        ConfigError when the state belongs to another dataset or another split."""
        ds = self.dataset
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a shardkit loader state: {state!r}")
        if state["fingerprint"] != ds.manifest.fingerprint:
            raise ConfigError("this state was saved for a different dataset (fingerprint "
                              f"{state['fingerprint'][:12]}…, this one {ds.manifest.fingerprint[:12]}…)")
        mine = {"seed": ds.seed, "world_size": ds.world_size, "shuffle": ds.shuffle,
                "drop_last": ds.drop_last, "window": ds.window}
        differs = {k: (state[k], v) for k, v in mine.items() if state[k] != v}
        if differs:
            raise ConfigError(f"this state was saved with other settings (saved, now): {differs}")
        samples = int(state["samples"])
        if not 0 <= samples <= self.samples_per_epoch:
            raise ConfigError(f"state says {samples} samples consumed of {self.samples_per_epoch}")
        ds.epoch, ds.start = int(state["epoch"]), samples
        self._consumed = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        self._consumed = 0
        if self.num_workers == 0:
            batches: Any = in_background(iter(ds), depth=self.prefetch)
        else:
            batches = torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch,
            )
        for batch in batches:
            if self.pin_memory and self.num_workers == 0:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                         for k, v in batch.items()}
            self._consumed += len(batch["index"])
            yield batch
        ds.epoch += 1
        ds.start = 0
        self._consumed = 0
