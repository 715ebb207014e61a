"""The one reading set-up, shared by the torch loader (`ShardDataset`) and the numpy path
(`Dataset.batches`): a dataset opened for reading in one process.

``Reading`` turns (epoch, resume point, worker) into the batches' index arrays (`assign`),
and those into assembled batches: opened shards in an LRU cache that opens the next ones in
a background thread (kept between passes when asked), reusable batch buffers (kept for the
reading's life, so no epoch starts by page-faulting fresh ones), and each batch's copies
split over threads. numpy only; no torch needed.

A dataset at a URL (`open_source`) is read the same way, its shards opened from verified local
copies in the node's cache (`remote_read`); each pass announces this rank's shard sequence,
which the pure order gives before the pass starts, and the cache downloads ahead along it.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from contextlib import suppress
from typing import Any

import numpy as np

from shardkit.config import ReadOptions
from shardkit.config.common import check_count
from shardkit.errors import ConfigError, DatasetError
from shardkit.format.location import parse_location
from shardkit.format.manifest import Manifest
from shardkit.format.storage import open_storage, read_index
from shardkit.reader.assign import Cut, Split, assign, batches_per_rank, shard_sequence
from shardkit.reader.augment_params import draw_params, stored_size
from shardkit.reader.batches import BufferPool, Copier, resolve_copy_threads, stream_batches
from shardkit.reader.decode import DecodePool, resolve_decode_threads
from shardkit.reader.handles import ShardCache, check_fields, default_capacity
from shardkit.reader.remote_cache import RemoteCache
from shardkit.reader.remote_read import (
    RemoteShardCache,
    RemoteSource,
    RemoteTableCache,
    open_cache,
)
from shardkit.reader.table import TableCache, stream_table_batches

__all__ = ["Reading", "open_manifest", "open_source"]


def open_manifest(path: str) -> Manifest:
    """index.json of the dataset in `path`, which must hold images or a table."""
    return _readable(Manifest.read(path), path)


def _readable(manifest: Manifest, path: str) -> Manifest:
    if manifest.kind not in ("images", "table"):
        raise DatasetError(f"{path}: holds {manifest.kind!r}, not images or a table")
    return manifest


def open_source(path: str, options: ReadOptions) -> tuple[str, Manifest, RemoteSource | None]:
    """The dataset at `path`, a local folder or a URL: (the folder or URL, its manifest, and
    for a URL where its shards come from). index.json of a URL is fetched through the storage
    layer with `options.storage_options`. Raises DatasetError (not a dataset), ConfigError or
    MissingExtraError (a URL that cannot be used), RemoteError (index.json unreachable)."""
    location = parse_location(path)
    if location.is_local:
        folder = path if "://" not in path else location.path
        return folder, open_manifest(folder), None
    storage = open_storage(path, storage_options=options.storage_options, retry=options.retry)
    manifest, index_bytes = read_index(storage)
    return storage.url, _readable(manifest, storage.url), RemoteSource(storage, index_bytes, options)


class Reading:
    """Dataset `path` read with `options` in batches of `batch_size` as `rank` of `world`.

    Holds only plain values until the first pass; `close` (or the end of a pass without
    ``keep_open``) closes its shards. Raises ConfigError for options this dataset cannot take.
    """

    def __init__(self, path: str, manifest: Manifest, options: ReadOptions, batch_size: int, *,
                 rank: int, world: int, source: RemoteSource | None = None) -> None:
        batch_size = check_count("batch_size", batch_size, 1)
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in a world of {world}")
        _check_decode(options, manifest, path)
        self.path, self.manifest, self.options = path, manifest, options
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.fields = check_fields(manifest, options.fields)
        self.copy_threads = resolve_copy_threads(options.copy_threads)
        self.decode_threads = resolve_decode_threads(options.decode_threads)
        self.source = source
        # Made here for a URL, so that a cache limit too small for it is refused up front.
        self._remote: RemoteCache | None = None
        if source is None:
            self.capacity = options.cache_shards or default_capacity(manifest, options.window)
        else:
            self._remote, self.capacity = open_cache(source, manifest, options)
        self.sizes = [s.samples for s in manifest.shards]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self._cache: ShardCache | TableCache | None = None
        self._pool = BufferPool()
        self._copiers: dict[int, Copier] = {}  # by thread count: their threads live as long
        self._decoders: dict[int, DecodePool] = {}
        #: (height, width) of the stored images, when batches carry augmentation rows.
        self.stored = stored_size(manifest, path) if options.augment is not None else None

    @property
    def lends(self) -> bool:
        """Whether batches inside one mapped run are lent, not copied (`batches.assemble`): a
        stored-order read of fixed-shape raw shards mapped in memory."""
        return self.manifest.mapped and not self.options.shuffle

    @property
    def inline(self) -> bool:
        """Whether a pass is better assembled in the consuming thread: when every batch inside
        one shard is lent (raw tar: a shard is one mapped run; a Parquet shard's runs are its
        data pages, which may hold fewer images than a batch), a batch is a few bookkeeping
        steps, less work than handing it over from another thread."""
        return self.lends and self.manifest.format == "tar"

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return batches_per_rank(self.total, self.world, drop_last=self.options.drop_last,
                                batch_size=self.batch_size)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # open files and threads do not travel to worker processes
        state["_pool"] = BufferPool()
        state["_copiers"], state["_decoders"] = {}, {}
        state["_remote"] = None  # each process makes its own RemoteCache
        return state

    def _make_remote(self) -> RemoteCache:
        assert self.source is not None
        return self.source.cache(self.manifest, held=self.capacity, verify=self.options.verify)

    def order(self, *, epoch: int, start: int = 0, worker: int = 0, workers: int = 1,
              cuts: Sequence[Cut] = ()) -> list[np.ndarray]:
        """The index arrays `worker` of `workers` yields in `epoch`, resuming after `start`
        samples of this rank's run (of what `cuts`, resumes on other world sizes, left)."""
        o = self.options
        split = Split(rank=self.rank, world=self.world, worker=worker, workers=workers)
        return list(assign(self.sizes, split, epoch=epoch, seed=o.seed, batch_size=self.batch_size,
                           drop_last=o.drop_last, shuffle=o.shuffle, window=o.window, start=start,
                           cuts=cuts))

    def stream(self, batches: Sequence[np.ndarray], *, epoch: int, keep_open: bool,
               threads: int | None = None, demand: threading.Event | None = None,
               lend: bool = True) -> Generator[dict[str, Any], None, None]:
        """numpy batches of `batches` (of `epoch`), in order. `keep_open`: the shards stay
        open for the next pass (in the training process); `threads`: copying threads (default
        `copy_threads`), used while `demand` is set when it is given (`batches.Copier`). With
        augmentation, each batch also holds ``augment`` float32 [B, k]: its samples'
        parameters, drawn from (seed, epoch, stored index). `lend`: a stored-order pass may
        lend its batches (`lends`)."""
        stream = self._assembled(batches, keep_open=keep_open, threads=threads, demand=demand,
                                 lend=lend and self.lends)
        if self.stored is None:
            return stream
        return self._augmented(stream, epoch)

    def _augmented(self, stream: Generator[dict[str, Any], None, None],
                   epoch: int) -> Generator[dict[str, Any], None, None]:
        augment, stored = self.options.augment, self.stored
        assert augment is not None and stored is not None
        try:
            for batch in stream:
                batch["augment"] = draw_params(augment, seed=self.options.seed, epoch=epoch,
                                               index=batch["index"], stored=stored)
                yield batch
        finally:
            stream.close()

    def _assembled(self, batches: Sequence[np.ndarray], *, keep_open: bool, threads: int | None,
                   demand: threading.Event | None,
                   lend: bool) -> Generator[dict[str, Any], None, None]:
        if self.source is not None:
            return self._remote_pass(batches, keep_open=keep_open, threads=threads, demand=demand,
                                     lend=lend)
        if self.manifest.kind == "table":
            tables = self._cache if isinstance(self._cache, TableCache) else \
                TableCache(self.path, self.manifest, capacity=self.capacity,
                           verify=self.options.verify)
            self._cache = tables if keep_open else None
            return stream_table_batches(tables, self.starts, batches, keep_open=keep_open)
        shards = self._cache if isinstance(self._cache, ShardCache) else ShardCache(
            self.path, self.manifest, capacity=self.capacity, verify=self.options.verify)
        return self._images(shards, batches, keep_open=keep_open, threads=threads, demand=demand,
                            lend=lend)

    def _images(self, shards: ShardCache, batches: Sequence[np.ndarray], *, keep_open: bool,
                threads: int | None, demand: threading.Event | None,
                lend: bool) -> Generator[dict[str, Any], None, None]:
        self._cache = shards if keep_open else None
        # `threads` (1 in DataLoader worker processes, which already run in parallel) caps
        # both the copying and the decoding threads.
        count = self.copy_threads if threads is None else min(threads, self.copy_threads)
        copier = self._copiers.get(count) or self._copiers.setdefault(count, Copier(count))
        copier.demand = demand
        decoding = self.decode_threads if threads is None else min(threads, self.decode_threads)
        decoder = self._decoders.get(decoding) or self._decoders.setdefault(decoding, DecodePool(decoding))
        return stream_batches(shards, self.starts, batches, self.fields, alloc=self._pool,
                              keep_open=keep_open, encoded=self.options.decode == "device",
                              copier=copier, decoder=decoder, lend=lend)

    def _remote_pass(self, batches: Sequence[np.ndarray], *, keep_open: bool,
                     threads: int | None, demand: threading.Event | None,
                     lend: bool) -> Generator[dict[str, Any], None, None]:
        """A pass over a remote dataset: this pass's shard sequence announced to the cache
        (which downloads ahead along it), shards opened from their pinned local copies."""
        if self._remote is None:
            self._remote = self._make_remote()
        remote = self._remote
        if self.manifest.kind == "table":
            tables = self._cache if isinstance(self._cache, RemoteTableCache) else \
                RemoteTableCache(remote, self.manifest, capacity=self.capacity)
            self._cache = tables if keep_open else None
            stream = stream_table_batches(tables, self.starts, batches, keep_open=keep_open)
        else:
            shards = self._cache if isinstance(self._cache, RemoteShardCache) else \
                RemoteShardCache(remote, self.manifest, capacity=self.capacity)
            stream = self._images(shards, batches, keep_open=keep_open, threads=threads,
                                  demand=demand, lend=lend)
        remote.announce(shard_sequence(self.starts, batches))
        return _then_quiet(stream, remote)

    def close(self) -> None:
        """Close the shards kept open, stop the copying threads and the downloads."""
        opened: list[Any] = [self._cache, self._remote, *self._copiers.values(),
                             *self._decoders.values()]
        self._cache = self._remote = None
        self._copiers.clear()
        self._decoders.clear()
        for each in opened:
            if each is not None:
                each.close()


def _then_quiet(stream: Generator[dict[str, Any], None, None],
                remote: RemoteCache) -> Generator[dict[str, Any], None, None]:
    """`stream`, then (at its end, or when it is dropped) no look-ahead left downloading."""
    try:
        yield from stream
    finally:
        stream.close()
        with suppress(ConfigError):  # closed meanwhile
            remote.announce([])


def _check_decode(options: ReadOptions, manifest: Manifest, path: object) -> None:
    """``decode="device"`` needs jpeg images of one size (the GPU decodes a batch at once)."""
    if options.decode == "device" and (manifest.kind != "images" or manifest.codec != "jpeg"
                                       or manifest.image_shape is None):
        shape = manifest.schema.get("image", {}).get("shape")
        raise ConfigError(f"{path}: decode='device' needs images converted with --codec jpeg "
                          f"to one size (this dataset: codec {manifest.codec}, shape {shape})")
