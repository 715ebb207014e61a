"""Reading options: `ReadOptions`, the same options and defaults for ``ShardLoader``,
``ShardDataset`` and ``Dataset.batches``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from shardkit.config.common import check_choice, check_count
from shardkit.errors import ConfigError
from shardkit.format.retry import RetryPolicy

if TYPE_CHECKING:
    from shardkit.reader.augment import Augment

__all__ = ["DECODES", "Decode", "ReadOptions"]

DECODES: tuple[str, ...] = ("cpu", "device")
Decode = Literal["cpu", "device"]


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How a dataset is read: the same options, with the same defaults, for ``ShardLoader``,
    ``ShardDataset`` and ``Dataset.batches``.

    shuffle / seed: each epoch's order is a seeded permutation of the shards, then of the
        samples inside each `window` of consecutive shards (None: one global shuffle).
    drop_last: drop the tail so every rank gets whole batches; otherwise every rank gets the
        same number of samples, the epoch padded by repeating its first ones.
    rank / world_size: this process's place in a distributed job; None: from
        torch.distributed when it is initialised (torch loaders), else 0 of 1.
    fields: metadata fields batches carry (key, source, orig_width, orig_height, an image
        CSV's columns): names, or one string of them separated by commas (``"key"`` is
        ``("key",)``, ``"key,source"`` is ``("key", "source")``).
    verify: check every shard's sha256 when it is opened (its size is always checked).
    prefetch: batches assembled ahead in a background thread (0: in the consuming thread).
        A stored-order pass of raw tar shards lends its batches and is assembled in the
        consuming thread whatever this says (a batch is then a few bookkeeping steps).
    cache_shards: shards kept open (None: window + 2; memory-mapped shards up to 64).
    decode: ``cpu`` (batches hold pixels) or ``device`` (a jpeg dataset's batches hold the
        stored files, which ``to_device`` decodes on the accelerator).
    copy_threads: threads sharing each batch's copies (None: 1; 2 help a loop that leaves
        the CPU idle, and compete with one that copies its batches: docs/performance.md).
    decode_threads: threads decoding a jpeg/png batch (None: one per CPU; libjpeg-turbo runs
        without the GIL, so one loader uses every core).
    torch_threads: torch's intra-op threads in the loop that iterates a ``ShardLoader``,
        during each pass (put back after it). None: 1 while jpeg/png shards are decoded on
        more than one thread (torch's idle threads spin and would take those cores: measured
        in docs/performance.md; FFCV sets 1 for the whole process), else unchanged.
    augment: per-sample augmentation (`shardkit.Augment`): each batch carries its samples'
        parameters, drawn from (seed, epoch, stored index), which ``to_device`` applies.

    shuffle, drop_last and verify must be booleans (numpy's too): a string such as ``"no"``
    is a ConfigError, not True. Every invalid option is a ConfigError naming it.

    A dataset at a URL (s3://, gs://, http(s)://, any fsspec URL) is read through a node-local
    cache of verified shards (docs/remote.md): storage_options go to the fsspec filesystem
    (endpoint_url, key, secret...; ignored for local paths); cache_dir (None: the user's cache
    folder) is shared by the node's processes; cache_limit: its bytes (None: half the free
    space); prefetch_shards: shards downloading ahead (None: about 1 GiB, 2 to 16); retry: a
    `shardkit.RetryPolicy` (None: its defaults).
    """

    shuffle: bool = True
    seed: int = 0
    window: int | None = 4
    drop_last: bool = False
    rank: int | None = None
    world_size: int | None = None
    fields: tuple[str, ...] = ()
    verify: bool = False
    prefetch: int = 2
    cache_shards: int | None = None
    decode: Decode = "cpu"
    copy_threads: int | None = None
    decode_threads: int | None = None
    torch_threads: int | None = None
    augment: Augment | None = None
    storage_options: dict[str, Any] | None = field(default=None, hash=False, repr=False)
    cache_dir: str | None = None
    cache_limit: int | None = None
    prefetch_shards: int | None = None
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        from shardkit.reader.augment import Augment  # the reader's config; imported when used

        if self.augment is not None and not isinstance(self.augment, Augment):
            raise ConfigError(f"augment must be a shardkit.Augment or None; got {self.augment!r}")
        for name in _BOOLS:
            object.__setattr__(self, name, _check_bool(name, getattr(self, name)))
        object.__setattr__(self, "fields", _check_names(self.fields))
        self._check_remote()
        for name, low in (("seed", 0), ("prefetch", 0), ("window", 1), ("cache_shards", 1),
                          ("copy_threads", 1), ("decode_threads", 1), ("torch_threads", 1),
                          ("rank", 0), ("world_size", 1), ("cache_limit", 1),
                          ("prefetch_shards", 0)):
            if name in ("seed", "prefetch") or getattr(self, name) is not None:
                object.__setattr__(self, name, check_count(name, getattr(self, name), low))
        check_choice("decode", self.decode, DECODES)
        if self.rank is not None and self.world_size is not None and self.rank >= self.world_size:
            raise ConfigError(f"rank {self.rank} is not in a world of {self.world_size}")

    def _check_remote(self) -> None:
        from shardkit.format.storage import RetryPolicy

        options, folder = self.storage_options, self.cache_dir
        if options is not None and not (isinstance(options, Mapping)
                                        and all(isinstance(k, str) for k in options)):
            raise ConfigError(f"storage_options must be a dict with string keys; got {type(options)}")
        if folder is not None and (not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder)):
            raise ConfigError(f"cache_dir must be a folder path; got {folder!r}")
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigError(f"retry must be a shardkit.RetryPolicy or None; got {self.retry!r}")
        object.__setattr__(self, "storage_options", None if options is None else dict(options))
        object.__setattr__(self, "cache_dir", None if folder is None else os.fspath(folder))


_BOOLS = ("shuffle", "drop_last", "verify")


def _check_bool(name: str, value: object) -> bool:
    # bool(value) would make any non-empty string True: "no" too.
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(f"{name} must be True or False; got {value!r}")


def _check_names(value: object) -> tuple[str, ...]:
    """`fields` as a tuple of names: from names, or from one string of comma-separated names."""
    if isinstance(value, str):
        value = [n.strip() for n in value.split(",")] if value.strip() else []
    elif isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(f"fields must be field names (a list, or one string such as "
                          f"'key,source'); got {value!r}")
    names: list[str] = []
    for name in value:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"fields must be non-empty field names; got {name!r} in {value!r}")
        names.append(name)
    return tuple(names)

