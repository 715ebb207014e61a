"""Raw Parquet shards read by mapping their data pages: values, layouts that fall back to
pyarrow, damaged page headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import small_dataset, small_tree

import shardkit
from shardkit import CorruptShardError, ShardLoader
from shardkit.format.manifest import ShardRecord
from shardkit.reader.gather import Pieces
from shardkit.reader.handles import ShardCache, open_parquet_raw
from shardkit.reader.parquet import _Compact, map_images

SHAPE = (4, 5, 3)
WIDTH = 4 * 5 * 3


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tree(tmp_path_factory.mktemp("src"), 7)


def convert(src: Path, out: Path, **options: object) -> Path:
    return small_dataset(src, out, 8, **options)


def write(path: Path, rows: int, *, nullable: bool = False, **options: Any) -> np.ndarray:
    """A Parquet file written by pyarrow itself: an ``image`` column of `rows` random
    [4,5,3] images and a ``label`` column; returns the images."""
    images = np.random.default_rng(rows).integers(0, 256, (rows, *SHAPE), dtype=np.uint8)
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(WIDTH), rows,
                                                  [None, pa.py_buffer(images.tobytes())])
    schema = pa.schema([pa.field("image", pa.binary(WIDTH), nullable=nullable),
                        pa.field("label", pa.int64(), nullable=False)])
    table = pa.table({"image": column, "label": pa.array(np.arange(rows))}, schema=schema)
    pq.write_table(table, path, **{"use_dictionary": False, "compression": "none", **options})
    return images


def record(path: Path, rows: int) -> ShardRecord:
    return ShardRecord(file=path.name, samples=rows, bytes=path.stat().st_size, sha256="")


@pytest.mark.parametrize(("rows", "options"), [
    (0, {}),
    (1, {}),
    (50, {"row_group_size": 12}),
    (50, {"data_page_size": 1, "write_batch_size": 1}),  # one image per page
    (50, {"data_page_size": 1 << 30, "row_group_size": 20}),  # one page per row group
    (50, {"data_page_size": 200, "write_batch_size": 7, "data_page_version": "1.0"}),
    (50, {"data_page_size": 200, "write_batch_size": 7, "data_page_version": "2.0",
          "row_group_size": 30}),
    (50, {"data_page_size": 300, "write_batch_size": 3, "write_statistics": True,
          "write_page_checksum": True, "write_page_index": True}),
])
def test_mapped_pages_hold_what_pyarrow_reads(tmp_path: Path, rows: int, options: dict[str, Any]) -> None:
    path = tmp_path / "shard.parquet"
    images = write(path, rows, **options)
    mapped = map_images(str(path), record(path, rows), SHAPE)
    assert mapped is not None
    pages = mapped[1]
    assert all(p.shape[1:] == SHAPE and not p.flags.writeable and not p.flags.owndata for p in pages)
    mapped = np.concatenate(pages) if pages else np.empty((0, *SHAPE), np.uint8)
    stored = pq.read_table(path).column("image").to_pylist()
    assert [bytes(m) for m in mapped] == stored
    np.testing.assert_array_equal(mapped, images)
    if options.get("write_batch_size") == 1:
        assert len(pages) == rows
    handle = open_parquet_raw(str(path), record(path, rows), SHAPE, labeled=True)
    assert isinstance(handle.images, Pieces) and len(handle.images) == rows
    np.testing.assert_array_equal(handle.labels, np.arange(rows))


@pytest.mark.parametrize("options", [{"compression": "zstd"}, {"use_dictionary": True},
                                     {"nullable": True}, {"data_page_version": "2.0",
                                                          "nullable": True}])
def test_other_layouts_fall_back_to_pyarrow(tmp_path: Path, options: dict[str, Any]) -> None:
    path = tmp_path / "shard.parquet"
    images = write(path, 30, row_group_size=16, **options)
    assert map_images(str(path), record(path, 30), SHAPE) is None
    handle = open_parquet_raw(str(path), record(path, 30), SHAPE, labeled=True)
    assert isinstance(handle.images, np.ndarray)
    np.testing.assert_array_equal(handle.images, images)
    np.testing.assert_array_equal(handle.labels, np.arange(30))


def test_row_counts_are_checked_against_index_json(tmp_path: Path) -> None:
    path = tmp_path / "shard.parquet"
    write(path, 20)
    with pytest.raises(CorruptShardError, match=r"shard\.parquet: 20 rows, index.json says 21"):
        map_images(str(path), record(path, 21), SHAPE)
    with pytest.raises(CorruptShardError, match="not fixed_size_binary"):
        map_images(str(path), record(path, 20), (4, 5, 1))


def _batches(out: Path, **options: Any) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in b.items()} for b in ShardLoader(out, 5, **options)]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_loader_gives_the_same_batches_as_over_tar(src: Path, tmp_path: Path, compression: str) -> None:
    tar = convert(src, tmp_path / "tar")
    parquet = convert(src, tmp_path / "parquet", format="parquet", compression=compression)
    dataset = shardkit.open(parquet)
    cache = ShardCache(str(parquet), dataset.manifest, capacity=1, verify=False)
    images = cache.get(0).images
    cache.close()
    assert isinstance(images, Pieces) == (compression == "none")
    if isinstance(images, Pieces):  # small images: a row group's fit one 1 MiB page
        groups = pq.read_metadata(parquet / dataset.manifest.shards[0].file).num_row_groups
        assert len(images.arrays) == groups
        assert images.offsets is not None  # a shuffled batch is one gather over all pages
    for options in ({"shuffle": False}, {"shuffle": True, "seed": 3, "window": 2}):
        expected, got = _batches(tar, **options), _batches(parquet, **options)
        assert len(got) == len(expected) == 5
        for a, b in zip(expected, got, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def _first_page_header(path: Path) -> int:
    column = pq.read_metadata(path).schema.names.index("image")
    return int(pq.read_metadata(path).row_group(0).column(column).data_page_offset)


def _varint_end(data: bytes | bytearray, at: int) -> int:
    while data[at] & 0x80:
        at += 1
    return at + 1


@pytest.mark.parametrize("damage", ["garbage", "zeros", "sizes", "count"])
def test_a_damaged_page_header_is_caught_naming_the_file(src: Path, tmp_path: Path, damage: str) -> None:
    out = convert(src, tmp_path / "d", format="parquet")
    shard = out / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    at = _first_page_header(shard)
    if damage == "garbage":
        data[at:at + 6] = b"\xff" * 6
    elif damage == "zeros":
        data[at:at + 6] = bytes(6)
    else:
        # pyarrow's header: 0x15 type, 0x15 uncompressed size, 0x15 compressed size, then
        # 0x2c (struct, field 5) and 0x15 num_values.
        assert data[at:at + 3] == b"\x15\x00\x15"
        first = at + 3
        second = _varint_end(data, first) + 1
        if damage == "sizes":  # both sizes one byte off: the page no longer holds whole images
            data[first] ^= 0x02
            data[second] ^= 0x02
        else:
            values = _varint_end(data, second) + 2
            assert data[values - 2:values] == b"\x2c\x15"
            data[values] += 2  # one image more than the page holds (zigzag: 2 per step)
    shard.write_bytes(bytes(data))
    assert len(data) == json.loads((out / "index.json").read_text())["shards"][1]["bytes"]
    with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet"):
        for _ in ShardLoader(out, 5, shuffle=False):
            pass


def test_the_compact_reader_skips_every_thrift_type() -> None:
    data = bytes([
        0x15, 6,  # 1: i32 3
        0x11,  # 2: true
        0x18, 2, *b"ab",  # 3: binary (skipped)
        0x19, 0x25, 2, 4,  # 4: list<i32> [1, 2] (skipped)
        0x06, 40, 1,  # 20 (long form): i64 -1
        0x1C, 0x15, 10, 0,  # 21: struct {1: 5}
        0x1B, 1, 0x58, 2, 1, *b"z",  # 22: map<i32, binary>
        0x2A, 0x19, 0x21, 1, 2,  # 24: set<list<bool>>
        0x19, 0xF1, 3, 1, 2, 1,  # 25: list<bool> of 3, long size
        0x17, *bytes(6), 0xF0, 0x3F,  # 26: double 1.0
        0x22,  # 28: false
        0,
    ])
    reader = _Compact(data, 0, len(data))
    fields = reader.struct()
    assert reader.position == len(data)
    assert {k: v for k, v in fields.items() if v is not None} == {1: 3, 2: True, 20: -1, 21: {1: 5},
                                                                 28: False}
    for damaged in (data[:-1], bytes([0x1E, 0]), bytes([0x19, 0xF5, 0xFF, 0xFF, 0x7F]),
                    bytes([0x15, *[0xFF] * 12]), bytes([0x1C] * 40),
                    bytes([0x19] * 3000)):  # lists nested in lists: no RecursionError
        with pytest.raises(ValueError):
            _Compact(damaged, 0, len(damaged)).struct()
