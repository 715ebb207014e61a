"""Raw Parquet pixels stored as Hugging Face's Array3D (``pixels="array3d"``): the column
built over the stored bytes, read back with every shape checked, conversions that give the
default layout's pixels, verify, damage, and the options it refuses. `test_hf.py` loads
these shards with ``datasets``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import small_tree

import shardkit
from shardkit import ConfigError, CorruptShardError, DatasetError
from shardkit.config import ARRAY3D_VALUES
from shardkit.conversion.plan import rows_per_group
from shardkit.conversion.tasks import shard_schema
from shardkit.conversion.writers import EncodedSample
from shardkit.conversion.writers.parquet import ParquetPartWriter, assemble_parquet
from shardkit.format.files import hash_file
from shardkit.format.samples import (
    ARRAY3D_LEAF,
    ARRAY3D_NAME,
    Array3DType,
    array3d_column,
    array3d_pixels,
    part_schema,
)
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
    assert leaves[ARRAY3D_LEAF] == compression.upper().replace("NONE", "UNCOMPRESSED")
    leaf = [meta.schema.column(i).path for i in range(meta.num_columns)].index(ARRAY3D_LEAF)
    assert "RLE_DICTIONARY" in meta.row_group(0).column(leaf).encodings
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
    refresh(out, 1, path)
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


def test_parts_and_row_groups_that_do_not_line_up_give_the_same_file(tmp_path: Path) -> None:
    pixels = images(76)
    labels = list(range(76))
    config = shardkit.ConvertConfig(image=shardkit.ImageOptions(size=(5, 4)), format="parquet",
                                    pixels="array3d")
    schema = shard_schema(config, labeled=True)

    def parts(sizes: list[int]) -> list[str]:
        paths, at = [], 0
        for number, size in enumerate(sizes):
            path = str(tmp_path / f"{sum(sizes)}-{len(sizes)}-{number}.arrow")
            writer = ParquetPartWriter(path, schema=part_schema(schema))
            for i in range(at, at + size):
                writer.add(EncodedSample(key=f"{i:06d}", label=labels[i], class_name=None,
                                         payload=pixels[i].tobytes(), shape=SHAPE, source=f"{i}.jpg",
                                         orig_size=(5, 4)))
            writer.close()
            paths.append(path)
            at += size
        return paths

    digests = []
    for sizes in ([5, 64, 7], [76], [20, 20, 20, 16]):
        out = str(tmp_path / f"shard-{len(sizes)}.parquet")
        digests.append(assemble_parquet(parts(sizes), out, schema=schema, rows_per_group=20,
                                        compression="none")[1])
        meta = pq.read_metadata(out)
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [20, 20, 20, 16]
        table = pq.read_table(out)
        np.testing.assert_array_equal(array3d_pixels(table.column("image"), SHAPE), pixels)
        assert table.column("label").to_pylist() == labels
    assert len(set(digests)) == 1


def test_row_groups_stay_below_the_int32_offsets_and_larger_images_are_refused() -> None:
    big = shardkit.ConvertConfig(image=shardkit.ImageOptions(size=(4000, 3000)), format="parquet",
                                 pixels="array3d")
    rows = rows_per_group(big, labeled=True)
    assert rows == ARRAY3D_VALUES // (4000 * 3000 * 3) == 59
    assert rows_per_group(dataclasses.replace(big, pixels="bytes"), labeled=True) == 64
    with pytest.raises(ConfigError, match="at most 2,147,483,647 pixel values"):
        shardkit.ConvertConfig(image=shardkit.ImageOptions(size=(30000, 30000)), format="parquet",
                               pixels="array3d")


CHECK_WITHOUT_DATASETS = """
import sys, numpy as np, shardkit
from shardkit.tools.verify import verify_dataset
out, problems = sys.argv[1], verify_dataset(sys.argv[1])
images = np.concatenate([b["image"] for b in shardkit.open(out).batches(100, shuffle=False)])
assert "datasets" not in sys.modules
print(images.sum(), images.shape, problems)
"""


def test_a_process_without_datasets_reads_and_verifies_the_storage_type(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "a3d", pixels="array3d")
    stored = everything(out)["image"]
    result = subprocess.run([sys.executable, "-c", CHECK_WITHOUT_DATASETS, str(out)],
                            capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split("\n")[0] == f"{stored.sum()} {stored.shape} []"


def declare(path: Path, metadata: bytes) -> None:
    """Rewrite a shard with its image field's extension metadata replaced."""
    table = pq.read_table(path)
    column = table.column("image").combine_chunks()
    storage = column.storage if isinstance(column, pa.ExtensionArray) else column
    field = pa.field("image", storage.type, metadata={
        b"ARROW:extension:name": ARRAY3D_NAME.encode(), b"ARROW:extension:metadata": metadata})
    table = table.set_column(table.schema.get_field_index("image"), field, storage)
    pq.write_table(table, path, compression="none")


def refresh(out: Path, number: int, path: Path) -> None:
    index = json.loads((out / "index.json").read_text())
    index["shards"][number]["bytes"], index["shards"][number]["sha256"] = hash_file(str(path))
    (out / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("metadata", [b'[[4, 5, 1], "uint8"]', b'[[4, 5, 3], "int32"]',
                                      b'{"a": 1}', b"not json"])
def test_an_extension_datasets_cannot_load_is_a_finding_and_never_a_crash(
        src: Path, tmp_path: Path, metadata: bytes) -> None:
    out = convert(src, tmp_path / "a3d", pixels="array3d")
    path = sorted(out.glob("*.parquet"))[0]
    declare(path, metadata)
    refresh(out, 0, path)
    # Without datasets (the CLI): the declaration is checked.
    result = subprocess.run([sys.executable, "-m", "shardkit", "verify", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and path.name in result.stdout + result.stderr \
        and "not datasets.features.features.Array3DExtensionType" in result.stdout + result.stderr
    # With datasets imported (as in this process) its deserialiser may refuse the file first.
    problems = verify_dataset(out)
    assert len(problems) == 1 and problems[0].startswith(path.name)
    try:
        shardkit.open(out).read_shard(0)
    except CorruptShardError as exc:
        assert path.name in str(exc)


def test_the_cli_converts_with_pixels_and_refuses_it_on_tar(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "shardkit", "convert", str(src), str(out),
                           "--format", "parquet", "--pixels", "array3d", "--size", "5x4",
                           "--workers", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "index.json").read_text())["config"]["pixels"] == "array3d"
    refused = subprocess.run([sys.executable, "-m", "shardkit", "convert", str(src),
                              str(tmp_path / "tar"), "--pixels", "array3d", "--workers", "0"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--pixels array3d applies to --format parquet" in refused.stderr
    assert not (tmp_path / "tar").exists()


def test_index_json_naming_pixels_for_tar_is_refused(src: Path, tmp_path: Path) -> None:
    out = shardkit.convert(src, tmp_path / "tar", size=(5, 4), workers=0, progress=False).out
    index = json.loads((out / "index.json").read_text())
    index["config"]["pixels"] = "array3d"
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=r"config\.pixels"):
        shardkit.open(out)
