"""shardkit: convert image folders once into pre-decoded tar/Parquet shards, then stream them
into training at memory-copy cost.

Public API::

    shardkit.convert(src, out, **options) -> ConvertSummary
    shardkit.open(path) -> Dataset           (numpy reading, no torch needed)
"""

from shardkit._version import __version__
from shardkit.config import ConvertConfig, ErrorBudget, ImageOptions, RunOptions
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
from shardkit.reader import Dataset
from shardkit.reader import open_dataset as open
from shardkit.report import ConvertSummary

__all__ = [
    "ConfigError",
    "ConvertConfig",
    "ConvertSummary",
    "CorruptShardError",
    "Dataset",
    "DatasetError",
    "ErrorBudget",
    "ImageOptions",
    "InputError",
    "MissingExtraError",
    "OutputExistsError",
    "RunOptions",
    "ShardkitError",
    "TooManyFailuresError",
    "UnsafeContentError",
    "WorkerError",
    "__version__",
    "convert",
    "open",
]
