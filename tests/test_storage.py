"""The storage layer (shardkit/format/storage.py) against real servers on 127.0.0.1: moto's S3,
a plain HTTP server, a fault-injecting proxy in front of either."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from servers import Fault

from shardkit.errors import ConfigError, DatasetError, MissingExtraError, RemoteError
from shardkit.format.location import parse_location
from shardkit.format.manifest import INDEX_NAME
from shardkit.format.remote_errors import is_retryable
from shardkit.format.storage import RetryPolicy, open_storage, read_index

FAST = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.05, timeout=3)


def blob(size: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(size)


# --- telling URLs from paths -------------------------------------------------------------

@pytest.mark.parametrize(("where", "protocol", "path", "url"), [
    ("s3://bucket/x/", "s3", "bucket/x", "s3://bucket/x"),
    ("S3://bucket", "s3", "bucket", "s3://bucket"),
    ("gs://b/p/q", "gs", "b/p/q", "gs://b/p/q"),
    ("http://h:1/a/", "http", "http://h:1/a", "http://h:1/a"),
    ("memory://d", "memory", "d", "memory://d"),
])
def test_a_url_is_parsed_as_a_url(where: str, protocol: str, path: str, url: str) -> None:
    location = parse_location(where)
    assert (location.protocol, location.path, location.url, location.is_local) == (protocol, path, url,
                                                                                   False)
    assert location.child_url("index.json") == f"{url}/index.json"


def test_local_paths_stay_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_location("out").path == str(tmp_path / "out")
    assert parse_location(f"file://{tmp_path}/d").path == str(tmp_path / "d")
    assert parse_location("weird:name").is_local  # a legal file name, not a known scheme
    assert parse_location(tmp_path).is_local


@pytest.mark.parametrize(("where", "words"), [
    ("s3:bucket/x", "without '//'"),
    ("foo://bucket/x", "unsupported URL scheme 'foo'"),
    ("s3://", "no bucket"),
    ("simplecache::s3://b/x", "chained"),
    ("https://h/a?sig=1", "queries"),
    ("./x/s3://b", "not a URL"),
])
def test_unusable_urls_are_refused_before_anything_is_written(
        where: str, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=words):
        open_storage(where, writable=True)
    assert list(tmp_path.iterdir()) == []


def test_http_is_read_only() -> None:
    with pytest.raises(ConfigError, match="read-only"):
        open_storage("http://127.0.0.1:9/d", writable=True)


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    monkeypatch.delitem(registry._registry, "gs", raising=False)  # forget a class imported before
    with pytest.raises(MissingExtraError, match=r"shardkit\[gcs\]"):
        open_storage("gs://bucket/d")


def test_retry_policy_is_validated() -> None:
    with pytest.raises(ConfigError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigError, match="timeout"):
        RetryPolicy(timeout=0)


def test_what_is_retried() -> None:
    assert is_retryable(ConnectionResetError())
    assert is_retryable(TimeoutError())
    assert not is_retryable(FileNotFoundError())
    assert not is_retryable(PermissionError())
    assert not is_retryable(ValueError("a bug"))


# --- S3 (moto) -----------------------------------------------------------------------------

def test_s3_destination_is_never_a_local_folder(s3: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage("s3://test/x", storage_options=s3.options(), writable=True, retry=FAST)
    storage.write_bytes("a.bin", b"abc")
    assert list(tmp_path.iterdir()) == []
    assert s3.client().get_object(Bucket="test", Key="x/a.bin")["Body"].read() == b"abc"


@pytest.mark.parametrize("where", ["s3", "local"])
def test_write_list_read_stream_delete(where: str, s3: Any, tmp_path: Path) -> None:
    target = "s3://test/ds" if where == "s3" else tmp_path / "ds"
    storage = open_storage(target, storage_options=s3.options(), writable=True, retry=FAST,
                           chunk_bytes=1000)
    assert storage.list_names() == []
    data = blob(4321)
    source = tmp_path / "shard.bin"
    source.write_bytes(data)
    storage.upload(source, "shard-00000.tar")
    storage.write_bytes(INDEX_NAME, b'{"x": 1}')
    assert storage.list_names() == [INDEX_NAME, "shard-00000.tar"]
    assert storage.read_bytes(INDEX_NAME) == b'{"x": 1}'
    assert storage.size("shard-00000.tar") == 4321
    assert storage.size("nothing") is None
    chunks = list(storage.iter_chunks("shard-00000.tar", 4321))
    assert [len(c) for c in chunks] == [1000, 1000, 1000, 1000, 321]
    assert b"".join(chunks) == data
    assert b"".join(storage.iter_chunks("shard-00000.tar", 10_000)) == data  # shorter than asked
    with pytest.raises(FileNotFoundError, match="nothing"):
        storage.read_bytes("nothing")
    storage.delete(["shard-00000.tar", "never-written"])
    assert storage.list_names() == [INDEX_NAME]


def test_read_index_of_a_prefix_without_one(s3: Any) -> None:
    storage = open_storage("s3://test/empty", storage_options=s3.options(), retry=FAST)
    with pytest.raises(DatasetError, match="not a shardkit dataset"):
        read_index(storage)


def test_forbidden_is_not_retried(s3: Any, fault_proxy: Any) -> None:
    s3.client().put_object(Bucket="test", Key="d/f", Body=b"x")
    proxy = fault_proxy(s3.endpoint)
    proxy.add(Fault("status", "/test/d/f", status=403, times=10))
    storage = open_storage("s3://test/d", storage_options=s3.options(proxy.url), retry=FAST)
    with pytest.raises(RemoteError, match=r"s3://test/d/f failed: HTTP 403"):
        storage.read_bytes("f")
    assert proxy.gets["/test/d/f"] == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", [
    Fault("status", "/test/d/big", status=503, times=3),
    Fault("status", "/test/d/big", status=429, times=2),
    Fault("drop", "/test/d/big", after=700, times=2),
    Fault("stall", "/test/d/big", after=10, seconds=30, times=1),
], ids=["503x3", "429x2", "drop-mid-body", "stall"])
def test_s3_faults_are_retried_to_the_right_bytes(fault: Fault, s3: Any, fault_proxy: Any) -> None:
    data = blob(5000, 1)
    s3.client().put_object(Bucket="test", Key="d/big", Body=data)
    proxy = fault_proxy(s3.endpoint)
    expected_gets = 3 + fault.times  # three 2000-byte ranges, each faulted one asked again
    proxy.add(fault)
    storage = open_storage("s3://test/d", storage_options=s3.options(proxy.url), chunk_bytes=2000,
                           retry=RetryPolicy(attempts=6, first_delay=0.01, max_delay=0.05, timeout=2))
    assert b"".join(storage.iter_chunks("big", 5000)) == data
    assert proxy.gets["/test/d/big"] == expected_gets


@pytest.mark.timeout(60)
def test_s3_failing_past_the_budget_is_a_remote_error(s3: Any, fault_proxy: Any) -> None:
    s3.client().put_object(Bucket="test", Key="d/f", Body=b"x" * 10)
    proxy = fault_proxy(s3.endpoint)
    proxy.add(Fault("status", "/test/d/f", status=503, times=100))
    storage = open_storage("s3://test/d", storage_options=s3.options(proxy.url), retry=FAST)
    with pytest.raises(RemoteError, match=r"GET s3://test/d/f failed 4 times; last: HTTP 503"):
        list(storage.iter_chunks("f", 10))
    assert proxy.gets["/test/d/f"] == 4


@pytest.mark.timeout(60)
def test_a_failed_upload_leaves_nothing_visible(s3: Any, fault_proxy: Any, tmp_path: Path) -> None:
    proxy = fault_proxy(s3.endpoint)
    storage = open_storage("s3://test/d", storage_options=s3.options(proxy.url), writable=True,
                           retry=FAST)
    source = tmp_path / "shard.bin"
    source.write_bytes(blob(3000))
    proxy.add(Fault("status", "/test/d/shard.bin", method="PUT", status=500, times=100))
    with pytest.raises(RemoteError, match=r"PUT s3://test/d/shard\.bin failed 4 times"):
        storage.upload(source, "shard.bin")
    assert storage.list_names() == []
    proxy.clear()
    storage.upload(source, "shard.bin")  # the same call goes through once the server recovers
    assert storage.read_bytes("shard.bin") == source.read_bytes()


@pytest.mark.timeout(120)
def test_a_failed_multipart_upload_leaves_no_object_and_no_parts(s3: Any, fault_proxy: Any,
                                                                 tmp_path: Path) -> None:
    proxy = fault_proxy(s3.endpoint)
    mib = 1 << 20
    storage = open_storage("s3://test/d", storage_options=s3.options(proxy.url), writable=True,
                           retry=FAST, chunk_bytes=5 * mib)
    source = tmp_path / "big.bin"
    source.write_bytes(blob(11 * mib))
    proxy.add(Fault("status", "partNumber=2", method="PUT", status=503, times=100))
    with pytest.raises(RemoteError, match=r"s3://test/d/big\.bin"):
        storage.upload(source, "big.bin")
    assert storage.list_names() == []
    assert s3.client().list_multipart_uploads(Bucket="test").get("Uploads", []) == []
    assert proxy.requests[("POST", "/test/d/big.bin?uploads")] == FAST.attempts
    proxy.clear()
    storage.upload(source, "big.bin")
    assert hashlib.sha256(storage.read_bytes("big.bin")).digest() == \
        hashlib.sha256(source.read_bytes()).digest()


def test_storage_options_reach_every_request(s3: Any, tmp_path: Path) -> None:
    # Every call below goes to moto only because endpoint_url travels with each request.
    storage = open_storage("s3://test/o", storage_options=s3.options(), writable=True, retry=FAST)
    (tmp_path / "f").write_bytes(b"123")
    storage.upload(tmp_path / "f", "f")
    storage.write_bytes("g", b"4")
    assert (storage.list_names(), storage.size("f"), storage.read_bytes("g")) == (["f", "g"], 3, b"4")
    assert b"".join(storage.iter_chunks("f", 3)) == b"123"
    storage.delete(["f", "g"])
    assert storage.list_names() == []


def test_a_storage_survives_pickling_and_forking(s3: Any) -> None:
    import pickle

    s3.client().put_object(Bucket="test", Key="p/f", Body=b"pickled")
    storage = open_storage("s3://test/p", storage_options=s3.options(), retry=FAST)
    assert storage.read_bytes("f") == b"pickled"
    again = pickle.loads(pickle.dumps(storage))
    assert again.read_bytes("f") == b"pickled"
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        try:
            os.write(write, storage.read_bytes("f"))
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert os.read(read, 100) == b"pickled"
    os.close(read)


# --- plain HTTP ----------------------------------------------------------------------------

def test_http_read_list_stream(http_folder: Any) -> None:
    root = Path(http_folder.root)
    data = blob(2500, 3)
    (root / "shard-00000.tar").write_bytes(data)
    (root / INDEX_NAME).write_bytes(b"{}")
    storage = open_storage(http_folder.url + "/", retry=FAST, chunk_bytes=1000)
    assert storage.list_names() == [INDEX_NAME, "shard-00000.tar"]
    assert storage.read_bytes(INDEX_NAME) == b"{}"
    assert b"".join(storage.iter_chunks("shard-00000.tar", 2500)) == data
    assert http_folder.gets["/shard-00000.tar"] == 3
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        storage.read_bytes("missing.bin")


@pytest.mark.timeout(60)
def test_http_faults_end_in_the_right_bytes_or_a_remote_error(http_folder: Any,
                                                              fault_proxy: Any) -> None:
    data = blob(3000, 4)
    (Path(http_folder.root) / "s.bin").write_bytes(data)
    proxy = fault_proxy(http_folder.url)
    storage = open_storage(proxy.url, retry=FAST, chunk_bytes=1000)
    proxy.add(Fault("drop", "/s.bin", after=100, times=2))
    proxy.add(Fault("status", "/s.bin", status=502, times=1))
    assert b"".join(storage.iter_chunks("s.bin", 3000)) == data
    proxy.add(Fault("status", "/s.bin", status=503, times=100))
    with pytest.raises(RemoteError, match=r"http://127\.0\.0\.1:\d+/s\.bin failed 4 times; last: HTTP 503"):
        b"".join(storage.iter_chunks("s.bin", 3000))


# --- synchronous fsspec implementations -----------------------------------------------------

def test_a_synchronous_fsspec_filesystem_works_the_same() -> None:
    storage = open_storage("memory://shardkit-test/ds", writable=True, retry=FAST, chunk_bytes=4)
    storage.write_bytes("a", b"0123456789")
    assert storage.list_names() == ["a"]
    assert list(storage.iter_chunks("a", 10)) == [b"0123", b"4567", b"89"]
    storage.delete(["a"])
    assert storage.list_names() == []


@pytest.mark.timeout(30)
def test_a_synchronous_filesystem_that_never_answers_is_bounded() -> None:
    import threading

    import fsspec
    from fsspec.spec import AbstractFileSystem

    released = threading.Event()

    class Silent(AbstractFileSystem):  # a real fsspec implementation whose server never answers
        protocol = "shardkit-silent"

        def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                     **kwargs: Any) -> bytes:
            released.wait(20)
            return b""

    fsspec.register_implementation("shardkit-silent", Silent, clobber=True)
    try:
        storage = open_storage("shardkit-silent://b/d",
                               retry=RetryPolicy(attempts=2, first_delay=0.01, timeout=0.2))
        with pytest.raises(RemoteError, match=r"shardkit-silent://b/d/index\.json failed 2 times; "
                                              r"last: TimeoutError: no answer within 0\.2 s"):
            storage.read_bytes(INDEX_NAME)
    finally:
        released.set()
