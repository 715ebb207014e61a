"""Resuming an epoch on another number of ranks (a preempted 4-GPU job restarted on 3): the
pure assignment over a grid and under hypothesis, ShardLoader's state, and a real gloo run."""

from __future__ import annotations

import itertools
import json
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import small_dataset, small_tree
from hypothesis import given, settings
from hypothesis import strategies as st

import shardkit
from shardkit.reader.assign import (
    Cut,
    Split,
    assign,
    epoch_order,
    rank_run,
    remaining_order,
    samples_left,
    samples_per_rank,
)

SIZES = [[1], [7], [5, 3], [13, 0, 4], [2, 3, 5, 7], [11, 11, 11, 1, 17], [64] * 5]


def consumed(sizes: list[int], cuts: list[Cut], *, drop_last: bool, **kw: object) -> list[int]:
    """What the ranks of `cuts` read before each cut, in order."""
    order = epoch_order(sizes, **kw)  # type: ignore[arg-type]
    out: list[int] = []
    for number, cut in enumerate(cuts):
        rest = remaining_order(order, cuts[:number], drop_last=drop_last)
        for rank in range(cut.world):
            out += rank_run(rest, rank=rank, world=cut.world, drop_last=drop_last,
                            batch_size=cut.batch_size)[:cut.samples].tolist()
    return out


def resumed(sizes: list[int], cuts: list[Cut], world: int, batch_size: int, *, workers: int = 1,
            **kw: object) -> list[list[list[int]]]:
    """Each rank's batches of the rest of the epoch after `cuts`, with `workers` workers."""
    ranks = []
    for rank in range(world):
        streams = [list(assign(sizes, Split(rank=rank, world=world, worker=w, workers=workers),
                               batch_size=batch_size, cuts=cuts, **kw))  # type: ignore[arg-type]
                   for w in range(workers)]
        merged = [streams[n % workers][n // workers]
                  for n in range(sum(len(s) for s in streams))]
        ranks.append([b.tolist() for b in merged])
    return ranks


def check_exactly_once(sizes: list[int], cuts: list[Cut], world: int, batch_size: int,
                       drop_last: bool, **kw: object) -> None:
    total = sum(sizes)
    options = {"epoch": 2, "seed": 9, "shuffle": True, "window": 2, **kw, "drop_last": drop_last}
    before = consumed(sizes, cuts, **{k: v for k, v in options.items()
                                      if k in ("epoch", "seed", "shuffle", "window", "drop_last")})
    after = resumed(sizes, cuts, world, batch_size, **options)
    rest = [i for rank in after for batch in rank for i in batch]
    # every rank the same number of batches (DDP does not hang), each batch sorted, full
    # batches with drop_last
    assert len({len(rank) for rank in after}) == 1
    assert all(batch == sorted(batch) for rank in after for batch in rank)
    left = samples_left(total, cuts, world=world, batch_size=batch_size, drop_last=drop_last)
    assert all(sum(len(b) for b in rank) == left for rank in after)
    seen = Counter(before + rest)
    uninterrupted = [i for rank in resumed(sizes, [], cuts[0].world, cuts[0].batch_size, **options)
                     for batch in rank for i in batch]
    if drop_last:  # at most the uninterrupted epoch's samples, each once; only whole batches
        assert all(n == 1 for n in seen.values()) and set(seen) <= set(uninterrupted)
        assert all(len(b) == batch_size for rank in after for b in rank)
        unread = set(uninterrupted) - set(seen)  # what the new split's whole batches drop
        assert len(unread) < world * batch_size + sum(c.world * c.batch_size for c in cuts[1:])
    else:  # every sample; repeats only to pad the ranks evenly, fewer than one per rank
        assert set(seen) == set(range(total))
        assert sum(seen.values()) - total < world + sum(c.world for c in cuts)
    # the new split does not depend on the worker count
    assert resumed(sizes, cuts, world, batch_size, workers=3, **options) == after


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize(("before", "after"), [(4, 3), (2, 5), (3, 3), (1, 4), (5, 1)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_grid_the_rest_of_the_epoch_goes_to_the_new_world_exactly_once(
        sizes: list[int], before: int, after: int, drop_last: bool) -> None:
    total = sum(sizes)
    for batch_size in (1, 3, 4):
        per_rank = samples_per_rank(total, before, drop_last=drop_last, batch_size=batch_size)
        for samples in sorted({0, batch_size, per_rank // 2 // batch_size * batch_size, per_rank}):
            if samples <= per_rank:
                check_exactly_once(sizes, [Cut(before, batch_size, samples)], after, batch_size,
                                   drop_last)


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=6),
       worlds=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       batch_size=st.integers(1, 6), drop_last=st.booleans(), shuffle=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 3)), data=st.data())
def test_any_chain_of_restarts_covers_the_epoch_exactly_once(
        sizes: list[int], worlds: list[int], batch_size: int, drop_last: bool, shuffle: bool,
        window: int | None, data: st.DataObject) -> None:
    total = sum(sizes)
    cuts: list[Cut] = []
    for world in worlds[:-1]:  # 6 ranks, then 4, then 5...: each cut at any point of its run
        per_rank = samples_left(total, cuts, world=world, batch_size=batch_size, drop_last=drop_last)
        cuts.append(Cut(world, batch_size, data.draw(st.integers(0, per_rank))))
    check_exactly_once(sizes, cuts, worlds[-1], batch_size, drop_last, shuffle=shuffle, window=window)


def test_the_remaining_order_keeps_the_epochs_order_and_drops_padding_repeats() -> None:
    order = np.array([5, 3, 0, 6, 1, 4, 2])  # 7 samples on 2 ranks: [5 3 0 6] [1 4 2 5]
    rest = remaining_order(order, [Cut(2, 2, 2)], drop_last=False)
    assert rest.tolist() == [0, 6, 2]  # 5 (rank 0) and its repeat (rank 1) both gone
    assert remaining_order(order, [Cut(2, 2, 4)], drop_last=False).tolist() == []
    with pytest.raises(ValueError, match="runs hold 4"):
        remaining_order(order, [Cut(2, 2, 5)], drop_last=False)


# --- ShardLoader ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """27 images in 7 tar shards."""
    src = small_tree(tmp_path_factory.mktemp("src"), 9)
    return small_dataset(src, tmp_path_factory.mktemp("d") / "tar", 4)


def loaders(path: Path, world: int, **kw: object) -> list[shardkit.ShardLoader]:
    return [shardkit.ShardLoader(path, 3, rank=r, world_size=world, seed=4, **kw)  # type: ignore[arg-type]
            for r in range(world)]


def read(loader: shardkit.ShardLoader, batches: int | None = None) -> list[int]:
    """The indices of the loader's next `batches` batches (all of the pass when None)."""
    out: list[int] = []
    stream = iter(loader)
    for batch in itertools.islice(stream, batches):
        out += batch["index"].tolist()
    return out


@pytest.mark.parametrize(("before", "after", "drop_last"),
                         [(4, 3, False), (2, 5, False), (4, 3, True), (2, 5, True)])
def test_a_loader_state_resumes_on_another_world_size(dataset: Path, before: int, after: int,
                                                       drop_last: bool) -> None:
    first = loaders(dataset, before, drop_last=drop_last)
    done = [i for loader in first for i in read(loader, 1)]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in first]
    assert all(state == states[0] for state in states)  # one state for the whole job
    second = loaders(dataset, after, drop_last=drop_last)
    for loader in second:
        loader.load_state_dict(states[0])
    rest = [read(loader) for loader in second]
    assert len({len(r) for r in rest}) == 1  # as many samples on every new rank
    seen = Counter(done + [i for r in rest for i in r])
    if drop_last:
        assert all(n == 1 for n in seen.values())
    else:
        assert set(seen) == set(range(27)) and sum(seen.values()) - 27 < before + after
    # the next epoch is the uninterrupted run's, on the new world
    fresh = loaders(dataset, after, drop_last=drop_last)
    for loader in fresh:
        loader.set_epoch(1)
    assert [read(loader) for loader in second] == [read(loader) for loader in fresh]


def test_a_state_saved_after_a_restart_resumes_again(dataset: Path) -> None:
    job = loaders(dataset, 4)
    done = [i for loader in job for i in read(loader, 1)]
    state = job[0].state_dict()
    job = loaders(dataset, 3)
    for loader in job:
        loader.load_state_dict(state)
    done += [i for loader in job for i in read(loader, 1)]
    state = json.loads(json.dumps(job[0].state_dict()))
    assert state["cuts"] == [[4, 3, 3]] and state["samples"] == 3
    job = loaders(dataset, 2)
    for loader in job:
        loader.load_state_dict(state)
    seen = Counter(done + [i for loader in job for i in read(loader)])
    assert set(seen) == set(range(27)) and sum(seen.values()) - 27 < 4 + 3 + 2
    assert job[0].epoch == 1 and job[0].state_dict()["cuts"] == []


def test_a_state_saved_with_another_batch_size_resumes_exactly_once(dataset: Path) -> None:
    job = [shardkit.ShardLoader(dataset, 4, rank=r, world_size=2, seed=4, drop_last=True)
           for r in range(2)]
    done = [i for loader in job for i in read(loader, 1)]
    state = job[0].state_dict()
    job = [shardkit.ShardLoader(dataset, 5, rank=r, world_size=2, seed=4, drop_last=True)
           for r in range(2)]
    for loader in job:
        loader.load_state_dict(state)
    rest = [read(loader) for loader in job]
    assert [len(r) for r in rest] == [5, 5]  # 2 x 8 left, in whole batches of 5
    seen = Counter(done + [i for r in rest for i in r])
    assert all(n == 1 for n in seen.values()) and len(done) == 8


def test_a_state_that_does_not_fit_is_refused(dataset: Path) -> None:
    state = loaders(dataset, 2)[0].state_dict()
    loader = loaders(dataset, 3)[0]
    with pytest.raises(shardkit.ConfigError, match="samples consumed of 14"):
        loader.load_state_dict({**state, "samples": 15})
    with pytest.raises(shardkit.ConfigError, match="not a shardkit loader state"):
        loader.load_state_dict({**state, "cuts": [[0, 3, 1]]})
    with pytest.raises(shardkit.ConfigError, match="other settings"):
        loader.load_state_dict({**state, "window": 2})


# --- a real gloo job, restarted on another world size -----------------------------------------

def _gloo_job(rank: int, world: int, port: int, path: str, state: str, out: str, steps: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        loader = shardkit.ShardLoader(path, 3, seed=4)
        if Path(state).exists():
            loader.load_state_dict(json.loads(Path(state).read_text()))
        mine = []
        for batch in itertools.islice(iter(loader), steps if steps >= 0 else None):
            mine += batch["index"].tolist()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        torch.distributed.all_gather(sizes, torch.tensor([len(mine)]))
        gathered = [torch.zeros(int(n), dtype=torch.int64) for n in sizes]
        torch.distributed.all_gather(gathered, torch.tensor(mine, dtype=torch.int64))
        if rank == 0:
            Path(out).write_text(json.dumps([g.tolist() for g in gathered]))
            Path(state).write_text(json.dumps(loader.state_dict()))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _job(world: int, dataset: Path, state: Path, out: Path, steps: int) -> None:
    # forked, not spawned: the ranks start in a fraction of a second, torch already imported
    torch.multiprocessing.start_processes(
        _gloo_job, args=(world, _free_port(), str(dataset), str(state), str(out), steps),
        nprocs=world, join=True, start_method="fork")


@pytest.mark.timeout(120)
def test_real_gloo_job_stopped_on_2_ranks_and_resumed_on_3(dataset: Path, tmp_path: Path) -> None:
    state, out = tmp_path / "state.json", tmp_path / "out.json"
    _job(2, dataset, state, out, 2)
    first = json.loads(out.read_text())
    assert [len(r) for r in first] == [6, 6] and json.loads(state.read_text())["world_size"] == 2
    _job(3, dataset, state, out, -1)
    rest = json.loads(out.read_text())
    assert len({len(r) for r in rest}) == 1  # the three ranks stepped together to the end
    seen = Counter(itertools.chain(*first, *rest))
    assert set(seen) == set(range(27)) and sum(seen.values()) - 27 < 2 + 3
    expected = [i for loader in loaders(dataset, 2) for i in read(loader, 2)]
    assert sorted(itertools.chain(*first)) == sorted(expected)
