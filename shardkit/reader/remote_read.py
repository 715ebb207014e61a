"""Reading a dataset at a URL: index.json through the storage layer, shards through the
node-local verified cache (`RemoteCache`), opened by the same `open_shard` as local shards.

A URL is told from a local path once, when a reader is made (`pipeline.open_source`); for a
local path nothing here runs, so local reading is unchanged. For a URL, `RemoteSource` holds
plain values (the storage, index.json's exact bytes, the cache settings) that travel to
DataLoader worker processes; each process that reads makes its own `RemoteCache` from it.
`RemoteShardCache` and `RemoteTableCache` are the `OpenAhead` caches of opened shards whose
`_load` first asks the RemoteCache for a verified local copy, pinned (never evicted by any
process of the node) for as long as the shard stays open, and whose `_dropped` unpins it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from shardkit.config import ReadOptions
from shardkit.errors import ConfigError, CorruptShardError
from shardkit.format.manifest import Manifest
from shardkit.format.storage import Storage
from shardkit.reader.handles import ShardCache, default_capacity
from shardkit.reader.remote_cache import RemoteCache, default_prefetch
from shardkit.reader.table import TableCache

__all__ = ["REMOTE_FIELDS", "RemoteShardCache", "RemoteSource", "RemoteTableCache",
           "open_cache", "pinned_copy", "remote_capacity"]

T = TypeVar("T")

#: The ReadOptions that say where a remote dataset's bytes come from; fixed when it is opened.
REMOTE_FIELDS = ("storage_options", "cache_dir", "cache_limit", "prefetch_shards", "retry")


def remote_capacity(manifest: Manifest, window: int | None) -> int:
    """Shards a reader of a remote dataset keeps open when the cache cannot hold the whole
    dataset: the shuffle window + 2 (the shards a batch mixes and the next ones), at most the
    dataset's. Not the 64 memory-mapped shards local raw data keeps: every open shard is a
    copy pinned in the cache, which no process may evict, and `cache_limit` must hold the pins
    of every reader on the node besides their look-ahead."""
    shards = len(manifest.shards)
    return max(1, min(shards, (window or shards) + 2))


def open_cache(source: RemoteSource, manifest: Manifest,
               options: ReadOptions) -> tuple[RemoteCache, int]:
    """This process's RemoteCache for a reader with `options`, and how many shards the reader
    keeps open. `cache_shards` when given; else, when the cache limit holds the whole dataset
    (and the look-ahead), as many as a local reader keeps (`default_capacity`: pins cost
    nothing when nothing need be evicted, and re-mapping every shard every epoch would halve
    the speed of later epochs on small shards); else the small `remote_capacity`. ConfigError
    when the limit cannot hold what reading needs."""
    verify = options.verify
    if options.cache_shards is not None:
        return source.cache(manifest, held=options.cache_shards, verify=verify), options.cache_shards
    with suppress(ConfigError):
        roomy = source.cache(manifest, held=len(manifest.shards), verify=verify)
        # ... with the whole look-ahead, which a tight limit would have trimmed to make room
        if options.prefetch_shards is not None or roomy.prefetch_shards >= default_prefetch(manifest):
            return roomy, default_capacity(manifest, options.window)
    small = remote_capacity(manifest, options.window)
    return source.cache(manifest, held=small, verify=verify), small


@dataclass(frozen=True)
class RemoteSource:
    """Where a remote dataset's shards come from: plain values, picklable (no open files,
    threads or connections). `cache` makes the per-process RemoteCache."""

    storage: Storage
    index_bytes: bytes
    options: ReadOptions

    @property
    def url(self) -> str:
        return self.storage.url

    def cache(self, manifest: Manifest, *, held: int, verify: bool) -> RemoteCache:
        """A RemoteCache for a reader keeping `held` shards open (one more is allowed for: a
        shard evicted while it was still being opened pins until its open ends; never more
        than the dataset's shards, of which none is evicted once all are held). ConfigError
        when the cache limit cannot hold them and the look-ahead."""
        o = self.options
        pinned = min(held + 1, max(1, len(manifest.shards)))
        return RemoteCache(self.storage, manifest, self.index_bytes, cache_dir=o.cache_dir,
                           cache_limit=o.cache_limit, prefetch_shards=o.prefetch_shards,
                           held=pinned, verify=verify)

    def check(self, options: ReadOptions) -> None:
        """ConfigError when `options` set where the bytes come from differently than the
        options this dataset was opened with."""
        differ = [name for name in REMOTE_FIELDS if getattr(options, name) is not None
                  and getattr(options, name) != getattr(self.options, name)]
        if differ:
            raise ConfigError(f"{self.url}: {', '.join(differ)} are fixed when the dataset is "
                              "opened (shardkit.open(url, ...)); give them there")


def _release(remote: RemoteCache, number: int) -> None:
    # A closed cache, or one inherited through a fork, holds no pin of ours to let go.
    with suppress(ValueError, ConfigError):
        remote.release(number)


def _url(remote: RemoteCache, number: int) -> str:
    return remote.storage.url_of(remote.manifest.shards[number].file)


def _pinned(remote: RemoteCache, number: int, open_local: Callable[[], T]) -> T:
    """`open_local()` of shard `number` while the RemoteCache pins its verified local copy;
    the pin is let go if the open fails, and a damaged shard's error names its URL."""
    remote.path(number)  # blocks until a verified copy is in place
    try:
        return open_local()
    except CorruptShardError as exc:
        _release(remote, number)
        raise CorruptShardError(f"{_url(remote, number)}: {exc}") from None
    except BaseException:
        _release(remote, number)
        raise


@contextmanager
def pinned_copy(remote: RemoteCache, number: int) -> Iterator[str]:
    """The folder holding a verified local copy of shard `number`, pinned while the block
    runs; a CorruptShardError raised in it names the shard's URL."""
    remote.path(number)
    try:
        yield remote.folder
    except CorruptShardError as exc:
        raise CorruptShardError(f"{_url(remote, number)}: {exc}") from None
    finally:
        _release(remote, number)


def _release_when_done(remote: RemoteCache, number: int, future: Future[Any]) -> None:
    def done(opened: Future[Any]) -> None:
        if not opened.cancelled() and opened.exception() is None:
            _release(remote, number)

    future.add_done_callback(done)  # at once when it is done already


class _Pinned:
    """What a remote cache of opened shards adds: each shard pinned in `remote` while open.
    The copy was checked by the RemoteCache (size; sha256 while downloading and, with
    `verify`, once more on first use), so opening does not hash it again."""

    remote: RemoteCache

    def _load(self, number: int) -> Any:
        opened = super()._load  # type: ignore[misc]  # the ShardCache's or the TableCache's
        return _pinned(self.remote, number, lambda: opened(number))

    def _dropped(self, number: int, future: Future[Any]) -> None:
        _release_when_done(self.remote, number, future)


class RemoteShardCache(_Pinned, ShardCache):
    """Opened shards of a remote image dataset (see `_Pinned`)."""

    def __init__(self, remote: RemoteCache, manifest: Manifest, *, capacity: int) -> None:
        ShardCache.__init__(self, remote.folder, manifest, capacity=capacity, verify=False)
        self.remote = remote


class RemoteTableCache(_Pinned, TableCache):
    """Opened shards of a remote table (see `_Pinned`)."""

    def __init__(self, remote: RemoteCache, manifest: Manifest, *, capacity: int) -> None:
        TableCache.__init__(self, remote.folder, manifest, capacity=capacity, verify=False)
        self.remote = remote
