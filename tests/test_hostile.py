"""Hostile inputs end to end: one mixed source tree through `shardkit.convert`, and for every
input exactly where it ended up (a sample with checked pixels, label and metadata, or an
``errors.jsonl`` line with the exact stage and reason), as docs/format.md promises.

`tests/test_images.py` checks the same cases on `load_image` alone; here they travel through
listing, the worker pool, the writers and the reader. Expected pixels are computed with
Pillow or known in advance (solid colours), never with shardkit's own image code.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

import shardkit
from shardkit.tools.synth import photo_like

# A FIFO that were opened would block forever: every test here must end.
pytestmark = pytest.mark.timeout(120)

SIZE = (16, 12)  # output width × height
SHAPE = (12, 16, 3)
BICUBIC = Image.Resampling.BICUBIC
DEFAULT_FILTER = Image.Resampling.BILINEAR  # ImageOptions.filter's default
ERROR_KEYS = {"index", "key", "path", "stage", "reason", "detail"}
RED, BLUE = (255, 0, 0), (0, 0, 255)

Check = Callable[[np.ndarray, dict[str, Any]], None]


@dataclass(frozen=True)
class Stored:
    """The input is a sample with this label; `check` looks at its pixels and metadata."""

    label: int
    check: Check


@dataclass(frozen=True)
class Failed:
    """The input is an errors.jsonl line with this stage and reason."""

    stage: str
    reason: str


Expectation = Stored | Failed


# --- building the tree ---------------------------------------------------------------------


def solid(colour: tuple[int, int, int], tolerance: int = 0) -> Check:
    def check(pixels: np.ndarray, meta: dict[str, Any]) -> None:
        diff = np.abs(pixels.astype(np.int16) - np.array(colour, dtype=np.int16))
        assert diff.max() <= tolerance, f"{meta['source']}: {pixels[0, 0]} is not {colour}"

    return check


def save_solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30),
               **save: Any) -> None:
    Image.new("RGB", size, colour).save(path, **save)


def patch_png_size(path: Path, width: int, height: int) -> None:
    """Rewrite the IHDR width/height and its CRC, leaving the (tiny) pixel data alone."""
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def make_huge_png(path: Path) -> None:
    """A 16×16 PNG whose header claims 40000×40000 (4.8 GB of RGB once decoded)."""
    photo_like(16, 16, np.random.default_rng(7)).save(path)
    patch_png_size(path, 40_000, 40_000)
    assert struct.unpack(">II", path.read_bytes()[16:24]) == (40_000, 40_000)


def cmyk_case(path: Path) -> Check:
    """A smooth CMYK picture: 64×48 goes through JPEG draft (1/4 scale) by default, and fine
    texture would make draft differ from this full-size reference by itself (a mean of ~2.2
    for photo_like at 64×48, ~2.6 for the same picture in RGB); smooth content isolates the
    CMYK → RGB conversion."""
    smooth = photo_like(16, 12, np.random.default_rng(2)).resize((64, 48), BICUBIC)
    smooth.convert("CMYK").save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        expected = np.asarray(ImageOps.fit(im.convert("RGB"), SIZE, method=DEFAULT_FILTER), dtype=np.int16)
    assert expected.std() > 20  # a picture, not a flat colour that anything would match

    def check(pixels: np.ndarray, meta: dict[str, Any]) -> None:
        assert float(np.abs(pixels.astype(np.int16) - expected).mean()) < 2.0

    return check


def sixteen_bit_case(path: Path, value: int, expected: int) -> Check:
    Image.fromarray(np.full((30, 40), value, dtype=np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    return solid((expected,) * 3)  # type: ignore[arg-type]


def palette_clear_case(path: Path) -> Check:
    im = Image.new("P", (40, 30), 3)
    im.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 10, 10] + [0] * (256 * 3 - 12))
    im.save(path, transparency=3)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info["transparency"] == 3
    return solid((255, 255, 255))


def exif_rotated_case(path: Path) -> Check:
    """Stored 64×32, left half red, right half blue, EXIF orientation 6 (displayed rotated 90°
    clockwise): the displayed picture is 32 wide × 64 tall, red on top. Center-crop to 16×12
    keeps rows 20..44 of it, so the red/blue border falls between output rows 5 and 6."""
    pixels = np.empty((32, 64, 3), dtype=np.uint8)
    pixels[:, :32], pixels[:, 32:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels, "RGB").save(path, exif=exif, quality=95)

    def check(out: np.ndarray, meta: dict[str, Any]) -> None:
        assert (meta["orig_width"], meta["orig_height"]) == (32, 64)
        solid(RED, 40)(out[:4], meta)
        solid(BLUE, 40)(out[-4:], meta)

    return check


def build_tree(src: Path, elsewhere: Path) -> dict[str, Expectation]:
    """Write the hostile tree; return {source path: expectation} for every input, i.e. every
    visible image-named entry (hidden ones and non-image names are written but not listed)."""
    good, odd = src / "good", src / "odd"
    for folder in (good, odd, odd / "deep", odd / "Ünïcode dir", elsewhere):
        folder.mkdir(parents=True)
    expected: dict[str, Expectation] = {}

    def stored(name: str, label: int, check: Check) -> None:
        expected[name] = Stored(label, check)

    # good/ (label 0): images that must come out right
    save_solid(good / "a_solid.png", (200, 60, 30))
    stored("good/a_solid.png", 0, solid((200, 60, 30)))
    save_solid(good / "IMG.JPG", (30, 90, 200), format="JPEG", quality=95)
    stored("good/IMG.JPG", 0, solid((30, 90, 200), 4))
    save_solid(good / "X.PnG", (90, 200, 40), format="PNG")
    stored("good/X.PnG", 0, solid((90, 200, 40)))
    stored("good/cmyk.jpg", 0, cmyk_case(good / "cmyk.jpg"))
    stored("good/deep16_max.png", 0, sixteen_bit_case(good / "deep16_max.png", 65535, 255))
    stored("good/deep16_mid.png", 0, sixteen_bit_case(good / "deep16_mid.png", 32768, 128))
    stored("good/palette_clear.png", 0, palette_clear_case(good / "palette_clear.png"))
    Image.new("RGBA", (40, 30), (10, 20, 30, 0)).save(good / "rgba_clear.png")
    stored("good/rgba_clear.png", 0, solid((255, 255, 255)))
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, BLUE)]
    frames[0].save(good / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    stored("good/anim.gif", 0, solid(RED))
    stored("good/exif6.jpg", 0, exif_rotated_case(good / "exif6.jpg"))
    save_solid(good / "thin_64x640.jpg", (220, 220, 40), size=(64, 640), quality=95)
    stored("good/thin_64x640.jpg", 0, solid((220, 220, 40), 4))
    save_solid(good / "thin_1x1000.png", (40, 220, 220), size=(1, 1000))
    stored("good/thin_1x1000.png", 0, solid((40, 220, 220)))
    # symbolic links: followed to a file outside SRC; dangling
    save_solid(elsewhere / "target.png", (10, 200, 30))
    (good / "linked.png").symlink_to(elsewhere / "target.png")
    stored("good/linked.png", 0, solid((10, 200, 30)))
    (good / "gone.jpg").symlink_to(elsewhere / "deleted.jpg")
    expected["good/gone.jpg"] = Failed("read", "missing_file")
    # a FIFO named like an image: opening it would block
    os.mkfifo(good / "pipe.jpg")
    expected["good/pipe.jpg"] = Failed("plan", "not_a_file")
    # not inputs: hidden files, hidden folders, other extensions
    save_solid(good / ".hidden.jpg", (1, 2, 3), format="JPEG")
    (good / ".cache").mkdir()
    save_solid(good / ".cache" / "x.jpg", (1, 2, 3), format="JPEG")
    (good / "notes.txt").write_text("not an image\n")

    # odd/ (label 1): odd names, broken files, loops
    save_solid(odd / "naïve café 猫.png", (120, 40, 160))
    stored("odd/naïve café 猫.png", 1, solid((120, 40, 160)))
    save_solid(odd / "Ünïcode dir" / "photo 1.jpeg", (160, 160, 160), quality=95)
    stored("odd/Ünïcode dir/photo 1.jpeg", 1, solid((160, 160, 160), 4))
    whole = photo_like(64, 48, np.random.default_rng(1))
    whole.save(elsewhere / "whole.jpg")
    data = (elsewhere / "whole.jpg").read_bytes()
    (odd / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["odd/truncated.jpg"] = Failed("decode", "truncated")
    (odd / "empty.jpg").write_bytes(b"")
    expected["odd/empty.jpg"] = Failed("read", "empty_file")
    (odd / "text.jpg").write_text("this is not an image\n")
    expected["odd/text.jpg"] = Failed("decode", "not_an_image")
    make_huge_png(odd / "huge.png")
    expected["odd/huge.png"] = Failed("decode", "too_many_pixels")
    save_solid(odd / "deep" / "inner.png", (70, 70, 70))
    stored("odd/deep/inner.png", 1, solid((70, 70, 70)))
    (odd / "deep" / "parent").symlink_to("..")  # odd/deep/parent -> odd: a loop
    (odd / "deep" / "top").symlink_to(src)  # back to SRC itself: another loop

    # SRC itself: an image next to the class folders has no label
    save_solid(src / "stray.png", (5, 5, 5))
    expected["stray.png"] = Failed("plan", "outside_class_folder")
    (src / "notes.txt").write_text("not an image\n")
    save_solid(src / ".hidden_root.png", (1, 2, 3))
    (src / ".cache").mkdir()  # a hidden folder is not a class
    save_solid(src / ".cache" / "y.jpg", (1, 2, 3), format="JPEG")
    return expected


# --- reading the result back ---------------------------------------------------------------


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_errors(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text("utf-8").splitlines()]


def stored_samples(out: Path) -> dict[str, tuple[np.ndarray, int, dict[str, Any]]]:
    """{source: (pixels, label, metadata)} of every sample, read with shardkit's reader;
    a source appearing twice fails."""
    dataset = shardkit.open(out)
    samples: dict[str, tuple[np.ndarray, int, dict[str, Any]]] = {}
    for number in range(len(dataset.manifest.shards)):
        shard = dataset.read_shard(number)
        metadata = dataset.metadata(number)
        assert shard.labels is not None
        assert len(metadata) == len(shard.images) == len(shard.labels)
        for pixels, label, meta in zip(shard.images, shard.labels, metadata, strict=True):
            assert meta["source"] not in samples, f"{meta['source']} stored twice"
            samples[meta["source"]] = (np.asarray(pixels), int(label), meta)
    return samples


def tar_keys(out: Path) -> dict[str, str]:
    """{source: key} from the tar members themselves (plain tarfile, not shardkit)."""
    keys: dict[str, str] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, field = member.name.partition(".")
                if field == "json":
                    handle = archive.extractfile(member)
                    assert handle is not None
                    keys[json.loads(handle.read())["source"]] = key
    return keys


# --- the conversion, once for the module ---------------------------------------------------


@dataclass(frozen=True)
class Converted:
    src: Path
    out: Path
    expected: dict[str, Expectation]
    summary: shardkit.ConvertSummary


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    root = tmp_path_factory.mktemp("hostile")
    src, out = root / "src", root / "out"
    expected = build_tree(src, root / "elsewhere")
    summary = shardkit.convert(src, out, size=SIZE, workers=2, max_errors="100%")
    return Converted(src, out, expected, summary)


def test_every_input_is_accounted_for(converted: Converted) -> None:
    expected, out = converted.expected, converted.out
    stored = {s: e for s, e in expected.items() if isinstance(e, Stored)}
    failed = {s: e for s, e in expected.items() if isinstance(e, Failed)}
    summary = converted.summary
    assert (summary.inputs, summary.samples, summary.failed) == (len(expected), len(stored), len(failed))
    index = json.loads((out / "index.json").read_text("utf-8"))
    assert (index["inputs"], index["samples"], index["failed"]) == (len(expected), len(stored), len(failed))
    assert index["classes"] == ["good", "odd"]
    labels = Counter(e.label for e in stored.values())
    assert index["class_counts"] == [labels[0], labels[1]]

    samples = stored_samples(out)
    assert set(samples) == set(stored)
    for source, (pixels, label, meta) in samples.items():
        assert pixels.shape == SHAPE, source
        assert pixels.dtype == np.uint8
        assert label == stored[source].label, source
        assert meta["class"] == ["good", "odd"][label]
        stored[source].check(pixels, meta)

    errors = read_errors(out)
    assert {e["path"]: (e["stage"], e["reason"]) for e in errors} == {
        s: (e.stage, e.reason) for s, e in failed.items()
    }
    assert len(errors) == len(failed)


def test_thin_and_rotated_sizes_in_metadata(converted: Converted) -> None:
    samples = stored_samples(converted.out)
    sizes = {s: (m["orig_width"], m["orig_height"]) for s, (_, _, m) in samples.items()}
    assert sizes["good/thin_64x640.jpg"] == (64, 640)
    assert sizes["good/thin_1x1000.png"] == (1, 1000)
    assert sizes["good/exif6.jpg"] == (32, 64)  # after orientation, not the stored 64×32


def test_loops_list_each_real_image_once(converted: Converted) -> None:
    sources = list(stored_samples(converted.out)) + [e["path"] for e in read_errors(converted.out)]
    assert Counter(sources).most_common(1)[0][1] == 1
    assert not [s for s in sources if "/parent/" in s or "/top/" in s]
    assert set(sources) == set(converted.expected)


def test_workers_do_not_change_the_bytes(converted: Converted, tmp_path: Path) -> None:
    inline = tmp_path / "out0"
    summary = shardkit.convert(converted.src, inline, size=SIZE, workers=0, max_errors="100%")
    assert (summary.inputs, summary.samples, summary.failed) == (
        converted.summary.inputs, converted.summary.samples, converted.summary.failed)
    hashes = tree_hashes(inline)
    assert {"index.json", "errors.jsonl"} <= set(hashes)
    assert hashes == tree_hashes(converted.out)


def test_error_report_order_keys_and_gaps(converted: Converted) -> None:
    errors = read_errors(converted.out)
    assert errors, "the tree has failures"
    for error in errors:
        assert set(error) == ERROR_KEYS
        assert isinstance(error["detail"], str) and error["detail"]
        if error["stage"] == "plan":
            assert error["index"] is None and error["key"] is None
        else:
            assert error["key"] == f"{error['index']:06d}"
    # Listing failures first, by path; then the others by plan index.
    listing = [e for e in errors if e["index"] is None]
    assert errors[: len(listing)] == listing
    assert [e["path"] for e in listing] == sorted(e["path"] for e in listing)
    planned = [e["index"] for e in errors[len(listing):]]
    assert planned == sorted(planned) and None not in planned

    # Failed inputs leave gaps in the keys: none of their keys names a tar member, and the
    # stored keys and the failed keys together are exactly the plan's indices.
    members = set()
    for shard in sorted(converted.out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            members |= {m.name.partition(".")[0] for m in archive.getmembers()}
    failed_keys = {e["key"] for e in errors if e["key"] is not None}
    assert not failed_keys & members
    keys = tar_keys(converted.out)
    assert set(keys.values()) == members
    assert sorted(members | failed_keys) == [f"{i:06d}" for i in range(len(members) + len(failed_keys))]
    # Within the shards, samples follow key order.
    sources = list(stored_samples(converted.out))
    assert [keys[s] for s in sources] == sorted(keys[s] for s in sources)


# --- memory: a header that claims 4.8 GB ---------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_pixel_bomb(path: Path, rows: int = 4000) -> None:
    """A 2 MB PNG claiming 40000×40000 RGB, whose data really holds `rows` rows of zeros (about
    0.5 GB decoded) before it ends: a decoder that ignores the header limit fills that much
    memory before it fails as truncated, so the peak RSS tells whether the limit held."""
    row = bytes(1 + 40_000 * 3)  # filter byte + pixels
    deflate = zlib.compressobj(1)
    body = b"".join(deflate.compress(row * 100) for _ in range(rows // 100))
    body += deflate.flush(zlib.Z_SYNC_FLUSH)  # not Z_FINISH: the stream is cut, as in a bomb
    header = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body)
                     + png_chunk(b"IEND", b""))


# Runs a command and prints its exit status and peak RSS (KiB). A separate measuring process,
# so the peak is this conversion's, not that of anything else this test session ran.
MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.stderr.write(done.stdout + done.stderr)
"""


def convert_peak_rss(src: Path, out: Path, *options: str) -> int:
    """Peak RSS in KiB of ``python -m shardkit convert`` with --workers 0. Workers are not
    measured: they are forkserver children, which the convert process never waits for, so
    RUSAGE_CHILDREN would not see their peak; with --workers 0 the decoding happens in the
    measured process."""
    command = [sys.executable, "-m", "shardkit", "convert", str(src), str(out), "--size", "16x12",
               "--workers", "0", "--max-errors", "100%", "--no-progress", *options]
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True,
                          timeout=100)
    returncode, peak_kib = (int(v) for v in done.stdout.split())
    assert returncode == 0, done.stderr
    return peak_kib


def test_pixel_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_pixel_bomb(src / "huge.png")
    save_solid(src / "fine.png", (50, 100, 150))
    peak_kib = convert_peak_rss(src, tmp_path / "out")
    assert 10 * 1024 < peak_kib < 400 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert [(e["path"], e["stage"], e["reason"]) for e in read_errors(tmp_path / "out")] == [
        ("huge.png", "decode", "too_many_pixels")]
    dataset = shardkit.open(tmp_path / "out")
    assert dataset.classes is None and len(dataset) == 1
    np.testing.assert_array_equal(dataset.read_shard(0).images[0], np.full(SHAPE, (50, 100, 150)))

    # Control: with the limit lifted the same file is decoded until it runs out, and the
    # measurement sees it (so the bound above is not vacuous).
    lifted = convert_peak_rss(src, tmp_path / "lifted", "--max-pixels", "2000000000")
    assert lifted > 400 * 1024, f"peak RSS {lifted / 1024:.0f} MiB without the limit"
    assert [e["reason"] for e in read_errors(tmp_path / "lifted")] == ["truncated"]


# --- permissions ---------------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    save_solid(src / "fine.png", (50, 100, 150))
    locked = src / "locked.png"
    save_solid(locked, (1, 2, 3))
    locked.chmod(0)
    try:
        if os.geteuid() == 0:
            pytest.skip("running as root: chmod 000 does not stop root from reading")
        if os.access(locked, os.R_OK):
            pytest.skip("this filesystem lets us read a chmod 000 file")
        # Inline (workers=0): the read path is the same as in a worker, and this test is meant
        # for unprivileged users, some of whom cannot start a process pool in a sandbox.
        summary = shardkit.convert(src, out, size=SIZE, workers=0, max_errors="100%")
        assert (summary.inputs, summary.samples, summary.failed) == (2, 1, 1)
        assert [(e["path"], e["stage"], e["reason"]) for e in read_errors(out)] == [
            ("locked.png", "read", "unreadable")]
    finally:
        locked.chmod(0o644)
