"""Crash safety with real processes: kill -9 at several points, SIGINT, a dying worker, then
resume to byte-identical output; Make-friendly reruns."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from corpus import hashes, slow_tree

import shardkit
from shardkit.conversion import commit
from shardkit.errors import EXIT_INTERRUPTED, OutputExistsError, WorkerError
from shardkit.format.manifest import Manifest

ARGS = ["--size", "48", "--samples-per-shard", "12", "--no-draft", "--workers", "2",
        "--max-errors", "5"]


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 inputs that take a few seconds to convert: 16 large images, hard-linked 15 times,
    plus one bad file so that errors.jsonl and the journal carry a failure."""
    root = tmp_path_factory.mktemp("src")
    return slow_tree(root, root.parent / "pristine")


def cli(*args: object, wait: bool = True) -> subprocess.Popen[str] | subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "shardkit", *map(str, args)]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)



@pytest.fixture(scope="module")
def clean(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("clean") / "out"
    result = cli("convert", src, out, *ARGS)
    assert result.returncode == 0, result.stderr
    return hashes(out)


def kill_when(process: subprocess.Popen[str], ready: Callable[[], bool], sig: int = signal.SIGKILL) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, f"finished before the kill point: {process.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(process.pid, sig)  # the CLI, its forkserver and the pool workers
    process.wait(timeout=60)


def journal_entries(out: Path) -> int:
    return len(list((out / commit.JOURNAL_NAME).glob("*.json")))


def assert_no_partial_files(out: Path, clean: dict[str, str]) -> None:
    """Every file under a final shard name is complete: byte-identical to the clean run's."""
    assert not (out / "index.json").exists()
    for name, digest in hashes(out).items():
        if name.startswith("shard-"):
            assert digest == clean[name], f"{name} is incomplete"


@pytest.mark.parametrize("point", ["before_first_shard", "mid_run"])
def test_kill_9_then_resume_is_byte_identical(src: Path, tmp_path: Path, clean: dict[str, str],
                                              point: str) -> None:
    out = tmp_path / "out"
    process = cli("convert", src, out, *ARGS, wait=False)
    assert isinstance(process, subprocess.Popen)
    if point == "before_first_shard":
        kill_when(process, lambda: (out / ".shardkit-tmp").exists())
    else:
        kill_when(process, lambda: journal_entries(out) >= 5)
    assert process.returncode == -signal.SIGKILL
    assert_no_partial_files(out, clean)
    again = cli("convert", src, out, *ARGS)
    assert again.returncode == OutputExistsError.exit_code and "--resume" in again.stderr
    resumed = cli("convert", src, out, *ARGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    if point == "mid_run":
        assert "shards kept from the interrupted run" in resumed.stdout
    assert hashes(out) == clean
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_kill_9_of_the_converting_process_alone_leaves_no_process_behind(
        src: Path, tmp_path: Path, clean: dict[str, str]) -> None:
    """A pool worker waits on its task queue for ever, and keeps the forkserver alive: each
    worker ends itself once the converting process is gone."""
    out = tmp_path / "out"
    process = cli("convert", src, out, *ARGS, wait=False)
    assert isinstance(process, subprocess.Popen)
    deadline = time.monotonic() + 120
    while journal_entries(out) < 2:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    group = [p for p in psutil.process_iter(["pid"]) if _group_of(p) == process.pid]
    assert len(group) >= 4, group  # the CLI, its forkserver, 2 workers (and a resource tracker)
    process.kill()  # the CLI alone, not its process group
    process.wait(timeout=60)
    left: list[psutil.Process] = []
    while time.monotonic() < deadline:
        left = [p for p in group if _live(p)]
        if not left:
            break
        time.sleep(0.1)
    assert not left, [p.cmdline()[-1][:60] for p in left]
    assert_no_partial_files(out, clean)
    resumed = cli("convert", src, out, *ARGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert hashes(out) == clean


def _live(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_of(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_killed_after_the_last_shard_before_index_json(src: Path, tmp_path: Path,
                                                      clean: dict[str, str]) -> None:
    out = tmp_path / "out"
    process = cli("convert", src, out, *ARGS, wait=False)
    assert isinstance(process, subprocess.Popen)
    total = sum(1 for name in clean if name.startswith("shard-"))
    kill_when(process, lambda: journal_entries(out) >= total - 1)
    # The last shard may or may not have been published: both states must resume exactly.
    assert_no_partial_files(out, clean)
    resumed = cli("convert", src, out, *ARGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert hashes(out) == clean


def test_state_with_every_shard_done_but_no_index(src: Path, tmp_path: Path,
                                                 clean: dict[str, str]) -> None:
    """Exactly the files a kill leaves between the last journal entry and index.json."""
    out = tmp_path / "out"
    assert cli("convert", src, out, *ARGS).returncode == 0
    manifest = Manifest.read(out)
    for number, record in enumerate(manifest.shards):
        commit.write_entry(out, manifest.fingerprint, commit.Entry(
            shard=number, record=record,
            failures=tuple(_failures_of(out, number)), label_counts=_counts(out, number)))
    (out / "index.json").unlink()
    (out / "errors.jsonl").unlink()
    resumed = cli("convert", src, out, *ARGS, "--resume", "--workers", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(manifest.shards)} shards kept" in resumed.stdout
    assert hashes(out) == clean


def _failures_of(out: Path, shard: int) -> list[shardkit.conversion.report.FailureRecord]:
    import json

    rows = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    start = shard * 12
    return [shardkit.conversion.report.FailureRecord(source=r["path"], stage=r["stage"], reason=r["reason"],
                                          detail=r["detail"], index=r["index"], key=r["key"])
            for r in rows if r["index"] is not None and start <= r["index"] < start + 12]


def _counts(out: Path, shard: int) -> tuple[int, ...]:
    labels = shardkit.open(out).read_shard(shard).labels
    assert labels is not None
    return tuple(int((labels == k).sum()) for k in range(3))


def test_sigint_exits_non_zero_and_publishes_nothing_partial(src: Path, tmp_path: Path,
                                                            clean: dict[str, str]) -> None:
    out = tmp_path / "out"
    process = cli("convert", src, out, *ARGS, wait=False)
    assert isinstance(process, subprocess.Popen)
    kill_when(process, lambda: journal_entries(out) >= 3, sig=signal.SIGINT)
    assert process.returncode == EXIT_INTERRUPTED
    assert "interrupted" in process.stderr.read()  # type: ignore[union-attr]
    assert_no_partial_files(out, clean)
    assert not (out / ".shardkit-tmp").exists()
    assert cli("convert", src, out, *ARGS, "--resume").returncode == 0
    assert hashes(out) == clean


def test_a_dying_worker_fails_the_run_clearly(src: Path, tmp_path: Path, clean: dict[str, str]) -> None:
    out = tmp_path / "out"
    process = cli("convert", src, out, *ARGS, wait=False)
    assert isinstance(process, subprocess.Popen)

    def a_worker_killed() -> bool:
        if journal_entries(out) < 2:
            return False
        workers = [p for p in psutil.Process(process.pid).children(recursive=True)
                   if p.ppid() != process.pid]  # pool workers are the forkserver's children
        if not workers:
            return False
        workers[0].kill()  # as the OOM killer would
        return True

    deadline = time.monotonic() + 120
    while not a_worker_killed():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    _, stderr = process.communicate(timeout=120)  # no hang
    assert process.returncode == WorkerError.exit_code, stderr
    assert "worker process died" in stderr
    assert_no_partial_files(out, clean)
    assert cli("convert", src, out, *ARGS, "--resume").returncode == 0
    assert hashes(out) == clean


def test_rerun_of_a_finished_conversion_does_nothing(src: Path, tmp_path: Path,
                                                     clean: dict[str, str]) -> None:
    out = tmp_path / "out"
    assert cli("convert", src, out, *ARGS).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = cli("convert", src, out, *ARGS)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    changed = cli("convert", src, out, *ARGS, "--size", "40")
    assert changed.returncode == OutputExistsError.exit_code and "fingerprint" in changed.stderr
    assert cli("convert", src, out, *ARGS, "--size", "40", "--overwrite").returncode == 0
    assert hashes(out) != clean


def test_resume_refuses_a_journal_of_other_options(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = cli("convert", src, out, *ARGS, wait=False)
    assert isinstance(process, subprocess.Popen)
    kill_when(process, lambda: journal_entries(out) >= 2)
    other = cli("convert", src, out, *ARGS, "--size", "40", "--resume")
    assert other.returncode == OutputExistsError.exit_code and "other inputs or options" in other.stderr
    shutil.rmtree(out)


class _Interrupting:
    """Sends this process SIGINT from its __del__, where Python prints the KeyboardInterrupt
    and drops it: what happens when a Ctrl-C lands while a Dask future is released."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, inside __del__


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing
def test_a_ctrl_c_swallowed_by_a_del_still_stops_the_run(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from corpus import image_tree

    from shardkit.conversion import tasks

    src = tmp_path / "src"
    image_tree(src, classes=("a",), per_class=200, min_side=20, max_side=30)
    run_part = tasks.run_part
    calls = []

    def interrupted_once(task: tasks.PartTask) -> tasks.PartResult:
        calls.append(task.part)
        if len(calls) == 1:
            _Interrupting()  # dropped at once: its __del__ swallows the interrupt
        return run_part(task)

    monkeypatch.setattr("shardkit.conversion.scheduler.run_part", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        shardkit.convert(src, tmp_path / "out", size=8, workers=0)
    assert len(calls) == 1  # stopped after the part it arrived in, not at the end
    assert not (tmp_path / "out" / "index.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    # The next run is not stopped by the last one's interrupt.
    assert shardkit.convert(src, tmp_path / "again", size=8, workers=0).samples == 200
