"""Keras benchmark: `model.fit` epochs fed by shardkit vs a PIL `keras.utils.PyDataset`.

The same class folders of photo-like JPEGs (300-800 px), the same tiny model (the data path,
not the model, is measured: Rescaling → 10× average pooling → Dense), Keras 3 on the torch
backend, batches of 32 at 150×150 (the seed's `flow_from_directory(target_size=(150, 150))`):

* shardkit, uint8 batches and ``keras.layers.Rescaling(1/255)`` in the model (the pattern
  the docs recommend: 4× fewer bytes to the device);
* shardkit, ``rescale=1/255`` in the loader (float32 batches, the model without Rescaling);
* a ``keras.utils.PyDataset`` that opens, converts and resizes every JPEG with PIL per sample
  (Keras' ``load_img``: nearest-neighbour resize), one worker (Keras' default) and 2 threads:
  what a Keras 3 user without TensorFlow has.

Each round runs ``fit`` on every loader, alternated (one epoch of the PIL loaders, and
``--fast-epochs`` of the others, reported per epoch); the table gives medians over
the rounds after a warm-up epoch (ranges in brackets): epoch seconds, samples/s and the
process's CPU-ms per sample (all threads). The JPEGs are converted once beforehand.

Usage: python scripts/bench_keras.py [--per-class 200] [--rounds 3] [--out bench-out/keras]
       [--write-doc docs/performance.md]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras' own setting: the backend measured

import keras
import numpy as np
import torch
from docblock import write_block
from PIL import Image

import shardkit
import shardkit.keras
from shardkit.tools.synth import make_image_folder

BEGIN, END = "<!-- keras:begin -->", "<!-- keras:end -->"
SIZE, BATCH, CLASSES = 150, 32, 3


class PilFolder(keras.utils.PyDataset):  # type: ignore[misc]
    """Class folders decoded per sample as Keras' load_img does, in a new order each epoch."""

    def __init__(self, root: Path, batch_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [(p, k) for k, c in enumerate(classes) for p in sorted((root / c).iterdir())]
        self.batch_size = batch_size
        self.rng = np.random.default_rng(0)
        self.order = self.rng.permutation(len(self.files))

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images, labels = [], []
        for i in rows:
            path, label = self.files[i]
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.NEAREST)))
            labels.append(label)
        return np.stack(images), np.asarray(labels)

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.files))


class InMemory(torch.utils.data.IterableDataset):  # type: ignore[misc]
    """The shards' batches held in memory as tensors: what the model alone costs."""

    def __init__(self, shards: Path) -> None:
        super().__init__()
        self.batches = [(x.clone(), y.clone()) for x, y in shardkit.keras.dataset(shards, BATCH, seed=0)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        return iter(self.batches)


def model(rescaling: bool) -> Any:
    layers = [keras.Input((SIZE, SIZE, 3)), *([keras.layers.Rescaling(1 / 255)] if rescaling else []),
              keras.layers.AveragePooling2D(10), keras.layers.Flatten(), keras.layers.Dense(CLASSES)]
    built = keras.Sequential(layers)
    built.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return built


def epoch(fit: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fit()
    return time.perf_counter() - wall, time.process_time() - cpu


def alone(data: Any) -> None:
    """One pass over the loader without a model: the data path's own cost."""
    if isinstance(data, PilFolder):
        for index in range(len(data)):
            data[index]
        data.on_epoch_end()
    else:
        for _ in data:
            pass


Times = dict[str, list[tuple[float, float, float]]]  # per round: fit wall, fit CPU, alone CPU


def measure(src: Path, shards: Path, rounds: int, fast_epochs: int) -> tuple[Times, int]:
    loaders: dict[str, tuple[Any, Any]] = {
        "shardkit, uint8 + `Rescaling(1/255)` in the model":
            (shardkit.keras.dataset(shards, BATCH, seed=0), model(True)),
        "shardkit, `rescale=1/255` in the loader":
            (shardkit.keras.dataset(shards, BATCH, seed=0, rescale=1 / 255), model(False)),
        "`PyDataset` + PIL per sample, 1 worker": (PilFolder(src, BATCH), model(True)),
        "`PyDataset` + PIL per sample, 2 threads": (PilFolder(src, BATCH, workers=2), model(True)),
        "in-memory tensors (the model's own cost)":
            (torch.utils.data.DataLoader(InMemory(shards), batch_size=None), model(True)),
    }
    samples = len(shardkit.open(shards))
    times: Times = {name: [] for name in loaders}
    for round_ in range(rounds + 1):  # round 0 warms up (first build, page cache)
        for name, (data, net) in loaders.items():
            # Fast loaders run several epochs per measurement, so that each lasts long enough.
            epochs = 1 if isinstance(data, PilFolder) else fast_epochs
            wall, cpu = epoch(lambda d=data, n=net, e=epochs: n.fit(d, epochs=e, shuffle=False, verbose=0))
            _, by_itself = epoch(lambda d=data: alone(d))
            if round_:
                times[name].append((wall / epochs, cpu / epochs, by_itself))
            print(f"round {round_} {name}: fit {wall / epochs:.2f} s wall, {cpu / epochs:.2f} s CPU; "
                  f"alone {by_itself:.3f} s CPU", flush=True)
    return times, samples


def report(args: argparse.Namespace, times: Times, samples: int) -> str:
    def med(values: list[float], digits: int = 2) -> str:
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"{mid:,.{digits}f} [{low:,.{digits}f}–{high:,.{digits}f}]"

    lines = [
        "## Keras `model.fit` (`scripts/bench_keras.py`)",
        "",
        f"{samples:,} photo-like JPEGs (300–800 px, {CLASSES} class folders), batches of {BATCH} at "
        f"{SIZE}×{SIZE}, Keras {keras.__version__} on the {keras.backend.backend()} backend, a tiny "
        "model (the data path is measured). One `fit` epoch of each loader per round, alternated; "
        f"medians of {args.rounds} rounds after a warm-up [ranges]; shardkit and in-memory rows: "
        f"the mean of {args.fast_epochs} epochs per round. Command: "
        f"`python scripts/bench_keras.py --per-class {args.per_class} --rounds {args.rounds}`.",
        "",
        "| loader | `fit` epoch s | samples/s | `fit` CPU-ms per sample | "
        "the loader alone, CPU-ms per sample |",
        "|---|---:|---:|---:|---:|",
    ]
    rates = {}
    for name, rows in times.items():
        walls = [w for w, _, _ in rows]
        rates[name] = samples / statistics.median(walls)
        lines.append(f"| {name} | {med(walls)} | {rates[name]:,.0f} | "
                     f"{med([c * 1e3 / samples for _, c, _ in rows])} | "
                     f"{med([a * 1e3 / samples for _, _, a in rows], 3)} |")
    names = list(times)
    cpu = {n: statistics.median(c for _, c, _ in times[n]) for n in names}
    data = {n: statistics.median(a for _, _, a in times[n]) * 1e3 / samples for n in names}
    lines += ["", f"shardkit (uint8) vs the PIL `PyDataset` with 1 worker: "
              f"**{rates[names[0]] / rates[names[2]]:,.1f}×** the samples/s and "
              f"**{cpu[names[2]] / cpu[names[0]]:,.1f}×** less CPU per sample in `fit`, the "
              f"model's own cost included (the in-memory row); the data path alone costs "
              f"{data[names[0]]:,.3f} CPU-ms per sample with shardkit and {data[names[2]]:,.2f} "
              f"with the PyDataset (**{data[names[2]] / data[names[0]]:,.0f}×**). Rescaling in the "
              f"loader instead of the model: {cpu[names[1]] / cpu[names[0]]:,.2f}× the CPU per "
              "sample. Without a GPU the model's `Rescaling` runs on this CPU too, and Keras "
              "makes it several passes over a float32 batch (cast, multiply, add the offset) "
              "where the loader makes one in-place multiply; with a GPU those passes run on the "
              "GPU and the batch crosses the bus as uint8, 4× fewer bytes than float32."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fast-epochs", type=int, default=5,
                        help="epochs per measurement of the in-memory and shardkit loaders")
    parser.add_argument("--out", type=Path, default=Path("bench-out/keras"))
    parser.add_argument("--write-doc", type=Path, default=None)
    args = parser.parse_args()
    src, shards = args.out / f"src-{args.per_class}", args.out / f"shards-{args.per_class}"
    if not src.exists():
        make_image_folder(src, classes=CLASSES, per_class=args.per_class, min_side=300, max_side=800)
    print(shardkit.convert(src, shards, size=SIZE, resize="stretch", progress=False).line())
    times, samples = measure(src, shards, args.rounds, args.fast_epochs)
    block = report(args, times, samples)
    print(block)
    if args.write_doc is not None:
        write_block(args.write_doc, BEGIN, END, f"{BEGIN}\n{block}\n{END}")


if __name__ == "__main__":
    main()
