"""Tabular CSVs: a conversion killed with SIGKILL resumes to byte-identical output; shards
bigger than a row group are cut into fixed row groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from corpus import hashes

from shardkit.conversion import commit

ROWS = 400_000
ARGS = ["--label-col", "y", "--samples-per-shard", "100000", "--no-progress"]


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bigcsv") / "big.csv"
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.integers(-1000, 1000, (ROWS, 4)) / 8, columns=list("abcd"))
    frame["y"] = rng.integers(0, 3, ROWS)
    frame.to_csv(path, index=False)
    return path


def convert(*args: object, wait: bool = True) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-m", "shardkit", "convert", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    if wait:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    return process



def test_killed_tabular_conversion_resumes_byte_identical(big_csv: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    convert(big_csv, clean, *ARGS)
    groups = pq.ParquetFile(clean / "shard-00000.parquet").metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [65536, 34464]
    frame = pd.read_csv(big_csv)
    table = pq.read_table(clean / "shard-00003.parquet")
    np.testing.assert_array_equal(table.column("a").to_numpy(),
                                  frame["a"].to_numpy(np.float32)[300_000:])
    assert table.column("row").to_pylist()[0] == 300_002  # header is row 1

    out = tmp_path / "out"
    process = convert(big_csv, out, *ARGS, wait=False)
    deadline = time.monotonic() + 120
    while len(list((out / commit.JOURNAL_NAME).glob("*.json"))) < 1:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (out / "index.json").exists()
    refused = convert(big_csv, out, *ARGS, wait=False)
    refused.communicate(timeout=120)
    assert refused.returncode == 4  # an interrupted run needs --resume or --overwrite
    resumed = convert(big_csv, out, *ARGS, "--resume", wait=False)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "kept from the interrupted run" in stdout
    assert hashes(out) == hashes(clean)


def test_row_numbers_stay_exact_across_blocks(tmp_path: Path) -> None:
    """Malformed rows, blank lines and quoted newlines spread over several 1 MB blocks: the
    `row` column and errors.jsonl still give each record's number."""
    lines, good, bad = ["n,text"], [], []
    for i in range(300_000):
        row = len(lines) + 1
        if i % 9_973 == 5:
            lines.append(f"{i},x,extra")
            bad.append((row, "wrong_field_count"))
        elif i % 12_007 == 7:
            lines.append("")
            bad.append((row, "empty_row"))
        elif i % 5_003 == 3:
            lines.append(f'{i},"two\nlines, and a comma"')
            good.append((row, i))
        else:
            lines.append(f"{i},t{i % 7}")
            good.append((row, i))
    path = tmp_path / "spread.csv"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 2 << 20  # several 1 MB blocks
    out = tmp_path / "out"
    convert(path, out, "--max-errors", "100", "--no-progress")
    table = pq.read_table(out / "shard-00000.parquet")
    assert table.column("row").to_pylist() == [r for r, _ in good]
    assert table.column("n").to_numpy().tolist() == [float(i) for _, i in good]
    reported = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["reason"]) for e in reported] == sorted(bad)
