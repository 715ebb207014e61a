"""The examples run end to end: the training scripts, and the Makefile pipeline with reruns."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shardkit
from shardkit.tools.synth import make_image_folder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PER_CLASS = 8


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_image_folder(root, classes=3, per_class=PER_CLASS, min_side=40, max_side=80, seed=5)
    return root


def test_train_classifier_prints_loss_and_stall_fraction(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    shardkit.convert(src, out, size=32, workers=0, progress=False)
    metrics = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_classifier.py"), str(out), "--steps", "3",
         "--batch-size", "8", "--log-every", "1", "--metrics", str(metrics), "--crop", "24"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    losses = [float(v) for v in re.findall(r"step \d+: loss (\d+\.\d+)", result.stdout)]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    assert "training on cpu" in result.stdout or "training on cuda" in result.stdout
    assert "random 24x24 crops and flips" in result.stdout
    stall = re.search(r"stall fraction: (\d+\.\d)% of the time waiting for data", result.stdout)
    assert stall is not None, result.stdout
    data = json.loads(metrics.read_text())
    assert data["steps"] == 3 and data["samples"] == 24  # 3 steps of 8, counted by the monitor
    assert math.isfinite(data["loss"]) and data["loss"] == pytest.approx(losses[-1], abs=1e-4)
    assert f"{100 * data['stall_fraction']:.1f}" == stall.group(1)


def test_monitor_demo_on_shards_and_on_the_raw_folder(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    shardkit.convert(src, out, size=24, workers=0, progress=False)
    demo = [sys.executable, str(EXAMPLES / "monitor_demo.py"), str(out), "--batch-size", "8"]
    shards = subprocess.run(demo, capture_output=True, text=True, timeout=300)
    assert shards.returncode == 0, shards.stderr
    lines = shards.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1", "total"]
    assert lines[-1].startswith(f"total: {2 * 3 * PER_CLASS} samples in 6 batches")
    raw = subprocess.run([*demo, "--raw", str(src), "--epochs", "1", "--workers", "1", "--limit", "16"],
                         capture_output=True, text=True, timeout=300)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout.startswith("epoch 0: 16 samples in 2 batches") and "waiting for data" in raw.stdout


def make(*args: str, src: Path, work: Path) -> subprocess.CompletedProcess[str]:
    variables = [f"SRC={src}", f"OUT={work / 'shards'}", f"RUN={work / 'run'}", "SIZE=24",
                 "STEPS=2", "BATCH=8", f"SHARDKIT={sys.executable} -m shardkit",
                 f"PYTHON={sys.executable}"]
    return subprocess.run(["make", "-C", str(EXAMPLES), *variables, *args], capture_output=True,
                          text=True, timeout=300)


def test_makefile_pipeline_reruns_nothing_when_up_to_date(src: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    subprocess.run(["cp", "-r", str(src), str(raw)], check=True)  # this test adds a file to it
    work = tmp_path / "work"
    first = make("-j2", src=raw, work=work)
    assert first.returncode == 0, first.stderr
    assert "stall fraction:" in first.stdout and "convert" in first.stdout
    assert shardkit.open(work / "shards").shape == (24, 24, 3)
    assert len(shardkit.open(work / "shards")) == 3 * PER_CLASS
    assert json.loads((work / "run" / "metrics.json").read_text())["steps"] == 2
    assert "samples" in (work / "run" / "info.txt").read_text()
    files = sorted(p for p in work.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    assert make("-q", src=raw, work=work).returncode == 0  # everything is up to date
    again = make("-j2", src=raw, work=work)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    (raw / "class_1" / "new.jpg").write_bytes((raw / "class_1" / "img_0000.jpg").read_bytes())
    assert make("-q", src=raw, work=work).returncode == 1  # a new image: out of date
    third = make(src=raw, work=work)
    assert third.returncode == 0, third.stderr
    assert len(shardkit.open(work / "shards")) == 3 * PER_CLASS + 1
    assert make("-q", src=raw, work=work).returncode == 0


def test_keras_fit_trains_from_a_keras_split_of_the_class_folders(src: Path, tmp_path: Path) -> None:
    history = tmp_path / "history.json"
    env = {**os.environ, "KERAS_BACKEND": "torch"}  # Keras' own setting: the backend this test uses
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "keras_fit.py"), str(src), "--out", str(tmp_path / "shards"),
         "--size", "32", "--epochs", "2", "--batch-size", "8", "--workers", "0",
         "--history", str(history)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(history.read_text())
    val_per_class = int(0.2 * PER_CLASS)  # ImageDataGenerator(validation_split=0.2)'s cut
    assert len(shardkit.open(tmp_path / "shards" / "val")) == 3 * val_per_class
    assert len(shardkit.open(tmp_path / "shards" / "train")) == 3 * (PER_CLASS - val_per_class)
    assert data["steps"] == math.ceil(3 * (PER_CLASS - val_per_class) / 8)
    assert data["val_steps"] == math.ceil(3 * val_per_class / 8)
    assert len(data["history"]["loss"]) == len(data["history"]["val_accuracy"]) == 2
    assert data["classes"] == ["class_0", "class_1", "class_2"]
    assert "validation: loss" in result.stdout
