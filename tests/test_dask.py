"""The conversion on a real Dask cluster (a `dask scheduler` and two `dask worker` processes on
127.0.0.1): byte-identical to a local run, surviving a killed worker, resumable across local and
Dask runs, failing clearly when workers cannot see SRC or a task fails."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from corpus import add_bad_files, hashes, image_tree, slow_tree
from PIL import Image

import shardkit
from shardkit.conversion import commit
from shardkit.conversion.executors import describe_task_error
from shardkit.conversion.images import pillow_limits
from shardkit.errors import EXIT_INTERRUPTED, InputError, MissingExtraError, WorkerError

distributed = pytest.importorskip("distributed")

OPTIONS: dict[str, Any] = {"size": 48, "samples_per_shard": 12, "draft": False, "max_errors": 5}
ARGS = ["--size", "48", "--samples-per-shard", "12", "--no-draft", "--max-errors", "5"]
DASK = Path(sys.executable).with_name("dask")


@dataclass
class Cluster:
    address: str
    client: Any  # distributed.Client, for the tests' own looks at the cluster

    def worker_pids(self) -> dict[str, int]:
        return dict(self.client.run(os.getpid))


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started in its own session, and everything it started."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    processes: list[subprocess.Popen[bytes]] = []
    client = None
    log = open(folder / "cluster.log", "wb")  # noqa: SIM115 - closed in the finally below

    def start(*args: object, cwd: Path) -> None:
        cwd.mkdir(exist_ok=True)
        processes.append(subprocess.Popen([str(DASK), *map(str, args)], cwd=cwd, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    try:
        start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", scheduler_file, cwd=folder / "scheduler")
        for number in range(2):
            start("worker", "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
                  "--no-dashboard", "--scheduler-file", scheduler_file, cwd=folder / f"w{number}")
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, (folder / "cluster.log").read_text()
            time.sleep(0.05)
        client = distributed.Client(scheduler_file=str(scheduler_file), set_as_default=False)
        client.wait_for_workers(2, timeout=60)
        yield Cluster(address=json.loads(scheduler_file.read_text())["address"], client=client)
    finally:
        if client is not None:
            client.close()
        for process in reversed(processes):
            _stop(process)
        log.close()


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 inputs that take a few seconds to convert (16 large images hard-linked 15 times)
    and one broken file, so that errors.jsonl and the journal carry a failure."""
    root = tmp_path_factory.mktemp("src")
    return slow_tree(root, root.parent / "pristine-dask")



@pytest.fixture(scope="module")
def clean(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The local run everything else must equal, file for file."""
    out = tmp_path_factory.mktemp("clean") / "out"
    summary = shardkit.convert(src, out, workers=2, **OPTIONS)
    assert (summary.samples, summary.failed, summary.shards) == (240, 1, 21)
    return hashes(out)


def cli(*args: object, wait: bool = True) -> Any:
    command = [sys.executable, "-m", "shardkit", *map(str, args)]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def journal_entries(out: Path) -> int:
    return len(list((out / commit.JOURNAL_NAME).glob("*.json")))


def wait_for(process: subprocess.Popen[str] | None, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if process is not None:
            assert process.poll() is None, f"finished too early: {process.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def assert_nothing_partial(out: Path, clean: dict[str, str]) -> None:
    assert not (out / "index.json").exists()
    assert not (out / ".shardkit-tmp").exists()
    for name, digest in hashes(out).items():
        if name.startswith("shard-"):
            assert digest == clean[name], f"{name} is incomplete"


def test_dask_executor_as_is_gives_byte_identical_output(cluster: Cluster, src: Path, tmp_path: Path,
                                                         clean: dict[str, str]) -> None:
    out = tmp_path / "out"
    summary = shardkit.convert(src, out, executor=cluster.client.get_executor(), **OPTIONS)
    assert (summary.samples, summary.failed, summary.workers) == (240, 1, 2)
    assert hashes(out) == clean
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    # The tasks really ran in the worker processes: their CPU time came back, not ours.
    assert summary.task_cpu_seconds > 0


@pytest.mark.parametrize("options", [{"format": "parquet"}, {"format": "tar", "codec": "jpeg"}])
def test_other_formats_are_byte_identical_too(cluster: Cluster, tmp_path: Path,
                                              options: dict[str, str]) -> None:
    src = tmp_path / "src"
    image_tree(src, per_class=12)
    add_bad_files(src / "cat")
    common = {"size": 24, "samples_per_shard": 10, "max_errors": 3, **options}
    local = shardkit.convert(src, tmp_path / "local", workers=2, **common)
    dask = shardkit.convert(src, tmp_path / "dask", executor=cluster.client.get_executor(), **common)
    assert (dask.samples, dask.failed, dask.shards) == (local.samples, local.failed, local.shards)
    assert (local.samples, local.failed, local.shards) == (36, 3, 4)
    assert hashes(tmp_path / "dask") == hashes(tmp_path / "local")


def test_cli_run_survives_a_killed_worker_byte_identically(cluster: Cluster, src: Path, tmp_path: Path,
                                                           clean: dict[str, str]) -> None:
    out = tmp_path / "out"
    process = cli("convert", src, out, *ARGS, "--dask-scheduler", cluster.address, wait=False)
    wait_for(process, lambda: journal_entries(out) >= 2)
    busy: list[str] = []

    def a_worker_is_busy() -> bool:  # between two tasks both may be idle for a moment
        busy[:] = [address for address, keys in cluster.client.processing().items() if keys]
        return bool(busy)

    wait_for(process, a_worker_is_busy)
    victim = cluster.worker_pids()[busy[0]]
    os.kill(victim, signal.SIGKILL)  # as the OOM killer would; its nanny starts a new one
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "240 samples in 21 shards" in stdout and "on 2 workers" in stdout
    assert hashes(out) == clean
    cluster.client.wait_for_workers(2, timeout=60)
    assert victim not in cluster.worker_pids().values()


def test_interrupted_local_run_finishes_on_dask(cluster: Cluster, src: Path, tmp_path: Path,
                                               clean: dict[str, str]) -> None:
    out = tmp_path / "out"
    process = cli("convert", src, out, *ARGS, "--workers", "2", wait=False)
    wait_for(process, lambda: journal_entries(out) >= 3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    kept = journal_entries(out)
    summary = shardkit.convert(src, out, executor=cluster.client.get_executor(), resume=True,
                               **OPTIONS)
    assert summary.reused_shards >= kept >= 3
    assert hashes(out) == clean


def test_ctrl_c_on_a_dask_run_cancels_it_then_local_resume(cluster: Cluster, src: Path, tmp_path: Path,
                                                           clean: dict[str, str]) -> None:
    out = tmp_path / "out"
    process = cli("convert", src, out, *ARGS, "--dask-scheduler", cluster.address, wait=False)
    wait_for(process, lambda: journal_entries(out) >= 2)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert "interrupted; nothing incomplete was published" in stderr
    assert_nothing_partial(out, clean)
    # Nothing of that run is left queued on the cluster.
    # (A lambda: cloudpickle sends it by value; the scheduler cannot import this module.)
    wait_for(None, lambda: cluster.client.run_on_scheduler(
        lambda dask_scheduler: len(dask_scheduler.tasks)) == 0)
    resumed = cli("convert", src, out, *ARGS, "--workers", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "shards kept from the interrupted run" in resumed.stdout
    assert hashes(out) == clean


def test_src_the_workers_cannot_see_fails_clearly(cluster: Cluster, src: Path, tmp_path: Path) -> None:
    """/proc/self/fd/N names SRC in this process only: each worker process resolves it to its
    own descriptor N, which it does not have — as a folder mounted on the client only."""
    descriptor = os.open(src, os.O_RDONLY)
    number = os.dup2(descriptor, 987)
    out = tmp_path / "out"
    try:
        client_only = f"/proc/self/fd/{number}"
        assert len(list(Path(client_only).iterdir())) == 3
        with pytest.raises(InputError) as caught:
            shardkit.convert(client_only, out, executor=cluster.client.get_executor(), **OPTIONS)
    finally:
        os.close(number)
        os.close(descriptor)
    message = str(caught.value)
    assert "SRC is not visible on the worker" in message and "127.0.0.1" in message
    assert f"{client_only}/a/000.jpg: No such file or directory" in message
    assert "shared" in message or "every worker mounts" in message
    assert not (out / "index.json").exists() and not (out / ".shardkit-tmp").exists()


def test_a_failing_task_fails_the_run_with_the_workers_message(cluster: Cluster, src: Path,
                                                               tmp_path: Path) -> None:
    """A directory where the last shard's temporary file must go: its assembly task fails on
    the worker every time it runs, so the run must stop and say why."""
    out = tmp_path / "out"
    tmp = out / ".shardkit-tmp"
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            shardkit.convert(src, out, executor=cluster.client.get_executor(), **OPTIONS)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(None, lambda: bool(list(tmp.glob("*/*.part"))) or not thread.is_alive())
    run_folder = next(tmp.glob("*/*.part")).parent
    (run_folder / "shard-00020.tar").mkdir()
    thread.join(timeout=120)
    assert len(outcome) == 1 and isinstance(outcome[0], WorkerError), outcome
    message = str(outcome[0])
    assert message.startswith("converting shard-00020.tar failed: IsADirectoryError")
    assert f"{run_folder}/shard-00020.tar'" in message
    assert outcome[0].exit_code == 7
    assert not (out / "index.json").exists() and not tmp.exists()
    assert journal_entries(out) <= 20


def test_without_dask_the_flag_names_the_extra(src: Path, tmp_path: Path) -> None:
    wrapper = ("import sys; sys.modules['distributed'] = None; "  # as if not installed
               "from shardkit.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", wrapper, "convert", str(src), str(tmp_path / "o"),
                             "--dask-scheduler", "tcp://127.0.0.1:8786"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == MissingExtraError.exit_code, result.stderr
    assert "pip install 'shardkit[dask]'" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, expected", [
    (["--dask-scheduler", "127.0.0.1:8786"], "expected an address like tcp://HOST:PORT"),
    (["--dask-scheduler", "tcp://127.0.0.1:8786", "--workers", "2"], "--workers does not apply"),
])
def test_bad_dask_options_are_config_errors(src: Path, tmp_path: Path, args: list[str],
                                            expected: str) -> None:
    result = cli("convert", src, tmp_path / "o", *args)
    assert result.returncode == 2 and expected in result.stderr


def test_pillow_limits_hold_while_any_threaded_task_runs() -> None:
    """Two tasks as threads of one worker: the first to finish must not restore Pillow's
    defaults (its own bomb check) under the one still running."""
    default = Image.MAX_IMAGE_PIXELS
    inside, release = threading.Event(), threading.Event()

    def long_task() -> None:
        with pillow_limits():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=long_task)
    thread.start()
    inside.wait(10)
    with pillow_limits():
        assert Image.MAX_IMAGE_PIXELS is None
    assert Image.MAX_IMAGE_PIXELS is None  # the long task still runs
    release.set()
    thread.join(10)
    assert default == Image.MAX_IMAGE_PIXELS


def test_cluster_errors_read_as_one_line() -> None:
    from distributed.scheduler import KilledWorker

    killed = KilledWorker("run_part-1234", "tcp://127.0.0.1:4242", 3)
    assert describe_task_error(killed) == (
        "every worker that ran it died (3 times: killed, or out of memory?), so Dask gave up on it")
    assert "cancelled by the executor" in describe_task_error(cf.CancelledError())
    assert describe_task_error(OSError(28, "No space left on device")) == \
        "OSError: [Errno 28] No space left on device"


class _RemovesSrcAfterTheCheck(cf.ThreadPoolExecutor):
    """A real executor (threads) for a real event: SRC disappears once the worker check has
    passed — what a worker that joins later without the shared filesystem sees."""

    def __init__(self, src: Path) -> None:
        super().__init__(max_workers=2)
        self.src, self.calls = src, 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        self.calls += 1
        if self.calls == 2:  # the first call was the check
            shutil.rmtree(self.src)
        return super().submit(fn, *args, **kwargs)


def test_a_task_that_cannot_see_src_fails_the_run(tmp_path: Path) -> None:
    """Not every input reported missing: the task fails, naming SRC."""
    src = tmp_path / "src"
    image_tree(src, per_class=3)
    out = tmp_path / "out"
    with _RemovesSrcAfterTheCheck(src) as executor, pytest.raises(WorkerError) as caught:
        shardkit.convert(src, out, executor=executor, size=16)
    assert f"FileNotFoundError: SRC {src} is not visible on" in str(caught.value)
    assert not (out / "index.json").exists() and not (out / ".shardkit-tmp").exists()


def test_an_image_csv_whose_first_row_is_missing_runs_on_dask(cluster: Cluster, src: Path,
                                                              tmp_path: Path) -> None:
    """The up-front worker check must not take the first CSV row's missing file for a worker
    that cannot see SRC: that row belongs in errors.jsonl, as in a local run."""
    table = tmp_path / "train.csv"
    rows = ["gone/nothing.jpg,a"] + [f"{k}/{i:03d}.jpg,{k}" for k in ("a", "b") for i in range(6)]
    table.write_text("path,kind\n" + "\n".join(rows) + "\n")
    options = {"image_col": "path", "label_col": "kind", "root": str(src), "size": 24,
               "samples_per_shard": 5, "max_errors": 1}
    local = shardkit.convert(table, tmp_path / "local", workers=2, **options)
    remote = shardkit.convert(table, tmp_path / "dask", executor=cluster.client.get_executor(),
                              **options)
    assert (remote.samples, remote.failed) == (local.samples, local.failed) == (12, 1)
    assert hashes(tmp_path / "dask") == hashes(tmp_path / "local")
    (failure,) = [json.loads(line) for line in (tmp_path / "dask" / "errors.jsonl").open()]
    assert (failure["row"], failure["reason"]) == (2, "missing_file")
