"""Damage fuzzing: every file of small tar (raw, jpeg), Parquet (raw, jpeg, zstd) and tabular
datasets, index.json and errors.jsonl included, gets seeded random bit flips, truncations,
zero runs and appended bytes (index.json also edits of its parsed JSON: keys deleted or
renamed, values retyped or changed). After each damage every read ends in a ShardkitError or
in the undamaged dataset's values, never another exception, a crash or a hang:

* ``shardkit.open``: ``read_shard`` / ``read_table`` of every shard, ``batches`` (with metadata
  fields, and with ``verify=True``); ``ShardLoader`` with ``num_workers=0``, with and without
  ``verify``; ``shardkit verify`` (full and ``--quick``) and ``shardkit info``.
* What must match the undamaged dataset: the order (index), shapes and dtypes of every batch,
  always; labels and metadata when only index.json was damaged (the shards are intact);
  labels and pixels too with ``verify=True`` (the sha256 of every shard is checked). With
  damaged shards and no ``verify``, labels need only name a class: a flipped digit in a
  ``.cls`` member is a valid label that nothing but the sha256 can tell from the original.
* ``shardkit verify`` (full) reports every changed shard file.

Cases run in subprocesses, one per dataset kind, each running its cases in turn and printing
one JSON line per case, so that a crash or hang (the subprocess dies, or outlives its timeout)
is itself a finding, pinned to the case it was running; the rest of the cases are then rerun.
The cases, the reads and the subprocesses are in tests/fuzzing.py; ``python tests/fuzzing.py
campaign SCALE`` runs a longer campaign, over more kinds of dataset.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fuzzing import KINDS, build_datasets, damaged, plan_cases, run_kind

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_datasets(tmp_path_factory.mktemp("fuzz"), KINDS)


def test_damage_ends_in_a_shardkit_error_or_the_right_values(datasets: dict[str, Path],
                                                             tmp_path: Path) -> None:
    plans = {kind: plan_cases(path, kind) for kind, path in datasets.items()}
    assert all(len(p) >= 40 for p in plans.values())
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda kind: run_kind(kind, datasets[kind], plans[kind], tmp_path), plans)
        findings = [line for lines in results for line in lines]
    assert not findings, f"{len(findings)} findings:\n" + "\n".join(findings)


def test_the_damage_is_what_it_says() -> None:
    data = bytes(range(256)) * 8
    flipped = damaged(data, "flip", "s")
    assert len(flipped) == len(data) and 1 <= sum(bin(a ^ b).count("1") for a, b in
                                                  zip(data, flipped, strict=True)) <= 3
    assert data.startswith(damaged(data, "truncate", "s")) and len(damaged(data, "truncate", "s")) < len(data)
    zeroed = damaged(data, "zeros", "s")
    assert len(zeroed) == len(data) and zeroed != data and zeroed.count(0) > data.count(0)
    appended = damaged(data, "append", "s")
    assert appended.startswith(data) and len(appended) > len(data)
    index = {"a": {"b": [1, 2]}, "c": "x"}
    edits = {damaged(json.dumps(index).encode(), "edit", str(n)) for n in range(20)}
    assert len(edits) > 5 and json.dumps(index, sort_keys=True).encode() not in edits


