"""Run a conversion: plan → part and shard tasks on an executor → atomic commit → index.json
(entered through `shardkit.conversion.entry.convert`).

The calling process plans, schedules and commits; executors only run `shardkit.conversion.tasks`. A
shard becomes visible by an atomic rename after fsync, ``errors.jsonl`` and ``index.json``
are written last, and an interrupted or failed run leaves no file under a final name that is
incomplete (and no ``index.json``, so no dataset).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from shardkit.config import ConvertConfig, RunOptions
from shardkit.conversion import executors
from shardkit.conversion.commit import Commit, Out, State
from shardkit.conversion.executors import InlineExecutor, local_pool
from shardkit.conversion.plan import Plan, make_plan, rows_per_group
from shardkit.conversion.report import ConvertSummary
from shardkit.conversion.scheduler import Scheduler
from shardkit.conversion.sources.hf import resolve_source
from shardkit.conversion.sources.remote import remote_source
from shardkit.conversion.tabular import TablePlan, plan_table, write_table
from shardkit.errors import ConfigError, InputError, ShardkitError, TooManyFailuresError, WorkerError
from shardkit.format.location import parse_location
from shardkit.format.manifest import Manifest
from shardkit.format.samples import image_schema
from shardkit.format.storage import Storage, open_storage

__all__ = ["convert_images", "convert_table", "resolve_out", "run_conversion"]


def run_conversion(src: str | os.PathLike[str], out: str | os.PathLike[str],
                   config: ConvertConfig, run: RunOptions, *,
                   executor: cf.Executor | None = None) -> ConvertSummary:
    """Plan, execute and commit (see the module docstring); `convert` with config objects.
    OUT (and SRC) may be URLs: an unusable one is refused before anything is read or written."""
    with executors.interrupts_kept():
        try:
            return _run_conversion(src, out, config, run, executor)
        except ShardkitError:
            raise
        except OSError as exc:  # in this process: OUT's disk full, a folder of SRC unreadable
            if exc.filename is not None and _below(os.fspath(exc.filename), src):
                raise InputError(f"{exc.filename}: SRC cannot be read: {exc.strerror or exc}") from exc
            raise WorkerError(_stopped_by(exc, out)) from exc


def _below(path: str, src: str | os.PathLike[str]) -> bool:
    """`path` is SRC or lies below it (a local SRC)."""
    path, root = os.path.abspath(path), os.path.abspath(os.fspath(src))
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _stopped_by(exc: OSError, out: str | os.PathLike[str]) -> str:
    """The one line a conversion stopped by the OS in this process ends with (nothing was
    published: the finished shards are kept for --resume)."""
    where = f"{exc.filename}: " if exc.filename else ""
    full = " (no space left: free some, then rerun with --resume)" \
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"converting into {os.fspath(out)} stopped: {where}{exc.strerror or exc}{full}"


def _run_conversion(src: str | os.PathLike[str], out: str | os.PathLike[str],
                    config: ConvertConfig, run: RunOptions,
                    executor: cf.Executor | None) -> ConvertSummary:
    started = time.perf_counter()
    for name, path in (("SRC", src), ("OUT", out)):
        if not os.fspath(path).strip():
            raise ConfigError(f"{name} is empty: name a folder or file (. for this folder)")
    target = resolve_out(out, run)
    if "://" in os.fspath(src) and parse_location(src).is_local:
        src = parse_location(src).path  # file:///data/train is the folder /data/train
    config = resolve_source(src, config)
    _out_not_in_src(src, target)
    source = remote_source(src, config, run)
    if config.split is not None:
        from shardkit.conversion.split_run import run_split

        return _check_budget(run_split(src, target, config, run, executor=executor, source=source), run)
    if config.csv is not None and config.csv.image_col is None:  # a tabular CSV
        _no_executor_for_tables(src, executor)
        return _check_budget(convert_table(plan_table(src, config), target, run, started), run)
    if executor is None and run.resolved_workers > 0:
        executors.start_forkserver()
    plan = make_plan(local_src(src, source), config, spill_dir=spill_dir(target), run=run, source=source)
    try:
        return _check_budget(convert_images(plan, target, run, executor, started), run)
    finally:
        plan.close()  # the spilled input list, if any: its disk space is freed now


def resolve_out(out: str | os.PathLike[str], run: RunOptions) -> Out:
    """OUT as the commit takes it: the local path as given, or the storage of a URL (a URL is
    never a local folder; a scheme that cannot be written, or whose extra is missing, is
    refused here, before any work)."""
    storage = open_storage(out, storage_options=run.storage_options, retry=run.retry, writable=True)
    if not storage.location.is_local:
        return storage
    return Path(storage.location.path) if "://" in os.fspath(out) else Path(out)  # file:// URLs


def _out_not_in_src(src: str | os.PathLike[str], out: Out) -> None:
    """A local OUT inside a local SRC folder would be listed as inputs on the next run (a new
    class folder, or a flat folder turned into classes): refused before anything is written."""
    if not isinstance(out, Path) or "://" in os.fspath(src) or not os.path.isdir(src):
        return
    inner, outer = os.path.realpath(out), os.path.realpath(src)
    if os.path.commonpath([inner, outer]) == outer:
        raise ConfigError(f"{out}: OUT lies inside SRC {src}, whose listing it would join; "
                          "write it beside SRC")


def local_src(src: str | os.PathLike[str], source: Storage | None) -> str:
    """SRC as the plan lists it: an absolute path (tasks may run with another working
    directory), or the URL of a remote one (`source` the storage of its inputs)."""
    location = parse_location(src)
    return location.path if source is None and location.is_local else os.fspath(src)


def spill_dir(out: Out) -> Path | None:
    """Where a long input list spills: beside a local OUT (same filesystem, not a RAM-backed
    /tmp); the system's temporary folder for a remote one."""
    if not isinstance(out, Path):
        return None
    parent = out.absolute().parent
    return parent if parent.is_dir() else None


def _no_executor_for_tables(src: str | os.PathLike[str], executor: cf.Executor | None) -> None:
    if executor is not None:
        raise ConfigError(
            f"{src}: a tabular CSV converts in this process (pyarrow parses it with its own "
            "threads and Parquet is written as the file streams by); --dask-scheduler and "
            "executor= apply to image inputs"
        )


def convert_table(table: TablePlan, out: Out, run: RunOptions, started: float) -> ConvertSummary:
    """Write the tabular plan `table` into `out` through the commit (no error budget check)."""
    with Commit(out, table.fingerprint, overwrite=run.overwrite, resume=run.resume) as commit:
        if commit.state is State.DONE:
            return commit.up_to_date(seconds=time.perf_counter() - started, workers=1, unit="rows")
        return write_table(table, commit, started)


def convert_images(plan: Plan, out: Out, run: RunOptions, executor: cf.Executor | None,
                   started: float) -> ConvertSummary:
    """Execute and commit `plan` into `out` (no error budget check). Absolute paths in the
    plan: tasks may run in processes with another working directory (Dask workers)."""
    with Commit(out, plan.fingerprint, overwrite=run.overwrite, resume=run.resume) as commit:
        if commit.state is State.DONE:
            return commit.up_to_date(seconds=time.perf_counter() - started,
                                     workers=run.resolved_workers)
        return _run_images(plan, commit, run, executor, started)


def _run_images(plan: Plan, commit: Commit, run: RunOptions, executor: cf.Executor | None,
                started: float) -> ConvertSummary:
    workers = run.resolved_workers
    finished = commit.finished(plan.shard_file, plan.shard_count)
    own = executor is None
    if executor is None:
        executor = InlineExecutor() if workers == 0 else local_pool(workers)
    else:
        workers = executors.capacity(executor) or workers
    show = sys.stderr.isatty() if run.progress is None else run.progress
    try:
        if not own:  # a cluster: do its workers see SRC and share OUT with us?
            # The first input the plan saw on disk (an image CSV may name missing files); a
            # remote SRC or OUT is reached by each worker itself.
            first = next((r for r in plan.records if r.size >= 0), None) if plan.source is None else None
            executors.check_workers(executor, (first.path, first.size) if first else None,
                                    None if commit.remote else commit.tmp)
        with tqdm(total=plan.inputs, unit="img", disable=not show, dynamic_ncols=True,
                  file=sys.stderr) as bar:
            bar.update(len(plan.failures))
            scheduler = Scheduler(plan, commit, executor, bar, finished,
                                  limit=max(4, 3 * max(workers, 1)), whole_shards=not own and commit.remote,
                                  join_here=own)
            shards, failures, counts = scheduler.run()
        executors.check_interrupt()  # one that a __del__ swallowed: nothing more is published
    finally:
        if own:
            executor.shutdown(wait=True, cancel_futures=True)
    config = plan.config
    all_failures = plan.failures + failures
    schema = image_schema(
        fmt=config.format, codec=config.codec, shape=config.image.fixed_shape,
        channels=config.image.channels, labeled=plan.labeled, meta_types=plan.meta_types,
        rows_per_group=rows_per_group(config, plan.labeled) if config.format == "parquet" else None)
    manifest = Manifest(
        kind="images", schema=schema, classes=plan.classes,
        class_counts=counts if plan.labeled else None, shards=shards, inputs=plan.inputs,
        failed=len(all_failures), config=plan.resolved, fingerprint=plan.fingerprint,
    )
    return commit.complete(manifest, all_failures, summary={
        "seconds": time.perf_counter() - started, "workers": workers,
        "task_cpu_seconds": scheduler.cpu_seconds, "reused_shards": len(finished)})


def _check_budget(summary: ConvertSummary, run: RunOptions) -> ConvertSummary:
    if summary.failed > run.max_errors.allowed(summary.inputs):
        raise TooManyFailuresError(
            f"{summary.failed} of {summary.inputs} inputs failed, more than --max-errors "
            f"{run.max_errors} allows; the {summary.samples} good samples were written and the "
            f"failures listed in {summary.reports()}",
            summary=summary,
        )
    return summary
