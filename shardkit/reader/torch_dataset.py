"""PyTorch reading: `ShardDataset` (an IterableDataset of whole batches) and `ShardLoader`
(what training loops iterate: exact ``len``, ``set_epoch``, tiny ``state_dict``).

Both take the same options (`shardkit.config.ReadOptions`, as an object or as keywords) and
read through the one reading set-up (`shardkit.reader.pipeline.Reading`) that the numpy
``Dataset.batches`` uses too. For raw shards the fast path is ``num_workers=0``: batches are
assembled in a background thread of the training process (the gather releases the GIL), with
no extra copy through shared memory. Worker processes pay off when samples must be decoded
(jpeg/png).
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shardkit.config import ReadOptions
from shardkit.config.common import check_count
from shardkit.errors import ConfigError, ShardkitError, require
from shardkit.keywords import read_options
from shardkit.reader.assign import Cut, padding, samples_left, samples_per_rank
from shardkit.reader.batches import Prefetcher
from shardkit.reader.pipeline import Reading, open_source

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from shardkit.format.manifest import Manifest
    from shardkit.keywords import ReadKeywords

torch: Any = require("torch", "torch")
_IterableDataset: Any = torch.utils.data.IterableDataset

__all__ = ["ShardDataset", "ShardLoader"]

STATE_FORMAT = "shardkit.loader/1"
_THREADS_NOT_WORKERS = (
    "ShardLoader(num_workers={}): shardkit assembles batches with threads in this process, so "
    "num_workers is not used. Raw pixels are memory-mapped and a batch is one copy; a worker "
    "process would add a second copy of every batch through shared memory (docs/performance.md "
    "measures it). jpeg/png shards are decoded by a pool of threads, one per core. To use worker "
    "processes anyway: DataLoader(ShardDataset(...), batch_size=None, num_workers=...).")


def _distributed() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


class ShardDataset(_IterableDataset):  # type: ignore[misc]
    """An IterableDataset yielding whole batches (dicts of tensors) of one rank.

    Use with ``DataLoader(ds, batch_size=None, num_workers=k)``: each worker yields every
    k-th batch, so the DataLoader's round-robin gives the same sequence for any k. Options:
    `options` and/or keywords, as `ShardLoader` takes them. The object holds only plain values
    until it is iterated (no open files), so it is cheap to send to worker processes; for a
    URL each worker makes its own cache object over the one cache folder of the node.

    Epochs: in this process (``num_workers=0``), a pass that hands out its last batch
    advances the epoch (the next pass starts the next epoch, from its first sample); one
    broken off earlier is repeated. In ``persistent_workers=True`` workers, whose copies live
    on, every pass after the first starts the next epoch: a worker makes its batches ahead of
    the loop and cannot see where the loop stopped, so all of them move on together (each
    advancing when its own last batch was made mixed two epochs in the pass after one broken
    off). Workers that are not persistent are new copies each epoch, made from this object:
    call ``ds.set_epoch(epoch)`` before each epoch, as with torch's DistributedSampler
    (otherwise every epoch repeats the first one's order).
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int,
                 options: ReadOptions | None = None, **keywords: Unpack[ReadKeywords]) -> None:
        super().__init__()
        self.options = read_options(options, dict(keywords))
        #: The dataset's folder, or its URL.
        self.path, manifest, source = open_source(os.fspath(path), self.options)
        auto_rank, auto_world = _distributed()
        rank = auto_rank if self.options.rank is None else self.options.rank
        world = auto_world if self.options.world_size is None else self.options.world_size
        #: The reading set-up: batch size, rank and world, the order, the shards.
        self.reading = Reading(self.path, manifest, self.options, batch_size, rank=rank, world=world,
                               source=source)
        self.manifest: Manifest = manifest
        self.total = self.reading.total  # samples in the dataset
        self.epoch = 0
        self.start = 0
        #: Where this epoch stopped before on other world sizes (resumed there; see assign).
        self.cuts: tuple[Cut, ...] = ()
        #: Set by ShardLoader while its loop waits for a batch (copying threads help only then).
        self.demand: threading.Event | None = None
        #: Passes this copy has started in a DataLoader worker process (see the docstring).
        self._worker_passes = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "demand": None}  # an Event does not travel to worker processes

    def __len__(self) -> int:
        return len(self.reading)

    def batches(self, worker: int = 0, workers: int = 1) -> list[np.ndarray]:
        """The index arrays this worker yields this epoch (from `start`)."""
        return self.reading.order(epoch=self.epoch, start=self.start, worker=worker, workers=workers,
                                  cuts=self.cuts)

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at the beginning of `epoch` (its own seeded order). ConfigError
        unless `epoch` is an integer >= 0."""
        self.epoch, self.start, self.cuts = check_count("epoch", epoch, 0), 0, ()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            if self._worker_passes:
                self.set_epoch(self.epoch + 1)
            self._worker_passes += 1
            yield from self._tensors(self.batches(info.id, info.num_workers), in_process=False)
            return
        order = self.batches()
        for step, batch in enumerate(self._tensors(order), start=1):
            if step == len(order):  # the pass is complete once its last batch is out (as a
                self.set_epoch(self.epoch + 1)  # ShardLoader's); one broken off is repeated
            yield batch
        if not order:
            self.set_epoch(self.epoch + 1)

    def _tensors(self, batches: Sequence[np.ndarray], *,
                 in_process: bool = True) -> Generator[dict[str, Any], None, None]:
        """The batches (dicts of tensors) of `batches`, index arrays of this epoch."""
        # Shards stay open between epochs only in the training process. Worker processes
        # already copy in parallel; in the training process a batch's copies are split over
        # threads.
        # Worker processes do not lend: their batches are copied into shared memory anyway,
        # and a lent tar batch's storage holds the members between its pixels too.
        stream = self.reading.stream(batches, epoch=self.epoch, keep_open=in_process,
                                     threads=None if in_process else 1,
                                     demand=self.demand if in_process else None,
                                     lend=in_process)
        try:
            for batch in stream:
                yield _to_tensors(batch)
        finally:
            # Now, not when a held traceback lets go of this generator: the copying threads
            # stop, and shards are closed unless they are kept for the next epoch.
            stream.close()


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


def _cuts_to_state(cuts: Sequence[Cut]) -> list[list[int]]:
    return [[c.world, c.batch_size, c.samples] for c in cuts]


#: What every loader state holds (batch_size and cuts came later: a state may lack them).
_STATE_KEYS = ("fingerprint", "seed", "epoch", "samples", "world_size", "shuffle", "drop_last",
               "window")


def _triples(value: object) -> bool:
    """A sequence of 3-item sequences (lists from JSON, tuples or a config library's lists)."""
    text = (str, bytes)
    return isinstance(value, Sequence) and not isinstance(value, text) and all(
        isinstance(c, Sequence) and not isinstance(c, text) and len(c) == 3 for c in value)


def _cuts_of(state: dict[str, Any], batch_size: int) -> tuple[tuple[Cut, ...], Cut]:
    """A state's earlier cuts of its epoch, and where it stands as one more cut (a state
    saved before batch sizes were recorded was saved with this loader's)."""
    def cut(world: object, size: object, samples: object) -> Cut:
        return Cut(check_count("world_size", world, 1), check_count("batch_size", size, 1),
                   check_count("samples", samples, 0))

    try:
        listed = state.get("cuts", [])
        if not _triples(listed):
            raise ConfigError(f"cuts must be a list of [world_size, batch_size, samples]; got {listed!r}")
        cuts = tuple(cut(*c) for c in listed)
        saved = cut(state["world_size"], state.get("batch_size", batch_size), state["samples"])
    except (ConfigError, KeyError) as exc:
        raise ConfigError(f"not a shardkit loader state ({exc}): {state!r}") from None
    return cuts, saved


class _LoaderPass:
    """What ``iter(loader)`` returns: one pass over a `ShardLoader`, which starts with the
    first ``next``. A pass that starts later (a newer ``iter(loader)``) ends this one: its
    prefetching stops, its shards and threads are let go, and a later ``next`` on it raises
    ShardkitError (it would otherwise hand out batches of a pass the loader has left)."""

    def __init__(self, loader: ShardLoader) -> None:
        self._loader = loader
        self._batches: Generator[dict[str, Any], None, None] | None = None
        self._finished = False  # its batches ran out (StopIteration from now on)
        self._ended = False  # a newer pass ended it

    def __iter__(self) -> _LoaderPass:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._ended:
            raise ShardkitError(
                "this ShardLoader iterator was ended by a newer pass over the same loader "
                "(iter(loader) again): a loader reads one pass at a time; use the newer iterator")
        if self._batches is None:
            self._batches = self._loader._start(self)
        try:
            return next(self._batches)
        except StopIteration:
            self._finished = True
            raise

    def close(self) -> None:
        """Stop the pass now (as dropping the iterator does, when it is collected)."""
        if self._batches is not None:
            self._batches.close()

    def end(self) -> None:
        """A newer pass starts: this one stops, and refuses to go on unless it had finished."""
        self._ended = not self._finished
        self.close()


def _close(prefetcher: Prefetcher, reading: Reading) -> None:
    """A ShardLoader's threads end with it (its finaliser)."""
    try:
        prefetcher.close()
    finally:
        reading.close()


class ShardLoader:
    """Iterate a converted dataset in whole batches: dicts with ``image`` uint8 [B,H,W,C],
    ``label`` int64 [B] (labelled datasets), ``index`` int64 [B] (position in stored order),
    and metadata when `fields` asks: orig_width and orig_height as int64 [B] tensors; key,
    source and an image CSV's other columns as lists (of B values). A table (a converted
    tabular CSV) gives ``features`` float32 [B,F] (order: the manifest's
    ``schema.features.names``), ``label`` (int64 [B], or float32 [B] / [B,K]) and ``index``.

    `path`: the dataset's folder, or its URL (``s3://``, ``gs://``, ``http(s)://``, any fsspec
    URL): shards then come through a verified node-local cache (docs/remote.md; options
    storage_options, cache_dir, cache_limit, prefetch_shards, retry).

    Options: a `ReadOptions` and/or its fields as keywords (shuffle, seed, window, drop_last,
    rank, world_size, fields, verify, prefetch, cache_shards, decode, copy_threads: see
    ReadOptions for each); `pin_memory` as torch's DataLoader takes it. `num_workers` is
    accepted and not used, with a warning that says why: batches are assembled by threads of
    this process, which is faster than worker processes for every kind of shard.

    ``len(loader)`` is the exact number of batches this rank yields per epoch; every rank
    yields the same number (``drop_last`` drops the tail evenly, otherwise ``padding``
    samples are repeated). The epoch advances by itself when a pass hands out its last batch
    (a loop that stops after ``len(loader)`` batches without exhausting the iterator gets the
    next epoch's order next time); a pass broken off earlier is repeated. ``set_epoch`` sets
    it. ``state_dict()`` is a few numbers; ``load_state_dict`` makes the next pass yield
    exactly the rest of the saved epoch (a state taken after the last batch of an epoch
    resumes at the start of the next). Rank and world size come from torch.distributed when
    it is initialised, unless given.

    Passes: each ``iter(loader)`` is a full pass of its own, as a new epoch is, from where the
    loader stands (its epoch, and a loaded state's resume point). One pass runs at a time: a
    pass starts with its iterator's first ``next``, and ends the pass of any earlier
    iterator still open, whose next ``next`` then raises ShardkitError. Calling ``set_epoch``
    or ``load_state_dict`` during a pass lets that pass go on with its own order, no longer
    counted in ``state_dict`` nor advancing the epoch.

    Memory: at most `cache_shards` shards are open at once (default ``window + 2``; for
    memory-mapped shards — raw tar, and raw Parquet with an uncompressed image column — whose
    pages are the kernel's page cache, not copies, up to 64). They stay open between epochs:
    a dataset of at most `cache_shards` shards is read from memory from the second epoch on.

    Threads: a background thread assembles the next `prefetch` batches (one copy per shard a
    batch touches); `copy_threads=2` lets a second thread share each batch's copies, which
    helps a loop that leaves the CPU idle and slows one that copies its batches (the default
    is 1: docs/performance.md). A stored-order read (``shuffle=False``) of memory-mapped
    shards copies nothing: a batch of consecutive samples of one shard is a view of the
    shard's mapping, lent to you (change it as you would a copy: the file, the pass's other
    batches and later passes never see it; in tar shards its samples are not adjacent in
    memory, so ``image.is_contiguous()`` is False; a batch that spans two shards is a copy),
    and for tar shards such a pass is assembled in the loop's own thread, which is quicker
    than a hand-over. A lent batch holds its shard's mapping (and an open file) while you
    hold it; a tar batch's storage spans the tar members between its pixels, so ``.clone()``
    it before ``torch.save``. Two passes open at once over one ShardDataset lend nothing, nor
    do DataLoader worker processes (their batches are copied into shared memory anyway).
    jpeg/png shards are decoded by `decode_threads` threads (one per CPU). In DataLoader
    worker processes (a ``DataLoader(ShardDataset(...))`` built by hand) each worker copies
    and decodes alone.

    Augmentation: with ``augment=Augment(...)`` each batch also holds ``augment`` (float32
    [B, k]), every sample's parameters drawn from (seed, epoch, its stored index) — the same
    for any worker count, rank count or resume cut, new each epoch; `to_device` applies them
    on the device. Needs images stored at one size.
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int,
                 options: ReadOptions | None = None, *, num_workers: int = 0,
                 pin_memory: bool = False, **keywords: Unpack[ReadKeywords]) -> None:
        num_workers = check_count("num_workers", num_workers, 0)
        if num_workers:
            warnings.warn(_THREADS_NOT_WORKERS.format(num_workers), UserWarning, stacklevel=2)
        self.dataset = ShardDataset(path, batch_size, options, **keywords)
        self.options: ReadOptions = self.dataset.options
        self.batch_size: int = self.dataset.reading.batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._consumed = 0  # samples the counted pass has handed out
        self._counted: object | None = None  # the pass whose batches move the position
        self._live: weakref.ref[_LoaderPass] | None = None  # the iterator of the open pass
        # One background thread for the loader's life (not one per epoch), and the event that
        # tells the copying threads when the loop waits for a batch.
        copying = self.dataset.reading.copy_threads > 1
        self.dataset.demand = threading.Event() if self.options.prefetch and copying else None
        self._prefetcher = Prefetcher(self.options.prefetch, self.dataset.demand)
        weakref.finalize(self, _close, self._prefetcher, self.dataset.reading)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def padding(self) -> int:
        """Samples repeated per epoch (over all ranks) so that every rank gets as many."""
        reading = self.dataset.reading
        return padding(reading.total, reading.world, drop_last=self.options.drop_last)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch."""
        reading = self.dataset.reading
        return samples_per_rank(reading.total, reading.world, drop_last=self.options.drop_last,
                                batch_size=reading.batch_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at the beginning of `epoch` (its own seeded order). ConfigError
        unless `epoch` is an integer >= 0."""
        epoch = check_count("epoch", epoch, 0)  # checked before the open pass is let go
        self._detach()
        self.dataset.set_epoch(epoch)

    def _detach(self) -> None:
        """The position is set anew: the open pass, if any, no longer moves it."""
        self._counted = None
        self._consumed = 0

    def _next_epoch(self) -> None:
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands: enough to resume at the exact next sample. Plain JSON, the
        same on every rank of a job (ranks step together)."""
        ds, o = self.dataset, self.options
        return {"format": STATE_FORMAT, "fingerprint": ds.manifest.fingerprint, "seed": o.seed,
                "epoch": ds.epoch, "samples": ds.start + self._consumed,
                "world_size": ds.reading.world, "batch_size": self.batch_size,
                "shuffle": o.shuffle, "drop_last": o.drop_last, "window": o.window,
                "cuts": _cuts_to_state(ds.cuts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next pass yields the rest of its epoch. A state saved
        with another world size (a job restarted on fewer or more ranks) continues with the
        samples no rank had consumed, split evenly over this world (every rank of the saved
        job must have consumed as many, as DDP's ranks do); so does one saved with another batch
        size. The next epoch is the same as without the restart. Raises ConfigError when the
        state belongs to another dataset or was saved with another seed, shuffle, window or
        drop_last."""
        ds, o = self.dataset, self.options
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a shardkit loader state: {state!r}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing or not isinstance(state["fingerprint"], str):
            what = f"no {', '.join(missing)}" if missing else "fingerprint is not a string"
            raise ConfigError(f"not a shardkit loader state ({what}): {state!r}")
        try:
            epoch = check_count("epoch", state["epoch"], 0)
        except ConfigError as exc:
            raise ConfigError(f"not a shardkit loader state ({exc}): {state!r}") from None
        if state["fingerprint"] != ds.manifest.fingerprint:
            raise ConfigError("this state was saved for a different dataset (fingerprint "
                              f"{state['fingerprint'][:12]}…, this one {ds.manifest.fingerprint[:12]}…)")
        mine = {"seed": o.seed, "shuffle": o.shuffle, "drop_last": o.drop_last, "window": o.window}
        differs = {k: (state[k], v) for k, v in mine.items() if state[k] != v}
        if differs:
            raise ConfigError(f"this state was saved with other settings (saved, now): {differs}")
        cuts, saved = _cuts_of(state, self.batch_size)
        try:
            per_rank = samples_left(ds.total, cuts, world=saved.world,
                                    batch_size=saved.batch_size, drop_last=o.drop_last)
        except ValueError as exc:
            raise ConfigError(f"this state's cuts do not fit the dataset: {exc}") from None
        if saved.samples > per_rank:
            raise ConfigError(f"state says {saved.samples} samples consumed of {per_rank}")
        start = saved.samples
        if (saved.world, saved.batch_size) != (ds.reading.world, self.batch_size):
            cuts, start = (*cuts, saved), 0  # the rest of the epoch, re-split over this world
        self._detach()
        ds.epoch, ds.start, ds.cuts = epoch, start, cuts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """A full pass of its own (see the class docstring, "Passes")."""
        return _LoaderPass(self)

    def _start(self, owner: _LoaderPass) -> Generator[dict[str, Any], None, None]:
        """`owner`'s pass, which replaces the open one (that pass ends first: its threads
        leave their shards and its torch thread count is put back before this one sets it)."""
        live = self._live() if self._live is not None else None
        if live is not None and live is not owner:
            live.end()
        self._live = weakref.ref(owner)
        return self._run()

    def _run(self) -> Generator[dict[str, Any], None, None]:
        ds, me = self.dataset, object()
        order = ds.batches()
        items = ds._tensors(order)
        ahead = self.options.prefetch and not ds.reading.inline
        batches = self._prefetcher.run(items) if ahead else items
        self._counted, self._consumed = me, 0
        # Held here: a pass still open at interpreter exit is closed after torch's module is
        # torn down, and its `finally` must still put the count back.
        threads, saved, set_threads = self._torch_threads(), torch.get_num_threads(), torch.set_num_threads
        if threads is not None:
            set_threads(threads)  # this (the training) thread's, for this pass
        try:
            for step, batch in enumerate(batches, start=1):
                if self.pin_memory:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                             for k, v in batch.items()}
                if self._counted is me:
                    self._consumed += len(batch["index"])
                    if step == len(order):  # the pass is complete once its last batch is out
                        self._next_epoch()
                yield batch
            if self._counted is me:  # a pass with no batch to hand out
                self._next_epoch()
        finally:
            batches.close()  # now: the thread leaves the pass, the shards are let go
            if threads is not None:
                set_threads(saved)

    def _torch_threads(self) -> int | None:
        """torch's intra-op threads for a pass (see ReadOptions.torch_threads); None: as they are."""
        if self.options.torch_threads is not None:
            return self.options.torch_threads
        reading = self.dataset.reading
        decoding = reading.manifest.kind == "images" and reading.manifest.codec != "raw" \
            and self.options.decode == "cpu" and reading.decode_threads > 1
        return 1 if decoding else None
