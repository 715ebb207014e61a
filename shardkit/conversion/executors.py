"""Where tasks run: in the calling process, in a local process pool, or on any
`concurrent.futures.Executor` the caller brings (a Dask ``Client.get_executor()`` works as is).

On a cluster the client plans and commits and the workers run `shardkit.conversion.tasks`, reading SRC and
writing under OUT themselves: both must be on a filesystem every worker mounts at the same
path. `check_workers` proves that with a tiny task before any real one is submitted. A SRC or
OUT in object storage needs no shared filesystem: workers reach the store themselves.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import re
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from shardkit.errors import ConfigError, InputError, WorkerError, require

__all__ = [
    "InlineExecutor",
    "capacity",
    "check_interrupt",
    "check_workers",
    "dask_executor",
    "describe_task_error",
    "interrupts_kept",
    "local_pool",
    "note_interrupt",
    "start_forkserver",
]

T = TypeVar("T")

_ADDRESS = re.compile(r"^[a-z][a-z0-9+]*://\S+:\d+$")
_CONNECT_TIMEOUT_S = 10
_WORKER_WAIT_S = 60
_SCALE_OUT_DOC = "see docs/scale-out.md"


# --------------------------------------------------------------------------- interrupts

# Python raises KeyboardInterrupt wherever the main thread happens to be. When that is a
# `__del__` or a weakref callback (a Dask future being released, say), the exception is
# printed and dropped, and the run would go on to publish as if nothing had happened. So an
# interrupt during a run is also remembered here, and the scheduler raises it again between
# tasks (`check_interrupt`): a Ctrl-C always stops the run.
_interrupted = threading.Event()
_runs = [0]  # runs under way in this process (a split runs several inside one; threads too)
_runs_lock = threading.Lock()


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Around a run: Ctrl-C is remembered as well as raised (only where Python's own SIGINT
    handler is in place and this is the main thread: a caller's own handler is left alone)."""
    with _runs_lock:
        first = _runs[0] == 0
        _runs[0] += 1
        if first:
            _interrupted.clear()
    mine = (first and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if mine:
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        yield
    finally:
        if mine:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        with _runs_lock:
            _runs[0] -= 1


def _on_interrupt(signum: int, frame: Any) -> None:
    note_interrupt()
    raise KeyboardInterrupt


def note_interrupt() -> None:
    """Remember an interrupt that the caller raises as KeyboardInterrupt (the CLI's SIGTERM)."""
    _interrupted.set()


def check_interrupt() -> None:
    """Raise KeyboardInterrupt again when an interrupt reached this run and was swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


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
    threading.Thread(target=_outlive_not, name="shardkit-parent-watch", daemon=True).start()


def _outlive_not() -> None:
    """End this worker once the converting process is gone (kill -9 of it alone): a pool
    worker waits on its task queue for ever otherwise, and keeps the forkserver, which each
    worker holds open, alive with it. multiprocessing's parent sentinel is the converting
    process's, under forkserver and spawn alike."""
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os._exit(1)  # nobody collects this worker's results any more


def local_pool(workers: int) -> cf.ProcessPoolExecutor:
    """A process pool that is safe to start from a threaded program (forkserver on POSIX).
    Its workers end on their own when this process dies without shutting it down."""
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(),
                                  initializer=_worker_init)


def start_forkserver() -> None:
    """Start the server a `local_pool` forks its workers from, without waiting for it: its
    imports (~0.2 s) then overlap listing and planning instead of delaying the first task.
    A run that turns out to have nothing to do (OUT up to date) has paid that CPU for
    nothing, once per process; a forkserver already running is left as it is."""
    if _pool_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _pool_context() -> multiprocessing.context.BaseContext:
    method = "forkserver" if sys.platform != "win32" and sys.platform != "darwin" else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Workers fork from a server that has already imported the task code (numpy, Pillow,
        # pyarrow): pool start-up drops from ~0.3 s to ~0.02 s, and a caller's heavy imports
        # (torch) are not repeated in every worker.
        context.set_forkserver_preload(["shardkit.conversion.tasks"])
    return context


# --------------------------------------------------------------------------- Dask


@contextlib.contextmanager
def dask_executor(address: str) -> Iterator[cf.Executor]:
    """Connect to the Dask scheduler at `address` (``tcp://HOST:PORT``) and yield an executor
    on its workers; the connection is closed (outstanding tasks released) on the way out.

    Raises ConfigError (malformed address), MissingExtraError (no ``shardkit[dask]``),
    WorkerError (scheduler unreachable).
    """
    if not _ADDRESS.match(address):
        raise ConfigError(f"--dask-scheduler: expected an address like tcp://HOST:PORT, got {address!r}")
    distributed: Any = require("distributed", "dask")
    try:
        client = distributed.Client(address, timeout=_CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise WorkerError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    try:
        # pure=False: a task's key must never match a finished task of an earlier run, whose
        # result Dask would hand back without running it (the part file would be missing).
        yield client.get_executor(pure=False)
    finally:
        client.close()


def _dask_client(executor: cf.Executor) -> Any:
    """The Dask client behind `executor` (a ``Client.get_executor()``), or None."""
    if type(executor).__module__.startswith("distributed."):
        return getattr(executor, "_client", None)
    return None


def capacity(executor: cf.Executor) -> int | None:
    """How many tasks `executor` runs at once, when it can tell (Dask: worker threads now
    connected; process and thread pools: their size); None otherwise."""
    client = _dask_client(executor)
    if client is not None:
        return max(1, int(sum(client.nthreads().values())))
    workers = getattr(executor, "_max_workers", None)  # cf.ProcessPoolExecutor, ThreadPoolExecutor
    return workers if isinstance(workers, int) else None


def describe_task_error(exc: BaseException) -> str:
    """One line for an exception that came out of a task's future."""
    if isinstance(exc, cf.CancelledError):
        return ("the task was cancelled by the executor (the Dask scheduler was restarted or "
                "lost, or the client closed)")
    if type(exc).__name__ == "KilledWorker":  # distributed.scheduler.KilledWorker
        return (f"every worker that ran it died ({exc.args[2] if len(exc.args) > 2 else 'several'} "
                "times: killed, or out of memory?), so Dask gave up on it")
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- worker check


def probe_worker(src_file: str | None, src_bytes: int, tmp: str | None) -> tuple[str, str, str, str]:
    """Runs on a worker: can it read the planned input `src_file` (with the planned size) and
    write a file under `tmp` (if given)? Returns (worker, what failed: "src"/"out"/"", detail,
    file name)."""
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    name = f"probe-{secrets.token_hex(8)}"
    if src_file is not None:
        try:
            size = os.stat(src_file).st_size
        except OSError as exc:
            return where, "src", f"{src_file}: {exc.strerror or exc}", name
        if size != src_bytes:
            return where, "src", f"{src_file}: {size} bytes there, {src_bytes} on the client", name
    if tmp is None:
        return where, "", "", ""
    try:
        with open(os.path.join(tmp, name), "w", encoding="ascii") as handle:
            handle.write(name)
    except OSError as exc:
        return where, "out", f"{tmp}: {exc.strerror or exc}", name
    return where, "", "", name


def check_workers(executor: cf.Executor, first_input: tuple[str, int] | None, tmp: Path | None) -> None:
    """Before any real task: check that the workers see SRC (the first planned input, same
    size; None: a remote SRC) and share OUT with the client (a file a worker writes under
    `tmp` is visible here; None: a remote OUT, which shares nothing).

    On Dask every connected worker is checked; another executor runs the check once.
    Raises InputError (SRC not visible), WorkerError (OUT not shared or writable; no workers).
    """
    src_file, src_bytes = first_input if first_input is not None else (None, 0)
    client = _dask_client(executor)
    if client is not None:
        _wait_for_a_worker(client)
        results = client.run(probe_worker, src_file, src_bytes, None if tmp is None else str(tmp))
        outcomes = [(f"{address} on {where}", *rest) for address, (where, *rest) in results.items()]
    else:
        outcomes = [executor.submit(probe_worker, src_file, src_bytes,
                                    None if tmp is None else str(tmp)).result()]
    for where, failed, detail, name in sorted(outcomes):
        _raise_for(where, failed, detail, None if tmp is None else tmp / name)


def _wait_for_a_worker(client: Any) -> None:
    try:
        client.wait_for_workers(1, timeout=_WORKER_WAIT_S)
    except TimeoutError:
        raise WorkerError(f"no Dask worker joined the scheduler within {_WORKER_WAIT_S} s") from None


def _raise_for(where: str, failed: str, detail: str, probe: Path | None) -> None:
    if failed == "src":
        raise InputError(f"SRC is not visible on the worker {where}: {detail}; SRC and OUT must be "
                         f"on a filesystem every worker mounts at the same path ({_SCALE_OUT_DOC})")
    if failed == "out":
        raise WorkerError(f"the worker {where} cannot write under OUT: {detail}; SRC and OUT must be "
                          f"on a filesystem every worker mounts at the same path ({_SCALE_OUT_DOC})")
    if probe is None:
        return
    try:
        seen = probe.read_text(encoding="ascii") == probe.name
        probe.unlink()
    except OSError:
        seen = False
    if not seen:
        raise WorkerError(f"the worker {where} wrote {probe} but this machine does not see it: "
                          f"OUT must be on a filesystem shared by the client and every worker "
                          f"({_SCALE_OUT_DOC})")
