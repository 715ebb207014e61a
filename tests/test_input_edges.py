"""Awkward inputs at the edges of the listing and the decoders, end to end through
`shardkit.convert`: corrupt PNG data, file names that are not UTF-8, integers past int64,
splits of a source with no usable input, a quoted newline in a CSV header, an empty label
column. Every input ends up in the output or in errors.jsonl (samples + failed == inputs)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import shardkit
from shardkit.cli import main


def errors(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def convert(src: Path, out: Path, **options: object) -> shardkit.ConvertSummary:
    return shardkit.convert(src, out, size=8, workers=0, progress=False,
                            **options)  # type: ignore[arg-type]


def png(path: Path, seed: int = 0, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def balanced(summary: shardkit.ConvertSummary) -> None:
    assert summary.samples + summary.failed == summary.inputs


# --- corrupt PNG data --------------------------------------------------------------------


def _idat_span(data: bytes) -> tuple[int, int]:
    """(start, end) of the first IDAT chunk's data in the bytes of a PNG."""
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        if data[at + 4:at + 8] == b"IDAT":
            return at + 8, at + 8 + length
        at += 12 + length
    raise AssertionError("no IDAT chunk")


def _pillow_rejects(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError, EOFError):
        return True
    return False


def test_png_with_corrupt_image_data_is_a_failure_never_a_sample(tmp_path: Path) -> None:
    src = tmp_path / "src"
    png(src / "good.png")
    data = (src / "good.png").read_bytes()
    start, end = _idat_span(data)
    flipped = []
    for offset in np.linspace(start + 2, end - 5, 24).astype(int).tolist():
        damaged = bytearray(data)
        damaged[offset] ^= 0x5A
        path = src / f"flip{offset:06d}.png"
        path.write_bytes(bytes(damaged))
        if _pillow_rejects(path):
            flipped.append(path.name)
        else:
            path.unlink()  # Pillow itself decodes it: garbage pixels are all anyone can tell
    assert len(flipped) >= 5
    summary = convert(src, tmp_path / "out", max_errors="100%")
    balanced(summary)
    assert (summary.inputs, summary.samples, summary.failed) == (len(flipped) + 1, 1, len(flipped))
    report = errors(tmp_path / "out")
    assert sorted(str(e["path"]) for e in report) == flipped
    assert {(e["stage"], e["reason"]) for e in report} <= {("decode", "decode_error"),
                                                          ("decode", "truncated")}
    assert all(e["detail"] for e in report)


def test_png_with_a_malformed_exif_block_still_converts_upright(tmp_path: Path) -> None:
    src = tmp_path / "src"
    png(src / "a.png", size=12)
    with Image.open(src / "a.png") as im:
        im.load()
        im.save(src / "badexif.png", exif=b"Exif\x00\x00XXjunkjunk")  # not TIFF
    with Image.open(src / "badexif.png") as im, pytest.raises(SyntaxError):
        im.load()
        im.getexif()
    summary = convert(src, tmp_path / "out")
    assert (summary.inputs, summary.samples, summary.failed) == (2, 2, 0)
    shard = shardkit.open(tmp_path / "out").read_shard(0)
    np.testing.assert_array_equal(shard.images[0], shard.images[1])


# --- file names that are not UTF-8 -------------------------------------------------------


def _raw_file(folder: Path, name: bytes, content: bytes) -> None:
    descriptor = os.open(os.fsencode(folder) + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, content)
    finally:
        os.close(descriptor)


def test_a_file_name_that_is_not_utf8_is_reported_and_the_rest_converts(tmp_path: Path) -> None:
    src = tmp_path / "src"
    png(src / "cat" / "a.png", 1, 8)
    png(src / "dog" / "b.png", 2, 8)
    _raw_file(src / "cat", b"\xff\xfename.png", (src / "cat" / "a.png").read_bytes())
    os.mkdir(os.fsencode(src / "dog") + b"/sub\xe9")
    _raw_file(src / "dog", b"sub\xe9/c.png", (src / "dog" / "b.png").read_bytes())
    summary = convert(src, tmp_path / "out", max_errors=2)
    balanced(summary)
    assert (summary.inputs, summary.samples, summary.failed) == (4, 2, 2)
    report = errors(tmp_path / "out")
    assert [(e["path"], e["stage"], e["reason"]) for e in report] == [
        ("cat/\\xff\\xfename.png", "plan", "bad_name"), ("dog/sub\\xe9/c.png", "plan", "bad_name")]
    assert report[0]["detail"] == "the file name is not valid UTF-8"
    assert "not valid UTF-8" in str(report[1]["detail"])
    assert shardkit.open(tmp_path / "out").classes == ["cat", "dog"]


def test_a_flat_folder_file_name_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    png(src / "a.png", 1, 8)
    _raw_file(src, b"b\x80.png", (src / "a.png").read_bytes())
    summary = convert(src, tmp_path / "out", max_errors=1)
    assert (summary.inputs, summary.samples, summary.failed) == (2, 1, 1)
    assert [(e["path"], e["reason"]) for e in errors(tmp_path / "out")] == [("b\\x80.png", "bad_name")]


def test_a_class_folder_name_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    png(src / "cat" / "a.png", 1, 8)
    os.mkdir(os.fsencode(src) + b"/d\xf6g")
    _raw_file(src, b"d\xf6g/b.png", (src / "cat" / "a.png").read_bytes())
    with pytest.raises(shardkit.InputError, match=r"d\\xf6g.*not valid UTF-8"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- integers past int64 -----------------------------------------------------------------


def _images(root: Path, count: int) -> None:
    for i in range(count):
        png(root / "imgs" / f"{i}.png", i, 8)


@pytest.mark.parametrize("column", ["big", "label"])
def test_an_integer_past_int64_in_an_image_csv_is_a_bad_row(tmp_path: Path, column: str) -> None:
    _images(tmp_path, 4)
    huge = {"big": ("99999999999999999999", "1"), "label": ("1", "-99999999999999999999")}[column]
    (tmp_path / "t.csv").write_text(
        "image,label,big\n"
        f"imgs/0.png,{huge[1]},{huge[0]}\n"      # row 2: out of range
        "imgs/1.png,2,9223372036854775807\n"     # row 3: int64's largest, kept
        "imgs/2.png,0,-9223372036854775808\n"    # row 4: int64's smallest, kept
        "imgs/3.png,1,3\n")
    summary = convert(tmp_path / "t.csv", tmp_path / "out", image_col="image", label_col="label",
                      max_errors=1)
    balanced(summary)
    assert (summary.inputs, summary.samples, summary.failed) == (4, 3, 1)
    (bad,) = errors(tmp_path / "out")
    assert (bad["row"], bad["stage"], bad["reason"]) == (2, "plan", "out_of_range")
    assert repr(column) in str(bad["detail"]) and "99999999999999999999" in str(bad["detail"])
    dataset = shardkit.open(tmp_path / "out")
    labels = dataset.read_shard(0).labels
    assert labels is not None and labels.tolist() == [2, 0, 1]
    assert [m["big"] for m in dataset.metadata(0)] == [2**63 - 1, -2**63, 3]


def test_an_integer_past_int64_in_a_kept_int_column_is_a_bad_row(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("n,y\n5,0\n99999999999999999999,1\n-7,1\n")
    summary = shardkit.convert(tmp_path / "t.csv", tmp_path / "out", label_col="y", keep_ints=True,
                               max_errors=1, progress=False)
    balanced(summary)
    assert (summary.inputs, summary.samples, summary.failed) == (3, 2, 1)
    assert [(e["row"], e["reason"]) for e in errors(tmp_path / "out")] == [(3, "out_of_range")]
    table = pq.read_table(tmp_path / "out" / "shard-00000.parquet")
    assert table.column("row").to_pylist() == [2, 4]
    assert table.column("n").to_pylist() == [5, -7]


# --- splits of a source with no usable input ---------------------------------------------


def _nothing_usable(src: Path) -> None:
    (src / "emptyclass").mkdir(parents=True)
    for i in range(4):
        png(src / f"img{i:03d}.png", i, 8)


@pytest.mark.parametrize("split", [{"validation_split": 0.25}, {"split": "train=0.75,val=0.25"}])
def test_a_split_of_a_source_with_no_usable_input_reports_like_no_split(
        tmp_path: Path, split: dict[str, object]) -> None:
    _nothing_usable(tmp_path / "src")
    plain = convert(tmp_path / "src", tmp_path / "plain", max_errors="100%")
    summary = convert(tmp_path / "src", tmp_path / "out", max_errors="100%", **split)
    assert (plain.inputs, plain.samples, plain.failed) == (4, 0, 4)
    assert (summary.inputs, summary.samples, summary.failed) == (4, 0, 4)
    assert errors(tmp_path / "out" / "train") == errors(tmp_path / "plain")
    assert {e["reason"] for e in errors(tmp_path / "out" / "train")} == {"outside_class_folder"}
    assert errors(tmp_path / "out" / "val") == []
    for part in ("train", "val"):
        manifest = shardkit.open(tmp_path / "out" / part).manifest
        assert manifest.inputs == manifest.samples + manifest.failed
        assert manifest.samples == 0


def test_a_split_of_a_source_with_no_usable_input_from_the_command_line(tmp_path: Path) -> None:
    _nothing_usable(tmp_path / "z1")
    assert main(["convert", str(tmp_path / "z1"), str(tmp_path / "ox"), "--size", "8",
                 "--validation-split", "0.25", "--max-errors", "100%", "--workers", "0"]) == 0
    assert len(errors(tmp_path / "ox" / "train")) == 4


def test_a_split_of_a_table_with_no_good_row_reports_every_row(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("x,y\n1,\n2,\n")
    summary = shardkit.convert(tmp_path / "t.csv", tmp_path / "out", label_col="y",
                               split="train=0.5,val=0.5", max_errors="100%", progress=False)
    assert (summary.inputs, summary.samples, summary.failed) == (2, 0, 2)
    assert [(e["row"], e["reason"]) for e in errors(tmp_path / "out" / "train")] == [
        (2, "missing_label"), (3, "missing_label")]
    assert errors(tmp_path / "out" / "val") == []


def test_too_many_failures_in_a_split_names_every_part_report_holding_some(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("cat", "dog"):
        for i in range(4):
            png(src / name / f"{i}.png", i, 8)
            (src / name / f"bad{i}.png").write_bytes(b"not an image")
    with pytest.raises(shardkit.TooManyFailuresError) as caught:
        convert(src, tmp_path / "out", split="train=0.5,val=0.5", max_errors=0)
    parts = [p for p in ("train", "val") if errors(tmp_path / "out" / p)]
    assert parts == ["train", "val"]
    for part in parts:
        assert str(tmp_path / "out" / part / "errors.jsonl") in str(caught.value)
    # A part without failures is not named.
    lone = tmp_path / "lone"
    for name in ("cat", "dog"):
        for i in range(4):
            png(lone / name / f"{i}.png", i, 8)
    (lone / "cat" / "broken.png").write_bytes(b"")
    with pytest.raises(shardkit.TooManyFailuresError) as caught:
        convert(lone, tmp_path / "one", split="train=0.5,val=0.5", max_errors=0)
    (holder,) = [p for p in ("train", "val") if errors(tmp_path / "one" / p)]
    (other,) = {"train", "val"} - {holder}
    assert str(tmp_path / "one" / holder / "errors.jsonl") in str(caught.value)
    assert str(tmp_path / "one" / other / "errors.jsonl") not in str(caught.value)


# --- a quoted newline in a CSV header ------------------------------------------------------


def test_a_quoted_newline_in_an_image_csv_header_keeps_rows_and_numbers(tmp_path: Path) -> None:
    _images(tmp_path, 2)
    (tmp_path / "h.csv").write_text('"im\nage",label\nimgs/0.png,1\nimgs/1.png,2\nimgs/9.png,1,x\n')
    summary = convert(tmp_path / "h.csv", tmp_path / "out", image_col="im\nage", label_col="label",
                      max_errors=1)
    balanced(summary)
    assert (summary.inputs, summary.samples, summary.failed) == (3, 2, 1)
    assert [(e["row"], e["reason"]) for e in errors(tmp_path / "out")] == [(4, "wrong_field_count")]
    labels = shardkit.open(tmp_path / "out").read_shard(0).labels
    assert labels is not None and labels.tolist() == [1, 2]


def test_a_quoted_newline_in_a_table_header_keeps_rows_and_numbers(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text('"a\nb",y\n1,0\n"2",1\n3\n4,1\n')
    summary = shardkit.convert(tmp_path / "h.csv", tmp_path / "out", label_col="y", max_errors=1,
                               progress=False)
    assert (summary.inputs, summary.samples, summary.failed) == (4, 3, 1)
    assert [(e["row"], e["reason"]) for e in errors(tmp_path / "out")] == [(4, "wrong_field_count")]
    table = pq.read_table(tmp_path / "out" / "shard-00000.parquet")
    assert table.column("row").to_pylist() == [2, 3, 5]
    assert table.column("a\nb").to_pylist() == [1.0, 2.0, 4.0]


# --- an empty label column ---------------------------------------------------------------


def test_an_image_csv_whose_label_column_is_empty_reports_every_row(tmp_path: Path) -> None:
    _images(tmp_path, 2)
    (tmp_path / "t.csv").write_text("image,label\nimgs/0.png,\nimgs/1.png,\n")
    summary = convert(tmp_path / "t.csv", tmp_path / "out", image_col="image", label_col="label",
                      max_errors="100%")
    assert (summary.inputs, summary.samples, summary.failed) == (2, 0, 2)
    assert [(e["row"], e["reason"]) for e in errors(tmp_path / "out")] == [
        (2, "missing_label"), (3, "missing_label")]


@pytest.mark.parametrize("codec", ["jpeg", "png"])
def test_compression_applies_to_an_encoded_image_column(tmp_path: Path, codec: str) -> None:
    """The Image struct's bytes leaf takes --compression (the column was keyed by its name,
    which a struct's leaves do not have, and stayed uncompressed)."""
    for k in range(4):
        png(tmp_path / "src" / "a" / f"{k}.png", seed=k, size=16)
    images = {}
    for compression in ("none", "zstd"):
        out = tmp_path / compression
        convert(tmp_path / "src", out, format="parquet", codec=codec, compression=compression)
        meta = pq.read_metadata(out / "shard-00000.parquet")
        leaves = {meta.schema.column(i).path: meta.row_group(0).column(i).compression
                  for i in range(meta.num_columns)}
        assert leaves["image.bytes"] == {"none": "UNCOMPRESSED", "zstd": "ZSTD"}[compression]
        images[compression] = shardkit.open(out).read_shard(0).images
    np.testing.assert_array_equal(images["none"], images["zstd"])


def test_infinities_in_an_image_csv_are_null_metadata_or_a_bad_target(tmp_path: Path) -> None:
    """JSON has no infinity: a float metadata column's inf is null (tar and Parquet alike), an
    infinite target fails its row; every .json member is strict JSON."""
    for k in range(3):
        png(tmp_path / "imgs" / f"{k}.png", seed=k, size=16)
    csv = tmp_path / "rows.csv"
    csv.write_text("image,w,dx,dy\nimgs/0.png,inf,1,2\nimgs/1.png,-Infinity,inf,3\nimgs/2.png,1.5,4,5\n")
    for fmt in ("tar", "parquet"):
        out = tmp_path / fmt
        summary = convert(csv, out, image_col="image", label_col="dx,dy", format=fmt, max_errors=1)
        balanced(summary)
        assert summary.samples == 2 and summary.reasons == {"bad_label": 1}
        assert errors(out)[0]["row"] == 3 and "not a finite target" in errors(out)[0]["detail"]
        data = shardkit.open(out)
        assert [m["w"] for m in data.metadata(0)] == [None, 1.5]
    import tarfile

    with tarfile.open(tmp_path / "tar" / "shard-00000.tar") as archive:
        texts = [archive.extractfile(m).read() for m in archive  # type: ignore[union-attr]
                 if m.name.endswith(".json")]
    constants: list[str] = []
    for text in texts:
        json.loads(text, parse_constant=constants.append)
    assert len(texts) == 2 and constants == []  # no Infinity, -Infinity or NaN


def test_a_transparency_key_of_a_1_bit_or_16_bit_grey_png_is_composited(tmp_path: Path) -> None:
    """PNG's tRNS for grey images: Pillow keeps it in info for 1-bit and 16-bit files too; the
    keyed pixels go on the background as for L, P and RGB (they were kept as they were)."""
    from shardkit.config import ImageOptions
    from shardkit.conversion.images import load_image

    one_bit, wide = tmp_path / "one.png", tmp_path / "wide.png"
    Image.fromarray(np.array([[0, 1], [1, 0]], bool)).save(one_bit, transparency=1)
    Image.fromarray(np.array([[0, 65535], [65535, 0]], np.uint16)).save(wide, transparency=0)
    options = ImageOptions(size=(2, 2), resize="stretch", background=(10, 200, 30))
    green, black, white = [10, 200, 30], [0, 0, 0], [255, 255, 255]
    assert np.asarray(load_image(one_bit, options)[0]).tolist() == [[black, green], [green, black]]
    assert np.asarray(load_image(wide, options)[0]).tolist() == [[green, white], [white, green]]
    # Pillow agrees on which 1-bit pixels are transparent.
    assert np.asarray(Image.open(one_bit).convert("RGBA"))[..., 3].tolist() == [[255, 0], [0, 255]]
    # Without a key nothing changes; in mode L the keyed pixel is the background's luma.
    Image.fromarray(np.array([[0, 1], [1, 0]], bool)).save(tmp_path / "plain.png")
    plain = np.asarray(load_image(tmp_path / "plain.png", options)[0])
    assert plain.tolist() == [[black, white], [white, black]]
    grey = np.asarray(load_image(one_bit, ImageOptions(size=(2, 2), resize="stretch", mode="L",
                                                       background=(10, 200, 30)))[0])
    luma = Image.new("RGB", (1, 1), (10, 200, 30)).convert("L").getpixel((0, 0))
    assert grey.tolist() == [[0, luma], [luma, 0]]


# --- folders linked from two places ---------------------------------------------------------


def test_a_folder_linked_from_two_places_is_listed_under_each_as_imagefolder_does(
        tmp_path: Path) -> None:
    # cat/also_dog -> ../dog (a class folder linked into another class) and shared/ linked into
    # both: one set of every folder seen skipped dog/ itself (its images labelled cat) and the
    # second link to shared/, with nothing reported. A loop (cat/up -> ..) is still not followed.
    from torchvision.datasets import ImageFolder

    root = tmp_path / "train"
    for name in ("cat/c0.png", "cat/c1.png", "dog/d0.png", "dog/d1.png", "dog/d2.png"):
        png(root / name, seed=len(name) + ord(name[-5]))
    png(tmp_path / "shared" / "s.png", seed=9)
    (root / "cat" / "also_dog").symlink_to("../dog")
    (root / "cat" / "shared").symlink_to(tmp_path / "shared")
    (root / "dog" / "shared").symlink_to(tmp_path / "shared")
    (root / "dog" / "up").symlink_to("..")
    summary = convert(root, tmp_path / "out")
    dataset = shardkit.open(tmp_path / "out")
    listed = [(m["source"], m["class"]) for k in range(len(dataset.manifest.shards))
              for m in dataset.metadata(k)]
    assert listed == [("cat/also_dog/d0.png", "cat"), ("cat/also_dog/d1.png", "cat"),
                      ("cat/also_dog/d2.png", "cat"), ("cat/also_dog/shared/s.png", "cat"),
                      ("cat/c0.png", "cat"), ("cat/c1.png", "cat"), ("cat/shared/s.png", "cat"),
                      ("dog/d0.png", "dog"), ("dog/d1.png", "dog"), ("dog/d2.png", "dog"),
                      ("dog/shared/s.png", "dog")]  # dog/up and cat/also_dog/up: the loop
    assert (summary.samples, summary.failed) == (11, 0)
    assert dataset.manifest.class_counts == [7, 4]
    (root / "dog" / "up").unlink()  # torchvision follows a loop until the OS stops it
    folder = ImageFolder(str(root))
    assert sorted((os.path.relpath(p, root), folder.classes[c]) for p, c in folder.samples) == listed
    pixels = dataset.read_shard(0).images
    assert np.array_equal(pixels[0], pixels[7])  # cat/also_dog/d0.png is dog/d0.png


def test_a_refused_conversion_leaves_no_out_folder(tmp_path: Path) -> None:
    # A run refused before it wrote anything left the empty OUT folder it had made; one into
    # a folder that was there keeps that folder.
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(shardkit.InputError):
        convert(tmp_path / "empty.csv", tmp_path / "a" / "out")
    assert not (tmp_path / "a" / "out").exists()
    png(tmp_path / "one" / "cat" / "0.png")
    with pytest.raises(shardkit.ConfigError, match="would hold none of the 1 inputs"):
        convert(tmp_path / "one", tmp_path / "b", split="train=0.8,val=0.2")
    assert not (tmp_path / "b").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(shardkit.InputError):
        convert(tmp_path / "empty.csv", tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    assert convert(tmp_path / "one", tmp_path / "c").samples == 1  # a run that writes keeps it
