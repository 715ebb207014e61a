"""Keras 3: ``model.fit(shardkit.keras.dataset("shards/train", 32), epochs=10)``.

`dataset` returns a `KerasLoader`: a ``torch.utils.data.DataLoader`` (single process, no
re-batching) over the whole batches of a `ShardLoader`, each turned into the ``(x, y)`` pair
Keras expects. Keras' data adapters recognise the DataLoader class on every backend (torch,
JAX, TensorFlow: ``keras.src.trainers.data_adapters.is_torch_dataloader``), take the steps
per epoch from ``len()`` and iterate it once per epoch, for ``fit``, ``evaluate``,
``predict`` and ``validation_data=`` alike.

Epochs: Keras opens a new iterator for each epoch without telling the data which epoch it
is (and opens extra ones: one for the model's first build, one it drops unused at an
epoch's end). The loader's epoch therefore advances when a pass has handed out its last
batch, and only then: each complete pass gets a new shuffle and new augmentation draws,
with no ``set_epoch``, and a pass broken off early is repeated with the same order. The
epoch is the `ShardLoader`'s (``dataset(...).loader``): its ``set_epoch`` and
``load_state_dict`` (a job resumed with ``fit(initial_epoch=...)``) hold for the next pass.

This module never imports Keras; Keras never needs to import it either: the numpy and
torch paths of shardkit are unchanged by it. It needs torch (``shardkit[torch]``; Keras
itself is ``shardkit[keras]``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from shardkit.config import ReadOptions
from shardkit.errors import ConfigError, require
from shardkit.reader.torch_dataset import ShardLoader

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from shardkit.keywords import ReadKeywords

torch: Any = require("torch", "torch")

__all__ = ["LABEL_MODES", "KerasBatches", "KerasLoader", "dataset"]

LabelMode = Literal["int", "categorical", "binary"]
#: What ``y`` holds, as Keras' ``image_dataset_from_directory(label_mode=...)`` names it.
LABEL_MODES: tuple[str, ...] = ("int", "categorical", "binary")


def dataset(path: str | os.PathLike[str], batch_size: int, options: ReadOptions | None = None, *,
            x: str | Sequence[str] = "image", y: str | None = "label",
            label_mode: LabelMode = "int", rescale: float | None = None, device: Any = None,
            pin_memory: bool = False, **keywords: Unpack[ReadKeywords]) -> KerasLoader:
    """What ``model.fit``, ``model.evaluate``, ``model.predict`` and ``validation_data=``
    take: the converted dataset `path` (a folder, or a URL: docs/remote.md) in batches of
    `batch_size` as ``(x, y)`` pairs.

    x: the batch field(s) the model takes: ``"image"`` (uint8 [B, H, W, C], NHWC as Keras
        expects), ``"features"`` for a table; several names give a dict (a model with named
        inputs). y: the target field (``"label"``), or None to yield x alone (predict).
    label_mode: ``int`` (labels as stored: int64 [B]; an image CSV's float32 targets
        [B, K] or a table's as they are), ``categorical`` (one-hot float32 [B, K],
        for categorical_crossentropy) or ``binary`` (float32 [B, 1]); as Keras'
        ``image_dataset_from_directory`` names them.
    rescale: None keeps the pixels uint8 (4× fewer bytes to the device; put
        ``keras.layers.Rescaling(1/255)`` first in the model), else x is float32 × rescale.
    device: where to make x and y (a torch device, e.g. "cuda"); None: the CPU, and Keras
        moves the batch to its own device. Augmentation and rescaling run there.
    Other options: a `ReadOptions` and/or its fields as keywords, as `ShardLoader` takes
        them (shuffle=True, seed=0, window, drop_last, augment, verify, ...), and
        `pin_memory`. With ``augment=shardkit.Augment(...)`` (or ``Augment.from_keras``) x is
        the augmented float32 NHWC batch, on the 0-255 scale times the Augment's own
        rescale (Keras' ``rescale=``) and times `rescale`.

    ``len()`` is the exact number of steps per epoch. Raises ConfigError for a field the
    dataset lacks or a label mode it cannot give, DatasetError for a path that is not a
    dataset.
    """
    loader = ShardLoader(path, batch_size, options, pin_memory=pin_memory, **keywords)
    return KerasLoader(KerasBatches(loader, x=x, y=y, label_mode=label_mode, rescale=rescale,
                                    device=device))


def _as_is(batch: Any) -> Any:
    # The batches are whole already: the DataLoader must neither re-batch nor convert them.
    return batch


class KerasBatches(torch.utils.data.IterableDataset):  # type: ignore[misc]
    """The ``(x, y)`` pairs of `loader`, one per batch; ``len()`` is its batches per epoch.
    The epoch advances when a pass has handed out its last batch (see the module docstring).
    """

    def __init__(self, loader: ShardLoader, *, x: str | Sequence[str], y: str | None,
                 label_mode: LabelMode, rescale: float | None, device: Any) -> None:
        super().__init__()
        manifest = loader.dataset.manifest
        names = [x] if isinstance(x, str) else list(x)
        schema = set(manifest.schema) | ({"label"} if "target" in manifest.schema else set())
        fields = ({"image", "label", "features"} & schema) | {"index"} | set(loader.options.fields)
        missing = [n for n in [*names, *([y] if y is not None else [])] if n not in fields]
        if not names or missing:
            raise ConfigError(f"{loader.dataset.path}: no field {', '.join(map(repr, missing)) or 'x'}"
                              f"; this dataset has {', '.join(sorted(fields))}")
        if label_mode not in LABEL_MODES:
            raise ConfigError(f"label_mode must be one of {', '.join(LABEL_MODES)}; got {label_mode!r}")
        if label_mode != "int" and (manifest.classes is None or y is None):
            raise ConfigError(f"label_mode={label_mode!r} needs class labels; "
                              f"{loader.dataset.path} has none (use label_mode='int')")
        if label_mode == "binary" and len(manifest.classes or ()) != 2:
            raise ConfigError(f"label_mode='binary' needs 2 classes; {loader.dataset.path} has "
                              f"{len(manifest.classes or ())}")
        if rescale is not None and (isinstance(rescale, bool) or not isinstance(rescale, (int, float))):
            raise ConfigError(f"rescale must be a number or None; got {rescale!r}")
        self.loader, self.names, self.single = loader, names, isinstance(x, str)
        self.y, self.label_mode, self.rescale = y, label_mode, rescale
        self.device = None if device is None else torch.device(device)
        self.classes: list[str] | None = manifest.classes

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        # The loader keeps the epoch: it advances when a pass hands out its last batch, and
        # repeats one broken off (the batch Keras takes to build the model), so its own
        # set_epoch and load_state_dict hold for the next pass.
        for batch in self.loader:
            yield self.pair(batch)

    def pair(self, batch: dict[str, Any]) -> Any:
        """The ``(x, y)`` (or x) Keras gets for one loader batch."""
        if isinstance(batch.get("augment"), torch.Tensor):
            from shardkit.reader.device import to_device

            # The Augment's own rescale (from_keras sets 1.0 when Keras would not rescale)
            # replaces to_device's scale; the dataset's rescale multiplies what comes out.
            moved = to_device(batch, self.device or "cpu", scale=1.0)
            image = moved["image"].permute(0, 2, 3, 1)  # NCHW view → NHWC
            batch = {**moved, "image": image if self.rescale is None else image.mul_(self.rescale)}
        elif self.device is not None:
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
        image = batch.get("image")
        if self.rescale is not None and isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            batch = {**batch, "image": image.to(torch.float32).mul_(self.rescale)}
        inputs = batch[self.names[0]] if self.single else {n: batch[n] for n in self.names}
        if self.y is None:
            return inputs
        return inputs, self._target(batch[self.y])

    def _target(self, label: Any) -> Any:
        if self.label_mode == "categorical":
            return torch.nn.functional.one_hot(label, len(self.classes or ())).to(torch.float32)
        if self.label_mode == "binary":
            return label.to(torch.float32).unsqueeze(1)
        return label


class KerasLoader(torch.utils.data.DataLoader):  # type: ignore[misc]
    """A ``torch.utils.data.DataLoader`` (what Keras' data adapters accept) over a
    `KerasBatches`; made by `dataset`. ``len()`` is the steps per epoch; ``class_names``
    the class of each label (None for unlabelled data); ``loader`` the `ShardLoader`."""

    def __init__(self, batches: KerasBatches) -> None:
        super().__init__(batches, batch_size=None, collate_fn=_as_is, num_workers=0)
        self.batches = batches

    @property
    def loader(self) -> ShardLoader:
        return self.batches.loader

    @property
    def class_names(self) -> list[str] | None:
        return self.batches.classes

    @property
    def epoch(self) -> int:
        """The epoch the next complete pass reads (the loader's)."""
        return self.batches.loader.epoch
