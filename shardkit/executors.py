"""Where tasks run: in the calling process, in a local process pool, or on any
`concurrent.futures.Executor` the caller brings (a Dask ``Client.get_executor()`` works as is).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["InlineExecutor", "local_pool"]

T = TypeVar("T")


class InlineExecutor(cf.Executor):
    """Runs each task at submit time in the calling thread (``workers=0``): no processes,
    easy to debug and profile."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        future: cf.Future[T] = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            future.set_exception(exc)
        return future


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group; the parent decides how to stop, so workers
    # finish their current part instead of dying with a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def local_pool(workers: int) -> cf.ProcessPoolExecutor:
    """A process pool that is safe to start from a threaded program (forkserver on POSIX)."""
    method = "forkserver" if sys.platform != "win32" and sys.platform != "darwin" else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Workers fork from a server that has already imported the task code (numpy, Pillow,
        # pyarrow): pool start-up drops from ~0.3 s to ~0.02 s, and a caller's heavy imports
        # (torch) are not repeated in every worker.
        context.set_forkserver_preload(["shardkit.tasks"])
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init)
