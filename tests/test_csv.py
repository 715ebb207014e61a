"""CSV inputs: image CSVs through the image pipeline, tabular CSVs to typed Parquet, read
back as feature batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from corpus import loader, to_array

import shardkit
from shardkit.cli import main
from shardkit.config import ImageOptions
from shardkit.conversion.images import load_image, pillow_limits
from shardkit.tools.synth import photo_like
from shardkit.tools.verify import verify_dataset


def pixels(path: Path, size: int) -> np.ndarray:
    opts = ImageOptions(size=(size, size))
    with pillow_limits():
        image, _ = load_image(path, opts)
    return to_array(image)


def errors(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def image_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six rows: four good images (one by absolute path), a missing file, a bad image, a
    row with text in the numeric `weight` column, a quoted note spanning two lines."""
    root = tmp_path_factory.mktemp("imgcsv")
    rng = np.random.default_rng(3)
    (root / "img").mkdir()
    for i in range(4):
        photo_like(30 + 7 * i, 24 + 5 * i, rng).save(root / "img" / f"p{i}.{'png' if i % 2 else 'jpg'}")
    (root / "img" / "bad.jpg").write_text("not an image")
    absolute = (root / "img" / "p3.png").resolve()
    (root / "train.csv").write_text(
        "filename,species,weight,note\n"
        'img/p0.jpg,cat,1.5,"a, b"\n'           # row 2
        "img/p1.png,dog,2,plain\n"              # row 3
        "img/missing.jpg,cat,3,gone\n"          # row 4: missing file
        "img/bad.jpg,dog,4,junk\n"              # row 5: not an image
        'img/p2.jpg,emu,,"two\nlines"\n'        # row 6 (spans two lines): empty weight
        "img/p0.jpg,cat,heavy,x\n"              # row 7: text in a numeric column
        f"{absolute},dog,7.25,abs\n"            # row 8: absolute path
    )
    return root


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_image_csv_pixels_labels_metadata_and_bad_rows(image_csv: Path, tmp_path: Path,
                                                       fmt: str) -> None:
    out = tmp_path / "out"
    summary = shardkit.convert(image_csv / "train.csv", out, image_col="filename",
                               label_col="species", size=20, format=fmt, workers=0, max_errors=3)
    assert (summary.inputs, summary.samples, summary.failed) == (7, 4, 3)
    assert [(e["row"], e["reason"]) for e in errors(out)] == [
        (7, "not_a_number"), (4, "missing_file"), (5, "not_an_image")]
    dataset = shardkit.open(out)
    assert dataset.classes == ["cat", "dog", "emu"]
    shard = dataset.read_shard(0)
    assert shard.labels is not None and shard.labels.tolist() == [0, 1, 2, 1]
    for got, name in zip(shard.images, ["p0.jpg", "p1.png", "p2.jpg", "p3.png"], strict=True):
        np.testing.assert_array_equal(got, pixels(image_csv / "img" / name, 20))
    if fmt == "tar":
        meta = dataset.metadata(0)
        assert [(m["weight"], m["note"]) for m in meta] == [
            (1.5, "a, b"), (2.0, "plain"), (None, "two\nlines"), (7.25, "abs")]
        assert meta[3]["source"] == str((image_csv / "img" / "p3.png").resolve())
    else:
        table = pq.read_table(out / "shard-00000.parquet")
        assert str(table.schema.field("weight").type) == "double"
        assert table.column("weight").to_pylist() == [1.5, 2.0, None, 7.25]
        assert table.column("note").to_pylist() == ["a, b", "plain", "two\nlines", "abs"]
    assert verify_dataset(out) == []
    batches = list(dataset.batches(3, shuffle=False, fields=["weight", "note"]))
    assert [w for b in batches for w in b["weight"]] == [1.5, 2.0, None, 7.25]
    assert [n for b in batches for n in b["note"]] == ["a, b", "plain", "two\nlines", "abs"]
    with pytest.raises(shardkit.ConfigError, match="weight, note"):  # the error lists them
        dataset.batches(2, fields=["nope"])


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_image_csv_columns_come_with_batches_when_asked(image_csv: Path, tmp_path: Path,
                                                        fmt: str) -> None:
    out = tmp_path / "out"
    shardkit.convert(image_csv / "train.csv", out, image_col="filename", label_col="species",
                     size=20, format=fmt, codec="png", workers=0, max_errors=3)
    loader = shardkit.ShardLoader(out, 4, shuffle=True, seed=5, fields=["weight", "note", "source"])
    (batch,) = list(loader)
    by_index = dict(zip(batch["index"].tolist(), zip(batch["weight"], batch["note"], strict=True),
                        strict=True))
    assert by_index == {0: (1.5, "a, b"), 1: (2.0, "plain"), 2: (None, "two\nlines"), 3: (7.25, "abs")}
    assert batch["source"][batch["index"].tolist().index(1)] == "img/p1.png"


def test_image_csv_columns_and_exclude_choose_the_metadata(image_csv: Path, tmp_path: Path) -> None:
    # They were taken and ignored for an image CSV (and recorded in index.json as if used).
    common = {"image_col": "filename", "label_col": "species", "size": 20, "workers": 0,
              "max_errors": 3}
    out = tmp_path / "no-weight"
    summary = shardkit.convert(image_csv / "train.csv", out, exclude="weight", **common)
    # row 7's "heavy" is in the column left out: no longer a bad row
    assert (summary.inputs, summary.samples, summary.failed) == (7, 5, 2)
    assert [(e["row"], e["reason"]) for e in errors(out)] == [(4, "missing_file"), (5, "not_an_image")]
    meta = shardkit.open(out).metadata(0)
    assert [m["note"] for m in meta] == ["a, b", "plain", "two\nlines", "x", "abs"]
    assert not any("weight" in m for m in meta)
    shardkit.convert(image_csv / "train.csv", tmp_path / "weight", columns="weight", **common)
    assert {tuple(sorted(m)) for m in shardkit.open(tmp_path / "weight").metadata(0)} == {(
        "class", "key", "label", "orig_height", "orig_width", "source", "weight")}
    with pytest.raises(shardkit.ConfigError, match="no such column 'nope'"):
        shardkit.convert(image_csv / "train.csv", tmp_path / "x", exclude="nope", **common)
    # A column named like an output field is left out instead of renamed.
    clash = image_csv / "clash.csv"
    clash.write_text("filename,species,class\nimg/p0.jpg,cat,a\nimg/p1.png,dog,b\n")
    with pytest.raises(shardkit.InputError, match="class would collide"):
        shardkit.convert(clash, tmp_path / "y", **common)
    assert shardkit.convert(clash, tmp_path / "z", exclude="class", **common).samples == 2


def test_image_csv_integer_labels_and_same_bytes_for_any_workers(image_csv: Path,
                                                                 tmp_path: Path) -> None:
    csv = image_csv / "ints.csv"
    csv.write_text("path,y\nimg/p0.jpg,2\nimg/p1.png,0\nimg/p2.jpg,2\nimg/p3.png,5\n")
    hashes = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        shardkit.convert(csv, out, image_col="path", label_col="y", size=16, workers=workers,
                         samples_per_shard=3)
        hashes.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted(out.iterdir())})
    assert hashes[0] == hashes[1] and len(hashes[0]) == 4  # 2 shards, index, errors
    dataset = shardkit.open(tmp_path / "w1")
    assert dataset.classes == ["0", "1", "2", "3", "4", "5"]
    assert np.concatenate([dataset.read_shard(k).labels for k in (0, 1)]).tolist() == [2, 0, 2, 5]


TABLE = (
    "id,price,city,note,qty,label\n"
    '1,0.5,"Paris, FR",hello,3,cat\n'          # row 2: embedded comma
    '2,,Lyon,"line one\nline two",4,dog\n'     # row 3: empty number, embedded newline
    "3,2.25,Paris,,,cat\n"                     # row 4: empty string and empty int
    "4,1e3,Nice,x,5,emu,EXTRA\n"               # row 5: too many fields
    '5,-7.125,"Lyon",q,6,dog\n'                # row 6: quoted plain value
    "6,3.5,Nice,z,7,cat\n"                     # row 7
)


@pytest.fixture
def table_csv(tmp_path: Path) -> Path:
    path = tmp_path / "table.csv"
    path.write_text(TABLE)
    return path


def test_tabular_values_equal_pandas_and_loader_gives_exact_rows(table_csv: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "t"
    summary = shardkit.convert(table_csv, out, label_col="label", samples_per_shard=2,
                               max_errors=1)
    assert (summary.inputs, summary.samples, summary.failed, summary.shards) == (6, 5, 1, 3)
    assert [(e["row"], e["reason"]) for e in errors(out)] == [(5, "wrong_field_count")]
    frame = pd.read_csv(table_csv, on_bad_lines="skip")
    manifest = json.loads((out / "index.json").read_text())
    names = manifest["schema"]["features"]["names"]
    assert names == ["id", "price", "city", "note", "qty"]
    columns = {c["name"]: c for c in manifest["schema"]["columns"]}
    assert manifest["classes"] == ["cat", "dog"]  # "emu" was only on the malformed row
    loader = shardkit.ShardLoader(out, batch_size=4, shuffle=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    features = np.concatenate([b["features"].numpy() for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert features.dtype == np.float32 and features.shape == (5, 5)
    assert np.concatenate([b["index"].numpy() for b in batches]).tolist() == [0, 1, 2, 3, 4]
    for j, name in enumerate(names):
        if name in ("city", "note"):
            cats = columns[name]["categories"]
            got = [None if np.isnan(v) else cats[int(v)] for v in features[:, j]]
            want = [None if pd.isna(v) else v for v in frame[name]]
            assert got == want
        else:
            np.testing.assert_allclose(features[:, j], frame[name].to_numpy(np.float64),
                                       rtol=1e-6, equal_nan=True)
    assert [manifest["classes"][i] for i in labels] == frame["label"].tolist()
    assert columns["price"]["nulls"] == 1 and columns["qty"]["nulls"] == 1
    assert columns["price"]["min"] == -7.125 and columns["price"]["max"] == 3.5
    assert columns["price"]["mean"] == pytest.approx((0.5 + 2.25 - 7.125 + 3.5) / 4)
    rows = pq.read_table(out / "shard-00001.parquet").column("row").to_pylist()
    assert rows == [4, 6]
    assert verify_dataset(out) == []


def test_tabular_shuffled_loader_covers_every_row_once_with_workers(table_csv: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "t"
    shardkit.convert(table_csv, out, label_col="label", samples_per_shard=2, max_errors=1)
    seen = []
    for workers in (0, 2):
        batches = list(loader(out, 2, workers, shuffle=True, seed=4))
        seen.append(np.concatenate([b["index"].numpy() for b in batches]).tolist())
        first = batches[0]
        index = first["index"].numpy()
        whole = np.concatenate([b["features"].numpy() for b in
                                shardkit.ShardLoader(out, batch_size=8, shuffle=False)])
        np.testing.assert_array_equal(first["features"].numpy(), whole[index])
    assert seen[0] == seen[1] and sorted(seen[0]) == [0, 1, 2, 3, 4]


def test_tabular_bad_numbers_multi_labels_keep_ints_and_budget(tmp_path: Path) -> None:
    path = tmp_path / "reg.csv"
    path.write_text("a;b;t1;t2;skip\n1;2.5;0.1;1\n2;x;0.2;2;n\n3;4.5;;3;n\n4;5.5;0.4;4;n\n"
                    "5;6.5;0.5;5;n\n")
    with pytest.raises(shardkit.TooManyFailuresError):
        shardkit.convert(path, tmp_path / "strict", label_col="t1,t2", delimiter=";")
    out = tmp_path / "out"
    shardkit.convert(path, out, label_col="t1,t2", delimiter=";", keep_ints=True,
                     exclude="skip", max_errors="60%")
    assert [(e["row"], e["reason"]) for e in errors(out)] == [
        (2, "wrong_field_count"), (3, "not_a_number"), (4, "missing_label")]
    table = pq.read_table(out / "shard-00000.parquet")
    assert table.column_names == ["row", "a", "b", "t1", "t2"]
    assert str(table.schema.field("a").type) == "int64"
    batch = next(iter(shardkit.ShardLoader(out, batch_size=8, shuffle=False)))
    np.testing.assert_array_equal(batch["features"].numpy(), [[4, 5.5], [5, 6.5]])
    np.testing.assert_allclose(batch["label"].numpy(), [[0.4, 4], [0.5, 5]], rtol=1e-6)
    assert batch["label"].dtype.is_floating_point


def test_tabular_rerun_is_a_no_op_and_changed_csv_is_refused(table_csv: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t"
    argv = ["convert", str(table_csv), str(out), "--label-col", "label", "--max-errors", "1"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    table_csv.write_text(TABLE + "7,1,Nice,w,8,dog\n")
    assert main(argv) == 4
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "index.json").read_text())["samples"] == 6
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "features    float32 [5]: id, price, city, note, qty" in text
    assert "price" in text and "-7.125" in text


def test_header_detection_and_bad_options(tmp_path: Path) -> None:
    path = tmp_path / "nohead.csv"
    path.write_text("1,2.5\n3,4.5\n")
    shardkit.convert(path, tmp_path / "o")
    manifest = json.loads((tmp_path / "o" / "index.json").read_text())
    assert manifest["schema"]["features"]["names"] == ["c0", "c1"] and manifest["samples"] == 2
    with pytest.raises(shardkit.ConfigError, match="no such column 'nope'"):
        shardkit.convert(path, tmp_path / "p", label_col="nope")
    with pytest.raises(shardkit.ConfigError, match=r"need a \.csv SRC"):
        shardkit.convert(tmp_path, tmp_path / "q", image_col="x")


def test_a_table_column_named_row_is_refused_or_left_out(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text("row,a,y\n10,1,0\n20,2,1\n")
    for label in ("y", "row"):  # a shard's own `row` column holds the CSV row numbers
        with pytest.raises(shardkit.InputError, match=r"rows.csv: a column named 'row' would collide"):
            shardkit.convert(csv, tmp_path / f"o-{label}", label_col=label)
    shardkit.convert(csv, tmp_path / "kept", label_col="y", exclude="row")
    batch = next(iter(shardkit.open(tmp_path / "kept").batches(4, shuffle=False)))
    np.testing.assert_array_equal(batch["features"], [[1], [2]])
    np.testing.assert_array_equal(batch["label"], [0, 1])


def test_numpy_batches_of_a_table_equal_the_loader_and_resume(table_csv: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "t"
    shardkit.convert(table_csv, out, label_col="label", samples_per_shard=2, max_errors=1)
    dataset = shardkit.open(out)
    assert dataset.is_table and len(dataset) == 5
    numpy_batches = list(dataset.batches(2, shuffle=True, seed=1))
    loader = shardkit.ShardLoader(out, batch_size=2, shuffle=True, seed=1)
    torch_batches = list(loader)
    for a, b in zip(numpy_batches, torch_batches, strict=True):
        np.testing.assert_array_equal(a["features"], b["features"].numpy())
        np.testing.assert_array_equal(a["label"], b["label"].numpy())
    shard = dataset.read_table(1)
    assert shard.labels is not None and shard.labels.tolist() == [0, 1]  # rows 4, 6: cat, dog
    loader = shardkit.ShardLoader(out, batch_size=2, shuffle=True, seed=1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = shardkit.ShardLoader(out, batch_size=2, shuffle=True, seed=1)
    rest.load_state_dict(state)
    assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in torch_batches[1:]]


def test_encoding_forced_header_and_unlabelled_image_csv(image_csv: Path, tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes("ville|n\nZürich|1\nGenève|2\n".encode("latin-1"))
    shardkit.convert(latin, tmp_path / "l", delimiter="|", encoding="latin-1", header="yes")
    manifest = json.loads((tmp_path / "l" / "index.json").read_text())
    assert manifest["schema"]["columns"][0]["categories"] == ["Genève", "Zürich"]
    assert "label" not in manifest["schema"] and manifest["classes"] is None
    batch = next(iter(shardkit.open(tmp_path / "l").batches(4, shuffle=False)))
    np.testing.assert_array_equal(batch["features"], [[1, 1], [0, 2]])
    plain = image_csv / "plain.csv"
    plain.write_text("path\nimg/p1.png\nimg/p0.jpg\n")
    shardkit.convert(plain, tmp_path / "p", image_col="path", size=12, workers=0)
    dataset = shardkit.open(tmp_path / "p")
    assert dataset.classes is None and dataset.read_shard(0).labels is None
    np.testing.assert_array_equal(dataset.read_shard(0).images[1], pixels(image_csv / "img" / "p0.jpg", 12))
    labelled = image_csv / "labelled.csv"  # a label column not named as one collides, and says so
    labelled.write_text("path,label\nimg/p1.png,0\n")
    with pytest.raises(shardkit.InputError, match=r"labelled.csv: column\(s\) label .*--label-col label"):
        shardkit.convert(labelled, tmp_path / "q", image_col="path", size=12, workers=0)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_image_csv_several_label_columns_are_float_targets(image_csv: Path, tmp_path: Path,
                                                           fmt: str) -> None:
    csv = image_csv / f"targets-{fmt}.csv"
    csv.write_text("file,dx,dy,tag\nimg/p0.jpg,0.5,-1,a\nimg/p1.png,1.25,,b\n"
                   "img/p2.jpg,2,3.5,c\nimg/p3.png,-4,8,d\n")
    out = tmp_path / "out"
    summary = shardkit.convert(csv, out, image_col="file", label_col="dx,dy", size=12,
                               format=fmt, workers=0, samples_per_shard=2, max_errors=1)
    assert (summary.samples, summary.failed) == (3, 1)
    assert [(e["row"], e["reason"]) for e in errors(out)] == [(3, "missing_label")]
    assert shardkit.open(out).classes is None
    batch = next(iter(shardkit.ShardLoader(out, batch_size=4, shuffle=False)))
    assert batch["label"].dtype.is_floating_point and tuple(batch["label"].shape) == (3, 2)
    np.testing.assert_array_equal(batch["label"].numpy(), [[0.5, -1], [2, 3.5], [-4, 8]])
    np.testing.assert_array_equal(batch["image"][1].numpy(), pixels(image_csv / "img" / "p2.jpg", 12))
    assert verify_dataset(out) == []


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_image_csv_one_column_of_fractions_is_a_float_target(image_csv: Path, tmp_path: Path,
                                                             fmt: str) -> None:
    # Keras' flow_from_dataframe(class_mode="raw") with one column (a regression): it was
    # refused as "holds fractions", also for 1.0-style integers as pandas writes them.
    csv = image_csv / f"age-{fmt}.csv"
    csv.write_text("file,age\nimg/p0.jpg,23.5\nimg/p1.png,40.0\nimg/p2.jpg,\nimg/p3.png,7\n")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="'age' holds fractions: its values are float32 targets"):
        summary = shardkit.convert(csv, out, image_col="file", label_col="age", size=12,
                                   format=fmt, workers=0, max_errors=1)
    assert (summary.samples, summary.failed) == (3, 1)
    assert [(e["row"], e["reason"]) for e in errors(out)] == [(4, "missing_label")]
    dataset = shardkit.open(out)
    assert dataset.classes is None and dataset.manifest.targets == 1
    batch = next(iter(shardkit.ShardLoader(out, batch_size=4, shuffle=False)))
    assert batch["label"].dtype == torch.float32 and tuple(batch["label"].shape) == (3, 1)
    np.testing.assert_array_equal(batch["label"].numpy(), [[23.5], [40.0], [7.0]])
    numpy = next(iter(dataset.batches(4, shuffle=False)))
    np.testing.assert_array_equal(numpy["label"], [[23.5], [40.0], [7.0]])
    assert verify_dataset(out) == []
    x, y = next(iter(shardkit.keras.dataset(out, 4, shuffle=False)))
    assert tuple(y.shape) == (3, 1) and tuple(x.shape) == (3, 12, 12, 3)


def test_verify_finds_a_damaged_table_shard(table_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    shardkit.convert(table_csv, out, label_col="label", samples_per_shard=2, max_errors=1)
    assert verify_dataset(out) == []
    shard = out / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_dataset(out) == ["shard-00001.parquet: sha256 differs from index.json"]
    shard.write_bytes(bytes(data[:-10]))
    problems = verify_dataset(out, quick=True)
    assert len(problems) == 1 and problems[0].startswith("shard-00001.parquet: ")


def test_a_tabular_csv_refuses_an_executor_instead_of_ignoring_it(table_csv: Path,
                                                                  tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool, pytest.raises(shardkit.ConfigError, match="tabular CSV"):
        shardkit.convert(table_csv, tmp_path / "t", label_col="label", executor=pool)
    assert not (tmp_path / "t").exists()


def test_padded_numbers_and_infinities_read_as_pandas_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "ws.csv"
    path.write_text("x,y\n1,a\n2, b\n 3,c\n4 ,d\n  5.5  ,e\ninf,f\n-Infinity,g\nNaN,i\n")
    out = tmp_path / "t"
    summary = shardkit.convert(path, out)
    assert (summary.samples, summary.failed) == (8, 0)
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["schema"]["features"]["names"] == ["x", "y"]
    stats = manifest["schema"]["columns"][0]  # over the finite values: index.json is strict JSON
    assert (stats["min"], stats["max"], stats["infinite"], stats["nulls"]) == (1.0, 5.5, 2, 1)
    (batch,) = list(shardkit.open(out).batches(16, shuffle=False))
    expected = pd.read_csv(path)["x"].to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(batch["features"][:, 0], expected)
    assert np.isinf(expected).sum() == 2 and np.isnan(expected).sum() == 1


def test_a_label_of_spaces_is_a_missing_label(image_csv: Path, tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("x,y\n1,2\n2,   \n3,4\n")
    summary = shardkit.convert(table, tmp_path / "t", label_col="y", max_errors=1)
    assert (summary.samples, summary.failed) == (2, 1)
    assert [(e["row"], e["reason"]) for e in errors(tmp_path / "t")] == [(3, "missing_label")]
    images = tmp_path / "i.csv"
    images.write_text(f"path,label\n{image_csv / 'img' / 'p0.jpg'},1\n{image_csv / 'img' / 'p1.png'},  \n")
    summary = shardkit.convert(images, tmp_path / "i", image_col="path", label_col="label", size=8,
                               workers=0, max_errors=1)
    assert (summary.samples, summary.failed) == (1, 1)
    assert [(e["row"], e["reason"]) for e in errors(tmp_path / "i")] == [(3, "missing_label")]


def test_a_table_of_only_a_header_is_refused_as_holding_no_inputs(tmp_path: Path) -> None:
    # It converted to a dataset of 0 rows with exit 0, where an image CSV or folder with
    # nothing in it is an InputError (exit 3).
    (tmp_path / "t.csv").write_text("x,y\n")
    with pytest.raises(shardkit.InputError, match="no rows"):
        shardkit.convert(tmp_path / "t.csv", tmp_path / "out", label_col="y")
    assert not (tmp_path / "out" / "index.json").exists()
    (tmp_path / "bad.csv").write_text("x,y\nabc,\n")  # one row, bad: reported, not refused
    summary = shardkit.convert(tmp_path / "bad.csv", tmp_path / "b", label_col="y", max_errors="100%")
    assert (summary.inputs, summary.failed) == (1, 1)
