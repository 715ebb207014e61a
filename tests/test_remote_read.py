"""Reading datasets at URLs through the loaders (ShardLoader, ShardDataset in a DataLoader with
workers, shardkit.open, shardkit.keras, the CLI), against real servers on 127.0.0.1: moto's S3,
a plain HTTP server that counts GETs, a fault-injecting proxy (tests/servers.py)."""

from __future__ import annotations

import pickle
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from corpus import small_dataset, small_tree
from servers import Fault, upload_dataset

import shardkit
from shardkit.cli import main
from shardkit.errors import ConfigError, CorruptShardError, RemoteError
from shardkit.format.manifest import Manifest
from shardkit.format.storage import RetryPolicy
from shardkit.reader.cache_store import cache_usage

FAST = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.05, timeout=5)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 27 images of 12x10 as raw tar and raw Parquet, 4 samples per shard (7 shards)."""
    src = small_tree(tmp_path_factory.mktemp("src"), 9)
    out = tmp_path_factory.mktemp("d")
    return {"tar": small_dataset(src, out / "tar", 4),
            "parquet": small_dataset(src, out / "parquet", 4, format="parquet")}


def contents(batches: Iterable[dict[str, Any]]) -> list[tuple[list[int], bytes, list[int]]]:
    """What a pass delivered: each batch's indices, pixel bytes and labels."""
    out = []
    for batch in batches:
        image = batch["image"]
        pixels = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        label = batch["label"]
        out.append((np.asarray(batch["index"]).tolist(), pixels.tobytes(), np.asarray(label).tolist()))
    return out


def epochs(loader: Any, n: int) -> list[Any]:
    return [contents(loader) for _ in range(n)]


def shard_gets(server: Any, prefix: str, folder: Path) -> list[int]:
    """GETs the server saw for each shard file of the dataset in `folder`."""
    return [server.gets[f"{prefix}/{s.file}"] for s in Manifest.read(folder).shards]


def bounded(call: Callable[[], Any], seconds: float = 60.0) -> Any:
    """`call()` in a thread: its result or exception, or a failure (not a hang) past `seconds`."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:
            outcome.append((False, exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"no result within {seconds} s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@pytest.fixture
def on_s3(datasets: dict[str, Path], s3: Any,
          fault_proxy: Any) -> Callable[[str], tuple[str, dict[str, Any], Any]]:
    """``on_s3(fmt)``: the dataset uploaded to s3://test/<fmt>; its URL, the storage_options
    that reach it through a GET-counting proxy, the proxy."""
    proxy = fault_proxy(s3.endpoint)

    def put(fmt: str) -> tuple[str, dict[str, Any], Any]:
        upload_dataset(datasets[fmt], f"s3://test/{fmt}", s3.options())
        return f"s3://test/{fmt}", s3.options(proxy.url), proxy

    return put


# --- the same batches as local reading -------------------------------------------------------

@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_s3_reads_equal_local_reads_and_later_epochs_come_from_the_cache(
        fmt: str, datasets: dict[str, Path], on_s3: Any, tmp_path: Path) -> None:
    url, options, proxy = on_s3(fmt)
    local = datasets[fmt]
    remote = shardkit.ShardLoader(url, 5, seed=2, storage_options=options, cache_dir=str(tmp_path / "c"),
                                  retry=FAST)
    assert remote.dataset.path == url and len(remote) == len(shardkit.ShardLoader(local, 5))
    assert "secret" not in repr(remote.options)  # credentials are never printed
    assert epochs(remote, 2) == epochs(shardkit.ShardLoader(local, 5, seed=2), 2)
    assert shard_gets(proxy, f"/test/{fmt}", local) == [1] * 7  # epoch 2 read the cache
    numpy = shardkit.open(url, storage_options=options, cache_dir=str(tmp_path / "c"))
    assert contents(numpy.batches(4, shuffle=False)) == \
        contents(shardkit.open(local).batches(4, shuffle=False))
    assert np.array_equal(numpy.read_shard(3).images, shardkit.open(local).read_shard(3).images)
    assert numpy.metadata(2) == shardkit.open(local).metadata(2)
    assert shard_gets(proxy, f"/test/{fmt}", local) == [1] * 7  # one cache for both
    with pytest.raises(ConfigError, match="fixed when the dataset is opened"):
        next(numpy.batches(4, cache_dir=str(tmp_path / "other")))


def test_dataloader_workers_each_make_their_cache_and_share_its_files(
        datasets: dict[str, Path], on_s3: Any, tmp_path: Path) -> None:
    url, options, proxy = on_s3("tar")
    dataset = shardkit.ShardDataset(url, 4, seed=1, storage_options=options,
                                    cache_dir=str(tmp_path / "c"), retry=FAST)
    assert pickle.loads(pickle.dumps(dataset)).reading._remote is None  # made where it reads
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    expected = contents(shardkit.ShardLoader(datasets["tar"], 4, seed=1))
    assert contents(loader) == expected
    assert shard_gets(proxy, "/test/tar", datasets["tar"]) == [1] * 7  # two processes, one download
    assert contents(pickle.loads(pickle.dumps(dataset))) == expected


def test_http_datasets_read_like_local_ones(datasets: dict[str, Path], http_folder: Any,
                                           tmp_path: Path) -> None:
    shutil.copytree(datasets["parquet"], Path(http_folder.root) / "ds")
    url = f"{http_folder.url}/ds"
    loader = shardkit.ShardLoader(url, 6, cache_dir=str(tmp_path / "c"), retry=FAST)
    assert epochs(loader, 2) == epochs(shardkit.ShardLoader(datasets["parquet"], 6), 2)
    assert shard_gets(http_folder, "/ds", datasets["parquet"]) == [1] * 7
    keras = shardkit.keras.dataset(url, 6, shuffle=False, cache_dir=str(tmp_path / "c"))
    x, y = next(iter(keras))
    first = next(iter(shardkit.ShardLoader(datasets["parquet"], 6, shuffle=False)))
    assert torch.equal(x, first["image"]) and torch.equal(y, first["label"])


def test_a_table_at_a_url(tmp_path: Path, http_folder: Any) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,y\n" + "".join(f"{i},{i * 0.5},{i % 3}\n" for i in range(40)))
    local = tmp_path / "table"
    shardkit.convert(csv, local, label_col="y", samples_per_shard=8, workers=0)
    shutil.copytree(local, Path(http_folder.root) / "table")
    remote = shardkit.ShardLoader(f"{http_folder.url}/table", 7, seed=4, cache_dir=str(tmp_path / "c"))
    got = [(b["index"].tolist(), b["features"].numpy().tobytes()) for b in remote]
    want = [(b["index"].tolist(), b["features"].numpy().tobytes())
            for b in shardkit.ShardLoader(local, 7, seed=4)]
    assert got == want
    opened = shardkit.open(f"{http_folder.url}/table", cache_dir=str(tmp_path / "c"))
    assert np.array_equal(opened.read_table(2).features, shardkit.open(local).read_table(2).features)


# --- damaged, stale, limited ----------------------------------------------------------------

def cached(root: Path, name: str) -> list[Path]:
    return sorted(root.glob(f"*/shards/{name}"))


def test_a_damaged_cached_copy_is_fetched_again_never_served(
        datasets: dict[str, Path], on_s3: Any, tmp_path: Path) -> None:
    url, options, proxy = on_s3("tar")
    root = tmp_path / "c"
    want = epochs(shardkit.ShardLoader(datasets["tar"], 4, shuffle=False), 1)
    assert epochs(shardkit.ShardLoader(url, 4, shuffle=False, storage_options=options,
                                       cache_dir=str(root)), 1) == want
    flipped, = cached(root, "shard-00002.tar")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x10  # same size: only the hash can tell
    flipped.write_bytes(bytes(data))
    cut, = cached(root, "shard-00005.tar")
    cut.write_bytes(cut.read_bytes()[:100])  # a size check tells
    again = shardkit.ShardLoader(url, 4, shuffle=False, storage_options=options,
                                 cache_dir=str(root), verify=True)
    assert epochs(again, 1) == want
    assert shard_gets(proxy, "/test/tar", datasets["tar"]) == [1, 1, 2, 1, 1, 2, 1]
    assert cut.read_bytes() == (datasets["tar"] / "shard-00005.tar").read_bytes()


def test_a_dataset_overwritten_at_the_same_url_is_read_fresh(
        datasets: dict[str, Path], s3: Any, tmp_path: Path) -> None:
    root = tmp_path / "c"
    other = small_dataset(small_tree(tmp_path / "src2", 5), tmp_path / "other", 3)
    upload_dataset(datasets["tar"], "s3://test/ds", s3.options())
    first = shardkit.ShardLoader("s3://test/ds", 4, storage_options=s3.options(), cache_dir=str(root))
    assert epochs(first, 1) == epochs(shardkit.ShardLoader(datasets["tar"], 4), 1)
    upload_dataset(other, "s3://test/ds", s3.options())  # same URL, same shard names
    fresh = shardkit.ShardLoader("s3://test/ds", 4, storage_options=s3.options(), cache_dir=str(root))
    assert epochs(fresh, 1) == epochs(shardkit.ShardLoader(other, 4), 1)
    assert len(list(root.glob("*/index.json"))) == 2  # one folder per version of index.json
    assert first.dataset.total == 27 and fresh.dataset.total == 15


def test_the_cache_limit_is_held_over_epochs_and_a_too_small_one_is_refused_up_front(
        datasets: dict[str, Path], on_s3: Any, tmp_path: Path) -> None:
    url, options, proxy = on_s3("tar")
    root = tmp_path / "c"
    largest = max(s.bytes for s in Manifest.read(datasets["tar"]).shards)
    limit = 6 * largest  # the dataset is 7 shards: some must be evicted every epoch
    loader = shardkit.ShardLoader(url, 4, window=1, seed=3, storage_options=options,
                                  cache_dir=str(root), cache_limit=limit, prefetch_shards=1)
    assert loader.dataset.reading.capacity == 3  # window + 2 open (pinned): it cannot hold all
    roomy = shardkit.ShardLoader(url, 4, window=1, storage_options=options, cache_dir=str(root))
    assert roomy.dataset.reading.capacity == 7  # it can: all open, as a local reader keeps them
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cache_usage(str(root)))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        got = bounded(lambda: epochs(loader, 3))  # a pin never let go would stall it
    finally:
        stop.set()
        sampler.join()
    assert got == epochs(shardkit.ShardLoader(datasets["tar"], 4, window=1, seed=3), 3)
    assert 0 < peak[0] <= limit and cache_usage(str(root)) <= limit
    assert sum(shard_gets(proxy, "/test/tar", datasets["tar"])) > 7  # evicted, fetched again
    proxy.reset_counts()
    with pytest.raises(ConfigError, match="cache_limit is 3000 bytes, smaller than reading needs"):
        shardkit.ShardLoader(url, 4, storage_options=options, cache_dir=str(root), cache_limit=3000)
    with pytest.raises(ConfigError, match="cache_limit"):
        shardkit.open(url, storage_options=options, cache_dir=str(root), cache_limit=3000).read_shard(0)
    assert shard_gets(proxy, "/test/tar", datasets["tar"]) == [0] * 7  # refused before any GET


def test_a_cache_limit_of_the_whole_dataset_reads_a_global_shuffle(
        datasets: dict[str, Path], on_s3: Any, tmp_path: Path) -> None:
    # docs/remote.md: with window=None the cache must hold the whole dataset. Holding exactly
    # that was refused: one more shard than the dataset has was asked for.
    url, options, _ = on_s3("tar")
    shards = Manifest.read(datasets["tar"]).shards
    limit = len(shards) * max(s.bytes for s in shards)
    loader = shardkit.ShardLoader(url, 4, window=None, seed=3, storage_options=options,
                                  cache_dir=str(tmp_path / "c"), cache_limit=limit, prefetch_shards=0)
    assert epochs(loader, 2) == epochs(shardkit.ShardLoader(datasets["tar"], 4, window=None, seed=3), 2)
    with pytest.raises(ConfigError, match="lower cache_shards or the shuffle window"):
        shardkit.ShardLoader(url, 4, window=None, storage_options=options,
                             cache_dir=str(tmp_path / "c"), cache_limit=limit - 1, prefetch_shards=0)


@pytest.mark.parametrize("bad", [{"cache_limit": 0}, {"prefetch_shards": -1}, {"cache_dir": 3},
                                 {"storage_options": "endpoint"}, {"retry": 5}])
def test_remote_options_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        shardkit.ReadOptions(**bad)


def test_urls_that_cannot_be_read_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported URL scheme"):
        shardkit.ShardLoader("nosuch://bucket/ds", 4)
    with pytest.raises(ConfigError, match="without '//'"):
        shardkit.open("s3:bucket/ds")
    with pytest.raises(shardkit.DatasetError, match="not a shardkit dataset"):
        shardkit.open(f"file://{tmp_path}")


# --- faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [
    Fault("status", "shard-00003", times=3, status=503),
    Fault("status", "shard-00001", times=2, status=429),
    Fault("drop", "shard-00004", after=900),
    Fault("corrupt", "shard-00002", offset=1500),
    Fault("status", "index.json", times=2, status=500),
], ids=["503", "429", "drop", "flip", "index-500"])
def test_faults_end_in_the_right_batches(fault: Fault, datasets: dict[str, Path], on_s3: Any,
                                         tmp_path: Path) -> None:
    url, options, proxy = on_s3("parquet")
    proxy.add(fault)
    loader = bounded(lambda: shardkit.ShardLoader(url, 4, seed=7, storage_options=options,
                                                  cache_dir=str(tmp_path / "c"), retry=FAST))
    want = epochs(shardkit.ShardLoader(datasets["parquet"], 4, seed=7), 1)
    assert bounded(lambda: epochs(loader, 1)) == want
    assert fault.times == 0  # the fault happened


def test_a_shard_always_served_wrong_is_a_clean_error(datasets: dict[str, Path], on_s3: Any,
                                                     http_folder: Any, fault_proxy: Any,
                                                     tmp_path: Path) -> None:
    url, options, proxy = on_s3("tar")
    proxy.add(Fault("corrupt", "shard-00001", times=100, offset=700))
    loader = shardkit.ShardLoader(url, 4, shuffle=False, storage_options=options,
                                  cache_dir=str(tmp_path / "c"), retry=FAST)
    # S3 answers carry a checksum, which botocore checks: a transport failure, retried
    with pytest.raises(RemoteError, match=r"s3://test/tar/shard-00001\.tar failed 4 times; "
                                          "last: FlexibleChecksumError"):
        bounded(lambda: epochs(loader, 1))
    shutil.copytree(datasets["tar"], Path(http_folder.root) / "ds")
    plain = fault_proxy(http_folder.url)  # no checksum: our sha256 while streaming tells
    plain.add(Fault("corrupt", "shard-00001", times=100, offset=700))
    loader = shardkit.ShardLoader(f"{plain.url}/ds", 4, shuffle=False, cache_dir=str(tmp_path / "c"),
                                  retry=FAST)
    with pytest.raises(CorruptShardError, match=r"/ds/shard-00001\.tar: sha256 .* \(downloaded 3 times"):
        bounded(lambda: epochs(loader, 1))
    assert list((tmp_path / "c").glob("*/shards/*shard-00001*")) == []  # nothing partial kept


def test_a_server_failing_past_the_budget_is_a_remote_error(on_s3: Any, tmp_path: Path) -> None:
    url, options, proxy = on_s3("tar")
    proxy.add(Fault("status", "shard-00004", times=100, status=503))
    loader = shardkit.ShardLoader(url, 4, shuffle=False, storage_options=options,
                                  cache_dir=str(tmp_path / "c"), retry=FAST)
    with pytest.raises(RemoteError, match=r"s3://test/tar/shard-00004\.tar failed 4 times; last: HTTP 503"):
        bounded(lambda: epochs(loader, 1))
    proxy.clear()
    assert len(epochs(loader, 1)[0]) == 7  # the next epoch tries again


# --- the CLI --------------------------------------------------------------------------------

def test_cli_info_and_preview_of_an_s3_dataset(datasets: dict[str, Path], on_s3: Any,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    url, options, proxy = on_s3("tar")
    flags = ["--storage-option", f"endpoint_url={options['endpoint_url']}",
             "--storage-option", "key=testing", "--storage-option", "secret=testing",
             "--storage-option", 'client_kwargs={"region_name": "us-east-1"}']
    assert main(["info", url, *flags]) == 0
    out = capsys.readouterr().out
    assert f"dataset     {url}" in out and "samples     27 of 27 inputs" in out
    assert shard_gets(proxy, "/test/tar", datasets["tar"]) == [0] * 7  # index.json alone
    sheet = tmp_path / "sheet.png"
    assert main(["preview", url, "-o", str(sheet), "--n", "5", "--cache-dir", str(tmp_path / "c"),
                 *flags]) == 0
    assert sheet.stat().st_size > 0 and "(5 samples)" in capsys.readouterr().out
    assert main(["info", "s3://test/none", *flags]) == shardkit.DatasetError.exit_code
    assert "s3://test/none: not a shardkit dataset" in capsys.readouterr().err
    assert main(["info", url, "--storage-option", "novalue"]) == ConfigError.exit_code
    # A bucket that does not exist is the storage's failure, not a missing index.json.
    for command in (["info", "s3://nobucket/ds"], ["verify", "s3://nobucket/ds"]):
        assert main([*command, *flags]) == shardkit.RemoteError.exit_code
        assert "bucket does not exist" in capsys.readouterr().err
    # An option the filesystem does not take is a bad option, not a failed request.
    assert main(["info", url, *flags, "--storage-option", "bogus=1"]) == ConfigError.exit_code
    assert "bogus" in capsys.readouterr().err
    for output in (str(tmp_path / "nowhere" / "x.png"), str(tmp_path), "s3://test/x.png"):
        assert main(["preview", url, "-o", output, *flags]) == ConfigError.exit_code
        assert capsys.readouterr().err.startswith("shardkit: error: the preview")
