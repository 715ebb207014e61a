"""Batch copies: gathers out of one array or out of pieces, split over threads."""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from corpus import image_tree

import shardkit
from shardkit.reader.batches import Copier, split_copies
from shardkit.reader.gather import Pieces, gather


def _shard(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3, 4, 2), dtype=np.uint8)


def _pieces(rng: np.random.Generator, cut: list[int], *, gaps: bool) -> tuple[Pieces, np.ndarray]:
    """Pieces of `cut` images each and the joined array. With `gaps`, the pieces are views of
    one flat buffer with bytes between them (like Parquet pages behind their headers)."""
    row = 3 * 4 * 2
    if not gaps:
        whole = _shard(rng, sum(cut))
        bounds = np.cumsum([0, *cut])
        return Pieces([whole[a:b] for a, b in itertools.pairwise(bounds)]), whole
    flat = rng.integers(0, 256, size=sum(cut) * row + 37 * (len(cut) + 1), dtype=np.uint8)
    arrays, at = [], 37
    for count in cut:
        arrays.append(flat[at:at + count * row].reshape(count, 3, 4, 2))
        at += count * row + 37
    return Pieces(arrays), np.concatenate(arrays)


@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("cut", [[7], [1, 6], [3, 3, 1], [2, 1, 1, 1, 2]])
def test_gather_out_of_pieces_equals_indexing_the_joined_array(cut: list[int], gaps: bool) -> None:
    pieces, whole = _pieces(np.random.default_rng(len(cut)), cut, gaps=gaps)
    assert len(pieces) == len(whole)
    assert (pieces.offsets is not None) == gaps  # one buffer: one index_select for any batch
    for local in ([0], [6], [0, 1, 2, 3, 4, 5, 6], [1, 2, 3], [0, 2, 5, 6], [4, 5], [0, 6]):
        index = np.asarray(local, dtype=np.int64)
        out = np.zeros((len(index), 3, 4, 2), np.uint8)
        gather(pieces, index, out)
        np.testing.assert_array_equal(out, whole[index])


def test_split_copies_cuts_in_order_into_balanced_parts() -> None:
    rng = np.random.default_rng(0)
    shards = [_shard(rng, 9), _shard(rng, 9), _shard(rng, 9)]
    out = np.zeros((13, 3, 4, 2), np.uint8)
    locals_ = [np.array([0, 3, 4, 8]), np.array([1, 2]), np.array([0, 1, 2, 3, 5, 6, 7])]
    copies, at = [], 0
    for shard, local in zip(shards, locals_, strict=True):
        copies.append((shard, local, out[at:at + len(local)]))
        at += len(local)
    for parts in (1, 2, 3, 5, 13, 20):
        split = split_copies(copies, parts)
        sizes = [sum(len(local) for _, local, _ in part) for part in split]
        assert sum(sizes) == 13 and len(split) <= parts and max(sizes) - min(sizes) <= -(-13 // parts)
        # The parts, one after the other, are the same copies in the same order.
        flat = [(id(images), int(i), dest.ctypes.data + k * dest.strides[0])
                for part in split for images, local, dest in part for k, i in enumerate(local)]
        want = [(id(images), int(i), dest.ctypes.data + k * dest.strides[0])
                for images, local, dest in copies for k, i in enumerate(local)]
        assert flat == want


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_copier_gives_the_same_batch_on_any_number_of_threads(threads: int) -> None:
    rng = np.random.default_rng(threads)
    pieces, joined = _pieces(rng, [20, 5, 25], gaps=True)
    shards: list[np.ndarray | Pieces] = [_shard(rng, 50), pieces]
    whole = [shards[0], joined]
    copier = Copier(threads, min_bytes=0)
    try:
        for trial in range(20):
            locals_ = [np.sort(rng.choice(50, size=rng.integers(1, 40), replace=False)) for _ in whole]
            if trial % 2:
                locals_[0] = np.arange(5, 5 + len(locals_[0]))  # a run of consecutive samples
            out = np.zeros((sum(map(len, locals_)), 3, 4, 2), np.uint8)
            copies, at = [], 0
            for shard, local in zip(shards, locals_, strict=True):
                copies.append((shard, local, out[at:at + len(local)]))
                at += len(local)
            copier(copies)
            np.testing.assert_array_equal(out, np.concatenate([w[loc] for w, loc in zip(whole, locals_,
                                                                                            strict=True)]))
    finally:
        copier.close()


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_loader_batches_are_right_with_one_or_two_copy_threads(tmp_path: Path, fmt: str) -> None:
    image_tree(tmp_path / "src", classes=("a", "b"), per_class=30, min_side=40, max_side=60)
    out = tmp_path / "d"
    # 128x128 RGB in batches of 32: 1.5 MB per batch, so two threads share each batch's copies.
    shardkit.convert(tmp_path / "src", out, size=128, samples_per_shard=17, workers=0, format=fmt)
    ds = shardkit.open(out)
    images = np.concatenate([np.stack(list(ds.read_shard(i).images))
                             for i in range(len(ds.manifest.shards))])
    for threads in (1, 2):
        for shuffle in (False, True):
            # prefetch=0: assembled in this thread, which always takes the helpers (with a
            # background thread they help only while the loop waits: see the next test).
            loader = shardkit.ShardLoader(out, 32, shuffle=shuffle, seed=3, copy_threads=threads,
                                          prefetch=0)
            seen, helpers = [], set()
            for batch in loader:
                helpers |= {t.name for t in threading.enumerate() if t.name.startswith("shardkit-copy")}
                index = batch["index"].numpy()
                np.testing.assert_array_equal(batch["image"].numpy(), images[index])
                seen.extend(index.tolist())
            assert sorted(seen) == list(range(60))
            assert len(helpers) == threads - 1  # the second thread did take part
    del loader  # the copying threads live as long as their loader
    gc.collect()
    assert not [t for t in threading.enumerate() if t.name.startswith("shardkit-copy")]
    with pytest.raises(shardkit.ConfigError, match="copy_threads"):
        shardkit.ShardLoader(out, 4, copy_threads=0)


def _count_submissions(copier: Copier, job: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
    """Run `copier(job)`, counting the jobs handed to its helper threads."""
    count = 0
    run = copier.helpers.run

    def counting(jobs: list[object]) -> None:
        nonlocal count
        count += len(jobs) - 1  # the first runs in the calling thread
        run(jobs)  # type: ignore[arg-type]

    copier.helpers.run = counting  # type: ignore[method-assign,assignment]
    try:
        copier(job)
    finally:
        copier.helpers.run = run  # type: ignore[method-assign]
    return count


def test_copy_helpers_work_only_while_the_consumer_waits() -> None:
    """A loop busy with the last batch (copying it to the device) has a core in use: the
    helpers would only compete with it, so they copy only while the loop waits."""
    source = np.random.default_rng(0).integers(0, 255, (64, 128, 128, 3), dtype=np.uint8)
    demand = threading.Event()
    copier = Copier(2, demand=demand)

    def copies() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        out = np.empty_like(source)
        return [(source, np.arange(64), out)]

    used: list[bool] = []
    try:
        for waiting in (False, True, False, True):
            (demand.set if waiting else demand.clear)()
            job = copies()
            submitted = _count_submissions(copier, job)
            np.testing.assert_array_equal(job[0][2], source)
            used.append(submitted > 0)
    finally:
        copier.close()
    assert used == [False, True, False, True]


def test_copy_threads_leave_torch_threads_of_other_threads_alone(tmp_path: Path) -> None:
    """The copying threads run torch single-threaded; the training thread, even one that has
    run no torch op before the first batch, keeps torch's default (a fresh process)."""
    image_tree(tmp_path / "src", classes=("a",), per_class=40, min_side=40, max_side=60)
    shardkit.convert(tmp_path / "src", tmp_path / "d", size=128, samples_per_shard=7, workers=0)
    code = (
        "import sys, threading, torch, shardkit\n"
        "loader = shardkit.ShardLoader(sys.argv[1], 32, shuffle=True, copy_threads=2)\n"
        "assert sum(len(b['index']) for b in loader) == 40\n"
        "box = []\n"
        "t = threading.Thread(target=lambda: box.append(torch.get_num_threads()))\n"
        "t.start(); t.join()\n"
        "print(torch.get_num_threads(), box[0])\n"
    )
    fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True).stdout.split()
    after = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code, str(tmp_path / "d")],
                           capture_output=True, text=True, check=True).stdout.split()
    assert after == fresh * 2


def test_a_loader_dropped_mid_pass_lets_its_thread_go(tmp_path: Path) -> None:
    """A pass left without closing it (a `next(iter(loader))`, a held traceback) and then the
    loader dropped: its background thread ends instead of waiting forever for the consumer."""
    import gc

    image_tree(tmp_path / "src", classes=("a", "b"), per_class=20, min_side=30, max_side=40)
    shardkit.convert(tmp_path / "src", tmp_path / "d", size=16, samples_per_shard=8, workers=0)
    before = {t.ident for t in threading.enumerate()}
    loader = shardkit.ShardLoader(tmp_path / "d", 2, prefetch=1)
    kept = iter(loader)
    assert len(next(kept)["index"]) == 2
    prefetcher = loader._prefetcher
    slots = prefetcher._current.slots  # the open pass's hand-over slots
    deadline = time.monotonic() + 10
    while not slots.full() and time.monotonic() < deadline:
        time.sleep(0.01)  # until the thread waits to hand over more
    del loader
    gc.collect()
    prefetcher.close()  # what the loader's finaliser does at the latest, at exit
    assert not [t for t in threading.enumerate() if t.ident not in before and t.name == "shardkit-batches"]
    kept.close()


def test_assembling_in_the_callers_thread_leaves_its_torch_threads_alone(tmp_path: Path) -> None:
    """prefetch=0 assembles batches in the thread that iterates: a shuffled gather there must
    not make that (the user's) thread run torch single-threaded from then on."""
    code = (
        "import sys, torch, shardkit\n"
        "torch.set_num_threads(2)\n"
        "for batch in shardkit.ShardLoader(sys.argv[1], 8, shuffle=True, prefetch=0):\n"
        "    pass\n"
        "print(torch.get_num_threads())\n"
    )
    image_tree(tmp_path / "src", classes=("a", "b"), per_class=20, min_side=30, max_side=40)
    shardkit.convert(tmp_path / "src", tmp_path / "d", size=16, samples_per_shard=8, workers=0)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2"]
