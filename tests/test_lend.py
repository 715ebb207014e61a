"""Stored-order batches of raw shards lent out of the mapped shard instead of copied: they
hold the stored pixels, are the caller's to change, and a change never reaches the file,
another batch of the pass, or a later pass (whether the batch was let go or is still held)."""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from corpus import image_tree

import shardkit
from shardkit import ShardLoader
from shardkit.reader.mapping import Lender, map_shard, written

SIZE = (48, 40)  # 5,760 bytes a sample: samples span pages, and neighbours share some
BATCH = 4


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    image_tree(root, classes=("a", "b"), per_class=13, min_side=50, max_side=90)
    return root


@pytest.fixture(scope="module", params=["tar", "parquet"])
def dataset(request: pytest.FixtureRequest, src: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("d") / request.param
    shardkit.convert(src, out, size=SIZE, workers=0, format=request.param, samples_per_shard=10)
    return out


def stored(path: Path) -> np.ndarray:
    ds = shardkit.open(path)
    return np.concatenate([np.array(ds.read_shard(i).images) for i in range(len(ds.manifest.shards))])


def shard_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("shard-*"))}


def test_stored_order_batches_are_the_mapping_itself(dataset: Path) -> None:
    """No copy: batches inside one shard are views of the shard's mapping, each BATCH rows
    of the file further on than the one before (copies would come from a few reused
    buffers), and a second epoch (nothing written, nothing held) hands out the very same
    memory; a batch that spans two shards is a copy."""
    images = stored(dataset)
    loader = ShardLoader(dataset, BATCH, shuffle=False)
    starts = np.cumsum([0] + [s.samples for s in shardkit.open(dataset).manifest.shards])
    first = []
    for batch in loader:
        index, image = batch["index"].tolist(), batch["image"]
        np.testing.assert_array_equal(image.numpy(), images[index])
        shard = int(np.searchsorted(starts, index[0], "right"))
        inside = shard == int(np.searchsorted(starts, index[-1], "right"))
        first.append((index, image.data_ptr(), image.stride(0), shard if inside else None))
    assert any(s is None for *_, s in first) and not all(s is None for *_, s in first)
    steps = [(b[1] - a[1], a[2]) for a, b in itertools.pairwise(first) if a[3] is not None and a[3] == b[3]]
    assert steps and all(step == BATCH * row for step, row in steps)
    if dataset.name == "tar":  # a sample's tar headers lie between its pixels and the next's
        assert all(row > SIZE[0] * SIZE[1] * 3 for _, row in steps)
    del batch, image  # a batch still held would have its shard opened afresh
    assert [(i, p) for i, p, *_ in first] == [(b["index"].tolist(), b["image"].data_ptr()) for b in loader]


def test_shuffled_batches_are_never_lent(dataset: Path) -> None:
    """A shuffled pass copies every batch, even one whose samples happen to be consecutive
    (one sample a batch): its batches come from a few reused buffers, not from the mapping."""
    images = stored(dataset)
    pointers = set()
    for batch in ShardLoader(dataset, 1, shuffle=True, seed=3):
        assert batch["image"].is_contiguous()
        np.testing.assert_array_equal(batch["image"].numpy(), images[batch["index"].numpy()])
        pointers.add(batch["image"].data_ptr())
    assert len(pointers) <= 8 < len(images)


def test_a_lent_batch_changed_in_place_changes_nothing_else(dataset: Path) -> None:
    """Every batch is zeroed in place as it comes: the next batch of the pass (which may
    share a page with it) and every batch of the next pass still hold the stored pixels, and
    the shard files are byte for byte what they were."""
    images, before = stored(dataset), shard_hashes(dataset)
    loader = ShardLoader(dataset, BATCH, shuffle=False)
    for _ in range(2):
        for batch in loader:
            image = batch["image"]
            np.testing.assert_array_equal(image.numpy(), images[batch["index"].numpy()])
            image.zero_()
            image.numpy()[:, 0, 0] = 255  # numpy's view of it is writable too
        del batch, image
    assert shard_hashes(dataset) == before


def test_a_batch_held_from_an_earlier_pass_and_changed_later_changes_nothing(dataset: Path) -> None:
    """A caller keeps every batch of the first epoch and writes into all of them while the
    second epoch runs: the second epoch's batches are the stored pixels all the same."""
    images = stored(dataset)
    loader = ShardLoader(dataset, BATCH, shuffle=False)
    held = [b["image"] for b in loader]
    for step, batch in enumerate(loader):
        for kept in held:
            kept.fill_(step + 1)
        np.testing.assert_array_equal(batch["image"].numpy(), images[batch["index"].numpy()])
    assert all(bool((kept == len(held)).all()) for kept in held)  # the caller's own changes stay


def test_many_passes_that_write_hold_no_more_files_or_memory(dataset: Path) -> None:
    """Shards opened again after a pass that wrote into its batches let go of the old
    mapping (and its open file) once nothing holds it: ten passes hold what two do."""
    loader = ShardLoader(dataset, BATCH, shuffle=False)

    def opened_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    counts = []
    for _ in range(10):
        for batch in loader:
            batch["image"].zero_()
        del batch
        counts.append(opened_files())
    assert counts[-1] <= counts[1], counts


def test_numpy_batches_and_worker_processes_lend_the_same_pixels(dataset: Path) -> None:
    """Dataset.batches (numpy) and a DataLoader over ShardDataset with worker processes read
    stored order the same way: the stored pixels, writable, a change not seen again; and
    worker processes forked from a process that read the dataset itself (its shards still
    open there) read on their own."""
    images = stored(dataset)
    ds = shardkit.open(dataset)
    for _ in range(2):
        for batch in ds.batches(BATCH, shuffle=False):
            np.testing.assert_array_equal(batch["image"], images[batch["index"]])
            batch["image"][...] = 7
    dataset_ = shardkit.ShardDataset(dataset, BATCH, shuffle=False)
    for batch in dataset_:  # in this process first: its shards stay open for the next pass
        batch["image"].zero_()
    workers = torch.utils.data.DataLoader(dataset_, batch_size=None, num_workers=2,
                                          multiprocessing_context="fork", timeout=60)
    for _ in range(2):
        seen = []
        for batch in workers:
            np.testing.assert_array_equal(batch["image"].numpy(), images[batch["index"].numpy()])
            batch["image"].zero_()
            seen.extend(batch["index"].tolist())
        assert sorted(seen) == list(range(len(images)))


PAGEMAP = pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK),
                             reason="no /proc/self/pagemap: written pages cannot be told apart")


@PAGEMAP
def test_written_tells_a_written_page_from_a_read_one(tmp_path: Path) -> None:
    """pagemap: reading a private mapping leaves its pages the file's; writing one byte makes
    that page a private copy; a new mapping of the file is the file again."""
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB: four pages
    mapped = map_shard(str(path))
    buffer = np.frombuffer(mapped, dtype=np.uint8)
    assert int(buffer.sum()) == 64 * sum(range(256))
    assert not written(buffer)
    buffer[mmap.PAGESIZE + 3] ^= 1
    assert written(buffer) and not written(buffer[:mmap.PAGESIZE])
    assert path.read_bytes() == bytes(range(256)) * 64
    assert not written(np.frombuffer(map_shard(str(path)), dtype=np.uint8))


@PAGEMAP
def test_a_lender_serves_again_only_when_nothing_lent_is_alive_or_written(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(3 * mmap.PAGESIZE))
    lender = Lender(map_shard(str(path)))
    inside = np.frombuffer(lender.mapping, dtype=np.uint8)[10:20]
    inside.flags.writeable = False
    assert lender.fresh() and not lender.lent  # nothing lent
    twin = lender.lend(inside)
    assert twin.flags.writeable and np.shares_memory(twin, inside) and lender.lent
    assert not lender.fresh()  # still alive: its owner may write into it later
    twin = lender.lend(inside)
    del twin
    assert lender.fresh()  # let go, unwritten
    twin = lender.lend(inside)
    twin[0] = 1
    del twin
    assert not lender.fresh()


def test_two_passes_open_at_once_never_share_a_batch(dataset: Path) -> None:
    """Two passes over one in-process ShardDataset read the same samples from the same
    opened shards: while both are open nothing is lent, so zeroing one pass's batch leaves
    the other's alone."""
    images = stored(dataset)
    reading = shardkit.ShardDataset(dataset, BATCH, shuffle=False)
    for first, second in zip(iter(reading), iter(reading), strict=True):
        first["image"].zero_()
        np.testing.assert_array_equal(second["image"].numpy(), images[second["index"].numpy()])


def test_read_shard_and_worker_batches_are_copies(dataset: Path) -> None:
    """Whole shards read with read_shard are the caller's arrays (holding them holds no
    file), and batches from DataLoader worker processes are plain copies in shared memory,
    not a shard's bytes with its tar members between the pixels."""
    ds = shardkit.open(dataset)
    before = len(os.listdir("/proc/self/fd"))
    held = [ds.read_shard(i) for i in range(len(ds.manifest.shards))]
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(shard.images.flags.owndata or (shard.images.base is not None
                                              and shard.images.base.flags.owndata)
               for shard in held)
    workers = torch.utils.data.DataLoader(shardkit.ShardDataset(dataset, BATCH, shuffle=False),
                                          batch_size=None, num_workers=2)
    for batch in workers:
        image = batch["image"]
        assert image.is_contiguous() and image.untyped_storage().nbytes() == image.nbytes


def test_remote_shards_opened_again_keep_one_pin_each(dataset: Path, http_folder: Any,
                                                     tmp_path: Path) -> None:
    """Over HTTP, shards that lent batches written into are opened again every pass: each
    still holds one pin in the node cache (a pin never let go would stall eviction)."""
    import shutil

    shutil.copytree(dataset, Path(http_folder.root) / "ds")
    images = stored(dataset)
    loader = ShardLoader(f"{http_folder.url}/ds", BATCH, shuffle=False,
                         cache_dir=str(tmp_path / "cache"))
    for _ in range(4):
        for batch in loader:
            np.testing.assert_array_equal(batch["image"].numpy(), images[batch["index"].numpy()])
            batch["image"].zero_()
    remote = loader.dataset.reading._remote
    assert remote is not None
    assert [pin.readers for pin in remote._pins.values()] == [1] * len(shardkit.open(dataset).manifest.shards)


REFUSED = """
import hashlib, resource, sys, threading
import numpy as np
import torch  # noqa: F401  (loaded before the limit: a library's own mappings count too)
from shardkit import ShardLoader
threading.stack_size(512 * 1024)  # the loader's threads: small stacks, not 8 MiB of data each
expected = np.load(sys.argv[2])
data = [line for line in open("/proc/self/status") if line.startswith("VmData")][0]
room = int(data.split()[1]) * 1024 + (20 << 20)  # less than the one 30 MB shard
resource.setrlimit(resource.RLIMIT_DATA, (room, resource.getrlimit(resource.RLIMIT_DATA)[1]))
for _ in range(2):
    for batch in ShardLoader(sys.argv[1], 16, shuffle=False):
        assert batch["image"].is_contiguous()  # copies: nothing lent from a shared mapping
        first, last = batch["index"][0].item(), batch["index"][-1].item()
        # hashes, not an array of comparisons: the limit leaves little room
        assert hashlib.sha256(batch["image"].numpy()).digest() == \
            hashlib.sha256(expected[first:last + 1]).digest()
        batch["image"].zero_()
print("read", len(expected))
"""


def test_a_private_mapping_the_system_refuses_reads_through_a_shared_one(tmp_path: Path) -> None:
    """A writable private mapping counts against the commit limit and RLIMIT_DATA as memory
    would: where the system refuses one, the shard is mapped shared and read-only, and the
    pass reads the same pixels (copied, not lent)."""
    import subprocess
    import sys

    src = tmp_path / "src"
    image_tree(src, classes=("a",), per_class=200, min_side=30, max_side=40)
    out = tmp_path / "big"
    shardkit.convert(src, out, size=(224, 224), workers=0)
    assert len(shardkit.open(out).manifest.shards) == 1
    np.save(tmp_path / "expected.npy", stored(out))
    done = subprocess.run([sys.executable, "-c", REFUSED, str(out), str(tmp_path / "expected.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["read", "200"]
