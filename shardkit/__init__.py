"""shardkit: convert image folders once into pre-decoded tar/Parquet shards, then stream them
into training at memory-copy cost.

Public API::

    shardkit.convert(src, out, **options) -> ConvertSummary
    shardkit.open(path) -> Dataset           (numpy reading, no torch needed)
    shardkit.ShardLoader(path, batch_size, ...)   (torch; needs the [torch] extra)
    shardkit.ShardDataset(path, batch_size, ...)
    shardkit.to_device(batch, device, mean=..., std=...)
    shardkit.monitor(loader) -> Monitor       (how long the loop waits for data; needs no torch)
"""

from typing import Any

from shardkit._version import __version__
from shardkit.config import ConvertConfig, CsvOptions, ErrorBudget, ImageOptions, RunOptions
from shardkit.convert import convert
from shardkit.errors import (
    ConfigError,
    CorruptShardError,
    DatasetError,
    InputError,
    MissingExtraError,
    OutputExistsError,
    ShardkitError,
    TooManyFailuresError,
    UnsafeContentError,
    WorkerError,
)

# Imported eagerly (it imports nothing heavy): a lazy `monitor` would be replaced by the
# submodule of the same name the moment anything imported shardkit.monitor.
from shardkit.monitor import monitor
from shardkit.reader import Dataset
from shardkit.reader import open_dataset as open
from shardkit.report import ConvertSummary

__all__ = [
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

_TORCH_NAMES = {"ShardDataset": "dataset", "ShardLoader": "dataset", "to_device": "device"}


def __getattr__(name: str) -> Any:
    # torch is an optional extra: import the torch-based reader only when it is asked for.
    if name in _TORCH_NAMES:
        import importlib

        module = importlib.import_module(f"shardkit.reader.{_TORCH_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'shardkit' has no attribute {name!r}")
