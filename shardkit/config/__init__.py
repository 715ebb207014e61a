"""Configuration: frozen, keyword-only dataclasses validated on construction.

`ConvertConfig` holds every option that decides the bytes of the output; it is written,
resolved, into ``index.json`` and hashed into the dataset fingerprint. `RunOptions` holds
what only decides *how* the run goes (workers, overwrite, error budget, progress display):
two runs that differ only there produce byte-identical datasets. `ReadOptions` holds how a
dataset is read, with the same names and defaults for ``ShardLoader``, ``ShardDataset`` and
``Dataset.batches``. ``shardkit.keywords`` maps the public keyword spellings onto them.
"""

from shardkit.config.common import usable_cpus
from shardkit.config.convert import (
    ARRAY3D_VALUES,
    CODECS,
    COLOR_MODES,
    COMPRESSIONS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PIXELS,
    DEFAULT_SHARD_BYTES,
    FILTERS,
    FORMATS,
    PIXELS,
    RESIZE_MODES,
    Codec,
    ColorMode,
    ConvertConfig,
    CsvOptions,
    ErrorBudget,
    Filter,
    Format,
    HfOptions,
    ImageOptions,
    Pixels,
    ResizeMode,
    RunOptions,
    SplitOptions,
)
from shardkit.config.read import DECODES, Decode, ReadOptions

__all__ = [
    "ARRAY3D_VALUES",
    "CODECS",
    "COLOR_MODES",
    "COMPRESSIONS",
    "DECODES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_PIXELS",
    "DEFAULT_SHARD_BYTES",
    "FILTERS",
    "FORMATS",
    "PIXELS",
    "RESIZE_MODES",
    "Codec",
    "ColorMode",
    "ConvertConfig",
    "CsvOptions",
    "Decode",
    "ErrorBudget",
    "Filter",
    "Format",
    "HfOptions",
    "ImageOptions",
    "Pixels",
    "ReadOptions",
    "ResizeMode",
    "RunOptions",
    "SplitOptions",
    "usable_cpus",
]
