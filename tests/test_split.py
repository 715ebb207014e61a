"""Train/validation splits at conversion: OUT/<part>/ datasets, each input in exactly one,
stratified and seeded, or Keras' own cut (checked against Keras' code); per-part resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import shardkit
from shardkit.cli import main
from shardkit.conversion.split import shares
from shardkit.tools.verify import verify_dataset

SIZES = {"ant": 10, "bee": 7, "cat": 3}
# Names whose order differs between a depth-first walk and Keras' os.walk sorted by folder.
NESTED = ["b.png", "a.png", "sub/c.png", "sub-2/a.png", "sub/z/x.png", "zz.png", "sub/a.png",
          "a-b.png", "sub-2/0.png", "sub0/q.png", "B.png"]


def png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 5, 3), value % 256, np.uint8)).save(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("split") / "src"
    for k, (name, count) in enumerate(SIZES.items()):
        for i in range(count):
            png(root / name / f"im{i:02d}.png", 20 * k + i)
    return root


def sources(out: Path) -> list[str]:
    data = shardkit.open(out)
    return [m["source"] for k in range(len(data.manifest.shards)) for m in data.metadata(k)]


def convert(src: Path, out: Path, **options: object) -> shardkit.ConvertSummary:
    return shardkit.convert(src, out, size=4, samples_per_shard=4, workers=0, progress=False,
                            **options)  # type: ignore[arg-type]


def test_stratified_split_is_a_partition_per_class_and_deterministic(tree: Path, tmp_path: Path) -> None:
    assert main(["convert", str(tree), str(tmp_path / "a"), "--split", "train=0.8,val=0.2",
                 "--seed", "0", "--size", "4", "--samples-per-shard", "4", "--workers", "0",
                 "--no-progress"]) == 0
    train, val = sources(tmp_path / "a" / "train"), sources(tmp_path / "a" / "val")
    every = sorted(f"{c}/im{i:02d}.png" for c, n in SIZES.items() for i in range(n))
    assert sorted(train + val) == every and not set(train) & set(val)
    for name, count in SIZES.items():
        got = [sum(s.startswith(name + "/") for s in part) for part in (train, val)]
        assert got == shares(count, [0.8, 0.2])
    manifests = [shardkit.open(tmp_path / "a" / p).manifest for p in ("train", "val")]
    assert manifests[0].classes == manifests[1].classes == list(SIZES)
    assert manifests[0].config["subset"] == "train" and manifests[1].config["split"]["parts"] == \
        [["train", 0.8], ["val", 0.2]]
    assert manifests[0].fingerprint != manifests[1].fingerprint
    assert train == sorted(train) and val == sorted(val)  # each part keeps the listing order
    for part in ("train", "val"):
        assert verify_dataset(tmp_path / "a" / part) == []
    again = convert(tree, tmp_path / "b", split="train=0.8,val=0.2")
    for part in ("train", "val"):
        assert (tmp_path / "a" / part / "index.json").read_bytes() == \
            (tmp_path / "b" / part / "index.json").read_bytes()
    assert again.samples == sum(SIZES.values()) and set(again.splits) == {"train", "val"}  # type: ignore[attr-defined]
    convert(tree, tmp_path / "c", split={"train": 0.8, "val": 0.2}, seed=1)
    assert sources(tmp_path / "c" / "val") != val


def test_three_parts_and_a_shuffled_split(tree: Path, tmp_path: Path) -> None:
    convert(tree, tmp_path / "s", split="train=0.6,val=0.2,test=0.2", shuffle=True, seed=3)
    parts = {p: sources(tmp_path / "s" / p) for p in ("train", "val", "test")}
    assert sorted(s for part in parts.values() for s in part) == \
        sorted(f"{c}/im{i:02d}.png" for c, n in SIZES.items() for i in range(n))
    assert [len(v) for v in parts.values()] == [sum(shares(n, [0.6, 0.2, 0.2])[k] for n in SIZES.values())
                                               for k in range(3)]
    assert parts["train"] != sorted(parts["train"])  # --shuffle shuffles within each part


def test_validation_split_is_keras_own_cut(tmp_path: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")  # the test's choice of Keras backend
    image = pytest.importorskip("keras.src.legacy.preprocessing.image")
    root = tmp_path / "src"
    for k, (name, count) in enumerate({"x": 11, "y": 6, "z": 5}.items()):
        for i, file in enumerate(NESTED[:count]):
            png(root / name / file, 10 * k + i)
    for validation in (0.2, 0.45):
        out = tmp_path / f"out{validation}"
        assert main(["convert", str(root), str(out), "--validation-split", str(validation),
                     "--size", "4", "--workers", "0", "--no-progress"]) == 0
        indices = {c: i for i, c in enumerate(sorted(os.listdir(root)))}
        for subset, cut in (("val", (0, validation)), ("train", (validation, 1))):
            keras_files: list[str] = []
            for name in sorted(indices):
                _, files = image._list_valid_filenames_in_directory(
                    str(root / name), image.DirectoryIterator.white_list_formats, cut, indices, False)
                keras_files += [f.replace(os.sep, "/") for f in files]
            assert sorted(sources(out / subset)) == sorted(keras_files), (subset, validation)
            assert {s.split("/")[0] for s in keras_files} == set(indices)


def test_validation_split_cuts_what_keras_lists_when_the_folders_hold_more(tmp_path: Path) -> None:
    # .webp and .gif (shardkit reads them, Keras does not), hidden images (Keras lists them,
    # shardkit skips them) and a linked folder (shardkit follows it, Keras does not): the val
    # part is still exactly Keras' validation subset, less the files shardkit does not take;
    # everything else shardkit lists is in train.
    os.environ.setdefault("KERAS_BACKEND", "torch")  # the test's choice of Keras backend
    image = pytest.importorskip("keras.src.legacy.preprocessing.image")
    root = tmp_path / "src"
    for k, (name, count) in enumerate({"ant": 13, "bee": 7, "cow": 5}.items()):
        for i in range(count):
            png(root / name / f"img_{i:04d}.png", 10 * k + i)
        Image.new("RGB", (6, 5), (k, 0, 0)).save(root / name / "aa_extra.webp")
        Image.new("RGB", (6, 5), (k, 9, 0)).save(root / name / "ab_extra.gif")
        png(root / name / f"._img_{k:04d}.png", 200 + k)
    png(tmp_path / "more" / "m.png", 99)
    (root / "bee" / "linked").symlink_to(tmp_path / "more")
    indices = {c: i for i, c in enumerate(sorted(os.listdir(root)))}
    for validation in (0.2, 0.3):
        out = tmp_path / f"out{validation}"
        convert(root, out, validation_split=validation)
        keras: dict[str, list[str]] = {}
        for subset, cut in (("val", (0, validation)), ("train", (validation, 1))):
            keras[subset] = []
            for name in sorted(indices):
                _, files = image._list_valid_filenames_in_directory(
                    str(root / name), image.DirectoryIterator.white_list_formats, cut, indices, False)
                keras[subset] += [f.replace(os.sep, "/") for f in files]
        val, train = sources(out / "val"), sources(out / "train")
        assert sorted(val) == sorted(f for f in keras["val"] if "/._" not in f), validation
        assert not set(val) & set(train) and len(val) + len(train) == 3 * 2 + 13 + 7 + 5 + 1
        assert {"ant/aa_extra.webp", "cow/ab_extra.gif", "bee/linked/m.png"} <= set(train)


def test_validation_split_of_an_image_csv_keeps_the_rows_flow_from_dataframe_keeps(
        tmp_path: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")  # the test's choice of Keras backend
    image = pytest.importorskip("keras.src.legacy.preprocessing.image")
    pandas = pytest.importorskip("pandas")
    lines = ["file,kind"]
    for i in range(14):
        name = f"img/{i}.webp" if i in (1, 4) else f"img/{i}.gif" if i == 7 else f"img/{i}.png"
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.new("RGB", (6, 5), (i, 0, 0)).save(tmp_path / name)
        lines.append(f"{name},{'dog' if i % 3 else 'cat'}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    convert(tmp_path / "t.csv", tmp_path / "k", validation_split=0.3, image_col="file",
            label_col="kind")
    frame = pandas.read_csv(tmp_path / "t.csv")
    keras = image.ImageDataGenerator(validation_split=0.3).flow_from_dataframe(
        frame, directory=str(tmp_path), x_col="file", y_col="kind", subset="validation",
        target_size=(4, 4))
    assert sources(tmp_path / "k" / "val") == keras.filenames
    assert sources(tmp_path / "k" / "train") == [
        line.split(",")[0] for line in lines[1:] if line.split(",")[0] not in keras.filenames]


def test_overwrite_replaces_an_earlier_conversion_with_a_split_and_splits_with_others(
        tree: Path, tmp_path: Path) -> None:
    # --overwrite refused a plain dataset (or an earlier split's part folders) in a split's
    # OUT, although shardkit wrote all of it; it still refuses anyone else's file.
    out = tmp_path / "out"
    convert(tree, out)
    with pytest.raises(shardkit.OutputExistsError, match="a split conversion writes only"):
        convert(tree, out, validation_split=0.2)
    convert(tree, out, validation_split=0.2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    convert(tree, out, split="a=0.5,b=0.5", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    assert sum(shardkit.open(out / p).manifest.samples for p in "ab") == sum(SIZES.values())
    (out / "notes.txt").write_text("mine")
    with pytest.raises(shardkit.OutputExistsError, match=r"notes\.txt"):
        convert(tree, out, validation_split=0.2, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "a" / "index.json").exists()
    (out / "notes.txt").unlink()
    # A split that cannot go ahead (no inputs) removes nothing; a plain conversion is told
    # it finds a split, and replaces it with --overwrite.
    (tmp_path / "empty").mkdir()
    with pytest.raises(shardkit.InputError):
        convert(tmp_path / "empty", out, validation_split=0.2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    with pytest.raises(shardkit.OutputExistsError, match=r"holds a split conversion \(a/, b/\)"):
        convert(tree, out)
    convert(tree, out, overwrite=True)
    assert (out / "index.json").exists() and not (out / "a").exists()


def test_a_split_holds_its_out_for_the_whole_run(tree: Path, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "out"
    convert(tree, out)
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # a conversion running in OUT
        with pytest.raises(shardkit.OutputExistsError, match="another conversion is writing"):
            convert(tree, out, validation_split=0.2, overwrite=True)
    finally:
        os.close(held)
    assert (out / "index.json").exists()  # its files were not removed under it


def test_validation_split_of_a_flat_folder(tmp_path: Path) -> None:
    # No class folders, nothing Keras lists by class: the inputs stand for Keras' listing
    # (it raised an IndexError).
    for i in range(10):
        png(tmp_path / "flat" / f"{i}.png", i)
    convert(tmp_path / "flat", tmp_path / "out", validation_split=0.3)
    assert sources(tmp_path / "out" / "val") == ["0.png", "1.png", "2.png"]


def test_failures_are_reported_by_their_part_and_listing_failures_by_the_first(
        tree: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    os.system(f"cp -r {tree} {src}")
    (src / "bee" / "broken.png").write_bytes(b"")
    png(src / "loose.png", 1)  # beside the class folders: no label
    summary = convert(src, tmp_path / "o", split="train=0.5,val=0.5", max_errors=2)
    reports = {p: [json.loads(line) for line in (tmp_path / "o" / p / "errors.jsonl").open()]
               for p in ("train", "val")}
    reasons = sorted(r["reason"] for part in reports.values() for r in part)
    assert reasons == ["empty_file", "outside_class_folder"]
    assert [r["reason"] for r in reports["train"] if r["stage"] == "plan"] == ["outside_class_folder"]
    assert summary.inputs == sum(SIZES.values()) + 2 and summary.failed == 2
    for part in ("train", "val"):
        manifest = shardkit.open(tmp_path / "o" / part).manifest
        assert manifest.inputs == manifest.samples + manifest.failed
        assert verify_dataset(tmp_path / "o" / part) == []
    with pytest.raises(shardkit.TooManyFailuresError):  # the budget is the whole split's
        convert(src, tmp_path / "p", split="train=0.5,val=0.5", max_errors=1)


def test_rerun_is_up_to_date_and_resume_redoes_only_the_interrupted_part(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    convert(tree, out, split="train=0.8,val=0.2")
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    rerun = convert(tree, out, split="train=0.8,val=0.2")
    assert rerun.up_to_date and "up to date" in rerun.line()
    with pytest.raises(shardkit.OutputExistsError, match="fingerprint"):
        convert(tree, out, split="train=0.7,val=0.3")  # the split is in the fingerprint
    (out / "val" / "index.json").unlink()  # val as an interrupted run leaves it
    with pytest.raises(shardkit.OutputExistsError, match="resume"):
        convert(tree, out, split="train=0.8,val=0.2")
    resumed = convert(tree, out, split="train=0.8,val=0.2", resume=True)
    assert resumed.splits["train"].up_to_date and not resumed.splits["val"].up_to_date  # type: ignore[attr-defined]
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == files


def test_split_output_is_byte_identical_for_any_worker_count(tree: Path, tmp_path: Path) -> None:
    for workers in (0, 2):
        shardkit.convert(tree, tmp_path / str(workers), size=4, samples_per_shard=4, workers=workers,
                         progress=False, split="train=0.8,val=0.2", format="parquet")
    one = {p.relative_to(tmp_path / "0"): p.read_bytes() for p in (tmp_path / "0").rglob("*") if p.is_file()}
    two = {p.relative_to(tmp_path / "2"): p.read_bytes() for p in (tmp_path / "2").rglob("*") if p.is_file()}
    assert one == two and len(one) == 9  # 4 + 1 shards, an index.json and errors.jsonl each


def test_image_csv_splits_stratified_or_as_flow_from_dataframe(tmp_path: Path) -> None:
    lines = ["file,kind"]
    for i in range(12):
        png(tmp_path / "img" / f"{i}.png", i)
        lines.append(f"img/{i}.png,{'dog' if i % 3 else 'cat'}")
    lines.insert(3, "img/missing.png,dog")  # row 3: no such file
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    options = {"image_col": "file", "label_col": "kind", "max_errors": 1}
    convert(tmp_path / "t.csv", tmp_path / "s", split="train=0.75,val=0.25", **options)
    val = sources(tmp_path / "s" / "val")
    assert sum(s in {"img/0.png", "img/3.png", "img/6.png", "img/9.png"} for s in val) == 1  # 4 cats
    convert(tmp_path / "t.csv", tmp_path / "k", validation_split=0.25, **options)
    existing = [line.split(",")[0] for line in lines[1:] if "missing" not in line]
    assert sources(tmp_path / "k" / "val") == existing[:int(0.25 * len(existing))]
    assert sources(tmp_path / "k" / "train") == existing[int(0.25 * len(existing)):]
    report = (tmp_path / "k" / "train" / "errors.jsonl").read_text()
    assert "missing_file" in report and (tmp_path / "k" / "val" / "errors.jsonl").read_text() == ""


def test_tabular_csv_splits_by_rows(tmp_path: Path) -> None:
    lines = ["x,y"] + [f"{i},{'a' if i % 4 else 'b'}" for i in range(40)]
    lines.insert(5, "7,")  # row 6 has no label: reported once, by train
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")

    def rows(out: Path) -> list[int]:
        return [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).column("row").to_pylist()]

    good = [n for n in range(2, 43) if n != 6]  # CSV row numbers (the header is row 1)
    convert(tmp_path / "t.csv", tmp_path / "s", label_col="y", split="train=0.75,val=0.25", max_errors=1)
    train, val = rows(tmp_path / "s" / "train"), rows(tmp_path / "s" / "val")
    assert sorted(train + val) == good and not set(train) & set(val)
    labels = {n: lines[n - 1].split(",")[1] for n in good}
    assert sum(labels[n] == "b" for n in val) == shares(10, [0.75, 0.25])[1]
    assert "missing_label" in (tmp_path / "s" / "train" / "errors.jsonl").read_text()
    convert(tmp_path / "t.csv", tmp_path / "k", label_col="y", validation_split=0.2, max_errors=1)
    split_at = math.floor(len(good) * (1 - 0.2))  # model.fit(validation_split=0.2)
    assert rows(tmp_path / "k" / "train") == good[:split_at]
    assert rows(tmp_path / "k" / "val") == good[split_at:]
    again = convert(tmp_path / "t.csv", tmp_path / "k", label_col="y", validation_split=0.2, max_errors=1)
    assert again.up_to_date


def test_bad_splits_are_refused(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(shardkit.ConfigError, match="add up to 1"):
        convert(tree, tmp_path / "a", split="train=0.8,val=0.3")
    with pytest.raises(shardkit.ConfigError, match="name=fraction"):
        convert(tree, tmp_path / "a", split="train:0.8")
    with pytest.raises(shardkit.ConfigError, match="not both"):
        convert(tree, tmp_path / "a", split="train=0.5,val=0.5", validation_split=0.2)
    with pytest.raises(shardkit.ConfigError, match="none of"):
        convert(tree, tmp_path / "a", validation_split=0.05)  # int(0.05 * n) is 0 in every class
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(shardkit.OutputExistsError, match=r"notes\.txt"):
        convert(tree, tmp_path / "b", split="train=0.5,val=0.5")


def test_a_splits_folder_is_not_a_dataset_and_says_which_parts_are(tree: Path, tmp_path: Path) -> None:
    convert(tree, tmp_path / "out", validation_split=0.2)
    with pytest.raises(shardkit.DatasetError, match=r"holds the parts of a split \(train/, val/\)"):
        shardkit.open(tmp_path / "out")
    assert main(["info", str(tmp_path / "out")]) == shardkit.DatasetError.exit_code
    assert len(shardkit.open(tmp_path / "out" / "val")) > 0
