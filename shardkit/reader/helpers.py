"""Helper threads that share one batch's work with the thread that assembles it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

__all__ = ["Helpers"]


class Helpers:
    """Up to ``threads - 1`` helper threads, started on first use and kept until `close`.

    `run(jobs)` runs the first job in the calling thread and the others on the helpers, and
    returns only when every one is done (a batch buffer is never handed on, or reused after
    an error, while a helper still writes into it); the first exception is re-raised.
    """

    def __init__(self, threads: int, name: str) -> None:
        self.threads, self.name = max(1, threads), name
        self._pool: ThreadPoolExecutor | None = None

    def run(self, jobs: Sequence[Callable[[], None]]) -> None:
        mine, *theirs = jobs
        futures: list[Future[None]] = []
        if theirs:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix=self.name)
            futures = [self._pool.submit(job) for job in theirs]
        try:
            mine()
        finally:
            wait(futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
