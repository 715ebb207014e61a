"""The node-local shard cache (shardkit/reader/remote_cache.py) reading real datasets from real
servers on 127.0.0.1: moto's S3, a plain HTTP server that counts GETs, a fault-injecting proxy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from corpus import small_dataset, small_tree
from servers import Fault, wait_until

from shardkit.errors import ConfigError, CorruptShardError, RemoteError
from shardkit.format.manifest import INDEX_NAME, Manifest
from shardkit.format.storage import RetryPolicy, open_storage
from shardkit.reader.cache_store import _try_exclusive, cache_usage, unlock_fd
from shardkit.reader.remote_cache import RemoteCache

FAST = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.05, timeout=3)

#: A reader in another process (tests/cache_reader.py).
READER = str(Path(__file__).with_name("cache_reader.py"))


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real converted dataset: 27 images of 12x10 in 7 raw tar shards."""
    src = small_tree(tmp_path_factory.mktemp("src"), 9)
    return small_dataset(src, tmp_path_factory.mktemp("d") / "tar", 4)


def shard_files(folder: Path) -> list[Path]:
    return [folder / s.file for s in Manifest.read(folder).shards]


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def publish(folder: Path, url: str, options: dict[str, Any] | None = None) -> None:
    """Upload a dataset folder: shards first, index.json last."""
    storage = open_storage(url, storage_options=options, writable=True, retry=FAST)
    for path in shard_files(folder):
        storage.upload(path, path.name)
    storage.upload(folder / INDEX_NAME, INDEX_NAME)


@pytest.fixture
def http_ds(local_ds: Path, http_folder: Any) -> tuple[str, Any]:
    """The dataset served by the counting HTTP server at URL/ds."""
    shutil.copytree(local_ds, Path(http_folder.root) / "ds")
    return f"{http_folder.url}/ds", http_folder


def read_all(cache: RemoteCache, numbers: list[int]) -> dict[int, str]:
    out = {}
    for k in numbers:
        out[k] = sha(cache.path(k))
        cache.release(k)
    return out


def expected(local_ds: Path) -> dict[int, str]:
    return {k: sha(p) for k, p in enumerate(shard_files(local_ds))}


def parts_left(root: Path) -> list[Path]:
    return list(root.glob("*/shards/.*.part"))


# --- reading, the cache folder, look-ahead -----------------------------------------------

def test_s3_shards_arrive_verified_and_are_served_from_the_cache_after(
        local_ds: Path, s3: Any, fault_proxy: Any, tmp_path: Path) -> None:
    publish(local_ds, "s3://test/ds", s3.options())
    proxy = fault_proxy(s3.endpoint)  # counts the GETs
    options = s3.options(proxy.url)
    n = len(expected(local_ds))
    with RemoteCache.open("s3://test/ds", storage_options=options, retry=FAST,
                          cache_dir=tmp_path / "c") as cache:
        cache.announce(list(range(n)))
        assert read_all(cache, list(range(n))) == expected(local_ds)
    # (counted once the look-ahead threads are joined: one may still be counting its download)
    assert (cache.downloads, cache.downloaded_bytes) == (n, sum(p.stat().st_size for p in
                                                               shard_files(local_ds)))
    assert sorted(os.listdir(cache.folder)) == sorted(p.name for p in shard_files(local_ds))
    assert all(proxy.gets[f"/test/ds/{p.name}"] == 1 for p in shard_files(local_ds))
    with RemoteCache.open("s3://test/ds", storage_options=options, retry=FAST,
                          cache_dir=tmp_path / "c", verify=True) as again:
        assert read_all(again, list(range(n))) == expected(local_ds)
        assert again.downloads == 0
    assert all(proxy.gets[f"/test/ds/{p.name}"] == 1 for p in shard_files(local_ds))
    assert parts_left(tmp_path / "c") == []


def test_look_ahead_downloads_the_announced_next_shards(http_ds: tuple[str, Any],
                                                       tmp_path: Path) -> None:
    url, server = http_ds
    order = [5, 2, 6, 0, 3, 1, 4]
    with RemoteCache.open(url, retry=FAST, cache_dir=tmp_path / "c", prefetch_shards=3) as cache:
        cache.announce(order)
        cache.path(order[0])
        assert wait_until(lambda: cache.downloads == 4)  # the one asked for and the next 3
        names = [cache.manifest.shards[k].file for k in order]
        assert wait_until(lambda: all(server.gets[f"/ds/{n}"] == 1 for n in names[:4]))
        assert [server.gets[f"/ds/{n}"] for n in names[4:]] == [0, 0, 0]
        cache.release(order[0])


def test_pins_follow_the_reader(http_ds: tuple[str, Any], tmp_path: Path) -> None:
    url, server = http_ds
    order = [0, 1, 0, 2, 3, 4]
    with RemoteCache.open(url, retry=FAST, cache_dir=tmp_path / "c", prefetch_shards=2) as cache:
        cache.announce(order)
        records = cache.manifest.shards

        def free(k: int) -> bool:  # no process (this one included) holds shard k pinned
            fd = _try_exclusive(cache.store.pin_lock(records[k]))
            if fd is not None:
                unlock_fd(fd)
            return fd is not None

        first = cache.path(0)
        cache.release(0)
        assert not free(0)  # wanted again two steps ahead: kept as look-ahead
        cache.announce([1, 2, 3, 4])  # ... until the order changes (a new epoch)
        for k in [1, 2, 3, 4]:
            assert cache.path(k) != ""
            cache.release(k)
        assert wait_until(lambda: all(free(k) for k in range(5)))  # the reader moved past them all
        assert Path(first).exists() and cache.downloads == 5
        assert server.gets[f"/ds/{records[0].file}"] == 1


def test_the_default_cache_folder_is_the_users_cache(http_ds: tuple[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the platform's convention
    with RemoteCache.open(http_ds[0], retry=FAST) as cache:
        assert Path(cache.folder).is_relative_to(tmp_path / "xdg" / "shardkit")
        free = shutil.disk_usage(tmp_path).free
        assert 0.4 * free < cache.limit < 0.6 * free + 1e6
        assert json.loads((Path(cache.folder).parent / "dataset.json").read_text())["url"] == http_ds[0]


# --- damaged, stale, shared -------------------------------------------------------------

def test_a_damaged_cached_copy_is_fetched_again(local_ds: Path, http_ds: tuple[str, Any],
                                                tmp_path: Path) -> None:
    url, server = http_ds
    root = tmp_path / "c"
    with RemoteCache.open(url, retry=FAST, cache_dir=root) as cache:
        read_all(cache, [1, 2])
        copies = Path(cache.folder)
    one, two = cache.manifest.shards[1].file, cache.manifest.shards[2].file
    data = bytearray((copies / one).read_bytes())
    data[700] ^= 0x01  # same size, one bit off: only the sha256 check sees it
    (copies / one).write_bytes(bytes(data))
    with open(copies / two, "r+b") as handle:
        handle.truncate(100)
    with RemoteCache.open(url, retry=FAST, cache_dir=root, verify=True) as cache:
        assert read_all(cache, [1, 2]) == {k: expected(local_ds)[k] for k in (1, 2)}
        assert cache.downloads == 2
    assert (server.gets[f"/ds/{one}"], server.gets[f"/ds/{two}"]) == (2, 2)


def test_a_dataset_overwritten_at_the_same_url_is_read_fresh(local_ds: Path, s3: Any,
                                                             tmp_path: Path) -> None:
    publish(local_ds, "s3://test/ds", s3.options())
    with RemoteCache.open("s3://test/ds", storage_options=s3.options(), retry=FAST,
                          cache_dir=tmp_path / "c") as cache:
        assert read_all(cache, [0]) == {0: expected(local_ds)[0]}
    # Version 2: same names, same sizes, one byte of shard 0 different (and its index record).
    v2 = tmp_path / "v2"
    shutil.copytree(local_ds, v2)
    first = shard_files(v2)[0]
    data = bytearray(first.read_bytes())
    data[600] ^= 0xFF
    first.write_bytes(bytes(data))
    index = json.loads((v2 / INDEX_NAME).read_text())
    index["shards"][0]["sha256"] = sha(first)
    (v2 / INDEX_NAME).write_text(json.dumps(index))
    publish(v2, "s3://test/ds", s3.options())
    with RemoteCache.open("s3://test/ds", storage_options=s3.options(), retry=FAST,
                          cache_dir=tmp_path / "c") as cache:
        assert read_all(cache, [0]) == {0: sha(first)} != {0: expected(local_ds)[0]}
        assert cache.downloads == 1
    assert len(list((tmp_path / "c").glob("*/shards"))) == 2  # one folder per version


def run_readers(count: int, url: str, cache: Path, shards: list[int], tmp_path: Path,
                hold: Path | None = None, prefetch: int = 3) -> list[subprocess.Popen[str]]:
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, READER, json.dumps(
        {"url": url, "cache": str(cache), "shards": shards, "go": str(go), "prefetch": prefetch,
         "hold": str(hold) if hold else None})], stdout=subprocess.PIPE, text=True)
        for _ in range(count)]
    time.sleep(0.5)  # let both start before either reads
    go.touch()
    return procs


@pytest.mark.timeout(120)
def test_two_processes_sharing_a_cache_download_each_shard_once(
        local_ds: Path, http_ds: tuple[str, Any], tmp_path: Path) -> None:
    url, server = http_ds
    n = len(expected(local_ds))
    procs = run_readers(2, url, tmp_path / "c", list(range(n)), tmp_path)
    outputs = [json.loads(p.communicate(timeout=100)[0].splitlines()[-1]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    want = {str(k): v for k, v in expected(local_ds).items()}
    assert outputs == [want, want]
    assert {name: server.gets[f"/ds/{name}"] for name in (p.name for p in shard_files(local_ds))} \
        == {p.name: 1 for p in shard_files(local_ds)}
    assert server.gets[f"/ds/{INDEX_NAME}"] == 2
    assert parts_left(tmp_path / "c") == []


# --- the cache limit ------------------------------------------------------------------------

def largest_shard(local_ds: Path) -> int:
    return max(p.stat().st_size for p in shard_files(local_ds))


@pytest.mark.timeout(60)
def test_the_cache_limit_is_held_while_reading(local_ds: Path, http_ds: tuple[str, Any],
                                               tmp_path: Path) -> None:
    url, _server = http_ds
    root = tmp_path / "c"
    root.mkdir()
    (root / "notes.txt").write_bytes(b"n" * 50_000)  # not ours: never counted, never deleted
    (root / "other").mkdir()
    (root / "other" / "shard-00000.tar").write_bytes(b"x" * 50_000)
    limit = 4 * largest_shard(local_ds)  # 2 ahead + 1 held, and one to spare; 7 shards in all
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(cache_usage(str(root)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    n = len(expected(local_ds))
    try:
        with RemoteCache.open(url, retry=FAST, cache_dir=root, cache_limit=limit,
                              prefetch_shards=2, held=1) as cache:
            for epoch in range(2):
                order = list(range(n)) if epoch == 0 else list(reversed(range(n)))
                cache.announce(order)
                assert read_all(cache, order) == expected(local_ds)
    finally:
        done.set()
        sampler.join()
    assert len(samples) > 10 and max(samples) <= limit
    assert cache.downloads > n  # the second epoch had to fetch evicted shards again
    assert (root / "notes.txt").stat().st_size == 50_000
    assert (root / "other" / "shard-00000.tar").stat().st_size == 50_000


def test_a_limit_smaller_than_the_look_ahead_is_refused(local_ds: Path, http_ds: tuple[str, Any],
                                                        tmp_path: Path) -> None:
    url, server = http_ds
    with pytest.raises(ConfigError, match=r"cache_limit is \d+ bytes, smaller than reading needs: "
                                          r"\(prefetch_shards 4 \+ 2 held\)"):
        RemoteCache.open(url, retry=FAST, cache_dir=tmp_path / "c", prefetch_shards=4,
                         cache_limit=5 * largest_shard(local_ds))
    with pytest.raises(ConfigError, match="cache_limit must be an integer >= 1"):
        RemoteCache.open(url, retry=FAST, cache_dir=tmp_path / "c", cache_limit=0)
    with pytest.raises(ConfigError, match="prefetch_shards"):
        RemoteCache.open(url, retry=FAST, cache_dir=tmp_path / "c", prefetch_shards=-1)
    assert sum(count for path, count in server.gets.items() if path.endswith(".tar")) == 0


@pytest.mark.timeout(120)
def test_eviction_never_deletes_a_shard_another_process_holds(local_ds: Path, http_ds: tuple[str, Any],
                                                              tmp_path: Path) -> None:
    url, _server = http_ds
    root, hold = tmp_path / "c", tmp_path / "hold"
    holder = run_readers(1, url, root, [0], tmp_path, hold=hold, prefetch=0)[0]
    assert holder.stdout is not None
    assert json.loads(holder.stdout.readline()) == {"0": expected(local_ds)[0]}  # holds shard 0
    n = len(expected(local_ds))
    with RemoteCache.open(url, retry=FAST, cache_dir=root, cache_limit=4 * largest_shard(local_ds),
                          prefetch_shards=1, held=1) as cache:
        copy = Path(cache.store.path(cache.manifest.shards[0]))
        for k in [1, 2, 3, 4, 5, 6, 1, 2, 3]:
            assert read_all(cache, [k]) == {k: expected(local_ds)[k]}
            assert copy.exists() and sha(copy) == expected(local_ds)[0]
        hold.touch()
        assert holder.wait(60) == 0
        read_all(cache, [4, 5, 6, 1])  # now shard 0 is fair game
        assert not copy.exists()
    assert cache.downloads > n


# --- failures ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", [
    Fault("drop", "shard-00001", after=300, times=2),
    Fault("status", "shard-00001", status=503, times=3),
    Fault("corrupt", "shard-00001", offset=777, times=2),
    Fault("stall", "shard-00001", after=100, seconds=30, times=1),
], ids=["drop-mid-shard", "503x3", "wrong-byte-twice", "stall"])
def test_faults_end_in_the_right_bytes(fault: Fault, local_ds: Path, http_ds: tuple[str, Any],
                                       fault_proxy: Any, tmp_path: Path) -> None:
    _url, server = http_ds
    proxy = fault_proxy(server.url)
    times = fault.times
    proxy.add(fault)
    retry = RetryPolicy(attempts=6, first_delay=0.01, max_delay=0.05, timeout=2)
    with RemoteCache.open(f"{proxy.url}/ds", retry=retry, cache_dir=tmp_path / "c") as cache:
        assert read_all(cache, [1]) == {1: expected(local_ds)[1]}
        assert cache.downloads == 1
    name = Manifest.read(local_ds).shards[1].file
    assert proxy.gets[f"/ds/{name}"] == 1 + times
    assert parts_left(tmp_path / "c") == []


@pytest.mark.timeout(60)
def test_a_shard_always_wrong_is_a_corrupt_shard_error(local_ds: Path, http_ds: tuple[str, Any],
                                                       fault_proxy: Any, tmp_path: Path) -> None:
    _url, server = http_ds
    proxy = fault_proxy(server.url)
    proxy.add(Fault("corrupt", "shard-00002", offset=10, times=100))
    with RemoteCache.open(f"{proxy.url}/ds", retry=FAST, cache_dir=tmp_path / "c") as cache, \
            pytest.raises(CorruptShardError, match=rf"{proxy.url}/ds/shard-00002\.tar: sha256 .* "
                                                   r"\(downloaded 3 times\)"):
        cache.path(2)
    assert not list((tmp_path / "c").glob("*/shards/shard-00002.tar"))
    assert parts_left(tmp_path / "c") == []


@pytest.mark.timeout(60)
def test_a_server_failing_past_the_budget_is_a_remote_error(local_ds: Path, http_ds: tuple[str, Any],
                                                            fault_proxy: Any, tmp_path: Path) -> None:
    _url, server = http_ds
    proxy = fault_proxy(server.url)
    with RemoteCache.open(f"{proxy.url}/ds", retry=FAST, cache_dir=tmp_path / "c",
                          prefetch_shards=2) as cache:
        proxy.add(Fault("status", "shard-00003", status=503, times=1000))
        cache.announce([2, 3, 4])
        assert read_all(cache, [2]) == {2: expected(local_ds)[2]}
        with pytest.raises(RemoteError, match=rf"GET {proxy.url}/ds/shard-00003\.tar failed 4 times; "
                                              "last: HTTP 503"):
            cache.path(3)
        assert read_all(cache, [4]) == {4: expected(local_ds)[4]}
    assert parts_left(tmp_path / "c") == []


def test_a_shard_missing_on_the_server_is_a_corrupt_shard_error(http_ds: tuple[str, Any],
                                                                tmp_path: Path) -> None:
    url, server = http_ds
    with RemoteCache.open(url, retry=FAST, cache_dir=tmp_path / "c") as cache:
        os.unlink(Path(server.root) / "ds" / cache.manifest.shards[5].file)
        with pytest.raises(CorruptShardError, match=r"/ds/shard-00005\.tar: missing"):
            cache.path(5)


@pytest.mark.timeout(60)
def test_a_crashed_downloaders_leftovers_are_cleaned_up(local_ds: Path, http_ds: tuple[str, Any],
                                                        fault_proxy: Any, tmp_path: Path) -> None:
    url, server = http_ds
    proxy = fault_proxy(server.url)
    proxy.add(Fault("stall", "shard-00000", after=500, seconds=60, times=1))
    root = tmp_path / "c"
    victim = run_readers(1, f"{proxy.url}/ds", root, [0], tmp_path, prefetch=0)[0]
    assert wait_until(lambda: parts_left(root) != [], 30)  # mid-download, holding the lock
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    with RemoteCache.open(url, retry=FAST, cache_dir=root) as cache:
        assert read_all(cache, [0]) == {0: expected(local_ds)[0]}
    assert parts_left(root) == []
