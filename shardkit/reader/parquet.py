"""Read Parquet shards.

* `map_images`: a raw fixed-shape shard's image column as views into the memory-mapped file,
  one [n,H,W,C] array per data page, with no copy. pyarrow reads only the footer; the page
  headers (Thrift compact protocol) are walked here, and every size and count is checked
  against the footer and index.json. Only a column that is stored as its bare bytes can be
  mapped: uncompressed, PLAIN, no dictionary, required (no levels), data pages v1 or v2.
  Anything else (``--compression zstd``, a file written by another tool with other options)
  is None, and the caller reads the column with pyarrow instead.
* `read_parquet_table` / `read_parquet_shard`: pyarrow reads (one copy of the column; the only
  way for pixels stored as Hugging Face's ``Array3D``, nested lists), through
  `pq.ParquetFile`, and `int64_values` for labels: neither imports pandas, as `pq.read_table`
  and pyarrow's ``to_numpy`` do (a quarter of a second in every process that reads).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardkit.config import DEFAULT_PIXELS
from shardkit.errors import CorruptShardError
from shardkit.format.manifest import ShardRecord
from shardkit.format.samples import PARQUET_ERRORS, array3d_pixels
from shardkit.reader.mapping import map_shard

__all__ = ["fixed_images", "int64_values", "map_images", "read_parquet_shard",
           "read_parquet_table"]



def read_parquet_table(path: str | os.PathLike[str], columns: Sequence[str],
                       samples: int) -> pa.Table:
    """Read `columns` of a shard, checking that it has them and its row count against
    index.json. Raises CorruptShardError naming the file."""
    try:
        with pq.ParquetFile(path, memory_map=True) as handle:
            missing = [name for name in columns if name not in handle.schema_arrow.names]
            table = handle.read(columns=list(columns), use_threads=False)
            table.validate(full=True)  # pyarrow reads strings that are not UTF-8 as they are
    except PARQUET_ERRORS as exc:
        raise CorruptShardError(f"{path}: not a readable Parquet file: {exc}") from None
    if missing:
        raise CorruptShardError(f"{path}: no column {', '.join(missing)}")
    if table.num_rows != samples:
        raise CorruptShardError(f"{path}: {table.num_rows} rows, index.json says {samples}")
    return table


def fixed_images(column: pa.ChunkedArray, shape: Sequence[int]) -> np.ndarray:
    """[N,H,W,C] uint8 from a fixed_size_binary column."""
    array = column.combine_chunks()
    width = int(np.prod(shape))
    data = array.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8, count=len(array) * width, offset=array.offset * width)
    return flat.reshape((len(array), *(int(s) for s in shape)))


def int64_values(column: pa.ChunkedArray) -> np.ndarray:
    """An int64 column with no nulls (labels) as a numpy array, read from its buffer (pyarrow's
    own conversions import pandas); other columns through pyarrow."""
    array = column.combine_chunks()
    if array.type != pa.int64() or array.null_count or not len(array):
        return np.asarray(array.to_numpy(zero_copy_only=False))
    return np.frombuffer(array.buffers()[1], dtype=np.int64, count=len(array), offset=array.offset * 8)


def read_parquet_shard(path: str | os.PathLike[str], samples: int, shape: Sequence[int],
                       labeled: bool, *, pixels: str = DEFAULT_PIXELS
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """(images [N,H,W,C] uint8, labels [N] int64 or None) of a fixed-shape raw Parquet shard
    whose pixels are stored as `pixels` says (index.json's ``config.pixels``)."""
    columns = ["image", "label"] if labeled else ["image"]
    table = read_parquet_table(path, columns, samples)
    column = table.column("image")
    width = int(np.prod(shape))
    if pixels == "array3d":
        try:
            images = array3d_pixels(column, shape)
        except ValueError as exc:
            raise CorruptShardError(f"{path}: {exc}") from None
    elif column.type != pa.binary(width) or column.null_count:
        raise CorruptShardError(f"{path}: the image column is not fixed_size_binary({width}) "
                                "as index.json's shape says")
    else:
        images = fixed_images(column, shape)
    labels = int64_values(table.column("label")) if labeled else None
    return images, labels


# parquet.thrift's PageType and Encoding values; `_data_pages` names the PageHeader fields.
_DATA_PAGE, _DATA_PAGE_V2 = 0, 3
_PLAIN = 0
_DICTIONARY_ENCODINGS = {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}


def map_images(path: str, record: ShardRecord,
               shape: Sequence[int]) -> tuple[mmap.mmap, list[np.ndarray]] | None:
    """The ``image`` column of a raw fixed-shape shard as read-only [n_i,H,W,C] uint8 views
    into the memory-mapped file (`shardkit.reader.mapping.map_shard`), one per data page, in
    row order (together `record.samples` rows), with that mapping; None when the column is
    stored in a layout this cannot map (compressed, dictionary-encoded, not PLAIN, with
    definition or repetition levels...).

    Raises CorruptShardError naming the file when its structure is damaged: an unreadable
    footer or page header, an image column that is not fixed_size_binary(H*W*C), sizes that
    run past their column chunk or the file, pages that do not tile their chunk, or counts
    that do not add up to the footer's and index.json's.
    """
    width = int(np.prod(shape))
    try:
        meta = pq.read_metadata(path)
    except PARQUET_ERRORS as exc:
        raise CorruptShardError(f"{path}: not a readable Parquet file: {exc}") from None
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if "image" not in names:
        raise CorruptShardError(f"{path}: no image column")
    column = names.index("image")
    spec = meta.schema.column(column)
    if spec.physical_type != "FIXED_LEN_BYTE_ARRAY" or spec.length != width:
        raise CorruptShardError(f"{path}: the image column is not fixed_size_binary({width}) "
                                "as index.json's shape says")
    if spec.max_definition_level or spec.max_repetition_level:
        return None
    if meta.num_rows != record.samples:
        raise CorruptShardError(f"{path}: {meta.num_rows} rows, index.json says {record.samples}")
    chunks = [meta.row_group(g).column(column) for g in range(meta.num_row_groups)]
    mapped = map_shard(path)
    if not _uncompressed(mapped, column, len(chunks)) or any(chunk.has_dictionary_page or chunk.file_path
                                                             or _DICTIONARY_ENCODINGS & set(chunk.encodings)
                                                             for chunk in chunks):
        return None
    size, pixels = len(mapped), np.frombuffer(mapped, dtype=np.uint8)
    pixels.flags.writeable = False  # the pages are read here; a batch lent out is a twin
    images: list[np.ndarray] = []
    rows = 0
    for group, chunk in enumerate(chunks):
        begin, end = chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size
        where = f"{path}: row group {group}, image column"
        group_rows = meta.row_group(group).num_rows
        if group_rows == chunk.num_values == chunk.total_compressed_size == 0:
            continue  # an empty row group: pyarrow writes no pages and offset 0
        if not 4 <= begin <= end <= size - 8:
            raise CorruptShardError(f"{where}: bytes {begin}..{end} run past the file ({size} bytes)")
        pages = _data_pages(mapped, begin, end, width, where)
        if pages is None:
            return None
        held = sum(count for _, count in pages)
        if held != group_rows or chunk.num_values != group_rows:
            raise CorruptShardError(f"{where}: pages hold {held} values, the footer says "
                                    f"{chunk.num_values} of {group_rows} rows")
        for start, count in pages:
            if count:
                images.append(pixels[start:start + count * width].reshape(count, *shape))
        rows += group_rows
    if rows != record.samples:
        raise CorruptShardError(f"{path}: row groups hold {rows} rows, index.json says {record.samples}")
    return mapped, images


def _data_pages(data: Any, begin: int, end: int, width: int,
                where: str) -> list[tuple[int, int]] | None:
    """(offset of the values, number of values) of each page of the column chunk
    data[begin:end], or None when a page is not a bare PLAIN data page."""
    pages = []
    position = begin
    while position < end:
        reader = _Compact(data, position, end)
        try:
            header = reader.struct()
            kind, size, stored = _field(header, 1, int), _field(header, 2, int), _field(header, 3, int)
            if kind == _DATA_PAGE:
                page = _field(header, 5, dict)
                count, encoding = _field(page, 1, int), _field(page, 2, int)
            elif kind == _DATA_PAGE_V2:
                page = _field(header, 8, dict)
                count, encoding = _field(page, 1, int), _field(page, 4, int)
                if (_field(page, 2, int), _field(page, 5, int), _field(page, 6, int)) != (0, 0, 0) \
                        or _field(page, 3, int) != count:
                    raise ValueError("a v2 data page of a required column with nulls or levels")
            else:
                return None  # a dictionary or index page: not a bare column
        except ValueError as exc:
            raise CorruptShardError(f"{where}: page header at byte {position} is damaged ({exc})") from None
        if encoding != _PLAIN or count == 0:
            return None  # another encoding, or empty pages (pyarrow writes none): not ours
        position = reader.position
        if stored != size:
            raise CorruptShardError(f"{where}: uncompressed page at byte {position} stores "
                                    f"{stored} bytes for {size}")
        if count < 0 or stored != count * width or position + stored > end:
            raise CorruptShardError(f"{where}: page at byte {position} holds {stored} bytes for "
                                    f"{count} values of {width} bytes, in a chunk ending at "
                                    f"byte {end}")
        pages.append((position, count))
        position += stored
    return pages


def _uncompressed(data: Any, column: int, groups: int) -> bool:
    """Whether leaf column `column` is stored UNCOMPRESSED in each of the `groups` row groups,
    read from the footer's Thrift (FileMetaData.row_groups[g].columns[column].meta_data.codec)
    rather than from pyarrow, whose ColumnChunkMetaData.compression aborts the process (an
    uncaught C++ exception) on a codec value it does not know. False when the footer cannot
    be read this way: pyarrow then reads the file, and reports damage as an error."""
    size = len(data)
    begin = size - 8 - int.from_bytes(data[size - 8:size - 4], "little")
    if begin < 4:
        return False
    try:
        footer = _Compact(data, begin, size - 8, lists=True).struct()
        codecs = [group[1][column][3][4] for group in footer[4]]
    except (ValueError, LookupError, TypeError):
        return False
    return codecs == [0] * groups


def _field(struct: dict[int, Any], number: int, kind: type) -> Any:
    value = struct.get(number)
    if type(value) is not kind:
        raise ValueError(f"field {number} missing or not {kind.__name__}")
    return value


class _Compact:
    """A Thrift compact-protocol reader over data[position:end] (bytes, mmap). `struct` keeps
    integer, boolean and struct fields by id (and with `lists`, lists and sets of them) and
    skips the others; damage (a read past `end`, an unknown type, runaway nesting or list
    lengths) is ValueError."""

    _NESTING = 32
    _ITEMS = 1 << 16  # list, set and map elements in all (a page header has none)

    def __init__(self, data: Any, position: int, end: int, *, lists: bool = False) -> None:
        self.data = data
        self.position = position
        self.end = end
        self.items = 0
        self.lists = lists

    def byte(self) -> int:
        if self.position >= self.end:
            raise ValueError("ends early")
        value: int = self.data[self.position]
        self.position += 1
        return value

    def skip(self, count: int) -> None:
        if count < 0 or self.position + count > self.end:
            raise ValueError("ends early")
        self.position += count

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift >= 70:
                raise ValueError("varint longer than 10 bytes")

    def zigzag(self) -> int:
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def struct(self, depth: int = 0) -> dict[int, Any]:
        if depth > self._NESTING:
            raise ValueError("nested too deep")
        fields: dict[int, Any] = {}
        last = 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == 0:
                return fields
            last = last + (head >> 4) if head >> 4 else self.zigzag()
            if kind in (1, 2):  # booleans carry their value in the type
                fields[last] = kind == 1
            else:
                fields[last] = self.value(kind, depth)

    def value(self, kind: int, depth: int) -> Any:
        if depth > self._NESTING:
            raise ValueError("nested too deep")
        if kind in (4, 5, 6):  # i16, i32, i64
            return self.zigzag()
        if kind == 12:
            return self.struct(depth + 1)
        if kind == 3:  # i8
            return self.byte()
        if kind == 7:  # double
            self.skip(8)
        elif kind == 8:  # binary / string
            self.skip(self.varint())
        elif kind in (9, 10):  # list, set
            head = self.byte()
            count = self.count(head >> 4 if head >> 4 != 15 else self.varint())
            items = [self.element(head & 0x0F, depth) for _ in range(count)]
            return items if self.lists else None
        elif kind == 11:  # map
            count = self.count(self.varint())
            if count:
                head = self.byte()
                for _ in range(count):
                    self.element(head >> 4, depth)
                    self.element(head & 0x0F, depth)
        elif kind == 13:  # uuid
            self.skip(16)
        else:
            raise ValueError(f"unknown field type {kind}")
        return None

    def count(self, items: int) -> int:
        """`items`, unless a damaged length would keep the skipping going for long."""
        self.items += items
        if self.items > self._ITEMS:
            raise ValueError("more list elements than a page header holds")
        return items

    def element(self, kind: int, depth: int) -> Any:
        """One list, set or map element, read as `value` reads a field (a boolean element is
        one byte, skipped)."""
        if kind in (1, 2):
            self.skip(1)
            return None
        return self.value(kind, depth + 1)
