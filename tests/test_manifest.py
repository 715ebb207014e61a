"""index.json validation (shardkit.format.manifest_schema): every field a reader, verify or
info reads is present and of its type, and damage is one DatasetError naming the file and the
field, from every entry point, never a KeyError or TypeError later."""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from corpus import small_dataset, small_tree

import shardkit
from shardkit import ShardLoader
from shardkit.errors import DatasetError
from shardkit.format.manifest import Manifest
from shardkit.tools.inspect import describe
from shardkit.tools.verify import verify_dataset

pytestmark = pytest.mark.timeout(120)

Path_ = tuple[str | int, ...]

#: Fields no reader, verify or info reads: they may be missing or of any type. Everything
#: else in a manifest the converter writes is required (the sweep below checks both ways).
FREE = {
    "config.image.background", "config.image.pad_color", "config.image.max_pixels",
    "config.quality", "config.samples_per_shard", "config.shard_bytes", "config.kind",
    *(f"config.csv.{name}" for name in ("columns", "delimiter", "encoding", "exclude", "header",
                                         "image_col", "keep_ints", "root")),
    *(f"schema.{name}.member" for name in ("key", "label", "source", "orig_width", "orig_height",
                                           "note", "n", "target")),
}
#: Fields that may be missing, but not of another type: an image CSV's metadata columns
#: (without them, a batch cannot carry them: asking for them is a ConfigError).
OPTIONAL = {"schema.note", "schema.note.csv_column", "schema.n", "schema.n.csv_column",
            "schema.target.csv_column"}


#: (field damaged, first word of the message) where the message does not start with the field.
RELATED = {("format", "not")}  # "not a shardkit index (format ...)"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One dataset of each kind of manifest: raw tar, jpeg Parquet, an image CSV with
    metadata columns and two targets, a table with classes, a table with a float label."""
    root = tmp_path_factory.mktemp("manifests")
    src = small_tree(root / "src", 3)
    out = {"tar": small_dataset(src, root / "tar", 4),
           "parquet": small_dataset(src, root / "parquet", 4, format="parquet", codec="jpeg")}
    images = sorted(src.rglob("*.jpg"))
    csv = root / "images.csv"
    csv.write_text("path,dx,dy,note,n\n" + "".join(
        f"{p.relative_to(root)},{i / 10},{i / 5},w{i},{i}\n" for i, p in enumerate(images)))
    out["image_csv"] = small_dataset(csv, root / "image_csv", 4, image_col="path", label_col="dx,dy")
    table = root / "table.csv"
    table.write_text("a,b,c,y\n" + "".join(f"{i},{i / 2},{'xyz'[i % 3]},{'pq'[i % 2]}\n"
                                           for i in range(20)))
    for name, label in (("table", "y"), ("regression", "b")):
        out[name] = root / name
        shardkit.convert(table, out[name], label_col=label, samples_per_shard=7, workers=0)
    return out


def _paths(value: Any, at: Path_ = ()) -> Iterator[Path_]:
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, item in items:
        yield (*at, key)
        yield from _paths(item, (*at, key))


def _dotted(path: Path_) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


def _changed(data: dict[str, Any], path: Path_, how: str) -> dict[str, Any]:
    """`data` with the value at `path` deleted (dict keys) or replaced by one of another type."""
    out = copy.deepcopy(data)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = [1] if isinstance(parent[path[-1]], dict) else {"x": 1}
    return out


@pytest.mark.parametrize("kind", ["tar", "parquet", "image_csv", "table", "regression"])
def test_every_field_a_reader_uses_is_required_and_typed(datasets: dict[str, Path], kind: str) -> None:
    data = json.loads((datasets[kind] / "index.json").read_text())
    Manifest.from_json(data)
    for path in _paths(data):
        name = _dotted(path)
        # The first shard stands for the others; list entries are only retyped.
        if path[0] == "shards" and len(path) > 1 and path[1] != 0:
            continue
        for how in ("delete", "retype") if isinstance(path[-1], str) else ("retype",):
            damaged = _changed(data, path, how)
            if name in FREE or any(name.startswith(f"{free}[") for free in FREE) \
                    or (how == "delete" and name in OPTIONAL):
                Manifest.from_json(damaged, where="index.json")
                continue
            with pytest.raises(DatasetError) as caught:
                Manifest.from_json(damaged, where="index.json")
            message = str(caught.value)
            assert message.startswith("index.json: "), message
            field = message.removeprefix("index.json: ").split(" ")[0]
            assert name.startswith(field) or field.startswith(name) or (name, field) in RELATED, \
                (name, how, message)


@pytest.mark.parametrize(("kind", "damage", "message"), [
    ("tar", lambda d: d["shards"][2].update(bytes="16384"), "shards[2].bytes is not a non-negative integer"),
    ("tar", lambda d: d["shards"][1].pop("sha256"), "shards[1].sha256 is missing"),
    ("tar", lambda d: d["shards"][0].update(sha256="ABC"), "shards[0].sha256 is not 64 lowercase hex digits"),
    ("tar", lambda d: d["shards"][0]["layout"].pop("stride"), "shards[0].layout.stride is missing"),
    ("tar", lambda d: d["shards"][1].pop("layout"), "shards[1].layout is missing (a raw tar shard has one)"),
    ("tar", lambda d: d["shards"][1]["layout"].update(offset=4000),
     "shards[1].layout {'label_digits': 1, 'label_offset': 1536, 'meta_offset': 2048, "
     "'offset': 4000, 'stride': 3072} puts a member outside the sample's 3072 bytes"),
    ("tar", lambda d: d["shards"][1]["layout"].update(label_offset=-3),
     "shards[1].layout.label_offset is not a non-negative integer"),
    ("tar", lambda d: d["shards"][1].update(file="shard-00000.tar"),
     "shards[1].file is 'shard-00000.tar', not 'shard-00001.tar'"),
    ("tar", lambda d: d["shards"][1].update(file="../x.tar"), "shards[1].file is not a plain file name"),
    ("tar", lambda d: d["schema"]["image"].update(shape=[10, 13, 3]),
     "schema.image.shape is [10, 13, 3], config.image makes [10, 12, 3]"),
    ("tar", lambda d: d["schema"]["image"].update(shape="10x12"),
     "schema.image.shape is not [H, W, C] or [null, null, C] with C 1 or 3"),
    ("tar", lambda d: d["config"].pop("codec"), "config.codec is missing"),
    ("tar", lambda d: d["config"].update(format="zip"), "config.format is not 'tar' or 'parquet'"),
    ("tar", lambda d: d.update(classes=None, class_counts=None),
     "schema.label is there, but classes is null"),
    ("tar", lambda d: d.update(classes=["a", 2, "c"]), "classes[1] is not a string"),
    ("tar", lambda d: d.update(class_counts=[4, 4]), "class_counts does not give one count per class"),
    ("tar", lambda d: d.pop("classes"), "classes is missing"),
    ("tar", lambda d: d.update(shards={}), "shards is not a list"),
    ("parquet", lambda d: d["schema"].pop("parquet"), "schema.parquet is missing"),
    ("image_csv", lambda d: d["schema"].pop("target"),
     "schema.target is missing, but config.csv.label_cols names 2 columns"),
    ("image_csv", lambda d: d["schema"]["note"].update(csv_column="0"),
     "schema.note.csv_column is not a non-negative integer"),
    ("table", lambda d: d["schema"]["features"].update(names=["a", "b", "zz"]),
     "schema.features.names[2] 'zz' is not a feature column of schema.columns"),
    ("table", lambda d: d["schema"]["columns"][2].pop("categories"),
     "schema.columns[2] has categories without dtype 'dictionary', or the other way round"),
    ("table", lambda d: d["schema"]["label"].update(dtype="int66"),
     "schema.label.dtype is not 'int64' or 'float32'"),
    ("regression", lambda d: d["schema"].pop("label"),
     "schema.label names no column, config.csv.label_cols ['b']"),
])
def test_a_damaged_index_is_one_dataset_error_everywhere(datasets: dict[str, Path], tmp_path: Path,
                                                         kind: str, damage: Any, message: str) -> None:
    out = tmp_path / kind
    shutil.copytree(datasets[kind], out)
    data = json.loads((out / "index.json").read_text())
    damage(data)
    (out / "index.json").write_text(json.dumps(data))
    expected = f"{out / 'index.json'}: {message}"
    for read in (lambda: list(shardkit.open(out).batches(4)), lambda: list(ShardLoader(out, 4)),
                 lambda: describe(out)):
        with pytest.raises(DatasetError) as caught:
            read()
        assert str(caught.value) == expected
    assert verify_dataset(out) == [expected]


def test_an_index_that_is_not_a_shardkit_manifest() -> None:
    for data, message in (([], "not a shardkit index (format [])"),
                          ({"format": "other"}, "not a shardkit index (format 'other')"),
                          ({"format": "shardkit", "format_version": 2},
                           "format version 2 is newer than this shardkit reads (1); upgrade shardkit"),
                          ({"format": "shardkit", "format_version": "1"},
                           "format_version is not a non-negative integer")):
        with pytest.raises(DatasetError, match=f"^index\\.json: {re.escape(message)}$"):
            Manifest.from_json(data)
