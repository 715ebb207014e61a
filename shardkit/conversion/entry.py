"""`convert`, the conversion's entry point, light to import.

A process's first conversion pays for importing the conversion code (the scheduler, the plan,
the commit, the sources: ~0.2 s) and, on a local pool, for the forkserver importing the task
code before it forks a worker (~0.35 s). Both are imported here only once the options are
known, after `start_pool_early` has set the forkserver going: the two imports then overlap
instead of following each other. `shardkit.conversion.run` does the work.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from typing import TYPE_CHECKING

from shardkit.config import ConvertConfig, RunOptions
from shardkit.keywords import configs_from_options

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from shardkit.conversion.report import ConvertSummary
    from shardkit.keywords import ConvertKeywords

__all__ = ["convert", "start_pool_early"]


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str],
            config: ConvertConfig | None = None, run: RunOptions | None = None, *,
            executor: cf.Executor | None = None,
            **options: Unpack[ConvertKeywords]) -> ConvertSummary:
    """Convert the image folder, CSV file or Hugging Face dataset `src` into a shardkit
    dataset in `out` (or, with ``split=``/``validation_split=``, one per part in OUT/<part>/).

    Options come as config objects (`config`: what decides the bytes; `run`: how the run
    goes) or as keywords (`shardkit.keywords.ConvertKeywords`): any field of `ImageOptions`,
    `ConvertConfig` or `RunOptions` (size, resize, mode, format, codec, quality, shard_size
    or samples_per_shard, shuffle, seed, workers, overwrite, max_errors, ...), and for a
    ``.csv`` SRC any field of `CsvOptions` (image_col, label_col="a" or "a,b", root, columns,
    exclude, delimiter, encoding, header, keep_ints): with image_col an image CSV, else a
    tabular CSV (Parquet of typed columns); a Hugging Face SRC takes image_col and label_col.
    split="train=0.8,val=0.2" (or a dict, or a `SplitOptions`): a stratified split drawn by
    seed; validation_split=0.2: Keras' own cut (shardkit.conversion.split). The summary of a
    split is a `SplitSummary` (``.splits``: each part's).
    executor: run tasks there instead of a local process pool (image inputs).

    Returns a `ConvertSummary`. Raises ConfigError, InputError, OutputExistsError,
    WorkerError; raises TooManyFailuresError (carrying ``.summary``) after writing the whole
    dataset when more inputs failed than ``max_errors`` allows.
    """
    config, run = configs_from_options(dict(options), config, run)
    if executor is None:
        start_pool_early(src, run)
    from shardkit.conversion.run import run_conversion

    return run_conversion(src, out, config, run, executor=executor)


def start_pool_early(src: str | os.PathLike[str], run: RunOptions) -> None:
    """Start the local pool's forkserver now when the conversion will surely use one: SRC is
    a folder on this machine (image inputs, not a table) and ``run`` asks for workers. A run
    that then finds OUT up to date has started it for nothing, as `run_conversion` would."""
    if run.resolved_workers > 0 and os.path.isdir(src):
        from shardkit.conversion.executors import start_forkserver

        start_forkserver()
