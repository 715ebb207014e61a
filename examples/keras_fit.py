"""Keras 3 `model.fit` from shards: class folders → `shardkit convert` → `model.fit`.

The Keras flow this replaces::

    datagen = ImageDataGenerator(rescale=1./255, validation_split=0.2)
    train = datagen.flow_from_directory("data/train", target_size=(150, 150), batch_size=32,
                                        subset="training")
    val = datagen.flow_from_directory("data/train", target_size=(150, 150), batch_size=32,
                                      subset="validation")
    model.fit(train, validation_data=val, epochs=10)

With shardkit the JPEGs are decoded and resized once, into OUT/train and OUT/val (the same
files Keras would put in each subset: ``--validation-split``), and Keras reads uint8 batches;
``Rescaling(1/255)`` in the model does ``rescale=1./255`` on the device::

    python examples/keras_fit.py data/train --out shards --size 150 --epochs 10

Runs on Keras' torch backend unless KERAS_BACKEND says otherwise (jax and tensorflow work
too). ``--augment`` adds ImageDataGenerator-style augmentation (``Augment.from_keras``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras' own setting; the example's choice

import keras

import shardkit
import shardkit.keras


def small_convnet(size: int, classes: int) -> keras.Model:
    """The classic small Keras convnet for class folders. It takes the uint8 batches as they
    are: on the torch backend Keras moves them to its device first, then casts to float32."""
    return keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Rescaling(1 / 255),              # ImageDataGenerator(rescale=1./255)
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(0.5),
        keras.layers.Dense(classes, activation="softmax"),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="class-per-folder tree (data/train)")
    parser.add_argument("--out", required=True, help="where the shards go (OUT/train, OUT/val)")
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--validation-split", type=float, default=0.2)
    parser.add_argument("--augment", action="store_true",
                        help="rotation, shifts, zoom and flips as ImageDataGenerator takes them")
    parser.add_argument("--workers", type=int, default=None, help="conversion workers")
    parser.add_argument("--history", default=None, help="write the Keras history as JSON here")
    args = parser.parse_args()

    # shardkit convert SRC OUT --size S --resize stretch --validation-split V
    summary = shardkit.convert(args.src, args.out, size=args.size, resize="stretch",
                               validation_split=args.validation_split, workers=args.workers,
                               progress=False)
    print(summary.line())

    augment = shardkit.Augment.from_keras(rotation_range=20, width_shift_range=0.1,
                                          height_shift_range=0.1, zoom_range=0.1,
                                          horizontal_flip=True) if args.augment else None
    train = shardkit.keras.dataset(Path(args.out) / "train", args.batch_size, seed=0, augment=augment)
    val = shardkit.keras.dataset(Path(args.out) / "val", args.batch_size, shuffle=False)
    classes = train.class_names or []
    print(f"{len(classes)} classes, {len(train)} steps per epoch, {len(val)} validation steps "
          f"(Keras {keras.__version__}, {keras.backend.backend()} backend)")

    model = small_convnet(args.size, len(classes))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    # shuffle=False: shardkit shuffles (a new order each epoch); Keras cannot shuffle a loader.
    history = model.fit(train, validation_data=val, epochs=args.epochs, shuffle=False, verbose=2)
    loss, accuracy = model.evaluate(val, verbose=0)
    print(f"validation: loss {loss:.4f}, accuracy {accuracy:.4f}")
    if args.history:
        Path(args.history).write_text(json.dumps({"history": history.history, "steps": len(train),
                                                  "val_steps": len(val), "classes": classes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
