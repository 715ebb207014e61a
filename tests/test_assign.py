"""The pure assignment of samples to (rank, worker, batch), checked exhaustively."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkit.reader.assign import (
    Split,
    assign,
    batches_per_rank,
    epoch_order,
    padding,
    rank_run,
    samples_per_rank,
    worker_batches,
)

SIZES = [[1], [7], [5, 3], [13, 0, 4], [2, 3, 5, 7], [11, 11, 11, 1, 17], [3, 1, 4, 1, 5, 9], [64] * 7]


def rank_batches(sizes: list[int], rank: int, world: int, workers: int, **kw: object) -> list[np.ndarray]:
    """What a DataLoader hands rank `rank`: worker batches collected round-robin."""
    streams = [list(assign(sizes, Split(rank=rank, world=world, worker=w, workers=workers), **kw))  # type: ignore[arg-type]
               for w in range(workers)]
    merged = []
    for number in itertools.count():
        stream = streams[number % workers]
        position = number // workers
        if position >= len(stream):
            break
        merged.append(stream[position])
    assert sum(len(s) for s in streams) == len(merged)
    return merged


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_grid_exactly_once_equal_batches_and_worker_invariance(sizes: list[int], world: int,
                                                               drop_last: bool) -> None:
    total = sum(sizes)
    for batch_size, shuffle in itertools.product([1, 2, 5, 8], [False, True]):
        kw = dict(epoch=3, seed=11, batch_size=batch_size, drop_last=drop_last, shuffle=shuffle,
                  window=2)
        per_rank = [rank_batches(sizes, r, world, 1, **kw) for r in range(world)]
        expected = batches_per_rank(total, world, drop_last=drop_last, batch_size=batch_size)
        assert [len(b) for b in per_rank] == [expected] * world
        for workers in (2, 3, 4):
            for r in range(world):
                other = rank_batches(sizes, r, world, workers, **kw)
                assert [b.tolist() for b in other] == [b.tolist() for b in per_rank[r]]
        seen = Counter(int(i) for batches in per_rank for b in batches for i in b)
        if drop_last:
            assert all(n == 1 for n in seen.values())
            assert sum(seen.values()) == world * samples_per_rank(
                total, world, drop_last=True, batch_size=batch_size)
            assert all(len(b) == batch_size for batches in per_rank for b in batches)
        else:
            pad = padding(total, world, drop_last=False)
            assert set(seen) == set(range(total))
            assert sum(seen.values()) == total + pad
            assert sum(n - 1 for n in seen.values()) == pad


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=7),
       world=st.integers(1, 4), workers=st.integers(1, 3), batch_size=st.integers(1, 9),
       drop_last=st.booleans(), shuffle=st.booleans(), seed=st.integers(0, 2**32 - 1),
       epoch=st.integers(0, 5), window=st.one_of(st.none(), st.integers(1, 4)), data=st.data())
def test_resume_at_any_cut_yields_exactly_the_rest(sizes: list[int], world: int, workers: int,
                                                   batch_size: int, drop_last: bool, shuffle: bool,
                                                   seed: int, epoch: int, window: int | None,
                                                   data: st.DataObject) -> None:
    total = sum(sizes)
    order = epoch_order(sizes, shuffle=shuffle, seed=seed, epoch=epoch, window=window)
    assert sorted(order.tolist()) == list(range(total))
    rank = data.draw(st.integers(0, world - 1))
    run = rank_run(order, rank=rank, world=world, drop_last=drop_last, batch_size=batch_size)
    cut = data.draw(st.integers(0, len(run)))
    resumed = [b for w in range(workers)
               for b in worker_batches(run, batch_size=batch_size, worker=w, workers=workers,
                                       start=cut)]
    assert sorted(int(i) for b in resumed for i in b) == sorted(run[cut:].tolist())
    assert all(len(b) <= batch_size and list(b) == sorted(b) for b in resumed)


def test_same_seed_and_epoch_same_order_other_epoch_other_order() -> None:
    sizes = [50, 50, 50, 50]
    a = epoch_order(sizes, shuffle=True, seed=1, epoch=0, window=2)
    assert np.array_equal(a, epoch_order(sizes, shuffle=True, seed=1, epoch=0, window=2))
    assert not np.array_equal(a, epoch_order(sizes, shuffle=True, seed=1, epoch=1, window=2))
    assert not np.array_equal(a, epoch_order(sizes, shuffle=True, seed=2, epoch=0, window=2))


def test_window_mixes_only_within_groups_of_shards() -> None:
    sizes = [10] * 6
    order = epoch_order(sizes, shuffle=True, seed=5, epoch=0, window=2)
    shards_per_group = [set((order[g * 20:(g + 1) * 20] // 10).tolist()) for g in range(3)]
    assert all(len(s) == 2 for s in shards_per_group)
    assert set().union(*shards_per_group) == set(range(6))
    full = epoch_order(sizes, shuffle=True, seed=5, epoch=0, window=None)
    assert len(set((full[:20] // 10).tolist())) > 2  # a global shuffle mixes every shard


def test_split_rejects_impossible_places() -> None:
    with pytest.raises(ValueError):
        Split(rank=2, world=2)
    with pytest.raises(ValueError):
        Split(worker=1, workers=1)
