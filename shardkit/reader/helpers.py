"""Helper threads that share one batch's work with the thread that assembles it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

__all__ = ["Helpers", "Share"]


class Share:
    """One batch's jobs, taken one at a time by whichever thread is free."""

    def __init__(self, jobs: Sequence[Callable[[], None]]) -> None:
        self.jobs = jobs
        self.taken = self.finished = 0
        self.error: BaseException | None = None
        self.changed = threading.Condition()

    def work(self) -> None:
        while self.work_one():
            pass

    def work_one(self) -> bool:
        """Take the next job and run it; False when none is left (or one failed)."""
        with self.changed:
            if self.taken == len(self.jobs) or self.error is not None:
                return False
            number = self.taken
            self.taken += 1
        try:
            self.jobs[number]()
        except BaseException as exc:  # handed to the thread that waits
            with self.changed:
                self.error = self.error or exc
        finally:
            with self.changed:
                self.finished += 1
                self.changed.notify_all()
        return True

    def wait(self) -> None:
        """Until every job taken is finished (no more are taken once the caller's `work`
        returned); the first error is raised."""
        with self.changed:
            self.changed.wait_for(self._settled)
            if self.error is not None:
                raise self.error

    def finish(self, then: Share | None = None) -> None:
        """The jobs nobody took yet done in this thread, then `wait`. Until the other
        threads' last jobs are done, this thread takes jobs of `then` (the next batch)
        instead of waiting idle."""
        try:
            self.work()
            if then is not None:
                while not self.done() and then.work_one():
                    pass
        finally:
            self.wait()

    def done(self) -> bool:
        """Whether every job taken is finished."""
        with self.changed:
            return self._settled()

    def _settled(self) -> bool:  # with `changed` held
        return self.finished == self.taken

    def cancel(self) -> None:
        """No job is taken any more; returns once those taken are finished (errors dropped)."""
        with self.changed:
            self.jobs = self.jobs[:self.taken]
            self.changed.wait_for(self._settled)


class Helpers:
    """Up to ``threads - 1`` helper threads, started on first use and kept until `close`.

    `run(jobs)` works through `jobs` in the calling thread and on the helpers, each thread
    taking the next job when it is free, and returns when every job is done (a batch buffer
    is never handed on, or reused after an error, while a helper still writes into it); the
    first exception is re-raised. A helper the machine does not schedule in time costs
    nothing: the others take its share, and the calling thread never waits for a job that
    nobody started (on a busy machine that wait is a scheduler time slice, milliseconds).
    """

    def __init__(self, threads: int, name: str) -> None:
        self.threads, self.name = max(1, threads), name
        self._pool: ThreadPoolExecutor | None = None

    def run(self, jobs: Sequence[Callable[[], None]]) -> None:
        if self.threads == 1 or len(jobs) == 1:
            for job in jobs:
                job()
            return
        self.start(jobs).finish()

    def start(self, jobs: Sequence[Callable[[], None]]) -> Share:
        """`jobs` handed to the helpers now, none run in this thread yet: the caller goes on
        (say, preparing the next batch) and calls `finish` (it then takes what is left) or
        `cancel` on what this returns. Helpers finish the jobs of earlier calls first."""
        share = Share(jobs)
        if self.threads == 1:
            share.work()  # no helper to hand them to: done now (an error waits for `finish`)
            return share
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix=self.name)
        for _ in range(min(self.threads, len(jobs)) - 1):
            self._pool.submit(share.work)
        return share

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
