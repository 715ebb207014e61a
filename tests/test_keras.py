"""shardkit.keras: Keras 3 trains, validates and evaluates straight from shards (torch
backend in this process; the JAX backend in a subprocess when jax is installed)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import shardkit
import shardkit.keras
from shardkit.tools.synth import make_image_folder

os.environ.setdefault("KERAS_BACKEND", "torch")  # the test's choice of Keras backend, not shardkit's
keras = pytest.importorskip("keras")
CLASSES, PER_CLASS, SIZE, BATCH = 3, 7, 16, 4
# Inside Keras' torch backend (np.array on a tensor), not shardkit's.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keras")
    make_image_folder(root / "raw", classes=CLASSES, per_class=PER_CLASS, min_side=20, max_side=40, seed=3)
    out = {}
    for fmt in ("tar", "parquet"):
        out[fmt] = root / fmt
        shardkit.convert(root / "raw", out[fmt], size=SIZE, format=fmt, samples_per_shard=8,
                         workers=0, progress=False)
    return out


def tiny_model(classes: int = CLASSES) -> Any:
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


class Steps(keras.callbacks.Callback):  # type: ignore[misc]
    """Counts the batches Keras trains on in each epoch and the epochs' progress-bar target."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.steps.append(0)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.steps[-1] += 1


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_fit_two_epochs_with_validation_data_and_evaluate(shards: dict[str, Path], fmt: str) -> None:
    train = shardkit.keras.dataset(shards[fmt], BATCH, seed=1)
    val = shardkit.keras.dataset(shards[fmt], BATCH, shuffle=False)
    assert isinstance(train, torch.utils.data.DataLoader)
    assert len(train) == math.ceil(CLASSES * PER_CLASS / BATCH) == 6
    counter = Steps()
    history = tiny_model().fit(train, validation_data=val, epochs=2, shuffle=False, verbose=0,
                               callbacks=[counter])
    assert len(history.history["loss"]) == len(history.history["val_loss"]) == 2
    assert counter.steps == [6, 6]
    assert all(np.isfinite(history.history["val_accuracy"]))
    assert train.epoch == 2  # two complete passes: each got its own order
    loss, accuracy = history.model.evaluate(val, verbose=0)
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0


def test_pairs_are_nhwc_uint8_with_the_class_folder_labels(shards: dict[str, Path]) -> None:
    data = shardkit.keras.dataset(shards["tar"], BATCH, shuffle=False)
    assert data.class_names == [f"class_{k}" for k in range(CLASSES)]
    pairs = list(data)
    x = torch.cat([p[0] for p in pairs])
    y = torch.cat([p[1] for p in pairs])
    assert x.dtype == torch.uint8 and x.shape == (CLASSES * PER_CLASS, SIZE, SIZE, 3)
    stored = shardkit.open(shards["tar"])
    np.testing.assert_array_equal(x.numpy(), np.concatenate(
        [stored.read_shard(k).images for k in range(len(stored.manifest.shards))]))
    folders = [m["source"].split("/")[0] for k in range(len(stored.manifest.shards))
               for m in stored.metadata(k)]
    assert [data.class_names[v] for v in y.tolist()] == folders


def test_a_new_order_each_complete_pass_and_a_broken_pass_repeats(shards: dict[str, Path]) -> None:
    data = shardkit.keras.dataset(shards["tar"], BATCH, seed=5)
    reference = shardkit.ShardLoader(shards["tar"], BATCH, seed=5)

    def order(epoch: int) -> list[int]:
        reference.set_epoch(epoch)
        return torch.cat([b["label"] for b in reference]).tolist()

    broken = iter(data)
    next(broken)  # Keras' first build takes one batch and drops the iterator
    del broken
    first = torch.cat([y for _, y in data]).tolist()
    second = torch.cat([y for _, y in data]).tolist()
    assert first == order(0) and second == order(1) and data.epoch == 2
    assert sorted(first) == sorted(second)


def test_the_loaders_set_epoch_and_state_hold_for_the_next_pass(shards: dict[str, Path]) -> None:
    # The adapter kept an epoch of its own and set it on the loader at every pass, so the
    # loader's set_epoch and load_state_dict (resuming a job) were silently undone.
    data = shardkit.keras.dataset(shards["tar"], BATCH, seed=5)
    reference = shardkit.ShardLoader(shards["tar"], BATCH, seed=5)
    reference.set_epoch(3)
    epoch3 = [b["label"].tolist() for b in reference]
    data.loader.set_epoch(3)
    assert [y.tolist() for _, y in data] == epoch3 and data.epoch == 4
    reference.set_epoch(1)
    passing = iter(reference)
    done = [next(passing)["label"].tolist() for _ in range(2)]
    state = reference.state_dict()
    resumed = shardkit.keras.dataset(shards["tar"], BATCH, seed=5)
    resumed.loader.load_state_dict(state)
    rest = [y.tolist() for _, y in resumed]
    reference.set_epoch(1)
    assert done + rest == [b["label"].tolist() for b in reference] and len(rest) == len(resumed) - 2
    assert resumed.epoch == 2


def test_rescale_categorical_and_augment(shards: dict[str, Path]) -> None:
    plain = next(iter(shardkit.keras.dataset(shards["tar"], BATCH, shuffle=False)))
    x, y = next(iter(shardkit.keras.dataset(shards["tar"], BATCH, shuffle=False, rescale=1 / 255,
                                            label_mode="categorical")))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, plain[0].float() / 255)
    torch.testing.assert_close(y, torch.nn.functional.one_hot(plain[1], CLASSES).float())
    augment = shardkit.Augment.from_keras(horizontal_flip=True, rotation_range=15, rescale=1 / 255)
    data = shardkit.keras.dataset(shards["tar"], BATCH, shuffle=False, augment=augment)
    ax, ay = next(iter(data))
    loader = shardkit.ShardLoader(shards["tar"], BATCH, shuffle=False, augment=augment)
    expected = shardkit.to_device(next(iter(loader)), "cpu")["image"].permute(0, 2, 3, 1)
    assert ax.shape == (BATCH, SIZE, SIZE, 3) and torch.equal(ay, plain[1])
    torch.testing.assert_close(ax, expected)
    assert not torch.allclose(ax, plain[0].float() / 255)  # the rotation moved pixels
    # Keras' rescale left out of from_keras: the dataset's rescale applies, as without augment.
    unscaled = shardkit.Augment.from_keras(horizontal_flip=True, rotation_range=15)
    bx, _ = next(iter(shardkit.keras.dataset(shards["tar"], BATCH, shuffle=False, augment=unscaled,
                                             rescale=1 / 255)))
    torch.testing.assert_close(bx, ax)
    raw, _ = next(iter(shardkit.keras.dataset(shards["tar"], BATCH, shuffle=False, augment=unscaled)))
    torch.testing.assert_close(raw, ax * 255)


def test_bad_requests_name_the_option(shards: dict[str, Path]) -> None:
    with pytest.raises(shardkit.ConfigError, match="features"):
        shardkit.keras.dataset(shards["tar"], BATCH, x="features")
    with pytest.raises(shardkit.ConfigError, match="binary"):
        shardkit.keras.dataset(shards["tar"], BATCH, label_mode="binary")  # 3 classes
    with pytest.raises(shardkit.ConfigError, match="label_mode"):
        shardkit.keras.dataset(shards["tar"], BATCH, label_mode="onehot")  # type: ignore[arg-type]


def test_multi_column_float_targets_and_string_labels_of_an_image_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = ["file,kind,a,b"]
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{'dog' if i % 2 else 'cat'},{i / 10},{-i}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    targets = shardkit.convert(tmp_path / "t.csv", tmp_path / "reg", image_col="file", label_col="a,b",
                               size=SIZE, workers=0, progress=False).out
    pairs = list(shardkit.keras.dataset(targets, 3, shuffle=False))
    y = torch.cat([p[1] for p in pairs])
    assert y.dtype == torch.float32 and y.shape == (6, 2)
    np.testing.assert_allclose(y.numpy(), [[i / 10, -i] for i in range(6)], rtol=1e-6)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    history = model.fit(shardkit.keras.dataset(targets, 3), epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2
    kinds = shardkit.convert(tmp_path / "t.csv", tmp_path / "cls", image_col="file", label_col="kind",
                             size=SIZE, workers=0, progress=False).out
    data = shardkit.keras.dataset(kinds, 6, shuffle=False, label_mode="binary")
    assert data.class_names == ["cat", "dog"]
    assert next(iter(data))[1].squeeze(1).tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_a_table_fits_from_its_features(tmp_path: Path) -> None:
    rows = ["x1,x2,y"] + [f"{i},{i * 2},{i % 2}" for i in range(10)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    out = shardkit.convert(tmp_path / "t.csv", tmp_path / "t", label_col="y", progress=False).out
    data = shardkit.keras.dataset(out, 4, x="features", shuffle=False)
    x, y = next(iter(data))
    assert x.shape == (4, 2) and x.dtype == torch.float32 and y.tolist() == [0, 1, 0, 1]
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert len(model.fit(data, epochs=2, shuffle=False, verbose=0).history["loss"]) == 2


_JAX = """
import sys, keras, shardkit.keras
assert keras.backend.backend() == "jax"
train = shardkit.keras.dataset(sys.argv[1], 4, seed=0)
model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255),
                          keras.layers.Flatten(), keras.layers.Dense(3)])
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
history = model.fit(train, validation_data=shardkit.keras.dataset(sys.argv[1], 4, shuffle=False),
                    epochs=2, verbose=0)
print(len(history.history["val_loss"]), len(train), train.epoch)
"""


def test_jax_backend_fits_from_the_same_loader(shards: dict[str, Path]) -> None:
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _JAX, str(shards["parquet"])], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "6", "2"]


def test_the_numpy_and_torch_paths_never_import_keras(shards: dict[str, Path]) -> None:
    code = ("import sys, shardkit; list(shardkit.open(sys.argv[1]).batches(4)); "
            "list(shardkit.ShardLoader(sys.argv[1], 4)); print('keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(shards["tar"])], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
