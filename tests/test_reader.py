"""The streaming reader: values, order, workers, resume, DDP, integrity, safety."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from corpus import loader, small_dataset, small_tree

import shardkit
from shardkit import CorruptShardError, ShardLoader, UnsafeContentError
from shardkit.format.tar_members import iter_members

BATCH = 5


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tree(tmp_path_factory.mktemp("src"), 9)


def convert(src: Path, out: Path, **options: object) -> Path:
    return small_dataset(src, out, 6, **options)


@pytest.fixture(scope="module")
def tar_ds(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(src, tmp_path_factory.mktemp("d") / "tar")


def stored(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every image and label as the converter wrote them (read shard by shard)."""
    ds = shardkit.open(path)
    shards = [ds.read_shard(i) for i in range(len(ds.manifest.shards))]
    images = np.concatenate([np.stack(list(s.images)) for s in shards])
    labels = np.concatenate([s.labels for s in shards if s.labels is not None])
    return images, labels


def indices(loader: ShardLoader) -> list[list[int]]:
    return [b["index"].tolist() for b in loader]


@pytest.mark.parametrize("fmt,codec", [("tar", "raw"), ("parquet", "raw"), ("tar", "jpeg"),
                                       ("parquet", "png")])
def test_batches_hold_exactly_what_was_written(src: Path, tmp_path: Path, fmt: str, codec: str) -> None:
    out = convert(src, tmp_path / "d", format=fmt, codec=codec)
    images, labels = stored(out)
    seen = []
    for workers in (0, 2):
        for batch in loader(out, BATCH, workers, seed=4, fields=["source", "key"]):
            index = batch["index"].numpy()
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (10, 12, 3)
            np.testing.assert_array_equal(batch["image"].numpy(), images[index])
            np.testing.assert_array_equal(batch["label"].numpy(), labels[index])
            assert [s.split("/")[0] for s in batch["source"]] == [["a", "b", "c"][v] for v in labels[index]]
            assert batch["key"] == [f"{i:06d}" for i in index]  # no failures: keys are positions
            seen.extend(index.tolist())
    assert sorted(seen) == sorted(list(range(27)) * 2)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_batches_kept_by_the_caller_are_never_overwritten(src: Path, tmp_path: Path, fmt: str) -> None:
    out = convert(src, tmp_path / "d", format=fmt)
    images, _ = stored(out)
    loader = ShardLoader(out, 4, seed=1)
    for _ in range(2):  # the second epoch reuses buffers the first one released
        kept = [(b["index"].numpy().copy(), b["image"][1:]) for b in loader]  # views keep them too
        for index, view in kept:
            np.testing.assert_array_equal(view.numpy(), images[index[1:]])


def test_order_is_the_same_for_any_number_of_workers(tar_ds: Path) -> None:
    orders = [indices(loader(tar_ds, BATCH, w, seed=9)) for w in (0, 1, 2, 4)]
    assert orders[0] == orders[1] == orders[2] == orders[3]
    assert sorted(i for b in orders[0] for i in b) == list(range(27))
    assert orders[0] != sorted(orders[0])  # shuffled
    plain = indices(ShardLoader(tar_ds, BATCH, shuffle=False))
    assert [i for b in plain for i in b] == list(range(27))


def test_epochs_reshuffle_and_set_epoch_replays(tar_ds: Path) -> None:
    loader = ShardLoader(tar_ds, BATCH, seed=2)
    first, second = indices(loader), indices(loader)
    assert first != second and loader.epoch == 2
    loader.set_epoch(0)
    assert indices(loader) == first


@pytest.mark.filterwarnings("ignore:ShardLoader\\(num_workers")  # it reads with threads
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_random_cut_points_yields_exactly_the_rest(tar_ds: Path, workers: int) -> None:
    full = indices(ShardLoader(tar_ds, BATCH, seed=5, num_workers=workers))
    rng = np.random.default_rng(0)
    for cut in sorted(set(rng.integers(0, len(full), size=3).tolist()) | {0, len(full) - 1}):
        loader = ShardLoader(tar_ds, BATCH, seed=5, num_workers=workers)
        iterator = iter(loader)
        for _ in range(cut):
            next(iterator)
        state = json.loads(json.dumps(loader.state_dict()))  # plain JSON, no pickle
        assert state["samples"] == cut * BATCH and state["epoch"] == 0
        fresh = ShardLoader(tar_ds, BATCH, seed=5, num_workers=workers)
        fresh.load_state_dict(state)
        assert indices(fresh) == full[cut:]
        assert fresh.epoch == 1 and fresh.state_dict()["samples"] == 0


def test_state_of_another_dataset_or_split_is_refused(src: Path, tar_ds: Path, tmp_path: Path) -> None:
    other = convert(src, tmp_path / "other", shuffle=True, seed=1)
    state = ShardLoader(other, BATCH).state_dict()
    with pytest.raises(shardkit.ConfigError, match="different dataset"):
        ShardLoader(tar_ds, BATCH).load_state_dict(state)
    state = ShardLoader(tar_ds, BATCH, seed=1).state_dict()
    with pytest.raises(shardkit.ConfigError, match="other settings"):
        ShardLoader(tar_ds, BATCH, seed=2).load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_equal_batches_and_cover_the_data(tar_ds: Path, world: int, drop_last: bool) -> None:
    per_rank = [indices(ShardLoader(tar_ds, 4, rank=r, world_size=world, drop_last=drop_last, seed=1))
                for r in range(world)]
    loaders = [ShardLoader(tar_ds, 4, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    assert [len(b) for b in per_rank] == [len(loaders[0])] * world
    flat = [i for batches in per_rank for b in batches for i in b]
    if drop_last:
        assert len(flat) == len(set(flat)) == world * ((27 // world) // 4 * 4)
    else:
        assert set(flat) == set(range(27)) and len(flat) == 27 + loaders[0].padding


def _ddp_worker(rank: int, world: int, port: int, path: str, result: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        loader = ShardLoader(path, 4, num_workers=2, seed=3)
        mine = torch.cat([b["index"] for b in loader])
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        torch.distributed.all_gather(counts, torch.tensor([len(loader)]))
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine)  # equal sizes on every rank, or this hangs
        if rank == 0:
            Path(result).write_text(json.dumps({"rank_of_world": [loader.dataset.reading.rank, world],
                                                "batches": [int(c) for c in counts],
                                                "index": [g.tolist() for g in gathered]}))
    finally:
        torch.distributed.destroy_process_group()


def test_real_two_process_gloo_run_with_workers(tar_ds: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = tmp_path / "ddp.json"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tar_ds), str(result)), nprocs=2,
                                join=True)
    report = json.loads(result.read_text())
    assert report["rank_of_world"] == [0, 2] and report["batches"] == [4, 4]
    flat = [i for rank in report["index"] for i in rank]
    assert len(flat) == 28 and set(flat) == set(range(27))  # one repeated sample pads rank 1


def _rewrite(out: Path, shard: str, data: bytes, *, update_index: bool) -> None:
    (out / shard).write_bytes(data)
    if update_index:
        index = json.loads((out / "index.json").read_text())
        for record in index["shards"]:
            if record["file"] == shard:
                record["bytes"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        (out / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("damage", ["member_boundary", "mid_member", "missing", "flipped_byte"])
def test_damaged_shards_are_detected_naming_the_file(src: Path, tmp_path: Path, damage: str) -> None:
    out = convert(src, tmp_path / "d")
    shard = "shard-00002.tar"
    data = (out / shard).read_bytes()
    stride = json.loads((out / "index.json").read_text())["shards"][2]["layout"]["stride"]
    if damage == "member_boundary":
        (out / shard).write_bytes(data[: 3 * stride] + bytes(1024))  # a valid, shorter tar
    elif damage == "mid_member":
        (out / shard).write_bytes(data[: 3 * stride + 700])
    elif damage == "missing":
        (out / shard).unlink()
    else:
        flipped = bytearray(data)
        flipped[stride + 2000] ^= 0x40  # inside a sample's pixels: only the hash can tell
        (out / shard).write_bytes(bytes(flipped))
    verify = damage == "flipped_byte"
    with pytest.raises(CorruptShardError, match=shard.replace(".", r"\.")):
        for _ in ShardLoader(out, BATCH, shuffle=False, verify=verify):
            pass
    if damage == "flipped_byte":  # without verify the structure is intact and reading goes on
        assert sum(len(b["index"]) for b in ShardLoader(out, BATCH)) == 27


def test_a_header_flip_is_caught_without_hashing(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "d")
    data = bytearray((out / "shard-00001.tar").read_bytes())
    stride = json.loads((out / "index.json").read_text())["shards"][1]["layout"]["stride"]
    data[2 * stride + 156] = ord("2")  # the .npy member becomes a symbolic link
    (out / "shard-00001.tar").write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.tar"):
        list(ShardLoader(out, BATCH, shuffle=False))


def _tar_with(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info, data


@pytest.mark.parametrize("bad", [
    _member("000000.jpg", kind=tarfile.SYMTYPE),
    _member("../000000.jpg", b"x"),
    _member("/tmp/000000.jpg", b"x"),
    _member("000000.pyd", b"x"),
    _member("000000.pickle", b"x"),
    _member("sub/000000.jpg", b"x"),
])
def test_unsafe_members_are_refused(src: Path, tmp_path: Path, bad: tuple[tarfile.TarInfo, bytes]) -> None:
    out = convert(src, tmp_path / "d", codec="jpeg", samples_per_shard=100)
    with tarfile.open(out / "shard-00000.tar") as archive:
        good = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]  # type: ignore[union-attr]
    _rewrite(out, "shard-00000.tar", _tar_with([bad, *good]), update_index=True)
    with pytest.raises(UnsafeContentError, match=r"shard-00000\.tar"):
        list(ShardLoader(out, BATCH))


def test_numpy_path_works_without_torch(tar_ds: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import shardkit\n"
        f"ds = shardkit.open({str(tar_ds)!r})\n"
        "batches = list(ds.batches(4, shuffle=True, seed=1))\n"
        "print(sum(len(b['index']) for b in batches), type(batches[0]['image']).__name__)\n"
        "try:\n    shardkit.ShardLoader\nexcept ImportError as e:\n    print(type(e).__name__, e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "27 ndarray"
    assert lines[1].startswith("MissingExtraError") and "shardkit[torch]" in lines[1]


def test_an_extra_that_is_installed_and_broken_says_what_broke(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # It said "is not installed" for any ImportError: a library torch loads failing to map
    # sent users to install what they had.
    from shardkit.errors import MissingExtraError, require

    (tmp_path / "broken_extra").mkdir()
    (tmp_path / "broken_extra" / "__init__.py").write_text(
        "raise ImportError('libbroken.so: failed to map segment from shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError, match=r"installed but does not import .*libbroken\.so"):
        require("broken_extra", "torch")
    with pytest.raises(MissingExtraError, match=r"^no_such_extra_module is not installed"):
        require("no_such_extra_module", "torch")


def test_to_device_normalises_on_the_device(tar_ds: Path) -> None:
    batch = next(iter(ShardLoader(tar_ds, BATCH)))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    moved = shardkit.to_device(batch, "cpu", mean=mean, std=std)
    x = moved["image"]
    assert x.shape == (BATCH, 3, 10, 12) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = (batch["image"].permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert torch.equal(moved["label"], batch["label"])
    plain = shardkit.to_device(batch, "cpu", channels_last=False)["image"]
    assert plain.is_contiguous() and float(plain.max()) <= 1.0


@pytest.mark.parametrize(("fmt", "compression", "kept"), [("tar", "none", 5), ("parquet", "none", 5),
                                                          ("parquet", "zstd", 4)])
def test_mapped_raw_shards_all_stay_open_between_epochs(src: Path, tmp_path: Path, fmt: str,
                                                        compression: str, kept: int) -> None:
    """Five shards, a shuffle window of 2: memory-mapped raw shards (tar, uncompressed Parquet)
    stay mapped, so a later epoch re-opens none; compressed Parquet shards (copied into memory)
    are bounded by window + 2."""
    out = convert(src, tmp_path / fmt, format=fmt, compression=compression)
    loader = ShardLoader(out, 4, shuffle=True, window=2)
    assert len(shardkit.open(out).manifest.shards) == 5
    first = sorted(i for batch in loader for i in batch["index"].tolist())
    assert first == list(range(27))
    cache = loader.dataset.reading._cache
    assert len(cache._open) == kept == loader.dataset.reading.capacity
    assert ShardLoader(out, 4, window=2, cache_shards=3).dataset.reading.capacity == 3


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_jpeg_files_decoded_by_to_device_match_the_cpu_loader(src: Path, tmp_path: Path, fmt: str) -> None:
    """decode="device": batches carry the stored JPEG files; to_device decodes them (nvJPEG on
    CUDA, Pillow here) into the same normalised pixels as the CPU loader's batches."""
    out = convert(src, tmp_path / fmt, format=fmt, codec="jpeg", samples_per_shard=8)
    stored: dict[int, bytes] = {}
    dataset = shardkit.open(out)
    for number, record in enumerate(dataset.manifest.shards):
        if fmt == "tar":
            files = [data for _key, field, data in iter_members(out / record.file) if field == "jpg"]
        else:
            # jpeg/png Parquet images are Hugging Face's Image storage: {bytes, path}
            image = pq.read_table(out / record.file, columns=["image"]).column("image")
            files = image.combine_chunks().field("bytes").to_pylist()
        first = number * 8
        stored.update({first + i: data for i, data in enumerate(files)})
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    on_cpu = list(ShardLoader(out, BATCH, shuffle=True, seed=4))
    for workers in (0, 2):
        on_device = list(loader(out, BATCH, workers, shuffle=True, seed=4, decode="device"))
        assert len(on_device) == len(on_cpu) == 6
        for a, b in zip(on_cpu, on_device, strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
            files = b["image"]
            assert isinstance(files, list) and all(t.dtype == torch.uint8 and t.dim() == 1 for t in files)
            assert [t.numpy().tobytes() for t in files] == [stored[i] for i in b["index"].tolist()]
            x = shardkit.to_device(a, "cpu", mean=mean, std=std)["image"]
            y = shardkit.to_device(b, "cpu", mean=mean, std=std)["image"]
            assert y.shape == (len(files), 3, 10, 12)
            assert y.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(y, x, rtol=0, atol=0)
    with pytest.raises(shardkit.ConfigError, match="--codec jpeg"):
        ShardLoader(convert(src, tmp_path / "raw"), BATCH, decode="device")


def test_metadata_has_the_same_names_for_tar_and_parquet(src: Path, tmp_path: Path) -> None:
    """Dataset.metadata() used to give width/height/class for tar and key/orig_width/
    orig_height for Parquet: now both give the batch field names, the label and the class."""
    tar = shardkit.open(convert(src, tmp_path / "tar"))
    parquet = shardkit.open(convert(src, tmp_path / "parquet", format="parquet"))
    for number in range(len(tar.manifest.shards)):
        rows = tar.metadata(number)
        assert rows == parquet.metadata(number)
        assert list(rows[0]) == ["key", "source", "orig_width", "orig_height", "label", "class"]
        labels = tar.read_shard(number).labels
        assert labels is not None and [r["label"] for r in rows] == labels.tolist()
        assert [r["class"] for r in rows] == [r["source"].split("/")[0] for r in rows]


def test_window_zero_is_refused_everywhere(tar_ds: Path) -> None:
    """window=0 meant a window of 1 to the shuffle and a global window to the shard cache:
    it now has no meaning, and every entry point says so."""
    with pytest.raises(shardkit.ConfigError, match="window"):
        ShardLoader(tar_ds, BATCH, window=0)
    with pytest.raises(shardkit.ConfigError, match="window"):
        shardkit.open(tar_ds).batches(BATCH, window=0)
    with pytest.raises(shardkit.ConfigError, match="window"):
        shardkit.ReadOptions(window=0)


def test_batch_buffers_are_kept_for_the_loaders_life(tar_ds: Path) -> None:
    """The second epoch reuses the first epoch's batch arrays (when nobody holds them) instead
    of page-faulting fresh ones: the pool lives as long as the loader. (Shuffled: a
    stored-order read lends its batches out of the mapped shards and needs no buffer.)"""
    loader = ShardLoader(tar_ds, BATCH, shuffle=True, prefetch=0, copy_threads=1)
    for _ in loader:
        pass
    pool = loader.dataset.reading._pool
    kept = [id(buffer) for buffer in pool._buffers]
    assert kept  # the first epoch's batches were drawn from it
    second = {batch["image"].data_ptr() for batch in loader}
    assert loader.dataset.reading._pool is pool
    assert set(kept) <= {id(b) for b in pool._buffers}  # none dropped, at most a few added
    assert second <= {b.ctypes.data for b in pool._buffers}


def test_shard_loader_reads_with_threads_and_says_why_num_workers_is_not_used(tar_ds: Path) -> None:
    """num_workers by habit never makes reading slower: ShardLoader keeps to its threads and
    says so once, naming the reason; the batches are the same."""
    with pytest.warns(UserWarning, match="second copy of every batch through shared memory"):
        habit = ShardLoader(tar_ds, BATCH, num_workers=8, seed=2)
    assert indices(habit) == indices(ShardLoader(tar_ds, BATCH, seed=2))
