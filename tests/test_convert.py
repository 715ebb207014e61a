"""End-to-end conversion: labels, formats read back by other tools, determinism, failures."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from corpus import add_bad_files, image_tree, to_array
from PIL import Image

import shardkit
from shardkit.config import ImageOptions
from shardkit.conversion.images import load_image, pillow_limits
from shardkit.conversion.plan import PART_SAMPLES
from shardkit.tools.verify import verify_dataset


def expected_pixels(path: Path, **options: object) -> np.ndarray:
    opts = ImageOptions(**options)  # type: ignore[arg-type]
    with pillow_limits():
        image, _ = load_image(path, opts)
    return to_array(image)


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    image_tree(root, classes=("dog", "cat", "emu"), per_class=5)
    return root


def test_labels_are_sorted_class_folders(tree: Path, tmp_path: Path) -> None:
    summary = shardkit.convert(tree, tmp_path / "out", size=32, workers=0)
    assert (summary.inputs, summary.samples, summary.failed) == (15, 15, 0)
    dataset = shardkit.open(tmp_path / "out")
    assert dataset.classes == ["cat", "dog", "emu"]
    assert dataset.manifest.class_counts == [5, 5, 5]
    shard = dataset.read_shard(0)
    assert shard.labels is not None
    assert shard.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert shard.index.tolist() == list(range(15))
    sources = [m["source"] for m in dataset.metadata(0)]
    assert sources == sorted(str(p.relative_to(tree)) for p in tree.rglob("*.*"))
    for i, source in enumerate(sources):
        np.testing.assert_array_equal(shard.images[i], expected_pixels(tree / source, size=(32, 32)))


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    image_tree(tmp_path / "flat", classes=(), per_class=4)
    shardkit.convert(tmp_path / "flat", tmp_path / "t", size=16, workers=0)
    shardkit.convert(tmp_path / "flat", tmp_path / "p", size=16, workers=0, format="parquet")
    tar_ds, pq_ds = shardkit.open(tmp_path / "t"), shardkit.open(tmp_path / "p")
    assert tar_ds.classes is None and "label" not in tar_ds.manifest.schema
    with tarfile.open(tmp_path / "t" / "shard-00000.tar") as archive:
        names = archive.getnames()
    assert names[:2] == ["000000.npy", "000000.json"] and not any(n.endswith(".cls") for n in names)
    assert pq.read_schema(tmp_path / "p" / "shard-00000.parquet").names == [
        "key", "image", "source", "orig_width", "orig_height"]
    np.testing.assert_array_equal(tar_ds.read_shard(0).images, pq_ds.read_shard(0).images)


def test_tar_reads_in_webdataset_and_parquet_in_pyarrow_and_duckdb(tree: Path, tmp_path: Path) -> None:
    shardkit.convert(tree, tmp_path / "t", size=(24, 16), workers=0, samples_per_shard=4)
    shardkit.convert(tree, tmp_path / "p", size=(24, 16), workers=0, samples_per_shard=4,
                     format="parquet")
    ours = list(shardkit.open(tmp_path / "t").samples())
    assert len(ours) == 15 and ours[0]["image"].shape == (16, 24, 3)

    urls = [str(p) for p in sorted((tmp_path / "t").glob("shard-*.tar"))]
    theirs = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in theirs] == [f"{i:06d}" for i in range(15)]
    for mine, sample in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(sample["npy"], mine["image"])
        assert sample["cls"] == mine["label"]
        assert sample["json"]["class"] == ["cat", "dog", "emu"][mine["label"]]

    files = sorted((tmp_path / "p").glob("shard-*.parquet"))
    table = pq.ParquetDataset(files).read()
    assert table.schema.field("image").type.byte_width == 16 * 24 * 3
    assert table.column("label").to_pylist() == [s["label"] for s in ours]
    for row, mine in zip(table.column("image").to_pylist(), ours, strict=True):
        assert row == mine["image"].tobytes()

    glob = str(tmp_path / "p" / "shard-*.parquet")
    rows = duckdb.sql(f"SELECT key, label, image, source FROM read_parquet('{glob}') ORDER BY key").fetchall()
    assert [r[1] for r in rows] == [s["label"] for s in ours]
    assert all(r[2] == mine["image"].tobytes() for r, mine in zip(rows, ours, strict=True))
    frame = pq.read_table(files[0]).to_pandas()
    assert list(frame["key"]) == ["000000", "000001", "000002", "000003"]


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_output_is_byte_identical_for_any_worker_count(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    image_tree(src, classes=("a", "b"), per_class=70, min_side=20, max_side=40)  # > one part
    hashes = []
    for workers in (0, 1, 2):
        out = tmp_path / f"out{workers}"
        shardkit.convert(src, out, size=12, workers=workers, format=fmt, samples_per_shard=100,
                         shuffle=True, seed=3)
        hashes.append(tree_hashes(out))
    assert hashes[0] == hashes[1] == hashes[2]
    assert len([n for n in hashes[0] if n.startswith("shard-")]) == 2


def placed_runs(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: int,
                **options: object) -> list[Path]:
    """`src` converted with 0 and 2 workers (raw tar written in place: each of its `parts`
    parts placed by `TarInPlace`) and on a thread pool (part files, copied: none placed);
    asserts the three give the same files, and returns their OUTs."""
    from shardkit.conversion.writers.tar import TarInPlace

    placed: list[int] = []
    place = TarInPlace.place
    monkeypatch.setattr(TarInPlace, "place", lambda self, offset, nbytes: (
        placed.append(offset), place(self, offset, nbytes))[1])
    outs, hashes, counts = [], [], []
    with ThreadPoolExecutor(2) as pool:
        for name, how in (("w0", {"workers": 0}), ("w2", {"workers": 2}), ("copied", {"executor": pool})):
            placed.clear()
            out = tmp_path / name
            shardkit.convert(src, out, **how, **options)  # type: ignore[arg-type]
            outs.append(out)
            hashes.append(tree_hashes(out))
            counts.append(len(placed))
    assert hashes[0] == hashes[1] == hashes[2]
    assert counts == [parts, parts, 0]  # every part of the first two was placed; none copied
    return outs


def test_raw_tar_parts_behind_failed_inputs_move_down_in_place(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed-layout raw tar shards joined by this machine are written by their part tasks
    straight into the shard file, each part from where it starts when nothing fails; a failed
    input leaves its part short and the parts behind it are moved down. The shards must be
    those of part files joined by copying (any other executor), for 0 and 2 workers, with
    every sample's pixels where the reader looks for them."""
    src = tmp_path / "src"
    image_tree(src, classes=("a",), per_class=150, min_side=20, max_side=40)  # 3 parts of 64
    files = sorted((src / "a").iterdir())
    bad = (3, 64, 65, 140)  # parts 0, 1 (two) and 2 come back short
    for k in bad:
        files[k].write_bytes(b"not an image")
    runs = placed_runs(src, tmp_path, monkeypatch, 3, size=12, max_errors=4, samples_per_shard=150)
    for out in runs:
        assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl", "index.json", "shard-00000.tar"]
    assert len(files) == 150 and PART_SAMPLES == 64  # three parts, the bad inputs in each
    out = runs[1]
    assert shardkit.open(out).manifest.failed == 4
    assert verify_dataset(out) == []
    good = [k for k in range(150) if k not in bad]
    with tarfile.open(out / "shard-00000.tar") as archive:
        names = archive.getnames()
    assert names == [f"{k:06d}.{ext}" for k in good for ext in ("npy", "cls", "json")]
    batch = next(iter(shardkit.ShardLoader(out, batch_size=146, shuffle=False)))
    assert batch["index"].tolist() == list(range(146))
    for row in (2, 3, 62, 63, 64, 137, 145):  # around each moved part's first sample
        np.testing.assert_array_equal(batch["image"][row].numpy(),
                                      expected_pixels(files[good[row]], size=(12, 12)))


def test_in_place_parts_and_shards_whose_every_input_failed(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Unlabelled grey samples (no .cls member: another stride); shard 0's middle part and all
    # of shard 1 fail: an empty part to step over, then a shard of the end marker alone.
    src = tmp_path / "src"
    files = image_tree(src, classes=(), per_class=150, min_side=20, max_side=40)
    for k in [*range(64, 128), *range(140, 150)]:
        files[k].write_bytes(b"not an image")
    outs = placed_runs(src, tmp_path, monkeypatch, 4, size=10, mode="L", max_errors=74,
                       samples_per_shard=140)
    out = outs[1]
    assert verify_dataset(out) == []
    assert (out / "shard-00001.tar").read_bytes() == bytes(1024)
    with tarfile.open(out / "shard-00000.tar") as archive:
        assert archive.getnames() == [f"{k:06d}.{ext}" for k in [*range(64), *range(128, 140)]
                                      for ext in ("npy", "json")]
    batch = next(iter(shardkit.ShardLoader(out, batch_size=76, shuffle=False)))
    for row, k in ((63, 63), (64, 128), (75, 139)):
        np.testing.assert_array_equal(batch["image"][row].numpy(),
                                      expected_pixels(files[k], size=(10, 10), mode="L"))


def test_an_in_place_part_that_outgrows_its_place_fails_the_run(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A sample bigger than the layout's stride would run into the next part's place: the
    # run must fail, naming the shard, and publish nothing (never hash what it overwrote).
    from shardkit.conversion.writers.tar import TarPartWriter

    add = TarPartWriter.add

    def longer(self: TarPartWriter, sample: object) -> None:
        add(self, sample)  # type: ignore[arg-type]
        self._handle.write(bytes(512))

    monkeypatch.setattr(TarPartWriter, "add", longer)
    failed = r"shard-00000\.tar failed: part 0 wrote \d+ bytes for 15 samples"
    with pytest.raises(shardkit.WorkerError, match=failed):
        shardkit.convert(tree, tmp_path / "out", size=8, workers=0)
    assert not (tmp_path / "out" / "index.json").exists()


def test_shuffle_is_seeded_and_keeps_every_input(tree: Path, tmp_path: Path) -> None:
    def order(seed: int, name: str) -> list[str]:
        shardkit.convert(tree, tmp_path / name, size=8, workers=0, shuffle=True, seed=seed)
        return [m["source"] for m in shardkit.open(tmp_path / name).metadata(0)]

    first, again, other = order(1, "a"), order(1, "b"), order(2, "c")
    assert first == again and first != other
    assert sorted(first) == sorted(other) and len(set(first)) == 15


def test_bad_inputs_are_reported_and_counted(tree: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    image_tree(src, classes=("good",), per_class=3)
    expected = add_bad_files(src / "bad")
    (src / "stray.png").write_bytes((src / "good" / "im001.png").read_bytes())
    with pytest.raises(shardkit.TooManyFailuresError) as caught:
        shardkit.convert(src, tmp_path / "out", size=8, workers=0)
    summary = caught.value.summary
    assert isinstance(summary, shardkit.ConvertSummary)
    assert (summary.inputs, summary.samples, summary.failed) == (7, 3, 4)
    report = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(r["path"], r["reason"]) for r in report] == [
        ("stray.png", "outside_class_folder"),
        *((f"bad/{name}", reason) for name, reason in sorted(expected.items())),
    ]
    assert all(r["stage"] in ("plan", "read", "decode") and r["detail"] for r in report)
    manifest = shardkit.open(tmp_path / "out").manifest  # everything else was still written
    assert (manifest.inputs, manifest.samples, manifest.failed) == (7, 3, 4)
    assert manifest.samples + manifest.failed == manifest.inputs
    ok = shardkit.convert(src, tmp_path / "out", size=8, workers=0, overwrite=True, max_errors=4)
    assert ok.failed == 4
    assert shardkit.convert(src, tmp_path / "o2", size=8, workers=0, max_errors="60%").failed == 4
    with pytest.raises(shardkit.TooManyFailuresError):
        shardkit.convert(src, tmp_path / "o3", size=8, workers=0, max_errors="50%")


def test_refuses_non_empty_output_unless_overwrite(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(shardkit.OutputExistsError, match="not empty"):
        shardkit.convert(tree, out, size=8, workers=0)
    with pytest.raises(shardkit.OutputExistsError, match=r"precious\.txt"):
        shardkit.convert(tree, out, size=8, workers=0, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    shardkit.convert(tree, out, size=8, workers=0, samples_per_shard=4)
    assert len(list(out.glob("shard-*.tar"))) == 4
    shardkit.convert(tree, out, size=8, workers=0, overwrite=True, format="parquet")
    assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl", "index.json", "shard-00000.parquet"]


@pytest.mark.parametrize("codec", ["jpeg", "png"])
@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_encoded_codecs_round_trip(tree: Path, tmp_path: Path, codec: str, fmt: str) -> None:
    shardkit.convert(tree, tmp_path / "raw", size=20, workers=0)
    shardkit.convert(tree, tmp_path / "enc", size=20, workers=0, codec=codec, format=fmt, quality=95)
    raw = shardkit.open(tmp_path / "raw").read_shard(0)
    enc = shardkit.open(tmp_path / "enc").read_shard(0)
    assert isinstance(raw.images, np.ndarray)
    decoded = np.stack(enc.images)
    assert decoded.shape == raw.images.shape
    assert enc.labels is not None and raw.labels is not None
    np.testing.assert_array_equal(enc.labels, raw.labels)
    # Exactly what Pillow's own encode/decode of the raw pixels gives (lossless for png).
    for stored, pixels in zip(decoded, raw.images, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=codec.upper(), quality=95)
        np.testing.assert_array_equal(stored, np.asarray(Image.open(buffer).convert("RGB")))
    if codec == "png":
        np.testing.assert_array_equal(decoded, raw.images)


def test_shard_size_sets_samples_per_shard(tree: Path, tmp_path: Path) -> None:
    stride = shardkit.open(_convert(tree, tmp_path / "probe", size=8)).manifest.shards[0].layout
    assert stride is not None
    summary = shardkit.convert(tree, tmp_path / "out", size=8, workers=0,
                               shard_size=str(4 * stride["stride"]))
    manifest = shardkit.open(tmp_path / "out").manifest
    assert summary.shards == 4 and [s.samples for s in manifest.shards] == [4, 4, 4, 3]
    assert all(s.bytes == s.samples * stride["stride"] + 1024 for s in manifest.shards)


def _convert(src: Path, out: Path, **options: object) -> Path:
    shardkit.convert(src, out, workers=0, **options)
    return out


def test_grayscale_and_shorter_side_shapes(tree: Path, tmp_path: Path) -> None:
    gray = shardkit.open(_convert(tree, tmp_path / "g", size=(10, 6), mode="L")).read_shard(0)
    assert isinstance(gray.images, np.ndarray) and gray.images.shape == (15, 6, 10, 1)
    for fmt in ("tar", "parquet"):
        ds = shardkit.open(_convert(tree, tmp_path / fmt, size=12, resize="shorter-side", format=fmt))
        assert ds.shape is None and ds.manifest.schema["image"]["shape"] == [None, None, 3]
        images = ds.read_shard(0).images
        for image, meta in zip(images, ds.metadata(0), strict=True):
            w, h = meta["orig_width"], meta["orig_height"]  # the same names for tar and Parquet
            assert min(image.shape[:2]) == 12
            assert image.shape[:2] == ((12, round(w * 12 / h)) if h <= w else (round(h * 12 / w), 12))


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_variable_size_batches_are_the_callers_to_change(tree: Path, tmp_path: Path, fmt: str) -> None:
    # They were the open shard's own arrays: an in-place change in the loop came back in
    # every later epoch (and Parquet's were views of immutable bytes).
    out = _convert(tree, tmp_path / fmt, size=12, resize="shorter-side", format=fmt)
    stored = list(shardkit.open(out).read_shard(0).images)
    loader = shardkit.ShardLoader(out, 4, shuffle=False)
    for epoch in range(2):
        seen = [image.numpy().copy() for batch in loader for image in batch["image"]]
        assert len(seen) == 15 and all(np.array_equal(a, b) for a, b in zip(seen, stored, strict=True)), epoch
        for batch in loader:
            for image in batch["image"]:
                image.fill_(7)  # what an in-place transform in a training loop does
    for batch in shardkit.open(out).batches(5, shuffle=False):
        for image in batch["image"]:
            assert image.flags.writeable
            image[...] = 9
    again = shardkit.open(out).read_shard(0).images
    assert all(np.array_equal(a, b) for a, b in zip(again, stored, strict=True))
    assert not any((image == 7).all() for batch in loader for image in batch["image"])


def test_index_json_is_complete(tree: Path, tmp_path: Path) -> None:
    _convert(tree, tmp_path / "out", size=8, samples_per_shard=6)
    data = json.loads((tmp_path / "out" / "index.json").read_text())
    assert data["format"] == "shardkit" and data["format_version"] == 1
    assert data["samples"] == 15 and data["inputs"] == 15 and data["failed"] == 0
    assert data["config"]["image"]["size"] == [8, 8] and data["config"]["samples_per_shard"] == 6
    assert len(data["fingerprint"]) == 64
    for record in data["shards"]:
        blob = (tmp_path / "out" / record["file"]).read_bytes()
        assert record["bytes"] == len(blob)
        assert record["sha256"] == hashlib.sha256(blob).hexdigest()
        # the layout really locates every sample's pixels
        lay = record["layout"]
        first = np.frombuffer(blob, np.uint8, count=8 * 8 * 3, offset=lay["offset"])
        with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
            member = archive.extractfile(archive.getmembers()[0])
            assert member is not None
            np.testing.assert_array_equal(np.load(io.BytesIO(member.read())).reshape(-1), first)
    assert [r["samples"] for r in data["shards"]] == [6, 6, 3]


def test_a_bug_in_shardkit_fails_the_run_instead_of_blaming_the_input(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what Pillow or the file system raise about an input is a per-input failure; an
    exception out of shardkit's own code is a WorkerError (exit 7), never a `decode_error`
    record for every input."""
    from shardkit.conversion import images

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug in shardkit")

    monkeypatch.setattr(images, "normalise_mode", broken)
    with pytest.raises(shardkit.WorkerError, match="a bug in shardkit") as caught:
        shardkit.convert(tree, tmp_path / "out", size=16, workers=0)
    assert caught.value.exit_code == 7
    assert not (tmp_path / "out" / "index.json").exists()


def test_imports_stay_light() -> None:
    # `import shardkit` loads the rest of the API on first use, and what a conversion's
    # forkserver preloads for its workers (shardkit.conversion.tasks) leaves out the reader,
    # the scheduler, the Hugging Face and remote sources and torch: each worker start pays
    # only for what its tasks run. The names still resolve, to the same objects.
    import subprocess
    import sys

    heavy = ["torch", "shardkit.reader", "shardkit.conversion.run", "shardkit.conversion.scheduler",
             "shardkit.conversion.sources.hf", "shardkit.conversion.sources.remote",
             "shardkit.conversion.sources.csv", "pyarrow.compute"]
    script = (
        "import sys, json\n"
        f"heavy = {heavy!r}\n"
        "import shardkit\n"
        "bare = [m for m in heavy if m in sys.modules]\n"
        "import shardkit.conversion.tasks\n"
        "tasks = [m for m in heavy if m in sys.modules]\n"
        "from shardkit.conversion.entry import convert\n"
        "from shardkit.reader import open_dataset, Dataset\n"
        "same = [shardkit.convert is convert, shardkit.open is open_dataset, shardkit.Dataset is Dataset]\n"
        "print(json.dumps([bare, tasks, same, 'convert' in dir(shardkit)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          check=True)
    bare, tasks, same, listed = json.loads(done.stdout)
    assert bare == []
    assert tasks == []
    assert same == [True, True, True]
    assert listed
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        shardkit.nonsense  # noqa: B018
