"""shardkit verify: sound datasets pass; each kind of damage is reported as exact lines naming
the damaged file, and the command exits 6."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from corpus import add_bad_files, image_tree

import shardkit
from shardkit.errors import DatasetError
from shardkit.tools.verify import verify_dataset

# 14 good images in two classes plus 3 bad ones in class "a": 14 samples, 3 failed, 17 inputs.
# Shard k holds plan positions 5k..5k+4, failures leaving gaps: shards of 4, 3, 5 and 2 samples.
SAMPLES, FAILED = 14, 3


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    image_tree(root, classes=("a", "b"), per_class=7, min_side=20, max_side=40)
    add_bad_files(root / "a")
    return root


def convert(src: Path, out: Path, **options: Any) -> Path:
    options = {"size": (10, 8), "samples_per_shard": 5, **options}
    shardkit.convert(src, out, workers=0, max_errors=10, **options)
    return out


@pytest.fixture(scope="module")
def raw_tar(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(src, tmp_path_factory.mktemp("raw_tar") / "d", format="tar", codec="raw")


@pytest.fixture
def out(raw_tar: Path, tmp_path: Path) -> Path:
    """A fresh copy of the raw tar dataset, for one test to damage."""
    return Path(shutil.copytree(raw_tar, tmp_path / "d"))


def cli(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardkit", "verify", str(out), *flags],
                          capture_output=True, text=True, timeout=60)


def reported(out: Path, *, quick: bool = False) -> list[str]:
    """The problems found, after checking the command prints the same lines and exits 6."""
    problems = verify_dataset(out, quick=quick)
    assert problems
    result = cli(out, *(["--quick"] if quick else []))
    assert result.returncode == DatasetError.exit_code, result.stderr
    assert result.stdout.splitlines() == problems
    return problems


def index(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "index.json").read_text()))


def stride(out: Path) -> int:
    return int(index(out)["shards"][0]["layout"]["stride"])


@pytest.mark.parametrize("fmt,codec,resize", [
    ("tar", "raw", "center-crop"), ("tar", "jpeg", "center-crop"), ("tar", "png", "shorter-side"),
    ("tar", "raw", "shorter-side"), ("parquet", "raw", "center-crop"),
    ("parquet", "jpeg", "center-crop"), ("parquet", "raw", "shorter-side"),
])
def test_a_sound_dataset_passes(src: Path, tmp_path: Path, fmt: str, codec: str, resize: str) -> None:
    size = (8, 8) if resize == "shorter-side" else (10, 8)
    out = convert(src, tmp_path / "d", format=fmt, codec=codec, resize=resize, size=size)
    assert verify_dataset(out) == []
    assert verify_dataset(out, quick=True) == []
    result = cli(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"{out}: OK\n"


def test_an_unlabelled_dataset_passes(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    image_tree(flat, classes=(), per_class=6, min_side=20, max_side=30)
    out = convert(flat, tmp_path / "d")
    assert index(out)["classes"] is None
    assert verify_dataset(out) == []


def test_a_flipped_pixel_is_caught_by_the_hash_only(out: Path) -> None:
    shard = out / "shard-00002.tar"
    data = bytearray(shard.read_bytes())
    data[stride(out) + index(out)["shards"][2]["layout"]["offset"] + 7] ^= 1  # sample 1's pixels
    shard.write_bytes(bytes(data))
    assert reported(out) == ["shard-00002.tar: sha256 differs from index.json (corrupted)"]
    assert verify_dataset(out, quick=True) == []  # --quick does not hash: a pixel flip passes
    assert cli(out, "--quick").returncode == 0


def test_an_end_marker_that_is_not_zeros(out: Path) -> None:
    """Tar readers need the two zero blocks; ours would not miss them, so verify looks."""
    shard = out / "shard-00002.tar"
    data = bytearray(shard.read_bytes())
    data[-1024:] = b"\x01" * 1024
    shard.write_bytes(bytes(data))
    message = "shard-00002.tar: does not end with the tar end-of-archive marker (two zero blocks)"
    assert reported(out, quick=True) == [message]
    assert reported(out) == ["shard-00002.tar: sha256 differs from index.json (corrupted)", message]


def test_a_shard_cut_at_a_sample_boundary(out: Path) -> None:
    shard = out / "shard-00002.tar"
    data, step = shard.read_bytes(), stride(out)
    shard.write_bytes(data[: 2 * step] + bytes(1024))  # a valid tar of 2 samples, not 5
    assert reported(out) == [
        f"shard-00002.tar: {2 * step + 1024} bytes on disk, index.json says {len(data)}",
        "shard-00002.tar: holds 2 samples, index.json says 5",
    ]


def test_a_shard_cut_inside_a_member(out: Path) -> None:
    shard = out / "shard-00002.tar"
    data, step = shard.read_bytes(), stride(out)
    shard.write_bytes(data[: 2 * step + 700])  # inside sample 2's .npy data
    problems = reported(out, quick=True)
    assert problems[0] == f"shard-00002.tar: {2 * step + 700} bytes on disk, index.json says {len(data)}"
    assert problems[1].startswith("shard-00002.tar: not a readable tar file: ")
    assert len(problems) == 2


def test_a_missing_shard(out: Path) -> None:
    (out / "shard-00002.tar").unlink()
    assert reported(out) == ["shard-00002.tar: missing (index.json lists it)"]


def sample_members(data: bytes, key: str) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [(m.name, archive.extractfile(m).read())  # type: ignore[union-attr]
                for m in archive if m.name.startswith(f"{key}.")]


def with_sample(data: bytes, members: list[tuple[str, bytes]]) -> bytes:
    """`data` (a tar shard) with `members` appended before its end-of-archive marker."""
    extra = b""
    for name, payload in members:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        extra += info.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)
    return data[:-1024] + extra + data[-1024:]


def test_an_extra_sample(out: Path) -> None:
    shard = out / "shard-00003.tar"  # the last shard: keys after its last one are free
    data = shard.read_bytes()
    last = index(out)["shards"][3]
    members = sample_members(data, "000016")
    assert [name for name, _ in members] == ["000016.npy", "000016.cls", "000016.json"]
    shard.write_bytes(with_sample(data, [(name.replace("000016", "000017"), payload)
                                         for name, payload in members]))
    assert reported(out) == [
        f"shard-00003.tar: {len(data) + stride(out)} bytes on disk, index.json says {last['bytes']}",
        "shard-00003.tar: holds 3 samples, index.json says 2",
    ]


def test_a_repeated_sample_is_out_of_order(out: Path) -> None:
    shard = out / "shard-00003.tar"
    data = shard.read_bytes()
    shard.write_bytes(with_sample(data, sample_members(data, "000016")))
    assert reported(out, quick=True) == [
        f"shard-00003.tar: {len(data) + stride(out)} bytes on disk, index.json says {len(data)}",
        "shard-00003.tar: key 000016 is out of order (after 000016)",
    ]


def test_a_link_member_is_refused(out: Path) -> None:
    shard = out / "shard-00003.tar"
    data = shard.read_bytes()
    link = tarfile.TarInfo("000017.npy")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    shard.write_bytes(data[:-1024] + link.tobuf(tarfile.USTAR_FORMAT) + data[-1024:])
    assert reported(out, quick=True) == [
        f"shard-00003.tar: {len(data) + 512} bytes on disk, index.json says {len(data)}",
        "shard-00003.tar: member '000017.npy' is not a regular file",
    ]


def test_an_unlisted_shard_file(out: Path) -> None:
    shutil.copy(out / "shard-00002.tar", out / "shard-00099.tar")
    assert reported(out) == ["shard-00099.tar: a shard file index.json does not list"]


def test_errors_jsonl_with_a_missing_line(out: Path) -> None:
    errors = out / "errors.jsonl"
    lines = errors.read_text().splitlines(keepends=True)
    assert len(lines) == FAILED
    errors.write_text("".join(lines[1:]))
    assert reported(out) == ["errors.jsonl: 2 lines, index.json says 3 failed"]
    errors.write_text("".join(lines[:2]) + '{"index": 1}\n')
    assert reported(out) == ["errors.jsonl: line 3 lacks key, path, stage, reason, detail"]
    errors.unlink()
    assert reported(out) == ["errors.jsonl: missing (index.json says 3 failed)"]


def test_a_tampered_index(out: Path) -> None:
    good = index(out)
    bad = json.loads(json.dumps(good))
    bad["samples"] += 1
    (out / "index.json").write_text(json.dumps(bad))
    assert reported(out) == [f"{out / 'index.json'}: 'samples' is {SAMPLES + 1} but the shards hold "
                             f"{SAMPLES}"]

    bad["shards"][1]["samples"] += 1  # now consistent with 'samples', not with the shard
    (out / "index.json").write_text(json.dumps(bad))
    step, size = stride(out), bad["shards"][1]["bytes"]
    assert reported(out) == [
        f"shard-00001.tar: index.json says 4 samples of layout stride {step} bytes in {size} bytes "
        "(should be samples * stride + 1024)",
        "shard-00001.tar: holds 3 samples, index.json says 4",
        f"index.json: {SAMPLES + 1} samples + {FAILED} failed != {SAMPLES + FAILED} inputs",
    ]

    bad = json.loads(json.dumps(good))
    offset = bad["shards"][0]["layout"]["offset"]
    bad["shards"][0]["layout"]["offset"] += 16  # the reader would read pixels 16 bytes late
    (out / "index.json").write_text(json.dumps(bad))
    assert reported(out, quick=True) == [
        f"shard-00000.tar: sample 000001 is not where index.json's layout puts it: offset {offset}, "
        f"layout says {offset + 16}"]

    bad = json.loads(json.dumps(good))
    bad["class_counts"] = [6, 8]
    (out / "index.json").write_text(json.dumps(bad))
    assert reported(out, quick=True) == ["index.json: class_counts [6, 8], the shards hold [7, 7]"]

    (out / "index.json").unlink()
    assert reported(out) == [f"{out}: not a shardkit dataset (no index.json)"]


def test_a_wrong_npy_header_and_a_relabelled_sample(out: Path) -> None:
    shard = out / "shard-00000.tar"
    original = shard.read_bytes()
    data = bytearray(original)
    at = data.index(b"'shape': (8, 10, 3)")
    data[at:at + 19] = b"'shape': (8, 10, 1)"  # same length, wrong channel count
    shard.write_bytes(bytes(data))
    assert reported(out, quick=True) == [
        "shard-00000.tar: sample 000001: .npy holds uint8 (8, 10, 1), the schema says 8×10×3 uint8"]

    layout = index(out)["shards"][0]["layout"]
    data = bytearray(original)
    data[layout["label_offset"]] = ord("1")  # sample 000001 (a/im000.jpg) is class "a": its .cls now says "b"
    shard.write_bytes(bytes(data))
    assert reported(out, quick=True) == [
        "shard-00000.tar: sample 000001: .json says class 'a', its .cls says 'b'"]


def test_a_damaged_parquet_shard(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "d", format="parquet", codec="raw")
    shard = out / "shard-00001.parquet"
    original = shard.read_bytes()
    pixels = pq.read_table(shard, columns=["image"]).column("image")[2].as_py()
    data = bytearray(original)
    data[data.index(pixels) + 5] ^= 1
    shard.write_bytes(bytes(data))
    assert reported(out) == ["shard-00001.parquet: sha256 differs from index.json (corrupted)"]
    assert verify_dataset(out, quick=True) == []

    shard.write_bytes(original[: len(original) // 2])
    problems = reported(out)
    assert problems[0] == (f"shard-00001.parquet: {len(original) // 2} bytes on disk, index.json "
                           f"says {len(original)}")
    assert problems[1].startswith("shard-00001.parquet: not a readable Parquet file: ")
    assert len(problems) == 2

    table = pq.read_table(io.BytesIO(original)).drop_columns(["source"])
    pq.write_table(table, shard)
    problems = reported(out, quick=True)
    assert problems[0].startswith("shard-00001.parquet: ") and "bytes on disk" in problems[0]
    assert problems[1].startswith("shard-00001.parquet: columns are (key: string, image: "
                                  "fixed_size_binary[240], label: int64, orig_width: int32, ")
