"""A SRC in object storage (moto's S3 server on 127.0.0.1): a prefix of class folders, or an
image CSV at a URL, converts to the same shards and errors.jsonl as the same files on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from corpus import add_bad_files, hashes, image_tree
from s3_objects import FAST, OPTIONS, objects
from servers import Fault

import shardkit
from shardkit.errors import InputError, OutputExistsError, RemoteError


def upload(s3: Any, folder: Path, prefix: str) -> None:
    client = s3.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket="test", Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                              Body=path.read_bytes())


def same_dataset(local: Path, other: dict[str, str] | Path) -> None:
    """Shards and errors.jsonl byte for byte; index.json equal but for the fingerprint (it
    hashes mtimes locally, ETags remotely)."""
    theirs = hashes(other) if isinstance(other, Path) else other
    assert {k: v for k, v in theirs.items() if k != "index.json"} == \
        {k: v for k, v in hashes(local).items() if k != "index.json"}
    if isinstance(other, Path):
        mine, yours = (json.loads((p / "index.json").read_text()) for p in (local, other))
        assert {**mine, "fingerprint": ""} == {**yours, "fingerprint": ""}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    image_tree(root, per_class=6)
    add_bad_files(root / "dog")
    (root / "stray.jpg").write_bytes((root / "cat" / "im000.jpg").read_bytes())  # beside the classes
    (root / "cat" / ".hidden.jpg").write_bytes(b"never listed")
    (root / "emu" / "notes.txt").write_bytes(b"not an image")
    return root


def test_a_prefix_of_class_folders_converts_like_the_folder(s3: Any, src: Path, tmp_path: Path) -> None:
    upload(s3, src, "src")
    options = {**OPTIONS, "storage_options": s3.options(), "workers": 2}
    local = shardkit.convert(src, tmp_path / "local", **options)
    remote = shardkit.convert("s3://test/src", tmp_path / "remote", **options)
    assert (remote.inputs, remote.samples, remote.failed) == (local.inputs, local.samples, local.failed)
    assert (local.samples, local.failed) == (18, 4)  # 3 bad files + the stray image
    same_dataset(tmp_path / "local", tmp_path / "remote")
    assert shardkit.convert("s3://test/src", tmp_path / "remote", **options).up_to_date
    # Into a remote OUT as well: the same objects again.
    shardkit.convert("s3://test/src", "s3://test/out", **options)
    same_dataset(tmp_path / "local", objects(s3, "out"))
    # A rewritten object changes the fingerprint (its ETag), as a touched file does locally.
    s3.client().put_object(Bucket="test", Key="src/cat/im001.png",
                           Body=(src / "cat" / "im003.png").read_bytes())
    with pytest.raises(OutputExistsError, match="fingerprint differs"):
        shardkit.convert("s3://test/src", tmp_path / "remote", **options)


def test_an_image_csv_at_a_url(s3: Any, src: Path, tmp_path: Path) -> None:
    rows = ["file,label,weight"] + [f"{c}/im{j:03d}.{'png' if j % 2 else 'jpg'},{c},{j}"
                                    for c in ("cat", "dog", "emu") for j in range(6)]
    rows += ["dog/empty.jpg,dog,7", "cat/gone.jpg,cat,8"]  # a bad image, a missing one
    (src / "train.csv").write_text("\n".join(rows) + "\n")
    upload(s3, src, "csv")
    options = {**OPTIONS, "image_col": "file", "label_col": "label", "workers": 0,
               "storage_options": s3.options()}
    shardkit.convert(src / "train.csv", tmp_path / "local", **options)
    remote = shardkit.convert("s3://test/csv/train.csv", tmp_path / "remote", **options)
    assert (remote.samples, remote.failed, remote.reasons) == (18, 2, {"empty_file": 1, "missing_file": 1})
    same_dataset(tmp_path / "local", tmp_path / "remote")
    # A local CSV whose images are under a URL (--root), and a row that leaves the root.
    (tmp_path / "rooted.csv").write_text("\n".join([*rows[:4], "../outside.jpg,cat,1",
                                                    "s3://elsewhere/x.jpg,cat,2"]) + "\n")
    rooted = shardkit.convert(tmp_path / "rooted.csv", tmp_path / "rooted",
                              **{**options, "root": "s3://test/csv", "max_errors": 5})
    assert (rooted.samples, rooted.reasons) == (3, {"outside_root": 2})


def test_missing_sources_are_input_errors(s3: Any, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"s3://test/nothing: no images found"):
        shardkit.convert("s3://test/nothing", tmp_path / "o", storage_options=s3.options(), **OPTIONS)
    with pytest.raises(InputError, match="bucket does not exist"):
        shardkit.convert("s3://no-bucket/x", tmp_path / "o", storage_options=s3.options(), **OPTIONS)
    with pytest.raises(InputError, match=r"s3://test/a\.csv: not found"):
        shardkit.convert("s3://test/a.csv", tmp_path / "o", storage_options=s3.options(),
                         image_col="f", **OPTIONS)
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(120)
def test_a_fetch_failing_past_its_retries_fails_the_run(s3: Any, src: Path, tmp_path: Path,
                                                        fault_proxy: Any) -> None:
    upload(s3, src, "src")
    proxy = fault_proxy(s3.endpoint)
    proxy.add(Fault("status", "/test/src/emu/im002.jpg", status=503, times=10_000))
    with pytest.raises(RemoteError, match=r"GET s3://test/src/emu/im002\.jpg failed 2 times; last: HTTP 503"):
        shardkit.convert("s3://test/src", tmp_path / "out", storage_options=s3.options(proxy.url),
                         retry=FAST, workers=0, **OPTIONS)
    assert not (tmp_path / "out" / "index.json").exists()
