"""`shardkit bench`: real loaders in fresh processes over a tiny converted dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from corpus import image_tree
from PIL import Image

import shardkit
from shardkit.errors import ConfigError, DatasetError, InputError
from shardkit.tools.bench import BENCH_SCHEMA, BenchOptions, BenchReport, LoaderRun, run_bench
from shardkit.tools.bench_run import measure_here

SAMPLES = 18

RUN_KEYS = {"loader", "workers", "epochs", "samples", "bytes", "seconds", "cpu_seconds",
            "first_batch_seconds", "peak_rss_bytes", "workers_peak_rss_bytes", "epoch_seconds",
            "samples_per_second", "cpu_ms_per_sample", "cores", "mb_per_second"}
REPORT_KEYS = {"schema", "dataset", "dataset_samples", "image_shape", "baseline", "baseline_samples",
               "baseline_skipped", "codec", "decode_threads",
               "cpu_count", "batch_size", "epochs", "shuffle", "target_rate", "runs", "verdict"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = tmp_path_factory.mktemp("src")
    image_tree(src, classes=("ant", "bee", "cow"), per_class=SAMPLES // 3)
    out = tmp_path_factory.mktemp("data") / "out"
    shardkit.convert(src, out, size="20x12", samples_per_shard=7, workers=0, progress=False)
    return src, out


def test_counts_cpu_and_schema(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = dataset
    options = BenchOptions(batch_size=4, workers=(0, 2), epochs=2, baseline=str(src),
                           baseline_limit=10)
    report = run_bench(out, options)
    assert [(r.loader, r.workers) for r in report.runs] == [
        ("shards", 0), ("raw", 0), ("shards", 2), ("raw", 2)]
    for run in report.runs:
        expected = SAMPLES * 2 if run.loader == "shards" else 10 * 2  # dataset (or limit) × epochs
        assert run.samples == expected, run
        assert run.bytes == expected * 12 * 20 * 3  # uint8 pixels delivered
        assert run.cpu_seconds > 0 and run.seconds > 0
        assert run.first_batch_seconds > 0
        assert len(run.epoch_seconds) == 2 and sum(run.epoch_seconds) <= run.seconds
        assert run.peak_rss_bytes > 10_000_000  # a Python process with torch loaded
        assert (run.workers_peak_rss_bytes > 0) == (run.workers > 0)
    data = report.to_json()
    assert set(data) == REPORT_KEYS and data["schema"] == BENCH_SCHEMA
    assert all(set(r) == RUN_KEYS for r in data["runs"])
    assert data["dataset_samples"] == SAMPLES and data["baseline_samples"] == 10
    assert data["image_shape"] == [12, 20, 3]
    json.dumps(data)  # serialisable as it is
    assert report.verdict().startswith("shards: ") and "raw folder: " in report.verdict()
    lines = report.table().splitlines()
    assert lines[1].split()[:3] == ["loader", "workers", "samples"]
    assert lines[2].split()[:3] == ["shards", "0", "36"]
    from shardkit.tools.bench import plot

    plot(report, tmp_path / "bench.png")
    with Image.open(tmp_path / "bench.png") as im:
        assert im.format == "PNG" and im.width > 500


def test_child_measures_cpu_of_worker_processes(tmp_path: Path) -> None:
    import psutil
    import torch  # noqa: F401  (imported here, so that its import is not in `own`)

    image_tree(tmp_path, classes=("a",), per_class=8, min_side=900, max_side=1000)
    files = [(str(p), 0) for p in sorted(tmp_path.rglob("*.*"))]
    spec = {"loader": "raw", "files": files, "shape": [12, 20, 3], "workers": 2, "epochs": 1,
            "batch_size": 2, "shuffle": False, "seed": 0}
    me = psutil.Process()
    own_before = sum(me.cpu_times()[:2])
    result = measure_here(spec)
    own = sum(me.cpu_times()[:2]) - own_before
    assert result["samples"] == 8
    # The decoding happened in two worker processes, reaped by now: their time is counted,
    # on top of what this process spent.
    assert result["cpu_seconds"] > own + 0.05


def test_cli_json_and_verdict(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = dataset
    result = subprocess.run([sys.executable, "-m", "shardkit", "bench", str(out), "--batch-size", "5",
                             "--workers", "0", "--epochs", "3", "--json", "--plot",
                             str(tmp_path / "b.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == REPORT_KEYS and data["baseline"] is None
    [run] = data["runs"]
    assert (run["loader"], run["workers"], run["samples"], run["epochs"]) == ("shards", 0, 3 * SAMPLES, 3)
    assert "cores of loading" in data["verdict"]
    assert (tmp_path / "b.png").stat().st_size > 0
    text = subprocess.run([sys.executable, "-m", "shardkit", "bench", str(out), "--batch-size", "5",
                           "--workers", "0", "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "samples/s per core" in text.stdout


def test_bad_input_is_a_clear_error(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = dataset
    with pytest.raises(ConfigError, match="workers"):
        BenchOptions(workers=(0, 0))
    with pytest.raises(ConfigError, match="batch_size"):
        BenchOptions(batch_size=0)
    with pytest.raises(ConfigError, match="epochs"):
        BenchOptions(epochs=True)  # a bool is no count (it passed as 1)
    assert BenchOptions(workers=(np.int64(0), 2)).workers == (0, 2)
    with pytest.raises(DatasetError, match=r"index\.json"):
        run_bench(src, BenchOptions(workers=(0,)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        run_bench(out, BenchOptions(workers=(0,), baseline=str(tmp_path / "empty")))
    bad = subprocess.run([sys.executable, "-m", "shardkit", "bench", str(out), "--workers", "0,x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == ConfigError.exit_code and "--workers" in bad.stderr
    with pytest.raises(ConfigError, match="not a URL"):
        BenchOptions(baseline="s3://bucket/raw")
    for plot in (str(tmp_path / "nowhere" / "b.png"), str(tmp_path)):  # refused before measuring
        refused = subprocess.run([sys.executable, "-m", "shardkit", "bench", str(out), "--workers", "0",
                                  "--plot", plot], capture_output=True, text=True, timeout=60)
        assert refused.returncode == ConfigError.exit_code and "--plot" in refused.stderr
        assert refused.stdout == ""


def test_a_damaged_shard_met_while_measuring_is_its_own_error(dataset: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    import shutil

    damaged = tmp_path / "out"
    shutil.copytree(dataset[1], damaged)
    first = damaged / "shard-00001.tar"
    first.write_bytes(first.read_bytes()[:1000])
    run = subprocess.run([sys.executable, "-m", "shardkit", "bench", str(damaged), "--workers", "0",
                          "--epochs", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == DatasetError.exit_code, run.stderr
    assert run.stderr.count("\n") == 1 and "shard-00001.tar" in run.stderr
    assert run.stderr.startswith("shardkit: error:") and "Traceback" not in run.stderr


def test_a_run_too_short_to_measure_cpu_gets_a_verdict() -> None:
    """CPU time comes in 10 ms ticks: a tiny run of shards can measure none at all."""
    def run(loader: str, cpu: float) -> LoaderRun:
        return LoaderRun(loader=loader, workers=0, epochs=1, samples=20, bytes=20 * 300,
                         seconds=0.01, cpu_seconds=cpu, first_batch_seconds=0.01,
                         peak_rss_bytes=1, workers_peak_rss_bytes=0)

    report = BenchReport(dataset="d", dataset_samples=20, image_shape=[10, 10, 3], baseline="s",
                         baseline_samples=20, options=BenchOptions(workers=(0,)),
                         runs=[run("shards", 0.0), run("raw", 0.1)])
    verdict = report.verdict()
    assert "too little CPU time to measure per core" in verdict
    assert "200 samples/s per core" in verdict  # raw: 20 samples in 0.1 CPU-s
    assert "shards' CPU per sample too small to measure" in verdict


def test_the_verdict_says_which_side_is_faster_and_keeps_small_ratios() -> None:
    # When the raw folder beat the shards it said "0× the CPU per sample, 0× slower".
    def run(loader: str, seconds: float, cpu: float) -> LoaderRun:
        return LoaderRun(loader=loader, workers=0, epochs=1, samples=100, bytes=100 * 300,
                         seconds=seconds, cpu_seconds=cpu, first_batch_seconds=0.01,
                         peak_rss_bytes=1, workers_peak_rss_bytes=0)

    def verdict(shards: LoaderRun, raw: LoaderRun) -> str:
        return BenchReport(dataset="d", dataset_samples=100, image_shape=[10, 10, 3], baseline="s",
                           baseline_samples=100, options=BenchOptions(workers=(0,)),
                           runs=[shards, raw]).verdict()

    slow = verdict(run("shards", 2.5, 2.5), run("raw", 0.08, 0.1))  # 40/s, 25 ms against 1,250/s, 1 ms
    assert "(25× less CPU per sample, 31× faster)" in slow
    fast = verdict(run("shards", 0.1, 0.05), run("raw", 0.25, 0.2))
    assert "(4.0× the CPU per sample, 2.5× slower)" in fast and "cores of decoding" in fast


def test_a_dataset_with_no_samples_is_refused_in_one_line(tmp_path: Path) -> None:
    # Every input failed: the dataset is valid and empty; bench divided by its 0 samples.
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.jpg").write_text("not an image")
    summary = shardkit.convert(tmp_path / "src", tmp_path / "out", size=8, workers=0, max_errors="100%")
    assert (summary.samples, summary.failed) == (0, 3)
    with pytest.raises(InputError, match="holds no samples"):
        run_bench(tmp_path / "out", BenchOptions(workers=(0,), epochs=1))
    bench = subprocess.run([sys.executable, "-m", "shardkit", "bench", str(tmp_path / "out"),
                            "--workers", "0"], capture_output=True, text=True, timeout=120)
    assert bench.returncode == InputError.exit_code and "Traceback" not in bench.stderr


def test_baseline_skips_and_counts_files_that_do_not_decode(dataset: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    """The folders people point the baseline at are the ones with broken files: it leaves them
    out, counts them by reason as convert does, and says so (it used to end in a traceback)."""
    src, out = dataset
    broken = tmp_path / "broken"
    for path in sorted(src.rglob("*.*")):
        target = broken / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (broken / "ant" / "zz-not-an-image.jpg").write_text("not an image")
    good = next((broken / "bee").glob("*.jpg")).read_bytes()
    (broken / "bee" / "zz-truncated.jpg").write_bytes(good[: len(good) // 2])
    report = run_bench(out, BenchOptions(batch_size=4, workers=(0,), epochs=1, baseline=str(broken)))
    raw = report.best("raw")
    assert raw is not None and raw.samples == SAMPLES  # every good file, none of the broken
    assert report.baseline_skipped == {"not_an_image": 1, "truncated": 1}
    assert report.to_json()["baseline_skipped"] == {"not_an_image": 1, "truncated": 1}
    assert "2 files skipped, as convert would report them (1 not_an_image, 1 truncated)" in report.table()
