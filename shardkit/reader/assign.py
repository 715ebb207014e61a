"""Who reads which sample, in which batch: pure functions of the shard sizes and the split.

An epoch's order is fixed by (seed, epoch) alone:

1. with shuffling, the shard order is permuted, then the samples inside each *window* of
   consecutive (permuted) shards are permuted together; ``window=None`` shuffles globally;
2. the global order is cut into `world` equal contiguous runs, one per rank. Without
   ``drop_last`` the order is first padded by repeating its own first samples so it divides
   evenly (``padding`` tells how many); with ``drop_last`` each rank gets ``N // world``
   samples, cut down to whole batches;
3. a rank's run is cut into batches of `batch_size` (the last may be short, never with
   ``drop_last``); batch ``j`` goes to worker ``j % workers``. A DataLoader collects worker
   batches round-robin, so the rank sees the same batches in the same order for any number
   of workers;
4. inside a batch, indices are sorted ascending: the batch is the same random *set*, and
   reading it touches each shard once, in file order.

Resuming after ``start`` samples of a rank's run cuts the rest of the run into batches from
there, so a resumed epoch yields exactly the samples an uninterrupted one had left.

Resuming on another number of ranks: a `Cut` records that the epoch was being read by
`world` ranks, each of which had consumed the same `samples` of its run (the ranks of a DDP
job step together). `remaining_order` is what no rank has consumed yet (padding repeats
dropped), in the epoch's order; steps 2-4 then split it among the new world as they split a
whole epoch. Cuts chain (8 ranks, then 6, then 7); the next epoch does not depend on them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from shardkit.config.common import as_integer

__all__ = [
    "Cut",
    "Split",
    "batches_per_rank",
    "epoch_order",
    "padding",
    "rank_run",
    "remaining_order",
    "samples_left",
    "samples_per_rank",
    "shard_runs",
    "shard_sequence",
    "worker_batches",
]


@dataclass(frozen=True, slots=True)
class Split:
    """The reader's place: rank of world (processes), worker of workers (inside a rank)."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world and 0 <= self.worker < self.workers):
            raise ValueError(f"invalid split {self}")


@dataclass(frozen=True)  # no slots: it travels to worker processes, pickled (Python 3.10)
class Cut:
    """Where an epoch stopped: `world` ranks reading batches of `batch_size`, each having
    consumed `samples` of its run (of what earlier cuts had left)."""

    world: int
    batch_size: int
    samples: int

    def __post_init__(self) -> None:
        for name, least in (("world", 1), ("batch_size", 1), ("samples", 0)):
            value = getattr(self, name)
            number = as_integer(value)
            if number is None or number < least:
                raise ValueError(f"invalid cut: {name} {value!r}")
            object.__setattr__(self, name, number)


def epoch_order(sizes: Sequence[int], *, shuffle: bool, seed: int, epoch: int,
                window: int | None) -> np.ndarray:
    """Every sample index (0..N-1, stored order) once, in this epoch's order."""
    total = int(sum(sizes))
    if not shuffle:
        return np.arange(total, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    rng = np.random.default_rng([seed, epoch])
    shards = rng.permutation(len(sizes))
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None; got {window}")
    step = len(sizes) if window is None else window
    pieces = []
    for first in range(0, len(sizes), step):
        group = shards[first:first + step]
        members = np.concatenate(
            [np.arange(starts[s], starts[s + 1], dtype=np.int64) for s in group]
        ) if len(group) else np.empty(0, dtype=np.int64)
        pieces.append(members[rng.permutation(len(members))])
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


def samples_per_rank(total: int, world: int, *, drop_last: bool, batch_size: int) -> int:
    """Samples each rank yields per epoch (equal on every rank)."""
    if drop_last:
        return (total // world) // batch_size * batch_size
    return math.ceil(total / world)


def batches_per_rank(total: int, world: int, *, drop_last: bool, batch_size: int) -> int:
    """Batches each rank yields per epoch (equal on every rank): what ``len(loader)`` says."""
    return math.ceil(samples_per_rank(total, world, drop_last=drop_last, batch_size=batch_size)
                     / batch_size)


def padding(total: int, world: int, *, drop_last: bool) -> int:
    """Repeated samples added to the epoch so that every rank gets the same count."""
    return 0 if drop_last else math.ceil(total / world) * world - total


def rank_run(order: np.ndarray, *, rank: int, world: int, drop_last: bool,
             batch_size: int) -> np.ndarray:
    """The part of the epoch's order that `rank` yields (padded or cut as documented)."""
    total = len(order)
    per_rank = samples_per_rank(total, world, drop_last=drop_last, batch_size=batch_size)
    if drop_last:
        return order[rank * (total // world):][:per_rank]
    if per_rank * world > total:
        order = np.resize(order, per_rank * world)  # repeats the order's own start
    return order[rank * per_rank:(rank + 1) * per_rank]


def remaining_order(order: np.ndarray, cuts: Sequence[Cut], *, drop_last: bool) -> np.ndarray:
    """The samples of `order` (an epoch's order) that the ranks of `cuts` left unread, in
    `order`'s order and each once: after each cut, the rest of every rank's run minus what any
    rank consumed (a padding repeat of a consumed sample is not left). ValueError when a cut
    consumed more than its runs hold."""
    rest = order
    for cut in cuts:
        total, world = len(rest), cut.world
        if not drop_last and total:
            # More ranks than samples: each run is one sample, the later ones repeats, and
            # what is left is the same as with one rank per sample (no array per rank).
            world = min(world, total)
        per_rank = samples_per_rank(total, world, drop_last=drop_last, batch_size=cut.batch_size)
        if cut.samples > per_rank:
            raise ValueError(f"a cut of {cut.samples} samples per rank; the runs hold {per_rank}")
        if per_rank == 0:  # no run holds a sample (drop_last cut them all, or none were left)
            rest = rest[:0]
            continue
        # Every rank's run (`rank_run`) as one row, made once.
        if drop_last:
            runs = rest[:total // world * world].reshape(world, total // world)[:, :per_rank]
        else:
            runs = np.resize(rest, per_rank * world).reshape(world, per_rank)
        done, left = runs[:, :cut.samples].ravel(), runs[:, cut.samples:].ravel()
        left = left[~np.isin(left, done)]
        _, first = np.unique(left, return_index=True)
        rest = left[np.sort(first)]
    return rest


def samples_left(total: int, cuts: Sequence[Cut], *, world: int, batch_size: int,
                 drop_last: bool) -> int:
    """Samples each of `world` ranks yields of an epoch of `total` after `cuts` (the count
    does not depend on the order, so none is drawn)."""
    left = len(remaining_order(np.arange(total, dtype=np.int64), cuts, drop_last=drop_last)) \
        if cuts else total
    return samples_per_rank(left, world, drop_last=drop_last, batch_size=batch_size)


def worker_batches(run: np.ndarray, *, batch_size: int, worker: int, workers: int,
                   start: int = 0) -> Iterator[np.ndarray]:
    """The batches (sorted index arrays) `worker` yields from a rank's run, resuming after
    `start` samples."""
    rest = run[start:]
    for number, first in enumerate(range(0, len(rest), batch_size)):
        if number % workers == worker:
            yield np.sort(rest[first:first + batch_size])


def assign(sizes: Sequence[int], split: Split, *, epoch: int, seed: int, batch_size: int,
           drop_last: bool, shuffle: bool, window: int | None, start: int = 0,
           cuts: Sequence[Cut] = ()) -> Iterator[np.ndarray]:
    """The batches one (rank, worker) yields in one epoch: the whole pipeline above, on what
    `cuts` (resumes on other world sizes) left of the epoch."""
    order = epoch_order(sizes, shuffle=shuffle, seed=seed, epoch=epoch, window=window)
    if cuts:
        order = remaining_order(order, cuts, drop_last=drop_last)
    run = rank_run(order, rank=split.rank, world=split.world, drop_last=drop_last,
                   batch_size=batch_size)
    return worker_batches(run, batch_size=batch_size, worker=split.worker,
                          workers=split.workers, start=start)


def shard_runs(starts: np.ndarray, index: np.ndarray) -> Iterator[tuple[int, slice, np.ndarray]]:
    """Split a sorted batch `index` by shard: (shard number, its slots in the batch, its
    positions inside the shard) for each shard the batch touches, in order. `starts` holds
    each shard's first sample index, then the total."""
    if not len(index):
        return
    first, last = (np.searchsorted(starts, (index[0], index[-1]), side="right") - 1).tolist()
    if first == last:  # the common case, one shard: no search per sample
        yield first, slice(0, len(index)), index - starts[first]
        return
    shard_of = np.searchsorted(starts, index, side="right") - 1
    cuts = [0, *(np.flatnonzero(np.diff(shard_of)) + 1).tolist(), len(index)]
    for a, b in itertools.pairwise(cuts):
        if a < b:
            number = int(shard_of[a])
            yield number, slice(a, b), index[a:b] - starts[number]



def shard_sequence(starts: np.ndarray, batches: Sequence[np.ndarray]) -> list[int]:
    """The shards `batches` touch, each once, in the order a reader first needs them (batch
    by batch; inside a batch in ascending order, as its sorted indices touch them)."""
    if not batches:
        return []
    shard_of = np.searchsorted(starts, np.concatenate(batches), side="right") - 1
    shards, first = np.unique(shard_of, return_index=True)
    return [int(n) for n in shards[np.argsort(first, kind="stable")]]
