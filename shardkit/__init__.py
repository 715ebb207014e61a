"""shardkit: convert image folders once into pre-decoded tar/Parquet shards, then stream them
into training at memory-copy cost.

Public API::

    shardkit.convert(src, out, [config, run], **options) -> ConvertSummary
    shardkit.open(path) -> Dataset           (numpy reading, no torch needed)
        path: a folder, or a URL (s3://, gs://, http(s)://, any fsspec URL; docs/remote.md)
    shardkit.ShardLoader(path, batch_size, [ReadOptions], **options)   (torch; the [torch] extra)
    shardkit.ShardDataset(path, batch_size, [ReadOptions], **options)
    shardkit.to_device(batch, device, mean=..., std=...)
    shardkit.Augment(...)                      (per-sample augmentation: ShardLoader(..., augment=...))
    shardkit.monitor(loader) -> Monitor       (how long the loop waits for data; needs no torch)
    shardkit.keras.dataset(path, batch_size, ...)  (Keras 3 model.fit; the [keras] extra)
"""

import importlib
from typing import TYPE_CHECKING, Any

from shardkit._version import __version__
from shardkit.config import ConvertConfig, CsvOptions, ErrorBudget, ImageOptions, ReadOptions, RunOptions
from shardkit.errors import (
    ConfigError,
    CorruptShardError,
    DatasetError,
    InputError,
    MissingExtraError,
    OutputExistsError,
    RemoteError,
    ShardkitError,
    TooManyFailuresError,
    UnsafeContentError,
    WorkerError,
)

if TYPE_CHECKING:
    from shardkit.conversion.entry import convert
    from shardkit.conversion.report import ConvertSummary
    from shardkit.format.retry import RetryPolicy
    from shardkit.reader import Dataset
    from shardkit.reader import open_dataset as open
    from shardkit.reader.augment import Augment
    from shardkit.reader.device import to_device
    from shardkit.reader.torch_dataset import ShardDataset, ShardLoader
    from shardkit.tools.monitor import monitor

__all__ = [
    "Augment",
    "ConfigError",
    "ConvertConfig",
    "ConvertSummary",
    "CorruptShardError",
    "CsvOptions",
    "Dataset",
    "DatasetError",
    "ErrorBudget",
    "ImageOptions",
    "InputError",
    "MissingExtraError",
    "OutputExistsError",
    "ReadOptions",
    "RemoteError",
    "RetryPolicy",
    "RunOptions",
    "ShardDataset",
    "ShardLoader",
    "ShardkitError",
    "TooManyFailuresError",
    "UnsafeContentError",
    "WorkerError",
    "__version__",
    "convert",
    "monitor",
    "open",
    "to_device",
]

#: The rest of the API, imported on first use (PEP 562): ``import shardkit`` stays light, so
#: a conversion's worker processes, which import the task code through this package, start
#: without the reader, the scheduler or pyarrow.compute, and torch (an optional extra) is
#: imported only by the names that need it. name: (module, attribute in it).
_LAZY = {
    "ConvertSummary": ("shardkit.conversion.report", "ConvertSummary"),
    "convert": ("shardkit.conversion.entry", "convert"),
    "RetryPolicy": ("shardkit.format.retry", "RetryPolicy"),
    "Dataset": ("shardkit.reader", "Dataset"),
    "open": ("shardkit.reader", "open_dataset"),
    "Augment": ("shardkit.reader.augment", "Augment"),
    "monitor": ("shardkit.tools.monitor", "monitor"),
    "ShardDataset": ("shardkit.reader.torch_dataset", "ShardDataset"),
    "ShardLoader": ("shardkit.reader.torch_dataset", "ShardLoader"),
    "to_device": ("shardkit.reader.device", "to_device"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # found directly from now on
        return value
    if name == "keras":  # a submodule, imported when used (it needs torch)
        return importlib.import_module("shardkit.keras")
    raise AttributeError(f"module 'shardkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
