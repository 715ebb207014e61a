"""The shardkit command: exit codes, summary line, info and preview, run as real processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from corpus import add_bad_files, image_tree
from PIL import Image

import shardkit
from shardkit.errors import (
    ConfigError,
    DatasetError,
    InputError,
    OutputExistsError,
    TooManyFailuresError,
    WorkerError,
)

SHARDKIT = [sys.executable, "-m", "shardkit"]


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHARDKIT, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    image_tree(root, classes=("ant", "bee"), per_class=4)
    return root


def test_convert_prints_a_summary_and_exits_zero(tree: Path, tmp_path: Path) -> None:
    result = cli("convert", tree, tmp_path / "out", "--size", "16x12", "--workers", "2",
                 "--samples-per-shard", "3")
    assert result.returncode == 0, result.stderr
    assert "8 samples in 3 shards" in result.stdout and "0 failed" in result.stdout
    assert shardkit.open(tmp_path / "out").shape == (12, 16, 3)


def test_exit_codes(tree: Path, tmp_path: Path) -> None:
    assert cli("convert", tree, tmp_path / "x", "--size", "0").returncode == ConfigError.exit_code
    assert cli("convert", tree, tmp_path / "x", "--codec", "gif").returncode == 2  # argparse
    assert cli("convert", tree, tmp_path / "x", "--resize", "shorter-side", "--size", "3x4",
               ).returncode == ConfigError.exit_code
    missing = cli("convert", tmp_path / "nowhere", tmp_path / "x")
    assert missing.returncode == InputError.exit_code
    assert missing.stderr.startswith("shardkit: error:") and "nowhere" in missing.stderr
    assert "Traceback" not in missing.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "a.txt").write_text("x")
    assert cli("convert", tree, full).returncode == OutputExistsError.exit_code
    assert cli("info", tree).returncode == DatasetError.exit_code


def test_a_write_the_os_refuses_in_this_process_is_one_line_and_exit_7(tmp_path: Path) -> None:
    # OUT's disk full (here: a file-size limit) while this process writes a table's shard,
    # or errors.jsonl, or a journal entry: a traceback and exit 1. Nothing is published, and
    # a rerun with room resumes.
    lines = ["x,y"] + [f"{i},{i % 3}" for i in range(30000)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000))\n"
              "from shardkit.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    limited = subprocess.run([sys.executable, "-c", script, "convert", str(tmp_path / "t.csv"), str(out),
                              "--label-col", "y"], capture_output=True, text=True, timeout=120)
    assert limited.returncode == WorkerError.exit_code, limited.stderr
    assert limited.stderr.startswith(f"shardkit: error: converting into {out} stopped: ")
    assert "File too large" in limited.stderr and "Traceback" not in limited.stderr
    assert not (out / "index.json").exists()
    done = cli("convert", tmp_path / "t.csv", out, "--label-col", "y", "--resume")
    assert done.returncode == 0, done.stderr
    assert shardkit.open(out).manifest.samples == 30000


def test_a_second_conversion_into_an_out_in_use_is_refused(tree: Path, tmp_path: Path) -> None:
    # It was told to pass --resume or --overwrite, which cleared the running one's temporary
    # files (that one then died with a traceback). A conversion holds a lock on OUT.
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running conversion holds it
        for extra in ((), ("--resume",), ("--overwrite",)):
            second = cli("convert", tree, out, "--size", "8", *extra)
            assert second.returncode == OutputExistsError.exit_code, second.stderr
            assert "another conversion is writing into it now" in second.stderr
    finally:
        os.close(held)
    assert cli("convert", tree, out, "--size", "8").returncode == 0
    assert shardkit.open(out).manifest.samples == 8


def test_workers_forked_during_a_run_do_not_keep_out_locked(tree: Path, tmp_path: Path) -> None:
    # A fork-started pool's workers, forked at the first task (while OUT is locked), got a copy
    # of the lock's descriptor: the next run into OUT with the same pool was refused.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        first = shardkit.convert(tree, tmp_path / "out", size=8, executor=pool, progress=False)
        again = shardkit.convert(tree, tmp_path / "out", size=8, executor=pool, progress=False,
                                 overwrite=True)
        assert (first.samples, again.samples) == (8, 8)


def test_unusable_src_and_out_paths_are_one_line_errors(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    inside = tmp_path / "src"
    image_tree(inside, classes=("ant", "bee"), per_class=2)
    csv = tmp_path / "rows.csv"
    csv.write_text("path,y\nant/0.png,0\n")
    cases = [
        (("", tmp_path / "o1"), ConfigError, "SRC is empty"),
        ((tree, ""), ConfigError, "OUT is empty"),
        ((tree, tmp_path / "afile" / "sub"), ConfigError, "OUT cannot be made a folder"),
        ((inside, inside / "shards"), ConfigError, "OUT lies inside SRC"),
        ((csv, tmp_path / "o2", "--image-col", "path", "--root", tmp_path / "nowhere"),
         InputError, "--root .*nowhere is not a folder"),
    ]
    for args, error, message in cases:
        result = cli("convert", *args, "--size", "8", "--workers", "0")
        assert result.returncode == error.exit_code, (args, result.stderr)
        assert result.stderr.startswith("shardkit: error:") and "Traceback" not in result.stderr
        assert re.search(message, result.stderr), result.stderr
    assert not (inside / "shards").exists() and sorted(p.name for p in inside.iterdir()) == ["ant", "bee"]


def test_info_and_preview_of_a_dataset_of_float_targets(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    image_tree(images, classes=("a",), per_class=3)
    rows = sorted(p.relative_to(tmp_path).as_posix() for p in images.rglob("*.*"))
    csv = tmp_path / "targets.csv"
    csv.write_text("file,dx,dy\n" + "".join(f"{r},{k}.5,{k}\n" for k, r in enumerate(rows)))
    out = tmp_path / "out"
    assert cli("convert", csv, out, "--image-col", "file", "--label-col", "dx,dy", "--size", "8",
               "--workers", "0").returncode == 0
    info = cli("info", out)
    assert info.returncode == 0 and "labels      float32 targets [2]: dx, dy" in info.stdout
    sheet = tmp_path / "sheet.png"
    preview = cli("preview", out, "-o", sheet)  # was a TypeError: a target row is no class index
    assert preview.returncode == 0, preview.stderr
    assert f"({len(rows)} samples)" in preview.stdout and Image.open(sheet).size[0] > 0
    for n in ("0", "-1"):
        refused = cli("preview", out, "-o", sheet, "--n", n)
        assert refused.returncode == ConfigError.exit_code and "n >= 1" in refused.stderr


def test_too_many_failures_exit_code_after_writing_everything(tmp_path: Path) -> None:
    src = tmp_path / "src"
    image_tree(src, classes=("a",), per_class=2)
    add_bad_files(src / "b")
    result = cli("convert", src, tmp_path / "out", "--size", "8", "--workers", "1")
    assert result.returncode == TooManyFailuresError.exit_code
    assert "2 samples" in result.stdout and "3 failed" in result.stdout
    assert "errors.jsonl" in result.stderr
    assert len((tmp_path / "out" / "errors.jsonl").read_text().splitlines()) == 3
    ok = cli("convert", src, tmp_path / "out", "--size", "8", "--overwrite", "--max-errors", "3")
    assert ok.returncode == 0, ok.stderr
    assert cli("convert", src, tmp_path / "o2", "--size", "8", "--max-errors", "60%").returncode == 0


def test_info_and_preview(tree: Path, tmp_path: Path) -> None:
    shardkit.convert(tree, tmp_path / "out", size=20, workers=0)
    text = cli("info", tmp_path / "out")
    assert text.returncode == 0
    assert "samples     8 of 8 inputs (0 failed)" in text.stdout
    assert "ant" in text.stdout and "bee" in text.stdout
    facts = json.loads(cli("info", tmp_path / "out", "--json").stdout)
    assert facts["samples"] == 8 and facts["shards"] == 1
    assert [(c["name"], c["count"]) for c in facts["classes"]] == [("ant", 4), ("bee", 4)]
    assert facts["bytes_per_sample"] == facts["bytes"] / 8
    assert facts["schema"]["image"]["shape"] == [20, 20, 3]
    grid = tmp_path / "grid.png"
    shown = cli("preview", tmp_path / "out", "-o", grid, "--n", "6")
    assert shown.returncode == 0 and "6 samples" in shown.stdout
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size == (3 * 128, 2 * (128 + 14))
    # The name's format, where it names one (PNG bytes were written under grid.jpg); else PNG.
    for name, kind in (("grid.jpg", "JPEG"), ("grid.webp", "WEBP"), ("grid.out", "PNG")):
        assert cli("preview", tmp_path / "out", "-o", tmp_path / name, "--n", "4").returncode == 0
        with Image.open(tmp_path / name) as im:
            assert im.format == kind and im.size == (2 * 128, 2 * (128 + 14))


def test_console_script_and_version() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "shardkit"), "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"shardkit {shardkit.__version__}"


def test_a_closed_pipe_ends_info_quietly(tree: Path, tmp_path: Path) -> None:
    # As `shardkit info OUT | head` does once it has its lines: the reader is gone before
    # shardkit writes, so the first write fails with EPIPE.
    shardkit.convert(tree, tmp_path / "out", size=20, workers=0)
    process = subprocess.Popen([*SHARDKIT, "info", str(tmp_path / "out")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 1
    assert stderr == ""


def test_preview_of_a_table_is_an_option_error_not_a_damaged_dataset(tmp_path: Path) -> None:
    # A valid table (it verifies) got exit 6, "not a shardkit dataset / corrupt shard", and
    # Python advice ("use read_table or batches").
    (tmp_path / "t.csv").write_text("x,y\n1,a\n2,b\n")
    assert cli("convert", tmp_path / "t.csv", tmp_path / "out", "--label-col", "y").returncode == 0
    assert cli("verify", tmp_path / "out").returncode == 0
    refused = cli("preview", tmp_path / "out", "-o", tmp_path / "p.png")
    assert refused.returncode == ConfigError.exit_code and "holds a table" in refused.stderr
    assert not (tmp_path / "p.png").exists()
