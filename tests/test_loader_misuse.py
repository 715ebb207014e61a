"""Loaders used the way real loops use them, and arguments they must refuse: a second
iterator while the first is alive, a loop that stops after ``len(loader)`` batches, options
and positions of the wrong type or out of range, shard numbers out of range."""

from __future__ import annotations

import gc
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from corpus import small_dataset, small_tree

import shardkit
import shardkit.keras
from shardkit import ConfigError, ReadOptions, ShardkitError, ShardLoader

BATCH = 5  # 27 samples in shards of 6, 6, 6, 6, 3: 6 batches per epoch, the last of 2


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = small_tree(tmp_path_factory.mktemp("src"), 9)
    return small_dataset(src, tmp_path_factory.mktemp("d") / "tar", 6)


def indices(batches: Any) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def epoch_order(data: Path, epoch: int, **options: Any) -> list[list[int]]:
    """The batches of `epoch` as a fresh loader gives them."""
    reference = ShardLoader(data, BATCH, seed=3, **options)
    reference.set_epoch(epoch)
    return indices(reference)


def batch_threads() -> int:
    return sum(t.name == "shardkit-batches" for t in threading.enumerate())


# --- 1. a second iterator over the same loader ---------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_second_iterator_is_a_full_pass_and_ends_the_first(data: Path, prefetch: int) -> None:
    expected = epoch_order(data, 0, prefetch=prefetch)
    loader = ShardLoader(data, BATCH, seed=3, prefetch=prefetch)
    peek = iter(loader)
    assert next(peek)["index"].tolist() == expected[0]
    assert indices(loader) == expected  # the whole of epoch 0, not the peek's leftovers
    assert loader.epoch == 1
    with pytest.raises(ShardkitError, match="ended by a newer pass"):
        next(peek)
    with pytest.raises(ShardkitError, match="ended by a newer pass"):
        next(peek)  # and it stays ended
    assert indices(loader) == epoch_order(data, 1, prefetch=prefetch)
    assert loader.epoch == 2


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_ended_iterator_collected_during_the_next_pass_disturbs_nothing(
        data: Path, prefetch: int) -> None:
    expected = epoch_order(data, 0, prefetch=prefetch)
    loader = ShardLoader(data, BATCH, seed=3, prefetch=prefetch)
    before = batch_threads()
    for _ in range(4):  # the same loader, peeked at and restarted again and again
        loader.set_epoch(0)
        peek = iter(loader)
        next(peek)
        newer = iter(loader)
        got = [next(newer)["index"].tolist()]
        del peek
        gc.collect()
        got += indices(newer)
        assert got == expected
    assert batch_threads() <= before + (1 if prefetch else 0)  # one thread for the loader's life
    state = loader.state_dict()
    assert (state["epoch"], state["samples"]) == (1, 0)


def test_an_iterator_that_had_finished_just_stops(data: Path) -> None:
    loader = ShardLoader(data, BATCH, seed=3)
    done = iter(loader)
    assert indices(done) == epoch_order(data, 0)
    assert indices(loader) == epoch_order(data, 1)
    assert next(done, None) is None  # it had finished: nothing to refuse


def test_torch_threads_are_put_back_when_a_pass_ends_another(data: Path) -> None:
    before = torch.get_num_threads()
    loader = ShardLoader(data, BATCH, seed=3, torch_threads=1 if before > 1 else 2)
    peek = iter(loader)
    next(peek)
    assert torch.get_num_threads() != before
    assert len(indices(loader)) == len(loader)
    assert torch.get_num_threads() == before
    del peek
    gc.collect()
    assert torch.get_num_threads() == before


def test_the_keras_adapter_gets_a_new_order_per_pass_with_a_build_iterator_kept(data: Path) -> None:
    keras_data = shardkit.keras.dataset(data, BATCH, seed=3)  # needs torch, not Keras
    build = iter(keras_data)
    next(build)  # kept alive, as a caller holding its first build's iterator would
    first = torch.cat([y for _, y in keras_data]).tolist()
    second = torch.cat([y for _, y in keras_data]).tolist()
    reference = ShardLoader(data, BATCH, seed=3)
    labels = [torch.cat([b["label"] for b in reference]).tolist() for _ in range(2)]
    assert [first, second] == labels and keras_data.epoch == 2


# --- 2. the epoch advances with the last batch ---------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_loop_of_len_loader_steps_gets_a_new_order_each_epoch(data: Path, prefetch: int) -> None:
    loader = ShardLoader(data, BATCH, seed=3, prefetch=prefetch)
    for epoch in range(3):
        got = [b["index"].tolist() for _, b in zip(range(len(loader)), loader, strict=False)]
        assert got == epoch_order(data, epoch)
        assert loader.epoch == epoch + 1
        state = loader.state_dict()
        assert (state["epoch"], state["samples"], state["cuts"]) == (epoch + 1, 0, [])


def test_the_epoch_advances_once_when_the_last_batch_is_out(data: Path) -> None:
    loader = ShardLoader(data, BATCH, seed=3)
    iterator = iter(loader)
    for _ in range(len(loader) - 1):
        next(iterator)
    state = loader.state_dict()
    assert (state["epoch"], state["samples"]) == (0, 25)  # five batches of 5
    next(iterator)
    state = json.loads(json.dumps(loader.state_dict()))
    assert (loader.epoch, state["epoch"], state["samples"]) == (1, 1, 0)
    assert next(iterator, None) is None and loader.epoch == 1  # exhausting it adds nothing
    fresh = ShardLoader(data, BATCH, seed=3)
    fresh.load_state_dict(state)
    assert indices(fresh) == epoch_order(data, 1)  # the next epoch, from its first sample


def test_a_resumed_pass_advances_with_its_own_last_batch(data: Path) -> None:
    first = ShardLoader(data, BATCH, seed=3)
    iterator = iter(first)
    next(iterator)
    next(iterator)
    state = first.state_dict()
    resumed = ShardLoader(data, BATCH, seed=3)
    resumed.load_state_dict(state)
    rest = [b["index"].tolist() for _, b in zip(range(len(resumed) - 2), resumed, strict=False)]
    assert rest == epoch_order(data, 0)[2:]
    assert resumed.epoch == 1 and resumed.state_dict()["samples"] == 0
    assert indices(resumed) == epoch_order(data, 1)


def test_set_epoch_during_a_pass_sets_the_next_one(data: Path) -> None:
    loader = ShardLoader(data, BATCH, seed=3)
    iterator = iter(loader)
    next(iterator)
    loader.set_epoch(4)
    assert loader.state_dict()["samples"] == 0
    assert indices(iterator) == epoch_order(data, 0)[1:]  # the open pass goes on as it was
    assert loader.epoch == 4  # and did not move the epoch that was set
    assert indices(loader) == epoch_order(data, 4)


# --- 3. boolean and fields options ---------------------------------------------------------

@pytest.mark.parametrize("name", ["shuffle", "drop_last", "verify"])
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None])
def test_boolean_options_must_be_booleans(data: Path, name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be True or False"):
        ReadOptions(**{name: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=name):
        ShardLoader(data, BATCH, **{name: value})
    with pytest.raises(ConfigError, match=name):
        shardkit.open(data).batches(BATCH, **{name: value})  # type: ignore[arg-type]


def test_numpy_booleans_are_booleans(data: Path) -> None:
    options = ReadOptions(shuffle=np.bool_(False), drop_last=np.bool_(True))  # type: ignore[arg-type]
    assert options.shuffle is False and options.drop_last is True
    loader = ShardLoader(data, BATCH, options)
    assert [i for b in indices(loader) for i in b] == list(range(25))


@pytest.mark.parametrize(("fields", "names"), [("key", ("key",)), ("key,source", ("key", "source")),
                                               (" key , source ", ("key", "source")), ("", ())])
def test_fields_as_one_string_are_names(data: Path, fields: str, names: tuple[str, ...]) -> None:
    assert ReadOptions(fields=fields).fields == names  # type: ignore[arg-type]
    batch = next(iter(ShardLoader(data, BATCH, shuffle=False, fields=fields)))
    assert set(batch) == {"image", "label", "index", *names}
    if "key" in names:
        assert batch["key"] == ["000000", "000001", "000002", "000003", "000004"]


@pytest.mark.parametrize("fields", [5, b"key", ["key", 3], ["key", ""], {"key": 1}])
def test_fields_of_another_kind_are_refused_naming_fields(data: Path, fields: object) -> None:
    with pytest.raises(ConfigError, match=r"^fields must"):
        ReadOptions(fields=fields)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^fields must"):
        ShardLoader(data, BATCH, fields=fields)


# --- 4. shard numbers ----------------------------------------------------------------------

@pytest.mark.parametrize("number", [-1, -5, 5, 6, 10**6])
def test_shard_numbers_out_of_range_are_index_errors(data: Path, number: int) -> None:
    dataset = shardkit.open(data)
    message = f"no shard {number}; shard numbers are 0 to 4"
    with pytest.raises(IndexError, match=message):
        dataset.read_shard(number)
    with pytest.raises(IndexError, match=message):
        dataset.metadata(number)


def test_the_last_shard_is_number_shards_minus_one(data: Path) -> None:
    dataset = shardkit.open(data)
    last = dataset.read_shard(4)
    assert last.index.tolist() == [24, 25, 26] and len(last.images) == 3
    assert [row["key"] for row in dataset.metadata(np.int64(4))] == ["000024", "000025", "000026"]


# --- 5. positions and states out of range --------------------------------------------------

@pytest.mark.parametrize(("argument", "value"), [("start", -1), ("start", 28), ("start", 10**6),
                                                 ("start", "3"), ("start", 2.0), ("epoch", -1),
                                                 ("epoch", "x"), ("epoch", 1.5), ("epoch", True)])
def test_numpy_batches_refuse_a_bad_start_or_epoch(data: Path, argument: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{argument} must be"):
        shardkit.open(data).batches(BATCH, **{argument: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_numpy_batches_from_a_start_up_to_the_end(data: Path, prefetch: int) -> None:
    dataset = shardkit.open(data)
    assert indices(dataset.batches(BATCH, shuffle=False, start=24, prefetch=prefetch)) == [[24, 25, 26]]
    assert indices(dataset.batches(BATCH, shuffle=False, start=27, prefetch=prefetch)) == []
    assert indices(dataset.batches(BATCH, shuffle=False, start=np.int64(25), epoch=np.int64(2),
                                   prefetch=prefetch)) == [[25, 26]]
    with pytest.raises(ConfigError, match="start must be at most 25"):  # drop_last: 5 batches
        dataset.batches(BATCH, shuffle=False, drop_last=True, start=26)


@pytest.mark.parametrize("epoch", [-1, "x", 1.5, None])
def test_set_epoch_refuses_what_is_not_an_epoch(data: Path, epoch: object) -> None:
    loader = ShardLoader(data, BATCH, seed=3)
    with pytest.raises(ConfigError, match=r"^epoch must be an integer >= 0"):
        loader.set_epoch(epoch)
    assert loader.epoch == 0 and indices(loader) == epoch_order(data, 0)
    loader.set_epoch(np.int64(2))
    assert indices(loader) == epoch_order(data, 2)


def _state(data: Path, **changes: object) -> dict[str, Any]:
    return {**ShardLoader(data, BATCH, seed=3).state_dict(), **changes}


@pytest.mark.parametrize(("drop", "changes"), [
    ("", {}), ("fingerprint", {}), ("epoch", {}), ("samples", {}), ("seed", {}),
    (None, {"epoch": "x"}), (None, {"epoch": -1}), (None, {"epoch": 1.5}),
    (None, {"samples": "x"}), (None, {"fingerprint": 3}), (None, {"world_size": None}),
    (None, {"cuts": "x"}),
    # numbers that int() took (3.5 → 3, "3", True, 2.7 ranks), and worlds no job has
    (None, {"samples": 3.5}), (None, {"samples": "3"}), (None, {"samples": True}),
    (None, {"world_size": 2.7}), (None, {"world_size": 0}), (None, {"batch_size": -2}),
    (None, {"cuts": [[2, 5]]}), (None, {"cuts": [[2, 5, "1"]]}), (None, {"cuts": [[0, 5, 0]]}),
])
def test_a_broken_state_is_a_config_error(data: Path, drop: str | None,
                                          changes: dict[str, object]) -> None:
    """`drop`: the key left out of a real state ("": everything but its format)."""
    loader = ShardLoader(data, BATCH, seed=3)
    bad = {"format": "shardkit.loader/1"} if drop == "" else _state(data, **changes)
    if drop:
        del bad[drop]
    with pytest.raises(ConfigError, match="not a shardkit loader state"):
        loader.load_state_dict(bad)
    assert (loader.epoch, loader.state_dict()["samples"]) == (0, 0)  # nothing was taken from it
    assert indices(loader) == epoch_order(data, 0)


def test_a_state_from_far_more_ranks_than_samples_resumes_without_an_array_per_rank(
        data: Path) -> None:
    # Each saved rank's run was an array of its own, each the size of the whole padded
    # order: a million ranks took 24 GB. Past one rank per sample the rest is the same.
    for world, samples, left in ((10**6, 0, 27), (10**6, 1, 0), (10**20, 0, 27)):
        loader = ShardLoader(data, BATCH, seed=3)
        loader.load_state_dict(_state(data, world_size=world, batch_size=1, samples=samples))
        got = [i for b in indices(loader) for i in b]
        assert sorted(got) == list(range(left))
        assert indices(loader) == epoch_order(data, 1)
    # With drop_last no rank of such a world holds a sample: nothing is left of the epoch
    # (a [10**20, 0] array was asked for); nor after a cut that left nothing.
    dropping = ShardLoader(data, BATCH, seed=3, drop_last=True)
    dropping.load_state_dict(_state(data, world_size=10**20, batch_size=1, samples=0, drop_last=True))
    assert indices(dropping) == []
    chained = ShardLoader(data, BATCH, seed=3)
    chained.load_state_dict(_state(data, world_size=1, batch_size=BATCH, samples=0,
                                   cuts=[(10**20, 1, 1)]))  # tuples, as a config library keeps them
    assert indices(chained) == [] and indices(chained) == epoch_order(data, 1)


def test_a_state_at_the_end_of_an_epoch_is_an_empty_pass_then_the_next_epoch(data: Path) -> None:
    loader = ShardLoader(data, BATCH, seed=3)
    loader.load_state_dict(_state(data, samples=27))  # an older loader's "all of epoch 0"
    assert indices(loader) == [] and loader.epoch == 1
    assert indices(loader) == epoch_order(data, 1)


# --- 6. what metadata batches hold ---------------------------------------------------------

def test_loader_metadata_numbers_are_tensors_and_strings_lists(data: Path) -> None:
    loader = ShardLoader(data, BATCH, shuffle=False, fields=["orig_width", "orig_height", "key"])
    batch = next(iter(loader))
    rows = shardkit.open(data).metadata(0)[:BATCH]
    assert isinstance(batch["orig_width"], torch.Tensor) and batch["orig_width"].dtype == torch.int64
    assert batch["orig_width"].tolist() == [row["orig_width"] for row in rows]
    assert batch["orig_height"].tolist() == [row["orig_height"] for row in rows]
    assert batch["key"] == [row["key"] for row in rows] and isinstance(batch["key"], list)
    assert "orig_width and orig_height as int64 [B] tensors" in " ".join((ShardLoader.__doc__ or "").split())


def test_many_passes_leave_no_thread_behind(data: Path) -> None:
    loader = ShardLoader(data, BATCH, seed=3)
    list(itertools.islice(iter(loader), 1))  # one pass broken off, dropped
    before = threading.active_count()
    for _ in range(5):
        peek = iter(loader)
        next(peek)
        indices(loader)
    assert threading.active_count() <= before


# --- a DataLoader of ShardDataset: epochs ---------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_of_shard_dataset_moves_on_by_epoch(data: Path, workers: int) -> None:
    """A complete pass advances the epoch where it ran: in this process, and in persistent
    workers; fresh workers each epoch take set_epoch (every epoch repeated the first)."""
    from torch.utils.data import DataLoader

    reference = [epoch_order(data, e) for e in range(3)]
    persistent = shardkit.ShardDataset(data, BATCH, seed=3)
    loader = DataLoader(persistent, batch_size=None, num_workers=workers,
                        persistent_workers=workers > 0)
    got = [indices(loader) for _ in range(3)]
    assert got == reference and got[0] != got[1]
    fresh = shardkit.ShardDataset(data, BATCH, seed=3)
    loader = DataLoader(fresh, batch_size=None, num_workers=workers)
    epochs = []
    for epoch in range(3):
        fresh.set_epoch(epoch)
        epochs.append(indices(loader))
    assert epochs == reference
    with pytest.raises(ConfigError, match="epoch"):
        fresh.set_epoch(-1)
    # In this process, a loop of len() steps that never exhausts it moves on too, as ShardLoader.
    counted = shardkit.ShardDataset(data, BATCH, seed=3)
    steps = [indices(itertools.islice(counted, len(counted))) for _ in range(2)]
    assert steps == reference[:2] and counted.epoch == 2


def test_persistent_workers_after_a_pass_broken_off_read_one_whole_epoch(data: Path) -> None:
    """Workers make batches ahead of the loop: with each advancing when its own last batch
    was made, the pass after one broken off mixed worker 0's epoch 0 with worker 1's epoch 1
    (samples missing, others twice). Every pass after the first is the next epoch, whole."""
    from torch.utils.data import DataLoader

    dataset = shardkit.ShardDataset(data, 1, seed=3)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True,
                        prefetch_factor=2)
    # 27 batches: worker 0 makes 14, worker 1 13. After 22 (11 each) both are asked for 2
    # more: worker 1 has then made its last one, worker 0 not.
    batches = iter(loader)
    first = indices(itertools.islice(batches, 22))
    time.sleep(1.0)  # let the workers make what they were asked for
    del batches
    second, third = indices(loader), indices(loader)
    reference = []
    for epoch in range(3):
        one = ShardLoader(data, 1, seed=3)
        one.set_epoch(epoch)
        reference.append(indices(one))
    assert first == reference[0][:22] and second == reference[1] and third == reference[2]
    assert sorted(i for b in second for i in b) == list(range(27)) and second != third


def test_an_open_jpeg_loader_pass_at_exit_prints_nothing(tmp_path: Path) -> None:
    """A jpeg pass sets torch's thread count and puts it back when it closes; closed at
    interpreter exit, after torch's module was torn down, that printed a traceback."""
    import subprocess
    import sys

    jpeg = small_dataset(small_tree(tmp_path / "src", 3), tmp_path / "jpeg", 4, codec="jpeg")
    script = ("import shardkit\n"
              f"it = iter(shardkit.ShardLoader({str(jpeg)!r}, 4))\n"
              "print(len(next(it)['index']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "4\n" and done.stderr == "", done.stderr


def test_an_unfinished_numpy_iterator_at_exit_prints_nothing(data: Path) -> None:
    """At interpreter exit the daemon thread is stopped inside the pass: closing its items
    then raised 'generator already executing' (a traceback printed at every exit)."""
    import subprocess
    import sys

    script = ("import shardkit\n"
              f"it = shardkit.open({str(data)!r}).batches(4)\n"
              "print(len(next(it)['index']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "4\n" and done.stderr == "", done.stderr
