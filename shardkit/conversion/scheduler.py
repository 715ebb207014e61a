"""Schedule a plan's tasks on an executor and publish each shard as it is assembled.

Part tasks go out a bounded number at a time. With ``join_here`` (this machine's own pool, or
no pool) a tar shard is joined in this process, on one background thread, part by part as the
parts come back in order (`Joiner`): the workers never stop converting to copy, and the run
does not end with one worker joining the last shard while the others wait. A fixed-layout raw
tar shard is not even copied: its part tasks write into the shard's file, made here at its
full size, and the joiner hashes them in place (`TarInPlace`). Otherwise (a
cluster: its data should not travel through the client), and for Parquet (whose assembly
re-cuts row groups), a shard's assembly (`run_shard`) is submitted to the executor once every
part is back. An assembled shard is published through the commit (`Commit.publish`). A task
that raises fails the run with a `WorkerError` (a `RemoteError` when the storage failed); a
worker process that dies does too, naming the shard.

With ``whole_shards`` (a cluster writing into object storage, which shares no folder with
the client) each shard is one task instead, uploaded by its worker
(`shardkit.conversion.shard_upload`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import os
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tqdm import tqdm

from shardkit.conversion import executors
from shardkit.conversion.commit import Commit, Entry
from shardkit.conversion.plan import Plan, rows_per_group
from shardkit.conversion.report import FailureRecord
from shardkit.conversion.shard_upload import WholeShardTask, run_whole_shard
from shardkit.conversion.tasks import PartResult, PartTask, ShardTask, run_part, run_shard
from shardkit.conversion.writers.tar import TarAssembly, TarInPlace
from shardkit.errors import RemoteError, WorkerError
from shardkit.format.manifest import ShardRecord
from shardkit.format.tar import raw_layout

__all__ = ["Scheduler"]


class Scheduler:
    """Feeds part tasks to the executor (a bounded number in flight), joins a shard (`Joiner`)
    or submits its assembly once its parts are done, and publishes each assembled shard."""

    def __init__(self, plan: Plan, commit: Commit, executor: cf.Executor, bar: tqdm,
                 finished: dict[int, Entry], *, limit: int, whole_shards: bool = False,
                 join_here: bool = False) -> None:
        self.plan, self.commit, self.executor, self.bar = plan, commit, executor, bar
        self.tmp = commit.tmp
        self.limit = limit
        self.whole_shards = whole_shards
        self.in_flight: dict[cf.Future[Any], tuple[str, int]] = {}
        self.parts: dict[int, list[PartResult]] = {}
        self.blocks: dict[int, int] = {}  # tar JSON padding of each shard this run writes
        self.layouts: dict[int, dict[str, int]] = {}  # and the raw layout it gives, if fixed
        self.expected = {k: len(list(plan.parts(k))) for k in range(plan.shard_count)}
        self.records = {k: e.record for k, e in finished.items()}
        self.failures = [f for e in finished.values() for f in e.failures]
        self.counts = [sum(c) for c in zip(*(e.label_counts for e in finished.values()),
                                           strict=True)] or [0] * len(plan.classes or ())
        self.cpu_seconds = 0.0
        self.joiner = Joiner() if join_here and plan.config.format == "tar" and not whole_shards else None
        bar.update(sum(len(plan.shard_slice(k)) for k in finished))

    def run(self) -> tuple[list[ShardRecord], list[FailureRecord], list[int]]:
        pending = self._whole_tasks() if self.whole_shards else self._part_tasks()
        kind, fn = ("whole", run_whole_shard) if self.whole_shards else ("part", run_part)
        try:
            while True:
                # A joiner that falls behind (many fast workers) holds back new parts, so part
                # files never pile up in the run's folder (nor parts wait long to be hashed).
                behind = self.joiner.backlog(self.limit) if self.joiner is not None else []
                while not behind and self._tasks() < self.limit and (task := next(pending, None)):
                    self._submit(kind, task.shard if kind == "part" else task.shard.shard, fn, task)
                if not self.in_flight and not behind:
                    break
                done, _ = cf.wait([*self.in_flight, *behind], return_when=cf.FIRST_COMPLETED)
                executors.check_interrupt()
                for future in done:
                    if future in self.in_flight:
                        self._finish(future)
        except BaseException:
            for future in self.in_flight:
                future.cancel()
            raise
        finally:
            if self.joiner is not None:
                self.joiner.close()
        return [self.records[k] for k in sorted(self.records)], self.failures, self.counts

    def _tasks(self) -> int:
        """Tasks on the executor (the joiner's thread holds no worker)."""
        return sum(kind != "join" for kind, _ in self.in_flight.values())

    def _part_tasks(self) -> Any:
        plan = self.plan
        classes = tuple(plan.classes) if plan.classes is not None else None
        for shard in range(plan.shard_count):
            if shard in self.records:
                continue  # finished by an earlier run (journal)
            whole = plan.shard_slice(shard)
            records = plan.records[whole.start:whole.stop]  # read once (it may be spilled)
            blocks = self.blocks[shard] = plan.json_blocks(records) if plan.config.format == "tar" else 0
            shape = plan.config.image.fixed_shape
            if plan.config.format == "tar" and plan.config.codec == "raw" and shape is not None:
                self.layouts[shard] = raw_layout(
                    shape, len(plan.classes) if plan.classes is not None else None, blocks)
            # A fixed-layout raw tar shard joined here: its part tasks write into its file.
            stride = self.layouts[shard]["stride"] if self.joiner is not None and shard in self.layouts else 0
            if stride:
                self._make_shard_file(shard, len(whole) * stride)
            for number, indices in enumerate(plan.parts(shard)):
                yield PartTask(
                    shard=shard, part=number, first=indices.start,
                    records=tuple(records[indices.start - whole.start:indices.stop - whole.start]),
                    classes=classes,
                    path=str(self.tmp / (plan.shard_file(shard) if stride else f"{shard}.{number}.part")),
                    key_width=plan.key_width,
                    json_blocks=blocks, config=plan.config, meta_types=plan.meta_types,
                    image_col=plan.image_col, source=plan.source,
                    offset=(indices.start - whole.start) * stride if stride else -1,
                )

    def _make_shard_file(self, shard: int, size: int) -> None:
        """The temporary file an in-place shard's part tasks write into, at its full size."""
        with open(self.tmp / self.plan.shard_file(shard), "wb") as handle:
            handle.truncate(size)

    def _whole_tasks(self) -> Any:
        for shard, parts in itertools.groupby(self._part_tasks(), key=lambda t: t.shard):
            yield WholeShardTask(parts=tuple(parts), shard=self._shard_task(shard, ()),
                                 upload=self.commit.task_store)

    def _shard_task(self, shard: int, parts: tuple[str, ...]) -> ShardTask:
        plan = self.plan
        return ShardTask(
            shard=shard, parts=parts, tmp_path=str(self.tmp / plan.shard_file(shard)),
            labeled=plan.labeled, rows_per_group=rows_per_group(plan.config, plan.labeled),
            config=plan.config, meta_types=plan.meta_types,
            classes=tuple(plan.classes) if plan.classes is not None else None,
        )

    def _submit(self, kind: str, shard: int, fn: Any, task: Any) -> None:
        executors.check_interrupt()  # a Ctrl-C that a __del__ swallowed stops the run here
        try:
            future = self.executor.submit(fn, task)
        except BrokenProcessPool:  # a worker died since the last result came back
            raise self._died(shard) from None
        except (EOFError, ConnectionError) as exc:  # no worker could be started at all
            raise WorkerError(f"the process pool could not start a worker ({type(exc).__name__}: "
                              f"its forkserver was killed?); nothing was published for "
                              f"{self.plan.shard_file(shard)}") from None
        self.in_flight[future] = (kind, shard)

    def _died(self, shard: int) -> WorkerError:
        return WorkerError(
            f"a worker process died (killed, or out of memory? A script that converts at its "
            f"top level needs `if __name__ == \"__main__\":` around it) while converting "
            f"{self.plan.shard_file(shard)}; nothing was published for it"
        )

    def _finish(self, future: cf.Future[Any]) -> None:
        kind, shard = self.in_flight.pop(future)
        try:
            result = future.result()
        except BrokenProcessPool:
            raise self._died(shard) from None
        except RemoteError:
            raise  # the storage failed past its retries: its own exit code, its URL
        except Exception as exc:
            raise WorkerError(f"converting {self.plan.shard_file(shard)} failed: "
                              f"{executors.describe_task_error(exc)}") from exc
        if kind == "part":
            self._part_done(result)
        elif kind == "whole":
            for part in result.parts:
                self._tally(part)
            self.parts[shard] = list(result.parts)
            self._shard_done(shard, (result.bytes, result.sha256))
        else:
            self._shard_done(shard, result)

    def _part_done(self, result: PartResult) -> None:
        if result.offset >= 0 and result.nbytes != result.samples * self.layouts[result.shard]["stride"]:
            # It wrote past its place, over the next part's: fail before anything is hashed.
            raise WorkerError(f"converting {self.plan.shard_file(result.shard)} failed: part "
                              f"{result.part} wrote {result.nbytes} bytes for {result.samples} "
                              f"samples of {self.layouts[result.shard]['stride']}")
        self._tally(result)
        done = self.parts.setdefault(result.shard, [])
        done.append(result)
        if self.joiner is not None:
            joined = self.joiner.add(result, self.expected[result.shard],
                                     str(self.tmp / self.plan.shard_file(result.shard)))
            if joined is not None:
                done.sort(key=lambda r: r.part)
                self.in_flight[joined] = ("join", result.shard)
        elif len(done) == self.expected[result.shard]:
            done.sort(key=lambda r: r.part)
            self._submit("shard", result.shard, run_shard,
                         self._shard_task(result.shard, tuple(r.path for r in done)))

    def _tally(self, result: PartResult) -> None:
        self.failures.extend(result.failures)
        self.cpu_seconds += result.cpu_seconds
        self.counts = [a + b for a, b in zip(self.counts, result.label_counts, strict=True)]
        self.bar.update(result.samples + len(result.failures))
        if self.failures:
            self.bar.set_postfix(failed=len(self.failures), refresh=False)

    def _shard_done(self, shard: int, result: tuple[int, str]) -> None:
        plan = self.plan
        name = plan.shard_file(shard)
        parts = self.parts.pop(shard)
        record = ShardRecord(file=name, samples=sum(r.samples for r in parts), bytes=result[0],
                             sha256=result[1], layout=self.layouts.get(shard))
        self.records[shard] = record
        counts = tuple(sum(c) for c in zip(*(r.label_counts for r in parts), strict=True))
        entry = Entry(shard=shard, record=record, label_counts=counts,
                      failures=tuple(f for r in parts for f in r.failures))
        if self.whole_shards:
            self.commit.publish_uploaded(entry)
            return
        self.commit.publish(self.tmp / name, entry)
        for part in parts:  # here, not in run_shard: a retried run_shard must find them
            if part.offset < 0:  # a part file (in place, the shard file was its path)
                os.unlink(part.path)


class Joiner:
    """Joins tar shards from their parts on one background thread of this process: each
    shard's parts are appended (or, written in place, placed) in part order as soon as they
    and all before them are back, so joining overlaps converting. `add` returns the future of
    the shard's (bytes, sha256) once its last part is handed over."""

    def __init__(self) -> None:
        self._thread = cf.ThreadPoolExecutor(1, thread_name_prefix="shardkit-join")
        self._shards: dict[int, _Joining] = {}  # shards with parts still to come
        self._started: list[_Joining] = []  # every shard not yet finished, to close on abort
        self._appends: collections.deque[cf.Future[None]] = collections.deque()

    def backlog(self, limit: int) -> list[cf.Future[None]]:
        """The appends not yet done when there are more than `limit` of them, else []."""
        while self._appends and self._appends[0].done():
            self._appends.popleft()
        return list(self._appends) if len(self._appends) > limit else []

    def add(self, result: PartResult, count: int, tmp_path: str) -> cf.Future[tuple[int, str]] | None:
        """Hand over one of the `count` parts of `result.shard`, whose file is `tmp_path`."""
        shard = result.shard
        joining = self._shards.get(shard)
        if joining is None:
            joining = self._shards[shard] = _Joining(tmp_path, in_place=result.offset >= 0)
            self._started = [j for j in self._started if not j.finished]
            self._started.append(joining)
        joining.ready[result.part] = result
        while joining.next in joining.ready:
            self._appends.append(self._thread.submit(joining.append, joining.ready.pop(joining.next)))
            joining.next += 1
        if joining.next < count:
            return None
        del self._shards[shard]
        return self._thread.submit(joining.finish)

    def close(self) -> None:
        """Stop (queued appends of an aborted run are dropped) and close what is open."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        for joining in self._started:  # a cancelled finish leaves its file open
            joining.close()
        self._started.clear()
        self._shards.clear()
        self._appends.clear()


class _Joining:
    """One shard being joined; runs on the joiner's thread. An append that fails makes
    `finish` raise its error (the run then fails, naming the shard)."""

    def __init__(self, tmp_path: str, *, in_place: bool) -> None:
        self.tmp_path = tmp_path
        self.next = 0
        self.ready: dict[int, PartResult] = {}
        # In place: the parts were written into the shard file (`TarInPlace`); else part files.
        self._kind = TarInPlace if in_place else TarAssembly
        self._assembly: TarAssembly | TarInPlace | None = None
        self._error: BaseException | None = None
        self.finished = False

    def append(self, part: PartResult) -> None:
        if self._error is not None:
            return
        try:
            if self._assembly is None:  # opened here, on the joiner's thread
                self._assembly = self._kind(self.tmp_path)
            if isinstance(self._assembly, TarInPlace):
                self._assembly.place(part.offset, part.nbytes)
            else:
                self._assembly.append(part.path)
        except BaseException as exc:
            self._error = exc

    def finish(self) -> tuple[int, str]:
        try:
            if self._error is not None:
                raise self._error
            if self._assembly is None:  # a shard of no parts is never planned
                raise RuntimeError(f"{self.tmp_path}: no part was joined")
            return self._assembly.finish()
        finally:
            self.close()
            self.finished = True

    def close(self) -> None:
        if self._assembly is not None:
            self._assembly.close()
