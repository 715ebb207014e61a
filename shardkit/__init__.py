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

from typing import Any

from shardkit._version import __version__
from shardkit.config import ConvertConfig, CsvOptions, ErrorBudget, ImageOptions, ReadOptions, RunOptions
from shardkit.conversion.report import ConvertSummary
from shardkit.conversion.run import convert
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
from shardkit.format.storage import RetryPolicy
from shardkit.reader import Dataset
from shardkit.reader import open_dataset as open
from shardkit.reader.augment import Augment
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

_TORCH_NAMES = {"ShardDataset": "torch_dataset", "ShardLoader": "torch_dataset", "to_device": "device"}


def __getattr__(name: str) -> Any:
    # torch is an optional extra: import the torch-based reader only when it is asked for.
    if name in _TORCH_NAMES:
        import importlib

        module = importlib.import_module(f"shardkit.reader.{_TORCH_NAMES[name]}")
        return getattr(module, name)
    if name == "keras":  # a submodule, imported when used (it needs torch)
        import importlib

        return importlib.import_module("shardkit.keras")
    raise AttributeError(f"module 'shardkit' has no attribute {name!r}")
