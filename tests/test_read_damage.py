"""Damage the reader must turn into a shardkit error: one test per defect found by trying it
(issue 11) or by tests/test_damage_fuzz.py, each failing before its fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shardkit
from shardkit import CorruptShardError, ShardLoader

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 CSV rows (a number, a float, a category; label p/q) in shards of 7 rows."""
    root = tmp_path_factory.mktemp("table")
    csv = root / "t.csv"
    csv.write_text("a,b,c,y\n" + "".join(f"{i},{i * 0.5},{'xyz'[i % 3]},{'pq'[i % 2]}\n"
                                         for i in range(20)))
    out = root / "out"
    shardkit.convert(csv, out, label_col="y", samples_per_shard=7, workers=0)
    return out


def _flip_a_value(shard: Path) -> None:
    """Change one stored value of the shard, keeping its size: only its sha256 tells."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def test_verify_true_checks_the_sha256_of_table_shards(table: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "t"
    shutil.copytree(table, out)
    shard = out / "shard-00001.parquet"
    before = shard.stat().st_size
    _flip_a_value(shard)
    assert shard.stat().st_size == before
    with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet: sha256 differs"):
        list(shardkit.open(out).batches(5, verify=True))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet: sha256 differs"):
        list(ShardLoader(out, 5, verify=True))
    # Without verify only the structure is checked: the flipped byte is somewhere in the
    # compressed pages or their statistics, and may or may not show.
    first = next(iter(shardkit.open(table).batches(7, shuffle=False, verify=True)))
    assert first["features"].shape == (7, 3)
    np.testing.assert_array_equal(first["label"], np.arange(7) % 2)
    assert json.loads((out / "index.json").read_text())["kind"] == "table"


@pytest.fixture(scope="module")
def raw_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from corpus import small_dataset, small_tree

    root = tmp_path_factory.mktemp("parquet")
    return small_dataset(small_tree(root / "src", 3), root / "out", 4, format="parquet")


def _copy(dataset: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / dataset.name
    shutil.copytree(dataset, out)
    return out


def test_a_footer_column_name_that_is_not_utf8(raw_parquet: Path, tmp_path: Path) -> None:
    """pyarrow raises UnicodeDecodeError (a ValueError) for it, not an ArrowException."""
    from shardkit.tools.verify import verify_dataset

    out = _copy(raw_parquet, tmp_path)
    shard = out / "shard-00001.parquet"
    data = shard.read_bytes()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    at = data.index(b"\x18\x05image", footer) + 2  # the schema element's name
    shard.write_bytes(data[:at] + b"\xe9" + data[at + 1:])
    with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet: not a readable Parquet file"):
        list(ShardLoader(out, 4, shuffle=False))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet: sha256 differs"):
        list(ShardLoader(out, 4, shuffle=False, verify=True))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet: not a readable Parquet file"):
        shardkit.open(out).read_shard(1)
    problems = verify_dataset(out, quick=True)
    assert len(problems) == 1 and problems[0].startswith("shard-00001.parquet: not a readable Parquet file")


def test_an_unknown_compression_codec_in_the_footer(raw_parquet: Path, tmp_path: Path) -> None:
    """pyarrow's ColumnChunkMetaData.compression aborts the process (an uncaught C++
    exception) on a codec value it does not know: the page walk must not ask it."""
    import subprocess
    import sys

    out = _copy(raw_parquet, tmp_path)
    shard = out / "shard-00000.parquet"
    data = shard.read_bytes()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    # The image column's ColumnMetaData: type, encodings, path ["image"], then codec (i32 0).
    at = data.index(b"\x19\x18\x05image\x15\x00", footer) + 9
    shard.write_bytes(data[:at] + b"\x47" + data[at + 1:])  # zigzag 0x47: codec -36
    script = ("import sys, shardkit\n"
              "try:\n"
              f"    list(shardkit.ShardLoader({str(out)!r}, 4, shuffle=False))\n"
              "except shardkit.CorruptShardError as exc:\n"
              "    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"{shard}: not a readable Parquet file"), result.stdout


@pytest.fixture(scope="module")
def jpeg_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from corpus import small_dataset, small_tree

    root = tmp_path_factory.mktemp("jpeg")
    src = small_tree(root / "src", 3)
    return {"tar": small_dataset(src, root / "tar", 4, codec="jpeg"),
            "raw": small_dataset(src, root / "raw", 4),
            "parquet": small_dataset(src, root / "parquet", 4, format="parquet", codec="jpeg")}


def _member_data(data: bytes, name: bytes) -> int:
    """Where the data of the tar member `name` starts."""
    return data.index(name + b"\0") + 512


def _reads_fail(out: Path, shard: str, message: str, **options: object) -> None:
    """Every reader of `out` ends in CorruptShardError naming `shard` and saying `message`."""
    pattern = rf"{shard.replace('.', chr(92) + '.')}: .*{message}"
    with pytest.raises(CorruptShardError, match=pattern):
        list(ShardLoader(out, 4, shuffle=False, **options))
    with pytest.raises(CorruptShardError, match=pattern):
        list(shardkit.open(out).batches(4, **options))  # type: ignore[arg-type]
    if not options:
        with pytest.raises(CorruptShardError, match=pattern):
            shardkit.open(out).read_shard(0)


def test_a_cls_member_that_is_not_digits(jpeg_datasets: dict[str, Path], tmp_path: Path) -> None:
    out = _copy(jpeg_datasets["tar"], tmp_path)
    shard = out / "shard-00000.tar"
    data = bytearray(shard.read_bytes())
    data[_member_data(data, b"000001.cls")] = 0
    shard.write_bytes(bytes(data))
    _reads_fail(out, shard.name, r"\.cls")


@pytest.mark.parametrize(("kind", "damage"), [
    ("tar", (b"{", b"x")),  # not JSON
    ("tar", (b'"source"', b'"sourcf"')),  # no source
    ("raw", (b"{", b"x")),
    ("raw", (b'"height"', b'"heighu"')),
])
def test_a_json_member_that_is_damaged(jpeg_datasets: dict[str, Path], tmp_path: Path, kind: str,
                                       damage: tuple[bytes, bytes]) -> None:
    out = _copy(jpeg_datasets[kind], tmp_path)
    shard = out / "shard-00000.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(damage[0], _member_data(data, b"000001.json"))
    data[at:at + len(damage[0])] = damage[1]
    shard.write_bytes(bytes(data))
    fields = ("key", "source")
    pattern = r"shard-00000\.tar: .*\.json"
    with pytest.raises(CorruptShardError, match=pattern):
        list(ShardLoader(out, 4, shuffle=False, fields=fields))
    with pytest.raises(CorruptShardError, match=pattern):
        list(shardkit.open(out).batches(4, fields=fields))
    with pytest.raises(CorruptShardError, match=pattern):
        shardkit.open(out).metadata(0)


def _first_jpeg(data: bytes) -> int:
    return data.index(b"\xff\xd8\xff")


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_a_stored_image_that_does_not_decode(jpeg_datasets: dict[str, Path], tmp_path: Path,
                                             kind: str) -> None:
    out = _copy(jpeg_datasets[kind], tmp_path)
    shard = out / f"shard-00000.{kind}"
    data = bytearray(shard.read_bytes())
    at = _first_jpeg(data)
    data[at:at + 4] = bytes(4)
    shard.write_bytes(bytes(data))
    _reads_fail(out, shard.name, "a stored image does not decode")


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_a_stored_image_of_another_size(jpeg_datasets: dict[str, Path], tmp_path: Path, kind: str) -> None:
    out = _copy(jpeg_datasets[kind], tmp_path)
    shard = out / f"shard-00000.{kind}"
    data = bytearray(shard.read_bytes())
    frame = data.index(b"\xff\xc0", _first_jpeg(data))  # SOF0: length, precision, height, width
    assert data[frame + 5:frame + 9] == b"\x00\x0a\x00\x0c"  # 10 rows of 12 pixels
    data[frame + 6] = 11
    shard.write_bytes(bytes(data))
    _reads_fail(out, shard.name, r"a stored image is 11×12(×3)?, index\.json says 10×12")


def _edit_index(out: Path, edit: Any) -> None:
    data = json.loads((out / "index.json").read_text())
    edit(data)
    (out / "index.json").write_text(json.dumps(data))


@pytest.mark.parametrize(("edit", "name"), [
    (lambda d: d["shards"][1]["layout"].update(offset=639), "offset"),  # pixels one byte early
    (lambda d: d["shards"][1]["layout"].update(label_offset=1024), "label_offset"),  # the .cls header
    (lambda d: d["shards"][1]["layout"].update(meta_offset=1536), "meta_offset"),
])
def test_a_layout_that_is_not_the_formats(jpeg_datasets: dict[str, Path], tmp_path: Path,
                                          edit: Any, name: str) -> None:
    """Each of these reads plausible bytes from the intact shard (the first character of the
    .cls member's name is a digit); only the layout's own arithmetic tells."""
    out = _copy(jpeg_datasets["raw"], tmp_path)
    _edit_index(out, edit)
    for options in ({}, {"verify": True}):
        _reads_fail_at(out, "shard-00001.tar", r".*(index\.json's layout|where index\.json puts them)",
                       **options)


def _reads_fail_at(out: Path, shard: str, message: str, *, read_shard: bool = True,
                   **options: Any) -> None:
    """ShardLoader, Dataset.batches and (`read_shard`) Dataset.read_shard(1) end in
    CorruptShardError naming `shard` and saying `message`."""
    pattern = rf"{shard.replace('.', chr(92) + '.')}: {message}"
    with pytest.raises(CorruptShardError, match=pattern):
        list(ShardLoader(out, 4, shuffle=False, **options))
    with pytest.raises(CorruptShardError, match=pattern):
        list(shardkit.open(out).batches(4, **options))
    if read_shard:
        with pytest.raises(CorruptShardError, match=pattern):
            shardkit.open(out).read_shard(1)


def test_shards_listed_out_of_order(jpeg_datasets: dict[str, Path], tmp_path: Path) -> None:
    """Records swapped whole (file, size, hash) still describe real files: only their names
    say that the order changed."""
    from shardkit.errors import DatasetError

    out = _copy(jpeg_datasets["tar"], tmp_path)
    _edit_index(out, lambda d: d.update(shards=list(reversed(d["shards"]))))
    with pytest.raises(DatasetError, match=r"index\.json: shards\[0\]\.file is 'shard-00002\.tar', "
                                           r"not 'shard-00000\.tar'"):
        ShardLoader(out, 4)


def test_a_label_that_names_no_class(jpeg_datasets: dict[str, Path], tmp_path: Path) -> None:
    out = _copy(jpeg_datasets["raw"], tmp_path)
    shard = out / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    data[_member_data(data, b"000005.cls")] = ord("8")  # three classes
    shard.write_bytes(bytes(data))
    _reads_fail_at(out, shard.name, r"label 8 names no class \(3 classes\)")


def test_fewer_json_members_than_samples(jpeg_datasets: dict[str, Path], tmp_path: Path) -> None:
    import io
    import tarfile

    out = _copy(jpeg_datasets["tar"], tmp_path)
    shard = out / "shard-00001.tar"
    kept = io.BytesIO()
    with tarfile.open(shard) as source, \
            tarfile.open(fileobj=kept, mode="w", format=tarfile.USTAR_FORMAT) as copy:
        for member in source:
            if member.name != "000005.json":
                copy.addfile(member, source.extractfile(member))
    shard.write_bytes(kept.getvalue())
    _edit_index(out, lambda d: d["shards"][1].update(bytes=len(kept.getvalue())))
    _reads_fail_at(out, shard.name, r"member 000006\.jpg stands where sample 000005's \.json belongs",
                   read_shard=False,
                   fields=("source",))


def _rewrite_tar(out: Path, shard: str, edit: Any) -> None:
    """Shard `shard` of `out` written again by tarfile with `edit(members)` applied (the
    same members, names and data), index.json's size and sha256 made to match."""
    import hashlib
    import io
    import tarfile

    path = out / shard
    with tarfile.open(path) as source:
        members = [(m, source.extractfile(m).read()) for m in source]  # type: ignore[union-attr]
    kept = io.BytesIO()
    with tarfile.open(fileobj=kept, mode="w", format=tarfile.USTAR_FORMAT) as copy:
        for member, data in edit(members):
            copy.addfile(member, io.BytesIO(data))
    path.write_bytes(kept.getvalue())
    number = int(shard.split("-")[1].split(".")[0])
    _edit_index(out, lambda d: d["shards"][number].update(
        bytes=len(kept.getvalue()), sha256=hashlib.sha256(kept.getvalue()).hexdigest()))


def test_a_member_out_of_its_sample_never_pairs_an_image_with_another_label(
        jpeg_datasets: dict[str, Path], tmp_path: Path) -> None:
    """Each member sound, its hash in index.json: only the order tells sample 5's image from
    sample 4's (a reader pairing by position gave it sample 4's label)."""
    out = _copy(jpeg_datasets["tar"], tmp_path)

    def move_5_ahead(members: list[Any]) -> list[Any]:
        image = next(m for m in members if m[0].name == "000005.jpg")
        rest = [m for m in members if m is not image]
        return [image, *rest]

    _rewrite_tar(out, "shard-00001.tar", move_5_ahead)
    _reads_fail_at(out, "shard-00001.tar", r"member 000004\.jpg stands where sample 000005's \.cls belongs")


@pytest.mark.parametrize("name", [b"/etc/passwd", b"../../evil.npy", b"000001.exe", b"00000x.npy"])
def test_a_raw_member_not_named_by_its_place(jpeg_datasets: dict[str, Path], tmp_path: Path,
                                             name: bytes) -> None:
    """The fixed-layout reader takes members by offset: it checks their names as well (a
    header renamed in place, its checksum and the shard's sha256 kept right)."""
    import hashlib

    out = _copy(jpeg_datasets["raw"], tmp_path)
    shard = out / "shard-00000.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"000001.npy\0")
    data[at:at + 100] = name.ljust(100, b"\0")
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(data[at:at + 512])
    shard.write_bytes(bytes(data))
    _edit_index(out, lambda d: d["shards"][0].update(sha256=hashlib.sha256(data).hexdigest()))
    _reads_fail(out, shard.name, "not named <key>.npy")


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_an_image_column_of_another_width(src_tree: Path, tmp_path: Path, compression: str) -> None:
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    from corpus import small_dataset

    out = small_dataset(src_tree, tmp_path / "out", 4, format="parquet", compression=compression)
    shard = out / "shard-00001.parquet"
    table = pq.read_table(shard)
    narrow = pa.array([bytes(104)] * table.num_rows, pa.binary(104))
    pq.write_table(table.set_column(1, pa.field("image", pa.binary(104), nullable=False), narrow), shard)
    data = shard.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    _edit_index(out, lambda d: d["shards"][1].update(bytes=len(data), sha256=digest))
    _reads_fail_at(out, shard.name, r"the image column is not fixed_size_binary\(360\)")


@pytest.fixture(scope="module")
def src_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from corpus import small_tree

    return small_tree(tmp_path_factory.mktemp("src"), 3)


def test_an_npy_header_cut_short_is_a_verify_finding(jpeg_datasets: dict[str, Path], tmp_path: Path) -> None:
    """numpy's header parser raises tokenize.TokenError (not a ValueError) for an unclosed
    bracket."""
    from shardkit.tools.verify import verify_dataset

    out = _copy(jpeg_datasets["raw"], tmp_path)
    shard = out / "shard-00000.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"(10, 12, 3)") + 4
    data[at:at + 8] = bytes(8)
    shard.write_bytes(bytes(data))
    problems = verify_dataset(out, quick=True)
    assert len(problems) == 1 and problems[0].startswith("shard-00000.tar: sample 000000: .npy header "
                                                         "unreadable"), problems


def test_a_string_that_is_not_utf8(src_tree: Path, tmp_path: Path) -> None:
    """pyarrow reads a string column's bytes as they are; converting them to Python raises
    UnicodeDecodeError later, far from the read."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    from corpus import small_dataset

    out = small_dataset(src_tree, tmp_path / "out", 4, format="parquet", codec="jpeg")
    shard = out / "shard-00001.parquet"
    table = pq.read_table(shard)
    sources = table.column("source").combine_chunks()
    offsets, data = sources.buffers()[1:]
    damaged = bytearray(data.to_pybytes())
    damaged[0] = 0xB0
    broken = pa.StringArray.from_buffers(len(sources), offsets, pa.py_buffer(bytes(damaged)))
    index = table.schema.get_field_index("source")
    pq.write_table(table.set_column(index, table.schema.field("source"), broken), shard)
    data_ = shard.read_bytes()
    digest = hashlib.sha256(data_).hexdigest()
    _edit_index(out, lambda d: d["shards"][1].update(bytes=len(data_), sha256=digest))
    _reads_fail_at(out, shard.name, "not a readable Parquet file: .*Invalid UTF8", read_shard=False,
                   fields=("source",))


def test_a_csv_column_of_unknown_dtype(src_tree: Path, tmp_path: Path) -> None:
    from corpus import small_dataset

    from shardkit.tools.verify import verify_dataset

    images = sorted(src_tree.rglob("*.jpg"))
    csv = tmp_path / "images.csv"
    csv.write_text("path,note\n" + "".join(f"{p},w{i}\n" for i, p in enumerate(images)))
    out = small_dataset(csv, tmp_path / "out", 4, format="parquet", image_col="path")
    _edit_index(out, lambda d: d["schema"]["note"].update(dtype="text"))
    (problem,) = verify_dataset(out)  # index.json's own validation names the field
    assert problem.endswith("index.json: schema.note.dtype is not 'int64' or 'float64' or 'string' "
                            "or 'bool' or 'float32_list'")
