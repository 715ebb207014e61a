"""The options are typed end to end: every entry point takes the same names with the same
types and defaults, and the keyword spellings editors see are the config fields."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import numpy as np
import pytest
from corpus import small_dataset, small_tree

import shardkit
from shardkit import keywords
from shardkit.config import ConvertConfig, CsvOptions, ImageOptions, ReadOptions, RunOptions


def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls, localns={"Augment": shardkit.Augment,
                                                 "RetryPolicy": shardkit.RetryPolicy})


def test_read_keywords_are_read_options_fields() -> None:
    fields = {f.name: f.type for f in dataclasses.fields(ReadOptions)}
    hints = _hints(keywords.ReadKeywords)
    assert set(hints) == set(fields)
    own = _hints(ReadOptions)
    for name, hint in hints.items():
        if name != "fields":  # a sequence (or None) as a keyword, a tuple once validated
            assert hint == own[name], name


def test_convert_keywords_are_the_config_fields_plus_the_friendly_forms() -> None:
    fields = set()
    for cls in (ImageOptions, ConvertConfig, RunOptions, CsvOptions):
        fields |= {f.name for f in dataclasses.fields(cls)}
    fields -= {"image"}
    assert set(_hints(keywords.ConvertKeywords)) == fields | {"shard_size", "label_col", "validation_split",
                                                               "hf_split"}


def test_loader_dataset_and_numpy_batches_share_options_and_defaults(tmp_path: Path) -> None:
    data = small_dataset(small_tree(tmp_path / "src", 4), tmp_path / "out", 5)
    loader = shardkit.ShardLoader(data, 4)
    assert loader.options == ReadOptions() == shardkit.ShardDataset(data, 4).options
    chosen = ReadOptions(shuffle=False, window=2, seed=3)
    assert shardkit.ShardLoader(data, 4, chosen).options == chosen
    assert shardkit.ShardLoader(data, 4, chosen, seed=5).options == dataclasses.replace(chosen, seed=5)
    numpy = [b["index"].tolist() for b in shardkit.open(data).batches(4, chosen, prefetch=0)]
    torch = [b["index"].tolist() for b in shardkit.ShardLoader(data, 4, chosen)]
    assert numpy == torch
    default_numpy = [b["index"].tolist() for b in shardkit.open(data).batches(4)]
    default_torch = [b["index"].tolist() for b in shardkit.ShardLoader(data, 4)]
    assert default_numpy == default_torch  # the same defaults: shuffled, seed 0, window 4
    with pytest.raises(shardkit.ConfigError, match="unknown option"):
        shardkit.ShardLoader(data, 4, shufle=False)  # type: ignore[call-arg]


@pytest.mark.parametrize("bad", [{"prefetch": -1}, {"seed": -1}, {"copy_threads": 0},
                                 {"cache_shards": 0}, {"decode": "gpu"}, {"rank": 2, "world_size": 2},
                                 {"world_size": 0}, {"window": True}])
def test_read_options_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(shardkit.ConfigError, match=next(iter(bad)).split("_")[0]):
        ReadOptions(**bad)  # type: ignore[arg-type]


def test_convert_takes_config_objects_or_keywords_not_both(tmp_path: Path) -> None:
    src = small_tree(tmp_path / "src", 2)
    config = ConvertConfig(image=ImageOptions(size=(8, 8)), samples_per_shard=4, shard_bytes=None)
    summary = shardkit.convert(src, tmp_path / "a", config, RunOptions(workers=0))
    by_keywords = shardkit.convert(src, tmp_path / "b", size=8, samples_per_shard=4, workers=0)
    assert (tmp_path / "a" / "shard-00000.tar").read_bytes() == \
        (tmp_path / "b" / "shard-00000.tar").read_bytes()
    assert summary.samples == by_keywords.samples == 6
    with pytest.raises(shardkit.ConfigError, match="not both"):
        shardkit.convert(src, tmp_path / "c", config, size=8)
    assert "options" in inspect.signature(shardkit.convert).parameters


@pytest.mark.parametrize("size", [150, "150", (150,), (True, 3), (0, 8), (8.0, 8)])
def test_image_options_size_is_validated_on_construction(size: object) -> None:
    with pytest.raises(shardkit.ConfigError, match="size"):
        ImageOptions(size=size)  # type: ignore[arg-type]
    assert ImageOptions(size=[16, 12]).size == (16, 12)  # type: ignore[arg-type]


def test_numpy_integers_are_integers_everywhere(tmp_path: Path) -> None:
    # An integer from numpy (a config array, np.arange) is taken wherever an int is, and kept
    # as a Python int (it goes into JSON: the manifest, state_dict); a bool is no integer.
    n = np.int64
    options = ReadOptions(seed=n(3), prefetch=n(2), window=n(2), cache_limit=n(10**9))
    assert options == ReadOptions(seed=3, prefetch=2, window=2, cache_limit=10**9)
    assert {type(getattr(options, f)) for f in ("seed", "prefetch", "window", "cache_limit")} == {int}
    image = ImageOptions(size=(n(16), np.int32(12)), max_pixels=n(10**6))
    assert image.size == (16, 12) and {type(v) for v in (*image.size, image.max_pixels)} == {int}
    assert type(shardkit.RetryPolicy(attempts=np.uint8(2)).attempts) is int
    data = small_dataset(small_tree(tmp_path / "src", 4), tmp_path / "out", 5)
    loader = shardkit.ShardLoader(data, n(4), shuffle=False, seed=n(1), num_workers=n(0))
    dataset = shardkit.open(data)
    assert len(dataset) == 12
    assert [b["index"].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert json.loads(json.dumps(loader.state_dict()))["seed"] == 1
    assert [len(dataset.read_shard(k).labels) for k in np.arange(3)] == [5, 5, 2]
    for bad in (True, np.True_, 2.0):
        with pytest.raises(shardkit.ConfigError, match=r"^seed must be an integer >= 0"):
            ReadOptions(seed=bad)  # type: ignore[arg-type]
        with pytest.raises(shardkit.ConfigError, match=r"^batch_size must be an integer >= 1"):
            shardkit.ShardLoader(data, bad)  # type: ignore[arg-type]
