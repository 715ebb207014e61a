"""Raw Parquet pixels stored as Hugging Face's Array3D (``pixels="array3d"``): the column
built over the stored bytes, read back with every shape checked, conversions that give the
default layout's pixels, verify, damage, and the options it refuses. `test_hf.py` loads
these shards with ``datasets``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import small_tree

import shardkit
from shardkit import ConfigError, CorruptShardError
from shardkit.format.files import hash_file
from shardkit.format.samples import Array3DType, array3d_column, array3d_pixels
from shardkit.reader.handles import open_parquet_raw
from shardkit.tools.verify import verify_dataset

SHAPE = (4, 5, 3)


def images(rows: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(rows).integers(0, 256, (rows, *shape), dtype=np.uint8)


def binary(pixels: np.ndarray) -> pa.Array:
    width = int(np.prod(pixels.shape[1:]))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(pixels),
                                                [None, pa.py_buffer(pixels.tobytes())])


@pytest.mark.parametrize("rows", [0, 1, 9])
def test_the_column_holds_the_bytes_as_nested_lists_and_reads_back_as_a_view(rows: int) -> None:
    pixels = images(rows)
    column = array3d_column(binary(pixels), Array3DType(SHAPE))
    assert column.type.storage_type == pa.list_(pa.list_(pa.list_(pa.uint8())))
    assert column.storage.to_pylist() == pixels.tolist()
    back = array3d_pixels(column, SHAPE)
    assert back.dtype == np.uint8 and back.shape == (rows, *SHAPE)
    np.testing.assert_array_equal(back, pixels)
    np.testing.assert_array_equal(array3d_pixels(column.storage, SHAPE), pixels)  # no extension


def test_slices_and_chunks_read_their_own_rows() -> None:
    pixels = images(10)
    column = array3d_column(binary(pixels).slice(3, 5), Array3DType(SHAPE))
    np.testing.assert_array_equal(array3d_pixels(column, SHAPE), pixels[3:8])
    chunked = pa.chunked_array([column.storage.slice(1, 2), column.storage.slice(4, 1)])
    np.testing.assert_array_equal(array3d_pixels(chunked, SHAPE), pixels[[4, 5, 7]])


def nested(rows: list[Any]) -> pa.Array:
    return pa.array(rows, type=pa.list_(pa.list_(pa.list_(pa.uint8()))))


@pytest.mark.parametrize(("rows", "message"), [
    ([images(1)[0].tolist()[:3]], "dimension 0 is not 4"),
    ([[row[:4] for row in images(1)[0].tolist()]], "dimension 1 is not 5"),
    ([[[px[:2] for px in row] for row in images(1)[0].tolist()]], "dimension 2 is not 3"),
    ([None], "holds nulls"),
    ([[None] * 4], "holds nulls"),
    ([[[[1, None, 3]] * 5] * 4], "holds nulls"),
])
def test_a_list_of_another_length_or_a_null_is_refused(rows: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        array3d_pixels(nested([images(1)[0].tolist(), *rows]), SHAPE)


def test_another_value_type_is_refused() -> None:
    wide = pa.array([images(1)[0].tolist()], type=pa.list_(pa.list_(pa.list_(pa.int32()))))
    with pytest.raises(ValueError, match="not list"):
        array3d_pixels(wide, SHAPE)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tree(tmp_path_factory.mktemp("src"), 2)


def convert(src: Path, out: Path, **options: Any) -> Path:
    return shardkit.convert(src, out, size=(5, 4), format="parquet", samples_per_shard=4,
                            workers=0, progress=False, **options).out


def everything(out: Path) -> dict[str, np.ndarray]:
    return next(iter(shardkit.open(out).batches(1000, shuffle=False)))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_conversion_gives_the_default_layouts_pixels_and_verifies(
        src: Path, tmp_path: Path, compression: str) -> None:
    default = everything(convert(src, tmp_path / "bytes"))
    out = convert(src, tmp_path / "a3d", pixels="array3d", compression=compression)
    manifest = shardkit.open(out).manifest
    assert manifest.config["pixels"] == "array3d" and not manifest.mapped
    got = everything(out)
    assert got["image"].shape == (len(default["image"]), *SHAPE)
    np.testing.assert_array_equal(got["image"], default["image"])
    np.testing.assert_array_equal(got["label"], default["label"])
    loader = shardkit.ShardLoader(out, 3, shuffle=False)
    streamed = np.concatenate([b["image"].numpy() for b in loader])
    np.testing.assert_array_equal(streamed, default["image"])
    files = sorted(out.glob("*.parquet"))
    meta = pq.read_metadata(files[0])
    leaves = {meta.schema.column(i).path: meta.row_group(0).column(i).compression
              for i in range(meta.num_columns)}
    assert leaves["image.list.element.list.element.list.element"] == compression.upper() \
        .replace("NONE", "UNCOMPRESSED")
    assert leaves["key"] == "ZSTD"
    for quick in (True, False):
        assert verify_dataset(out, quick=quick) == []


def test_the_default_layout_keeps_its_manifest(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "bytes")
    assert "pixels" not in json.loads((out / "index.json").read_text())["config"]
    assert shardkit.open(out).manifest.mapped


def test_output_is_byte_identical_for_any_worker_count(src: Path, tmp_path: Path) -> None:
    digests = []
    for workers in (0, 2):
        out = shardkit.convert(src, tmp_path / f"w{workers}", size=(5, 4), format="parquet",
                               pixels="array3d", samples_per_shard=4, workers=workers,
                               progress=False).out
        digests.append([hash_file(str(f)) for f in sorted(out.glob("*.parquet"))])
    assert digests[0] == digests[1] and len(digests[0]) == 2


def test_pyarrow_pandas_and_duckdb_read_nested_lists(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "a3d", pixels="array3d")
    stored = everything(out)["image"]
    table = pq.read_table(sorted(out.glob("*.parquet"))[0])
    first = table.column("image").combine_chunks()
    first = first.storage if isinstance(first, pa.ExtensionArray) else first
    assert first.to_pylist()[0] == stored[0].tolist()
    frame = table.to_pandas()
    assert np.stack([np.stack([np.stack(r) for r in im]) for im in frame["image"]]).tolist() == \
        stored[:len(frame)].tolist()
    rows = duckdb.sql(f"SELECT len(image), len(image[1]), len(image[1][1]), image[2][3][1] "
                      f"FROM read_parquet('{out}/*.parquet') ORDER BY key").fetchall()
    assert rows == [(4, 5, 3, int(im[1, 2, 0])) for im in stored]


def damage(path: Path, row: int) -> None:
    """Rewrite a shard with image `row` one pixel row short, its schema as written."""
    table = pq.read_table(path)
    column = table.column("image").combine_chunks()
    rows = (column.storage if isinstance(column, pa.ExtensionArray) else column).to_pylist()
    rows[row] = rows[row][:-1]
    kind = Array3DType(SHAPE)
    broken = pa.ExtensionArray.from_storage(kind, nested(rows))
    schema = table.schema.set(table.schema.get_field_index("image"), pa.field("image", kind))
    table = table.set_column(table.schema.get_field_index("image"), schema.field("image"), broken)
    pq.write_table(table.cast(schema), path, compression="none", use_dictionary=False)


def test_a_damaged_shard_is_a_corrupt_shard_error_and_a_verify_finding(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "a3d", pixels="array3d")
    path = sorted(out.glob("*.parquet"))[1]
    damage(path, 1)
    index = json.loads((out / "index.json").read_text())
    record = index["shards"][1]
    record["bytes"], record["sha256"] = hash_file(str(path))
    (out / "index.json").write_text(json.dumps(index))
    data = shardkit.open(out)
    with pytest.raises(CorruptShardError, match=rf"{path.name}: an image's dimension 0 is not 4"):
        data.read_shard(1)
    with pytest.raises(CorruptShardError, match=path.name):
        open_parquet_raw(str(path), data.manifest.shards[1], SHAPE, labeled=True, pixels="array3d")
    assert verify_dataset(out, quick=True) == [f"{path.name}: an image's dimension 0 is not 4 "
                                                "as index.json's shape says"]


@pytest.mark.parametrize(("options", "message"), [
    ({"pixels": "lists"}, "pixels"),
    ({"pixels": "array3d", "format": "tar"}, "--pixels array3d applies to --format parquet"),
    ({"pixels": "array3d", "codec": "jpeg"}, "--codec raw only"),
    ({"pixels": "array3d", "resize": "shorter-side"}, "one image shape"),
])
def test_options_it_cannot_honour_are_config_errors(src: Path, tmp_path: Path,
                                                    options: dict[str, Any], message: str) -> None:
    options = {"format": "parquet", **options}
    with pytest.raises(ConfigError, match=message):
        shardkit.convert(src, tmp_path / "out", size=8, workers=0, progress=False, **options)
    assert not (tmp_path / "out").exists()
