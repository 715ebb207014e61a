"""The stall monitor, around a real ShardLoader over a tiny converted dataset."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from corpus import image_tree, loader

import shardkit
from shardkit.tools.monitor import cpu_seconds, monitor

SAMPLES = 12
BATCH = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    image_tree(src, classes=("ant", "bee", "cow"), per_class=SAMPLES // 3)
    out = tmp_path_factory.mktemp("data") / "out"
    shardkit.convert(src, out, size=16, samples_per_shard=5, workers=0, progress=False)
    return out


class SlowLoader:
    """A real ShardLoader whose batches arrive `delay` seconds late."""

    def __init__(self, path: Path, delay: float) -> None:
        self.loader = shardkit.ShardLoader(path, BATCH, shuffle=True, seed=1)
        self.delay = delay

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def consistent(stats: Any) -> None:
    assert stats.wall > 0 and stats.wait > 0 and stats.step >= 0
    # wait + step covers the wall time but for the monitor's own bookkeeping
    assert stats.wait + stats.step <= stats.wall + 1e-6
    assert stats.wait + stats.step >= 0.9 * stats.wall - 0.005
    assert stats.samples_per_second == pytest.approx(stats.samples / stats.wall)


def test_a_loader_that_sleeps_stalls_a_fast_step(data: Path) -> None:
    out = io.StringIO()
    mon = monitor(SlowLoader(data, 0.05), out=out)
    labels = []
    for batch in mon:
        labels += batch["label"].tolist()
    stats = mon.epochs[0]
    assert stats.stall_fraction > 0.8
    assert (stats.samples, stats.batches, stats.complete) == (SAMPLES, SAMPLES // BATCH, True)
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert stats.wait >= 0.05 * stats.batches
    consistent(stats)
    assert stats.gpu_utilization is None and stats.gpu_memory_bytes is None  # no GPU here
    line = out.getvalue()
    assert line.startswith("epoch 0: 12 samples in 3 batches") and "waiting for data" in line
    assert "GPU" not in line


def test_an_instant_loader_does_not_stall_a_slow_step(data: Path) -> None:
    mon = monitor(shardkit.ShardLoader(data, BATCH, shuffle=False), quiet=True)
    seen = []
    for epoch in range(2):
        for batch in mon:
            seen += batch["index"].tolist()
            time.sleep(0.1)
        assert mon.epochs[epoch].stall_fraction < 0.2
        assert mon.epochs[epoch].step >= 0.1 * 3
        consistent(mon.epochs[epoch])
    assert seen == list(range(SAMPLES)) * 2
    total = mon.total()
    assert (total.samples, total.batches) == (2 * SAMPLES, 6)
    assert total.wall == pytest.approx(sum(e.wall for e in mon.epochs))
    assert total.wait == pytest.approx(sum(e.wait for e in mon.epochs))
    assert total.stall_fraction < 0.2
    assert mon.summary().splitlines()[-1].startswith("total: 24 samples in 6 batches")


def test_breaking_out_records_a_partial_epoch_and_running_windows(data: Path) -> None:
    out = io.StringIO()
    mon = monitor(shardkit.ShardLoader(data, 2, shuffle=False), every=2, out=out)
    for step, _ in enumerate(mon):
        if step == 4:
            break
    assert len(mon.epochs) == 1
    partial = mon.epochs[0]
    assert (partial.complete, partial.batches, partial.samples) == (False, 5, 10)
    assert [w.batches for w in mon.windows] == [2, 2]
    assert "epoch 0 (partial): 10 samples in 5 batches" in out.getvalue()
    assert out.getvalue().count("  step ") == 2


def test_cpu_counts_workers_and_reaped_children() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    before = cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn])
    child.wait()  # reaped: its time now shows in this process's children_* times
    assert cpu_seconds() - before >= 0.3


def test_worker_cpu_shows_in_the_epoch(data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    image_tree(src, classes=("a", "b"), per_class=24, min_side=300, max_side=400)
    jpeg = tmp_path / "jpeg"
    shardkit.convert(src, jpeg, size=256, codec="jpeg", workers=0, progress=False)
    mon = monitor(loader(jpeg, 4, 2), quiet=True)  # a DataLoader with two worker processes
    me = psutil.Process()
    own_before = sum(me.cpu_times()[:2])
    count = sum(len(batch["label"]) for batch in mon)
    own = sum(me.cpu_times()[:2]) - own_before
    stats = mon.epochs[0]
    assert count == stats.samples == 48
    # Two worker processes decoded 48 JPEGs of 256 px: their CPU time (counted in ticks of
    # 10 ms) comes on top of this process's own, which mostly waited.
    assert stats.cpu_seconds >= own + 0.03
    consistent(stats)


def test_tensorboard_gets_the_figures(data: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = monitor(SlowLoader(data, 0.01), quiet=True, tensorboard=tmp_path / "tb")
    for _ in range(2):
        for _ in mon:
            pass
    mon.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    stall = events.Scalars("loader/epoch/stall_fraction")
    assert [e.step for e in stall] == [0, 1]
    assert [e.value for e in stall] == pytest.approx([s.stall_fraction for s in mon.epochs], rel=1e-5)
    assert "loader/epoch/gpu_utilization" not in events.Tags()["scalars"]


def test_bad_options_are_config_errors(data: Path) -> None:
    with pytest.raises(shardkit.ConfigError, match="every"):
        monitor([], every=0)
    import torch

    if torch.cuda.is_available():
        assert monitor([], sync=True).sync is True
    else:
        with pytest.raises(shardkit.ConfigError, match="CUDA"):
            monitor([], sync=True)


def test_numpy_batches_without_torch_print_to_stdout(data: Path) -> None:
    code = (
        "import sys, shardkit, shardkit.tools.bench, shardkit.tools.monitor\n"
        "assert callable(shardkit.monitor)  # the function, not the module of the same name\n"
        # In stored order: a shuffled gather uses torch's index_select when torch is installed.
        f"mon = shardkit.monitor(shardkit.open({str(data)!r}).batches(5, shuffle=False))\n"
        "n = sum(len(b['image']) for b in mon)\n"
        "print(n, mon.epochs[0].samples, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line, last = result.stdout.splitlines()
    assert line.startswith("epoch 0: 12 samples in 3 batches")
    assert last == "12 12 False"
