"""A long input list spills to disk: same bytes out, and planning memory that does not grow
with the number of inputs (beyond the shuffle's permutation)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest
from corpus import add_bad_files, hashes, image_tree

import shardkit
from shardkit.config import ConvertConfig, ImageOptions
from shardkit.conversion.plan import make_plan
from shardkit.conversion.sources import records


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    image_tree(root, classes=("ant", "bee", "cow"), per_class=7)
    add_bad_files(root / "bee")
    return root


@pytest.mark.parametrize("options", [
    {"shuffle": False, "format": "tar"},
    {"shuffle": True, "seed": 3, "format": "tar"},
    {"shuffle": True, "seed": 3, "format": "parquet"},
])
def test_a_spilled_plan_writes_the_same_bytes(tree: Path, tmp_path: Path, options: dict[str, object],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    common = {"size": 16, "samples_per_shard": 5, "workers": 0, "max_errors": 3, **options}
    in_memory = shardkit.convert(tree, tmp_path / "memory", **common)
    monkeypatch.setattr(records, "CHUNK", 5)  # 4 batches of 5 on disk, the last 4 in memory
    config = ConvertConfig(image=ImageOptions(size=(16, 16)), samples_per_shard=5, shard_bytes=None)
    plan = make_plan(tree, config, spill_dir=tmp_path)
    spool = plan.records
    assert isinstance(spool, records.RecordSpool) and spool.spilled == 20 and len(spool) == 24
    listed = list(spool)
    assert [r.source for r in listed][:3] == ["ant/im000.jpg", "ant/im001.png", "ant/im002.jpg"]
    assert [spool[i] for i in range(-24, 24)] == listed + listed
    assert spool[3:22:4] == listed[3:22:4]
    plan.close()
    assert len(spool) == 0
    assert os.listdir(tmp_path) == ["memory"]  # the spill file has no name: nothing to clean up
    spilled = shardkit.convert(tree, tmp_path / "spilled", **common)
    assert (spilled.samples, spilled.failed) == (in_memory.samples, in_memory.failed) == (21, 3)
    assert hashes(tmp_path / "spilled") == hashes(tmp_path / "memory")


def test_an_image_csv_spills_too(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "train.csv"
    lines = [f"{k}/im{i:03d}.{'png' if i % 2 else 'jpg'},{j - 1},{i * 0.5}"
             for j, k in enumerate(("ant", "bee", "cow")) for i in range(7)]
    table.write_text("path,label,weight\n" + "\n".join(lines) + "\n")
    common = {"image_col": "path", "label_col": "label", "root": str(tree), "size": 16,
              "samples_per_shard": 6, "workers": 0, "max_errors": 7, "shuffle": True}
    shardkit.convert(table, tmp_path / "memory", **common)
    monkeypatch.setattr(records, "CHUNK", 3)
    summary = shardkit.convert(table, tmp_path / "spilled", **common)
    assert (summary.samples, summary.failed) == (14, 7)  # label -1 (the ants) is refused
    assert hashes(tmp_path / "spilled") == hashes(tmp_path / "memory")


def _many_files(root: Path, folders: int, per_folder: int) -> None:
    for f in range(folders):
        folder = root / "only" / f"d{f:04d}"
        folder.mkdir(parents=True)
        for i in range(per_folder):
            (folder / f"{i:05d}_a_fairly_long_file_name_like_real_datasets_have.jpg").touch()


def test_planning_memory_does_not_grow_with_the_inputs(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "CHUNK", 1000)
    config = ConvertConfig(image=ImageOptions(size=(16, 16)), samples_per_shard=64, shard_bytes=None,
                           shuffle=True)
    peaks = {}
    for count in (200, 4_000, 16_000):  # the first run pays for lazy imports: not measured
        root = tmp_path / str(count)
        _many_files(root, count // 200, 200)
        tracemalloc.start()
        plan = make_plan(root, config, spill_dir=tmp_path)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # tracemalloc sees Python objects only: the spilled records must not sit in Arrow's
        # own memory either, but on disk, read back through a memory map.
        assert pa.total_allocated_bytes() < 1 << 20
        assert isinstance(plan.records, records.Permuted) and len(plan.records) == count
        spool = plan.records.records
        assert isinstance(spool, records.RecordSpool)
        assert spool.spilled == (count - count % 1000 if count > 1000 else 0)
        assert len(list(spool)) == count and pa.total_allocated_bytes() < 1 << 20
        plan.close()
    growth = (peaks[16_000] - peaks[4_000]) / 12_000
    # Held in memory, the same records take about 400 bytes each; spilled, what grows is the
    # shuffle's permutation (8 bytes per input).
    assert growth < 40, f"{growth:.0f} bytes per input ({peaks})"
