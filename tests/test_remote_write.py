"""Converting into object storage (moto's S3 server on 127.0.0.1, a fault-injecting proxy in
front of it): the same objects as a local conversion, the same commit protocol (up to date,
resume after kill -9, overwrite of shardkit's objects only), failures that fail the run."""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from corpus import add_bad_files, hashes, image_tree, slow_tree
from s3_objects import FAST, OPTIONS, cli, objects, storage_args
from servers import Fault

import shardkit
from shardkit.errors import ConfigError, OutputExistsError, RemoteError
from shardkit.keywords import parse_storage_options


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    image_tree(root, per_class=6)
    add_bad_files(root / "cat")
    return root


@pytest.mark.parametrize("options", [{"workers": 2}, {"workers": 0, "format": "parquet"},
                                     {"workers": 0, "codec": "jpeg", "samples_per_shard": 30}],
                         ids=["tar-raw-pool", "parquet", "jpeg-one-shard"])
def test_objects_are_byte_identical_to_a_local_conversion(s3: Any, src: Path, tmp_path: Path,
                                                          options: dict[str, Any]) -> None:
    local = shardkit.convert(src, tmp_path / "local", **{**OPTIONS, **options})
    remote = shardkit.convert(src, "s3://test/ds", storage_options=s3.options(), **{**OPTIONS, **options})
    assert (remote.samples, remote.failed, remote.shards) == (local.samples, local.failed, local.shards)
    assert (remote.out, remote.errors_path) == ("s3://test/ds", "s3://test/ds/errors.jsonl")
    assert remote.samples == 18 and remote.failed == 3
    # Every object, index.json and errors.jsonl included, and nothing else (no journal, no
    # temporary objects) is left under the prefix.
    assert objects(s3, "ds") == hashes(tmp_path / "local")


def test_a_url_is_never_a_local_folder(s3: Any, src: Path, tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    done = cli("convert", src, "s3://test/x", "--size", "16", "--max-errors", "5",
               *storage_args(s3), cwd=work)
    assert done.returncode == 0, done.stderr
    assert "→ s3://test/x;" in done.stdout
    assert list(work.iterdir()) == []  # no folder named s3:
    assert "index.json" in objects(s3, "x")
    for where, words in [("foo://bucket/x", "unsupported URL scheme"), ("s3:test/x", "without '//'"),
                         ("http://127.0.0.1:9/x", "read-only")]:
        refused = cli("convert", src, where, *storage_args(s3), cwd=work)
        assert refused.returncode == ConfigError.exit_code and words in refused.stderr, refused.stderr
    assert list(work.iterdir()) == []


def test_a_bucket_that_does_not_exist_fails_up_front(s3: Any, src: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    done = cli("convert", src, "s3://no-such-bucket/x", *storage_args(s3), cwd=tmp_path)
    assert done.returncode == RemoteError.exit_code, done.stderr
    assert "s3://no-such-bucket/x: the bucket does not exist" in done.stderr
    assert time.monotonic() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.timeout(120)
def test_an_upload_failing_past_its_retries_fails_the_run_and_publishes_nothing(
        s3: Any, src: Path, tmp_path: Path, fault_proxy: Any) -> None:
    proxy = fault_proxy(s3.endpoint)
    proxy.add(Fault("status", "/test/ds/shard-00002", method="PUT", status=503, times=10_000))
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(RemoteError, match=r"PUT s3://test/ds/shard-00002\.tar failed 2 times; "
                                          r"last: HTTP 503"):
        shardkit.convert(src, "s3://test/ds", storage_options=s3.options(proxy.url), retry=FAST,
                         workers=0, **OPTIONS)
    left = objects(s3, "ds")
    assert "index.json" not in left and "errors.jsonl" not in left and "shard-00002.tar" not in left
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("shardkit-")}
    journaled = [n for n in left if n.startswith(".shardkit-journal/")]
    assert all(left[n.split("/")[1][:-5]] for n in journaled)  # each entry's shard is there
    # The server recovers: --resume keeps what was uploaded and journaled, and finishes.
    proxy.clear()
    summary = shardkit.convert(src, "s3://test/ds", storage_options=s3.options(), resume=True,
                               workers=0, **OPTIONS)
    assert (summary.samples, summary.reused_shards) == (18, len(journaled))
    shardkit.convert(src, tmp_path / "local", workers=0, **OPTIONS)
    assert objects(s3, "ds") == hashes(tmp_path / "local")


def test_rerun_does_nothing_changed_options_refuse_overwrite_replaces(s3: Any, src: Path, tmp_path: Path,
                                                                      fault_proxy: Any) -> None:
    proxy = fault_proxy(s3.endpoint)
    options = s3.options(proxy.url)
    shardkit.convert(src, "s3://test/ds", storage_options=options, workers=0, **OPTIONS)
    first = objects(s3, "ds")
    proxy.reset_counts()
    again = shardkit.convert(src, "s3://test/ds", storage_options=options, workers=0, **OPTIONS)
    assert again.up_to_date and again.samples == 18
    assert [k for k in proxy.requests if k[0] in ("PUT", "POST", "DELETE")] == []
    with pytest.raises(OutputExistsError, match="fingerprint differs"):
        shardkit.convert(src, "s3://test/ds", storage_options=options, workers=0,
                         **{**OPTIONS, "samples_per_shard": 25})
    # Objects beside the prefix (a longer name, another prefix) are not ours and stay.
    s3.client().put_object(Bucket="test", Key="ds-other/keep.txt", Body=b"k")
    s3.client().put_object(Bucket="test", Key="dsx", Body=b"k")
    replaced = shardkit.convert(src, "s3://test/ds", storage_options=options, workers=0, overwrite=True,
                                **{**OPTIONS, "samples_per_shard": 25})
    assert replaced.shards == 1
    shardkit.convert(src, tmp_path / "local", workers=0, **{**OPTIONS, "samples_per_shard": 25})
    assert objects(s3, "ds") == hashes(tmp_path / "local") != first  # the 4 other shards went
    assert objects(s3, "ds-other") == {"keep.txt": hashlib.sha256(b"k").hexdigest()}
    assert s3.client().get_object(Bucket="test", Key="dsx")["Body"].read() == b"k"


@pytest.mark.parametrize("key", ["notes.txt", "deeper/shard-00000.tar", "shard-00000.tar/x"])
def test_a_foreign_object_under_the_prefix_is_refused_even_with_overwrite(s3: Any, src: Path,
                                                                          key: str) -> None:
    s3.client().put_object(Bucket="test", Key=f"ds/{key}", Body=b"mine")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="which shardkit did not write"):
            shardkit.convert(src, "s3://test/ds", storage_options=s3.options(), workers=0,
                             overwrite=overwrite, **OPTIONS)
    assert objects(s3, "ds") == {key: hashlib.sha256(b"mine").hexdigest()}


def test_split_and_tabular_csv_into_s3(s3: Any, src: Path, tmp_path: Path) -> None:
    split = {**OPTIONS, "split": "train=0.7,val=0.3", "workers": 0}
    shardkit.convert(src, tmp_path / "split", **split)
    summary = shardkit.convert(src, "s3://test/split", storage_options=s3.options(), **split)
    assert summary.out == "s3://test/split" and set(summary.splits) == {"train", "val"}
    for part in ("train", "val"):
        assert objects(s3, f"split/{part}") == hashes(tmp_path / "split" / part)
    table = tmp_path / "t.csv"
    table.write_text("a,b,y\n" + "".join(f"{i},{i * 0.5},{'xy'[i % 2]}\n" for i in range(50)))
    shardkit.convert(table, tmp_path / "table", label_col="y", samples_per_shard=16, progress=False)
    shardkit.convert(table, "s3://test/table", label_col="y", samples_per_shard=16, progress=False,
                     storage_options=s3.options())
    assert objects(s3, "table") == hashes(tmp_path / "table")
    s3.client().put_object(Bucket="test", Key="split/other.txt", Body=b"x")
    with pytest.raises(OutputExistsError, match=r"other\.txt"):
        shardkit.convert(src, "s3://test/split", storage_options=s3.options(), overwrite=True, **split)


@pytest.fixture(scope="module")
def slow_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slow")
    return slow_tree(root / "src", root / "pristine")


ARGS = ["--size", "48", "--samples-per-shard", "12", "--no-draft", "--workers", "2", "--max-errors", "5"]


@pytest.mark.timeout(240)
def test_kill_9_mid_run_then_resume_gives_identical_objects(s3: Any, slow_src: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    shardkit.convert(slow_src, clean, size=48, samples_per_shard=12, draft=False, workers=2,
                     max_errors=5, progress=False)  # ARGS, in this process
    expected = hashes(clean)
    process = cli("convert", slow_src, "s3://test/ds", *ARGS, *storage_args(s3), wait=False)
    client = s3.client()
    deadline = time.monotonic() + 120

    def journaled() -> int:
        listed = client.list_objects_v2(Bucket="test", Prefix="ds/.shardkit-journal/")
        return len(listed.get("Contents", []))

    while journaled() < 5:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    left = objects(s3, "ds")
    assert "index.json" not in left
    assert all(left[n] == expected[n] for n in left if n.startswith("shard-")), "a partial shard"
    refused = cli("convert", slow_src, "s3://test/ds", *ARGS, *storage_args(s3))
    assert refused.returncode == OutputExistsError.exit_code and "--resume" in refused.stderr
    resumed = cli("convert", slow_src, "s3://test/ds", *ARGS, "--resume", *storage_args(s3))
    assert resumed.returncode == 0, resumed.stderr
    assert "shards kept from the interrupted run" in resumed.stdout
    assert objects(s3, "ds") == expected


def test_storage_options_from_the_command_line() -> None:
    assert parse_storage_options([
        "endpoint_url=http://h:9000", "key=a=b", "anon=false", "client_kwargs.region_name=eu",
        'client_kwargs={"verify": false}', 'secret="true"', "config_kwargs={}"]) == {
        "endpoint_url": "http://h:9000", "key": "a=b", "anon": False,
        "client_kwargs": {"region_name": "eu", "verify": False}, "secret": "true", "config_kwargs": {}}
    for bad in ("novalue", "=x", "a..b=1", "k={oops"):
        with pytest.raises(ConfigError, match="--storage-option"):
            parse_storage_options([bad])
    with pytest.raises(ConfigError, match="storage_options"):
        shardkit.RunOptions(storage_options=[("k", "v")])  # type: ignore[arg-type]


def test_verify_a_dataset_at_a_url(s3: Any, src: Path) -> None:
    shardkit.convert(src, "s3://test/ds", storage_options=s3.options(), workers=0, **OPTIONS)
    ok = cli("verify", "s3://test/ds", *storage_args(s3))
    assert ok.returncode == 0 and "s3://test/ds: OK" in ok.stdout, ok.stderr
    client = s3.client()
    body = bytearray(client.get_object(Bucket="test", Key="ds/shard-00001.tar")["Body"].read())
    body[700] ^= 0xFF
    client.put_object(Bucket="test", Key="ds/shard-00001.tar", Body=bytes(body))
    client.delete_object(Bucket="test", Key="ds/shard-00003.tar")
    client.put_object(Bucket="test", Key="ds/shard-00009.tar", Body=b"stray")
    bad = cli("verify", "s3://test/ds", *storage_args(s3))
    assert bad.returncode == shardkit.DatasetError.exit_code
    assert bad.stdout.splitlines() == [
        "shard-00001.tar: sha256 differs from index.json (corrupted)",
        "shard-00003.tar: missing (index.json lists it)",
        "shard-00009.tar: a shard file index.json does not list"], bad.stdout
    missing = cli("verify", "s3://test/none", *storage_args(s3))
    assert missing.returncode == shardkit.DatasetError.exit_code
    assert "s3://test/none: not a shardkit dataset" in missing.stdout
