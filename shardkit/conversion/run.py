"""Run a conversion: plan → part and shard tasks on an executor → atomic commit → index.json.

The calling process plans, schedules and commits; executors only run `shardkit.conversion.tasks`. A
shard becomes visible by an atomic rename after fsync, ``errors.jsonl`` and ``index.json``
are written last, and an interrupted or failed run leaves no file under a final name that is
incomplete (and no ``index.json``, so no dataset).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from shardkit.config import ConvertConfig, RunOptions
from shardkit.conversion import executors, journal, outdir
from shardkit.conversion.executors import InlineExecutor, local_pool
from shardkit.conversion.plan import Plan, make_plan, rows_per_group
from shardkit.conversion.report import ConvertSummary, FailureRecord, error_reasons, write_error_report
from shardkit.conversion.sources.csv import source_config
from shardkit.conversion.tasks import PartResult, PartTask, ShardTask, run_part, run_shard
from shardkit.errors import ConfigError, TooManyFailuresError, WorkerError
from shardkit.format.files import publish
from shardkit.format.manifest import ERRORS_NAME, Manifest, ShardRecord
from shardkit.format.samples import image_schema
from shardkit.format.tar import raw_layout
from shardkit.keywords import configs_from_options

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from shardkit.keywords import ConvertKeywords

__all__ = ["convert", "run_conversion"]


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str],
            config: ConvertConfig | None = None, run: RunOptions | None = None, *,
            executor: cf.Executor | None = None,
            **options: Unpack[ConvertKeywords]) -> ConvertSummary:
    """Convert the image folder or CSV file `src` into a shardkit dataset in `out`.

    Options come as config objects (`config`: what decides the bytes; `run`: how the run
    goes) or as keywords (`shardkit.keywords.ConvertKeywords`): any field of `ImageOptions`,
    `ConvertConfig` or `RunOptions` (size, resize, mode, format, codec, quality, shard_size
    or samples_per_shard, shuffle, seed, workers, overwrite, max_errors, ...), and for a
    ``.csv`` SRC any field of `CsvOptions` (image_col, label_col="a" or "a,b", root, columns,
    exclude, delimiter, encoding, header, keep_ints): with image_col an image CSV, else a
    tabular CSV (Parquet of typed columns).
    executor: run tasks there instead of a local process pool (image inputs).

    Returns a `ConvertSummary`. Raises ConfigError, InputError, OutputExistsError,
    WorkerError; raises TooManyFailuresError (carrying ``.summary``) after writing the whole
    dataset when more inputs failed than ``max_errors`` allows.
    """
    config, run = configs_from_options(dict(options), config, run)
    return run_conversion(src, out, config, run, executor=executor)


def run_conversion(src: str | os.PathLike[str], out: str | os.PathLike[str],
                   config: ConvertConfig, run: RunOptions, *,
                   executor: cf.Executor | None = None) -> ConvertSummary:
    started = time.perf_counter()
    config = source_config(src, config)
    if config.csv is not None and config.csv.image_col is None:  # a tabular CSV
        from shardkit.conversion.tabular import convert_table

        if executor is not None:
            raise ConfigError(
                f"{src}: a tabular CSV converts in this process (pyarrow parses it with its own "
                "threads and Parquet is written as the file streams by); --dask-scheduler and "
                "executor= apply to image inputs"
            )

        return _check_budget(convert_table(src, out, config, run), run)
    # Absolute paths: tasks may run in processes with another working directory (Dask workers).
    # A long input list spills beside OUT (same filesystem, not a RAM-backed /tmp).
    parent = Path(out).absolute().parent
    plan = make_plan(os.path.abspath(src), config, spill_dir=parent if parent.is_dir() else None)
    try:
        return _run_plan(plan, Path(out), config, run, executor, started)
    finally:
        plan.close()  # the spilled input list, if any: its disk space is freed now


def _run_plan(plan: Plan, out_dir: Path, config: ConvertConfig, run: RunOptions,
              executor: cf.Executor | None, started: float) -> ConvertSummary:
    state = outdir.prepare(out_dir, plan.fingerprint, overwrite=run.overwrite, resume=run.resume)
    workers = run.resolved_workers
    if state is outdir.State.DONE:
        return _check_budget(_summary_of_finished(out_dir, workers, started), run)
    finished = journal.load(out_dir, plan.fingerprint,
                            [plan.shard_file(k) for k in range(plan.shard_count)])
    # A folder of this run's own: a task of an earlier run still running on a cluster (Ctrl-C
    # cannot stop a running Dask task) never writes where this run reads.
    tmp = out_dir.absolute() / outdir.TMP_NAME / secrets.token_hex(4)
    tmp.mkdir(parents=True)
    own = executor is None
    if executor is None:
        executor = InlineExecutor() if workers == 0 else local_pool(workers)
    else:
        workers = executors.capacity(executor) or workers
    show = sys.stderr.isatty() if run.progress is None else run.progress
    try:
        if not own:  # a cluster: do its workers see SRC and share OUT with us?
            # The first input the plan saw on disk (an image CSV may name missing files).
            first = next((r for r in plan.records if r.size >= 0), None)
            executors.check_workers(executor, (first.path, first.size) if first else None, tmp)
        with tqdm(total=plan.inputs, unit="img", disable=not show, dynamic_ncols=True,
                  file=sys.stderr) as bar:
            bar.update(len(plan.failures))
            scheduler = _Scheduler(plan, out_dir, tmp, executor, bar, finished,
                                   limit=max(4, 3 * max(workers, 1)))
            shards, failures, counts = scheduler.run()
    finally:
        if own:
            executor.shutdown(wait=True, cancel_futures=True)
        _discard(tmp)

    all_failures = plan.failures + failures
    write_error_report(out_dir / ERRORS_NAME, all_failures)
    manifest = Manifest(
        kind="images", schema=_schema(plan), classes=plan.classes,
        class_counts=counts if plan.labeled else None, shards=shards, inputs=plan.inputs,
        failed=len(all_failures), config=config.to_json(), fingerprint=plan.fingerprint,
    )
    manifest.write(out_dir)
    journal.remove(out_dir)
    summary = ConvertSummary(
        out=out_dir, inputs=plan.inputs, samples=manifest.samples, failed=len(all_failures),
        shards=len(shards), bytes=manifest.bytes, seconds=time.perf_counter() - started,
        workers=workers, errors_path=out_dir / ERRORS_NAME,
        task_cpu_seconds=scheduler.cpu_seconds,
        reasons=dict(Counter(f.reason for f in all_failures)), reused_shards=len(finished),
    )
    return _check_budget(summary, run)


def _discard(tmp: Path) -> None:
    """Remove the run's temporary folder and OUT/.shardkit-tmp around it. Renamed first: a
    cancelled task still running on a cluster may create files in it by name while rmtree
    works, and after the rename none can."""
    gone = tmp.with_name(f"{tmp.name}.gone")
    try:
        tmp.rename(gone)
    except OSError:
        gone = tmp
    shutil.rmtree(gone, ignore_errors=True)
    shutil.rmtree(tmp.parent, ignore_errors=True)


def _check_budget(summary: ConvertSummary, run: RunOptions) -> ConvertSummary:
    if summary.failed > run.max_errors.allowed(summary.inputs):
        raise TooManyFailuresError(
            f"{summary.failed} of {summary.inputs} inputs failed, more than --max-errors "
            f"{run.max_errors} allows; the {summary.samples} good samples were written and the "
            f"failures listed in {summary.errors_path}",
            summary=summary,
        )
    return summary


def _summary_of_finished(out: Path, workers: int, started: float) -> ConvertSummary:
    """The summary of a dataset already complete in `out` (a rerun with nothing to do)."""
    manifest = Manifest.read(out)
    return ConvertSummary(
        out=out, inputs=manifest.inputs, samples=manifest.samples, failed=manifest.failed,
        shards=len(manifest.shards), bytes=manifest.bytes, seconds=time.perf_counter() - started,
        workers=workers, errors_path=out / ERRORS_NAME, reasons=error_reasons(out / ERRORS_NAME),
        reused_shards=len(manifest.shards), up_to_date=True,
    )


class _Scheduler:
    """Feeds part tasks to the executor (a bounded number in flight), submits a shard's
    assembly once its parts are done, and publishes each assembled shard."""

    def __init__(self, plan: Plan, out: Path, tmp: Path, executor: cf.Executor,
                 bar: tqdm, finished: dict[int, journal.Entry], *, limit: int) -> None:
        self.plan, self.out, self.tmp, self.executor, self.bar = plan, out, tmp, executor, bar
        self.limit = limit
        self.in_flight: dict[cf.Future[Any], tuple[str, int]] = {}
        self.parts: dict[int, list[PartResult]] = {}
        self.blocks: dict[int, int] = {}  # tar JSON padding of each shard this run writes
        self.expected = {k: len(list(plan.parts(k))) for k in range(plan.shard_count)}
        self.records = {k: e.record for k, e in finished.items()}
        self.failures = [f for e in finished.values() for f in e.failures]
        self.counts = [sum(c) for c in zip(*(e.label_counts for e in finished.values()),
                                           strict=True)] or [0] * len(plan.classes or ())
        self.cpu_seconds = 0.0
        bar.update(sum(len(plan.shard_slice(k)) for k in finished))

    def run(self) -> tuple[list[ShardRecord], list[FailureRecord], list[int]]:
        pending = self._part_tasks()
        try:
            while True:
                while len(self.in_flight) < self.limit and (task := next(pending, None)):
                    self._submit("part", task.shard, run_part, task)
                if not self.in_flight:
                    break
                done, _ = cf.wait(self.in_flight, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    self._finish(future)
        except BaseException:
            for future in self.in_flight:
                future.cancel()
            raise
        return [self.records[k] for k in sorted(self.records)], self.failures, self.counts

    def _part_tasks(self) -> Any:
        plan = self.plan
        classes = tuple(plan.classes) if plan.classes is not None else None
        for shard in range(plan.shard_count):
            if shard in self.records:
                continue  # finished by an earlier run (journal)
            whole = plan.shard_slice(shard)
            records = plan.records[whole.start:whole.stop]  # read once (it may be spilled)
            blocks = self.blocks[shard] = plan.json_blocks(records) if plan.config.format == "tar" else 0
            for number, indices in enumerate(plan.parts(shard)):
                yield PartTask(
                    shard=shard, part=number, first=indices.start,
                    records=tuple(records[indices.start - whole.start:indices.stop - whole.start]),
                    classes=classes,
                    path=str(self.tmp / f"{shard}.{number}.part"), key_width=plan.key_width,
                    json_blocks=blocks, config=plan.config, meta_types=plan.meta_types,
                )

    def _submit(self, kind: str, shard: int, fn: Any, task: Any) -> None:
        try:
            future = self.executor.submit(fn, task)
        except BrokenProcessPool:  # a worker died since the last result came back
            raise self._died(shard) from None
        self.in_flight[future] = (kind, shard)

    def _died(self, shard: int) -> WorkerError:
        return WorkerError(
            f"a worker process died (killed, or out of memory?) while converting "
            f"{self.plan.shard_file(shard)}; nothing was published for it"
        )

    def _finish(self, future: cf.Future[Any]) -> None:
        kind, shard = self.in_flight.pop(future)
        try:
            result = future.result()
        except BrokenProcessPool:
            raise self._died(shard) from None
        except Exception as exc:
            raise WorkerError(f"converting {self.plan.shard_file(shard)} failed: "
                              f"{executors.describe_task_error(exc)}") from exc
        if kind == "part":
            self._part_done(result)
        else:
            self._shard_done(shard, result)

    def _part_done(self, result: PartResult) -> None:
        self.failures.extend(result.failures)
        self.cpu_seconds += result.cpu_seconds
        self.counts = [a + b for a, b in zip(self.counts, result.label_counts, strict=True)]
        self.bar.update(result.samples + len(result.failures))
        if self.failures:
            self.bar.set_postfix(failed=len(self.failures), refresh=False)
        done = self.parts.setdefault(result.shard, [])
        done.append(result)
        if len(done) == self.expected[result.shard]:
            done.sort(key=lambda r: r.part)
            plan = self.plan
            self._submit("shard", result.shard, run_shard, ShardTask(
                shard=result.shard, parts=tuple(r.path for r in done),
                tmp_path=str(self.tmp / plan.shard_file(result.shard)), labeled=plan.labeled,
                rows_per_group=rows_per_group(plan.config, plan.labeled), config=plan.config,
                meta_types=plan.meta_types,
            ))

    def _shard_done(self, shard: int, result: tuple[int, str]) -> None:
        plan = self.plan
        name = plan.shard_file(shard)
        publish(self.tmp / name, self.out / name)
        parts = self.parts.pop(shard)
        for part in parts:  # here, not in run_shard: a retried run_shard must find them
            os.unlink(part.path)
        layout = None
        shape = plan.config.image.fixed_shape
        if plan.config.format == "tar" and plan.config.codec == "raw" and shape is not None:
            classes = len(plan.classes) if plan.classes is not None else None
            layout = raw_layout(shape, classes, self.blocks[shard])
        record = ShardRecord(file=name, samples=sum(r.samples for r in parts), bytes=result[0],
                             sha256=result[1], layout=layout)
        self.records[shard] = record
        counts = tuple(sum(c) for c in zip(*(r.label_counts for r in parts), strict=True))
        journal.write(self.out, plan.fingerprint, journal.Entry(
            shard=shard, record=record, failures=tuple(f for r in parts for f in r.failures),
            label_counts=counts,
        ))


def _schema(plan: Plan) -> dict[str, Any]:
    config = plan.config
    return image_schema(
        fmt=config.format, codec=config.codec, shape=config.image.fixed_shape,
        channels=config.image.channels, labeled=plan.labeled, meta_types=plan.meta_types,
        rows_per_group=rows_per_group(config, plan.labeled) if config.format == "parquet" else None)
