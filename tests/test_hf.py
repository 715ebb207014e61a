"""Hugging Face datasets in (a source, built with `datasets` itself) and out (our Parquet shards
loaded by `datasets.load_dataset("parquet")` with their features, no shardkit code)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import image_tree
from PIL import Image

import shardkit
import shardkit.cli

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # datasets' own setting: nothing to fetch
datasets = pytest.importorskip("datasets")
CLASSES = ("cat", "dog", "emu")
PER_CLASS = 4


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf") / "src"
    image_tree(root, classes=CLASSES, per_class=PER_CLASS, min_side=20, max_side=50)
    return root


def rows_of(tree: Path) -> tuple[list[Path], list[int]]:
    """The tree's images in shardkit's listing order (sorted classes, sorted files)."""
    files = [p for c in CLASSES for p in sorted((tree / c).iterdir())]
    return files, [CLASSES.index(p.parent.name) for p in files]


def build(tree: Path, *, embed: bool, image: str = "image", label: str = "label",
          class_label: bool = True) -> Any:
    files, labels = rows_of(tree)
    values: list[Any] = [{"bytes": p.read_bytes(), "path": p.name} for p in files] if embed \
        else [str(p) for p in files]
    ds = datasets.Dataset.from_dict({image: values, label: labels if class_label else
                                     [CLASSES[v] for v in labels]})
    ds = ds.cast_column(image, datasets.Image())
    if class_label:
        ds = ds.cast_column(label, datasets.ClassLabel(names=list(CLASSES)))
    return ds


def pixels(out: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Every image of the dataset `out`, in order, and its labels (None when unlabelled)."""
    data = shardkit.open(out)
    shards = [data.read_shard(k) for k in range(len(data.manifest.shards))]
    labels = [s.labels for s in shards if s.labels is not None]
    return np.concatenate([s.images for s in shards]), np.concatenate(labels) if labels else None


def convert(src: Path, out: Path, **options: Any) -> Path:
    return shardkit.convert(src, out, size=12, samples_per_shard=5, workers=0, progress=False,
                            **options).out


@pytest.fixture(scope="module")
def folder_shards(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tree, tmp_path_factory.mktemp("folder") / "out")


def test_parquet_folder_and_save_to_disk_convert_to_the_folders_pixels(
        tree: Path, folder_shards: Path, tmp_path: Path) -> None:
    expected_images, expected_labels = pixels(folder_shards)
    hub = tmp_path / "hub"
    build(tree, embed=True).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    build(tree, embed=False).to_parquet(str(tmp_path / "paths.parquet"))  # {bytes: null, path}
    build(tree, embed=False).save_to_disk(str(tmp_path / "saved"))
    for src in (hub, tmp_path / "paths.parquet", tmp_path / "saved"):
        out = convert(src, tmp_path / f"out-{src.name}")
        images, labels = pixels(out)
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)
        assert shardkit.open(out).classes == list(CLASSES)  # the ClassLabel names
    assert shardkit.open(tmp_path / "out-hub").metadata(0)[1]["source"] == \
        "data/train-00000-of-00001.parquet:1"


def test_named_columns_string_labels_shuffle_and_bad_rows(tree: Path, tmp_path: Path) -> None:
    ds = build(tree, embed=True, image="img", label="y", class_label=False)
    broken = ds.to_dict()
    broken["img"][2] = {"bytes": b"not an image", "path": None}
    broken["y"][5] = None
    bad = datasets.Dataset.from_dict(broken).cast_column("img", datasets.Image())
    bad.to_parquet(str(tmp_path / "src" / "part.parquet"))
    summary = shardkit.convert(tmp_path / "src", tmp_path / "out", image_col="img", label_col="y",
                               size=12, workers=0, max_errors=2, shuffle=True, samples_per_shard=3,
                               progress=False)
    assert summary.samples == len(CLASSES) * PER_CLASS - 2 and summary.reasons == \
        {"missing_label": 1, "not_an_image": 1}
    data = shardkit.open(tmp_path / "out")
    assert data.classes == sorted(CLASSES)  # string labels: their sorted values
    stored = [m for k in range(len(data.manifest.shards)) for m in data.metadata(k)]
    _, labels = rows_of(tree)
    for m in stored:
        assert m["class"] == CLASSES[labels[int(m["source"].rsplit(":", 1)[1])]]
    with pytest.raises(shardkit.InputError, match="no image column 'image'"):
        shardkit.convert(tmp_path / "src", tmp_path / "o2", workers=0)
    with pytest.raises(shardkit.ConfigError, match="do not apply"):
        shardkit.convert(tmp_path / "src", tmp_path / "o3", image_col="img", root="x")


def test_a_dataset_dict_names_its_splits(tree: Path, tmp_path: Path) -> None:
    ds = build(tree, embed=True)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(shardkit.InputError, match=r"DatasetDict.*train"):
        shardkit.convert(tmp_path / "dd", tmp_path / "out", workers=0)
    out = convert(tmp_path / "dd" / "train", tmp_path / "out")
    assert len(shardkit.open(out)) == len(CLASSES) * PER_CLASS
    picked = convert(tmp_path / "dd", tmp_path / "picked", hf_split="test")  # or by its name
    np.testing.assert_array_equal(pixels(picked)[0], pixels(out)[0])


def test_a_hub_folder_of_several_splits_is_refused_unless_one_is_picked(tree: Path, tmp_path: Path) -> None:
    ds = build(tree, embed=True)
    train, test = ds.select(range(8)), ds.select(range(8, len(ds)))
    hub = tmp_path / "hub"
    train.select(range(5)).to_parquet(str(hub / "data" / "train-00000-of-00002.parquet"))
    train.select(range(5, 8)).to_parquet(str(hub / "data" / "train-00001-of-00002.parquet"))
    test.to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    with pytest.raises(shardkit.InputError, match=r"splits test \(1 file\), train \(2 files\).*--hf-split"):
        shardkit.convert(hub, tmp_path / "merged", workers=0)
    expected, labels = pixels(convert(tree, tmp_path / "folder"))
    out = convert(hub, tmp_path / "train", hf_split="train")
    images, got = pixels(out)
    np.testing.assert_array_equal(images, expected[:8])
    np.testing.assert_array_equal(got, labels[:8])
    assert shardkit.open(out).manifest.config["hf"]["split"] == "train"
    assert len(pixels(convert(hub, tmp_path / "test", hf_split="test"))[0]) == len(ds) - 8
    with pytest.raises(shardkit.InputError, match=r"no split 'valid'.*train"):
        convert(hub, tmp_path / "valid", hf_split="valid")
    # Word names and folders, as the Hub reads them; the CLI takes --hf-split.
    words = tmp_path / "words"
    train.to_parquet(str(words / "my_train_file.parquet"))
    test.to_parquet(str(words / "validation" / "0.parquet"))
    with pytest.raises(shardkit.InputError, match=r"train \(1 file\), validation \(1 file\)"):
        shardkit.convert(words, tmp_path / "w", workers=0)
    assert shardkit.cli.main(["convert", str(words), str(tmp_path / "val"), "--size", "12",
                              "--hf-split", "val", "--workers", "0", "--no-progress"]) == 0
    assert len(shardkit.open(tmp_path / "val")) == len(ds) - 8
    # Split folders holding the Hub's shard names: the folder names the split.
    folders = tmp_path / "folders"
    train.to_parquet(str(folders / "train" / "data-00000-of-00001.parquet"))
    test.to_parquet(str(folders / "test" / "data-00000-of-00001.parquet"))
    with pytest.raises(shardkit.InputError, match=r"splits test \(1 file\), train \(1 file\)"):
        shardkit.convert(folders, tmp_path / "f", workers=0)
    assert len(pixels(convert(folders, tmp_path / "f-test", hf_split="test"))[0]) == len(ds) - 8
    with pytest.raises(shardkit.ConfigError, match="hf-split"):
        convert(tmp_path / "words" / "my_train_file.parquet", tmp_path / "one", hf_split="train")
    with pytest.raises(shardkit.ConfigError, match="not a Hugging Face dataset"):
        convert(tree, tmp_path / "folder2", hf_split="train")


def test_labels_that_are_floats_or_lists(tree: Path, tmp_path: Path) -> None:
    files, _ = rows_of(tree)
    images = [{"bytes": p.read_bytes(), "path": None} for p in files[:6]]
    table = pa.table({"image": images, "label": [0.0, 1.0, 2.0, float("nan"), 1.5, None]})
    pq.write_table(table, tmp_path / "floats.parquet")
    summary = shardkit.convert(tmp_path / "floats.parquet", tmp_path / "out", size=12, workers=0,
                               max_errors=3, progress=False)
    assert summary.samples == 3 and summary.reasons == {"missing_label": 2, "bad_label": 1}
    data = shardkit.open(tmp_path / "out")
    assert data.classes == ["0", "1", "2"] and data.read_shard(0).labels.tolist() == [0, 1, 2]
    lists = pa.table({"image": images, "label": [[0], [1], [0, 1], [2], [0], [1]]})
    pq.write_table(lists, tmp_path / "lists.parquet")
    with pytest.raises(shardkit.InputError, match=r"lists.parquet: label column 'label' is list"):
        shardkit.convert(tmp_path / "lists.parquet", tmp_path / "out2", size=12, workers=0)


def load(out: Path, tmp_path: Path) -> Any:
    files = sorted(str(p) for p in out.glob("*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train",
                                 cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(("codec", "pixels"), [("raw", "bytes"), ("raw", "array3d"),
                                               ("jpeg", "bytes"), ("png", "bytes")])
def test_datasets_loads_our_parquet_with_features_and_the_same_rows(
        tree: Path, tmp_path: Path, codec: str, pixels: str) -> None:
    out = convert(tree, tmp_path / codec, format="parquet", codec=codec, pixels=pixels)
    loaded = load(out, tmp_path)
    features = loaded.features
    assert features["label"] == datasets.ClassLabel(names=list(CLASSES))
    batch = next(iter(shardkit.open(out).batches(100, shuffle=False)))
    assert loaded["label"] == batch["label"].tolist() and loaded["key"] == [f"{i:06d}" for i in
                                                                             range(len(loaded))]
    if pixels == "array3d":
        assert features["image"] == datasets.Array3D(shape=(12, 12, 3), dtype="uint8")
        assert loaded.data.column("image").type.storage_type.value_type.value_type.value_type \
            == "uint8"
        images = np.stack([np.asarray(im) for im in loaded.with_format("numpy")["image"]])
        assert images.shape == (len(loaded), 12, 12, 3)
    elif codec == "raw":
        # The default layout stays bytes, which the reader maps (hf_features).
        assert features["image"] == datasets.Value("fixed_size_binary[432]")
        images = np.stack([np.frombuffer(r, np.uint8).reshape(12, 12, 3) for r in loaded["image"]])
    else:
        assert isinstance(features["image"], datasets.Image)
        images = np.stack([np.asarray(im.convert("RGB")) for im in loaded["image"]])
    np.testing.assert_array_equal(images, batch["image"])


def test_pyarrow_pandas_and_duckdb_read_the_jpeg_parquet(tree: Path, tmp_path: Path) -> None:
    out = convert(tree, tmp_path / "j", format="parquet", codec="jpeg")
    files = sorted(out.glob("*.parquet"))
    stored = [pq.read_table(f).column("image").combine_chunks().field("bytes").to_pylist() for f in files]
    flat = [b for part in stored for b in part]
    assert all(b[:2] == b"\xff\xd8" for b in flat)
    frame = pq.read_table(files[0]).to_pandas()
    assert frame["image"][0]["bytes"] == flat[0] and frame["image"][0]["path"] is None
    query = f"SELECT image.bytes, label FROM read_parquet('{out}/*.parquet') ORDER BY key"
    rows = duckdb.sql(query).fetchall()
    assert [r[0] for r in rows] == flat
    from PIL import Image

    with Image.open(io.BytesIO(flat[0])) as im:
        assert im.size == (12, 12)


def pixel_rows(rows: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, *shape), dtype=np.uint8)


def test_array3d_and_nested_list_pixels_convert_to_those_pixels(tmp_path: Path) -> None:
    images = pixel_rows(9, (10, 12, 3))
    labels = [i % len(CLASSES) for i in range(9)]
    label = datasets.ClassLabel(names=list(CLASSES))
    array3d = datasets.Dataset.from_dict(
        {"image": list(images), "label": labels},
        features=datasets.Features({"image": datasets.Array3D((10, 12, 3), "uint8"), "label": label}))
    nested = datasets.Dataset.from_dict(
        {"image": [im.tolist() for im in images], "label": labels},
        features=datasets.Features({"image": datasets.List(datasets.List(datasets.List(
            datasets.Value("uint8")))), "label": label}))
    array3d.to_parquet(str(tmp_path / "a3d.parquet"))
    array3d.save_to_disk(str(tmp_path / "saved"))
    nested.to_parquet(str(tmp_path / "nested.parquet"))
    for src in (tmp_path / "a3d.parquet", tmp_path / "saved", tmp_path / "nested.parquet"):
        out = shardkit.convert(src, tmp_path / f"out-{src.stem}", size=(12, 10), resize="stretch",
                               workers=0, progress=False).out
        got, got_labels = pixels(out)
        np.testing.assert_array_equal(got, images)  # same size, stretch: the pixels themselves
        assert got_labels.tolist() == labels and shardkit.open(out).classes == list(CLASSES)
    # Our own --pixels array3d shard as SRC: the same pixels back.
    shards = shardkit.convert(tmp_path / "a3d.parquet", tmp_path / "ours", size=(12, 10),
                              resize="stretch", format="parquet", pixels="array3d", workers=0,
                              progress=False).out
    again = shardkit.convert(sorted(shards.glob("*.parquet"))[0], tmp_path / "again",
                             size=(12, 10), resize="stretch", workers=0, progress=False).out
    np.testing.assert_array_equal(pixels(again)[0], images)


def test_gray_alpha_and_rows_that_are_no_image(tmp_path: Path) -> None:
    gray, la, rgba = (pixel_rows(2, (6, 5, c), seed=c) for c in (1, 2, 4))
    la[0, :3, :, 1] = rgba[0, :3, :, 3] = 90  # semi-transparent: composited on the background
    good = [gray[0], la[0], rgba[0], gray[1], la[1], rgba[1]]
    bad: list[Any] = [
        [*gray[0].tolist()[:-1], [[1, 2]] * 5],  # its channels differ in length
        np.zeros((6, 5, 5), np.uint8).tolist(),  # 5 channels
        [[[]] * 5] * 6,  # 0 channels
        [[None] * 5] * 6,  # null pixel lists
        [[[1, None, 3]] * 5] * 6,  # a null value
        None,  # no image: missing_image, as for an Image column
    ]
    rows: list[Any] = [im.tolist() for im in good[:3]] + bad + [im.tolist() for im in good[3:]]
    kind = datasets.LargeList(datasets.List(datasets.List(datasets.Value("uint8"))))
    datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": kind})) \
        .to_parquet(str(tmp_path / "mixed.parquet"), batch_size=4)  # row groups of 4 rows
    assert pq.ParquetFile(tmp_path / "mixed.parquet").metadata.num_row_groups == 3
    flat = tmp_path / "flat"
    flat.mkdir()
    for n, im in enumerate(good):  # the same images as PNG files: the reference
        Image.fromarray(im if im.shape[2] != 1 else im[..., 0]).save(flat / f"{n}.png")
    options: dict[str, Any] = {"size": (5, 6), "resize": "stretch", "progress": False}
    summary = shardkit.convert(tmp_path / "mixed.parquet", tmp_path / "out", workers=2,
                               shuffle=True, samples_per_shard=4, max_errors=6, **options)
    assert (summary.samples, summary.failed) == (6, 6)
    assert summary.reasons == {"decode_error": 5, "missing_image": 1}
    reference = pixels(shardkit.convert(flat, tmp_path / "ref", workers=0, **options).out)[0]
    data = shardkit.open(summary.out)
    got = {int(m["source"].rsplit(":", 1)[1]): im for k in range(len(data.manifest.shards))
           for m, im in zip(data.metadata(k), data.read_shard(k).images, strict=True)}
    assert sorted(got) == [0, 1, 2, 9, 10, 11]
    for n, row in enumerate(sorted(got)):
        np.testing.assert_array_equal(got[row], reference[n])
    assert not np.array_equal(reference[2][:3], rgba[0][:3, :, :3])  # the alpha did something
    errors = {int(e["path"].rsplit(":", 1)[1]): e["detail"] for e in
              map(json.loads, (summary.out / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == list(range(3, 9))
    for row, words in zip(range(3, 9), ["its channels per pixel differ (1 to 2)", "6x5x5",
                                        "6x5x0", "a pixel is null", "a pixel value is null",
                                        "no image (null)"], strict=True):
        assert words in errors[row], (row, errors[row])


def test_pixels_of_another_type_are_refused_naming_the_column(tmp_path: Path) -> None:
    floats = datasets.Dataset.from_dict(
        {"px": list(np.zeros((2, 4, 4, 3), np.float32))},
        features=datasets.Features({"px": datasets.Array3D((4, 4, 3), "float32")}))
    floats.to_parquet(str(tmp_path / "f.parquet"))
    with pytest.raises(shardkit.InputError, match=r"f\.parquet: column 'px' is .*, not an Image "
                                                  r"feature .* or pixels \(an Array3D"):
        shardkit.convert(tmp_path / "f.parquet", tmp_path / "out", image_col="px", workers=0)


def test_a_damaged_arrow_file_is_unreadable_for_each_of_its_rows(tmp_path: Path) -> None:
    images = pixel_rows(4, (3, 3, 3))
    datasets.Dataset.from_dict(
        {"image": list(images)},
        features=datasets.Features({"image": datasets.Array3D((3, 3, 3), "uint8")})) \
        .save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    table = pa.ipc.open_stream(bytes(data)).read_all()
    offsets = table.column("image").chunk(0).storage.offsets.to_numpy()
    marker = offsets.astype(np.int32).tobytes()
    at = bytes(data).index(marker)
    data[at:at + 4] = np.int32(7).tobytes()  # the first offset past the second
    arrow.write_bytes(bytes(data))
    summary = shardkit.convert(tmp_path / "saved", tmp_path / "out", size=3, workers=0,
                               max_errors=4, progress=False)
    assert (summary.samples, summary.failed, summary.reasons) == (0, 4, {"unreadable": 4})


def test_a_source_whose_array3d_datasets_cannot_load_is_an_input_error(tmp_path: Path) -> None:
    # With datasets imported, its deserialiser reads an Array3D declaration first: JSON it
    # cannot parse is a ValueError, other metadata a TypeError. Either is the file's fault.
    from test_array3d import declare

    src = tmp_path / "src"
    image_tree(src, classes=("a", "b"), per_class=3, min_side=20, max_side=30)
    shards = shardkit.convert(src, tmp_path / "a3d", size=(5, 4), workers=0, format="parquet",
                              pixels="array3d", progress=False).out
    source = tmp_path / "hf"
    source.mkdir()
    data = source / "train.parquet"
    for metadata in (b"not json", b'{"a": 1}'):
        data.write_bytes(next(Path(shards).glob("*.parquet")).read_bytes())
        declare(data, metadata)
        with pytest.raises(shardkit.InputError, match=r"train\.parquet: not a readable Parquet/Arrow file"):
            shardkit.convert(source, tmp_path / "out", size=4, workers=0, progress=False)
        assert not (tmp_path / "out").exists()
