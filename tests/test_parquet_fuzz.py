"""Property tests of the Parquet page-header reader (`shardkit.reader.parquet`): random and
mutated bytes end in a value, None (the pyarrow fallback) or CorruptShardError, never another
exception, a crash or a hang; and pages it maps hold what pyarrow reads from the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkit.errors import CorruptShardError
from shardkit.format.manifest import ShardRecord
from shardkit.reader.parquet import _Compact, map_images

pytestmark = pytest.mark.timeout(300)

SHAPE = (2, 3, 3)
WIDTH = 18
ROWS = 12
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _shard(**options: object) -> bytes:
    """A Parquet file as pyarrow writes a raw shard's image column: several row groups of
    several PLAIN pages."""
    images = np.random.default_rng(0).integers(0, 256, (ROWS, WIDTH), dtype=np.uint8)
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(WIDTH), ROWS,
                                                  [None, pa.py_buffer(images.tobytes())])
    schema = pa.schema([pa.field("image", pa.binary(WIDTH), nullable=False),
                        pa.field("label", pa.int64(), nullable=False)])
    table = pa.table({"image": column, "label": pa.array(np.arange(ROWS))}, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=False, compression="none", row_group_size=5,
                   data_page_size=40, write_batch_size=2, **options)  # type: ignore[arg-type]
    return bytes(sink.getvalue().to_pybytes())


SHARDS = {"v1": _shard(), "v2": _shard(data_page_version="2.0"),
          "checked": _shard(write_statistics=True, write_page_checksum=True, write_page_index=True)}


def _compact_value(data: bytes) -> None:
    reader = _Compact(data, 0, len(data))
    try:
        fields = reader.struct()
    except ValueError:
        return
    assert isinstance(fields, dict)
    assert 0 < reader.position <= len(data)


@FUZZ
@given(st.binary(max_size=400))
def test_the_compact_reader_on_random_bytes(data: bytes) -> None:
    _compact_value(data)


# Bytes that mean something to the compact protocol: struct/list/map headers, long varints,
# field stops, and the type nibbles of every Thrift type.
_TOKENS = st.sampled_from([0x00, 0x15, 0x16, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x2C, 0xF9, 0xFF, 0x80, 0x7F,
                           0x01, 0x02, 0x0C, 0x0D, 0x0E, 0x0F])


@FUZZ
@given(st.lists(st.one_of(_TOKENS, st.integers(0, 255)), max_size=300))
def test_the_compact_reader_on_protocol_like_bytes(tokens: list[int]) -> None:
    _compact_value(bytes(tokens))


def _header_starts(data: bytes) -> list[int]:
    meta = pq.read_metadata(pa.py_buffer(data))
    return [meta.row_group(g).column(0).data_page_offset for g in range(meta.num_row_groups)]


@st.composite
def _damaged(draw: st.DrawFn) -> tuple[str, bytes]:
    """A shard with a few bytes changed, inserted or removed, mostly in its page headers and
    footer (what the reader parses), sometimes anywhere."""
    name = draw(st.sampled_from(sorted(SHARDS)))
    data = bytearray(SHARDS[name])
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    spots = [*_header_starts(bytes(data)), footer]
    for _ in range(draw(st.integers(1, 4))):
        region = draw(st.sampled_from(["header", "footer", "anywhere"]))
        if region == "anywhere":
            at = draw(st.integers(0, len(data) - 1))
        elif region == "header":
            at = min(len(data) - 1, draw(st.sampled_from(spots[:-1])) + draw(st.integers(0, 40)))
        else:
            at = min(len(data) - 1, footer + draw(st.integers(0, len(data) - footer)))
        how = draw(st.sampled_from(["set", "flip", "insert", "delete"]))
        if how == "set":
            data[at] = draw(st.one_of(_TOKENS, st.integers(0, 255)))
        elif how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            data[at:at] = bytes([draw(st.one_of(_TOKENS, st.integers(0, 255)))])
        elif len(data) > 1:
            del data[at]
    return name, bytes(data)


@FUZZ
@given(_damaged())
def test_damaged_shards_map_or_fall_back_or_are_corrupt(tmp_path: Path, case: tuple[str, bytes]) -> None:
    name, data = case
    path = tmp_path / f"{name}.parquet"
    path.write_bytes(data)
    record = ShardRecord(file=path.name, samples=ROWS, bytes=len(data), sha256="0" * 64)
    try:
        mapped = map_images(str(path), record, SHAPE)
    except CorruptShardError as exc:
        assert str(path) in str(exc)
        return
    if mapped is None:
        return
    pages = mapped[1]
    assert sum(len(p) for p in pages) == ROWS
    assert all(p.shape[1:] == SHAPE and p.dtype == np.uint8 for p in pages)
    rows = np.concatenate(pages).reshape(ROWS, WIDTH)
    try:
        stored = pq.read_table(pa.py_buffer(data), columns=["image"]).column("image").to_pylist()
    except (OSError, pa.ArrowException):
        return  # pyarrow refuses what the page walk accepted: damage outside what it checks
    assert [bytes(row) for row in rows] == stored


@pytest.mark.parametrize("name", sorted(SHARDS))
def test_the_undamaged_shards_map(tmp_path: Path, name: str) -> None:
    """The fuzzed files, undamaged, are mapped (so the damage above is what is tested)."""
    path = tmp_path / "shard.parquet"
    path.write_bytes(SHARDS[name])
    record = ShardRecord(file=path.name, samples=ROWS, bytes=path.stat().st_size, sha256="0" * 64)
    mapped = map_images(str(path), record, SHAPE)
    assert mapped is not None and len(mapped[1]) > 3
    pages = mapped[1]
    stored = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    assert [bytes(row) for row in np.concatenate(pages).reshape(ROWS, WIDTH)] == stored
