"""Which part of a split each input goes to: pure functions of the listing and the options.

``stratified`` (``--split train=0.8,val=0.2 --seed S``): the inputs are grouped by label (an
unlabelled dataset is one group). Each group's count per part is its share by largest
remainders (ties go to the earlier part); which of the group's inputs go where is a
permutation drawn from (S, label). Every class is split in the same proportions, the same
seed gives the same split every time, and one class's split does not depend on any other.

``keras`` (``--validation-split v``), Keras' own cuts:

* class folders: ``ImageDataGenerator(validation_split=v).flow_from_directory(subset=...)``:
  per class, the files Keras lists in its folder, in its order (``os.walk`` sorted by
  folder path, not following linked folders, then file names sorted; names ending with one
  of its extensions `KERAS_FORMATS`, hidden ones too), validation the first ``int(v * n)``
  (Keras' ``_list_valid_filenames_in_directory`` with ``split=(0, v)`` and ``(v, 1)``).
  An input Keras does not list (a .webp or .gif, an image in a linked folder) goes to
  training. A remote SRC cannot be walked as Keras walks it: its inputs stand for Keras'
  listing, exact when the class folders hold only what Keras lists too.
* image CSVs (and Hugging Face datasets): ``flow_from_dataframe(validation_split=v)``: over
  the rows Keras keeps (the file exists and, for a CSV, its name ends with one of
  `KERAS_FORMATS`), in CSV order, validation the first ``int(v * n)``; the other rows go
  to training (a missing file is reported there).
* tabular CSVs: ``model.fit(validation_split=v)``: training the first ``floor(n * (1 - v))``
  good rows, validation the rest.

Each part keeps the listing order of its inputs. Parts are numbered as
`SplitOptions.parts` lists them (0 = train).
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence

import numpy as np

__all__ = ["KERAS_FORMATS", "keras_folder", "keras_rows", "keras_table", "shares", "stratified"]

#: The extensions Keras' flow_from_directory and flow_from_dataframe read (its
#: ``white_list_formats``), matched as Keras matches them: the lower-cased name ends so.
KERAS_FORMATS = ("png", "jpg", "jpeg", "bmp", "ppm", "tif", "tiff")


def shares(n: int, fractions: Sequence[float]) -> list[int]:
    """`n` cut into parts of `fractions` (adding up to 1) by largest remainders; the counts
    add up to `n`, ties go to the earlier part."""
    exact = [f * n for f in fractions]
    counts = [math.floor(e + 1e-9) for e in exact]
    rest = n - sum(counts)
    by_remainder = sorted(range(len(fractions)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[:max(rest, 0)]:
        counts[k] += 1
    return counts


def stratified(labels: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """The part of each input (int64 array): per label (-1: unlabelled) a seeded choice."""
    part = np.empty(len(labels), dtype=np.int64)
    for label, members in _groups(labels):
        chosen = members[np.random.default_rng([seed, label + 1]).permutation(len(members))]
        first = 0
        for k, count in enumerate(shares(len(members), fractions)):
            part[chosen[first:first + count]] = k
            first += count
    return part


def keras_folder(labels: np.ndarray, sources: Sequence[str], validation: float,
                 listed: Sequence[Sequence[str]] | None = None) -> np.ndarray:
    """flow_from_directory's cut (0 = train, 1 = val) of class-folder inputs; `sources` are
    paths relative to SRC (``class/sub/file.jpg``). `listed`: per label, the files Keras lists
    in that class folder, in its order (relative to SRC): validation is the first
    ``int(v * len)`` of them, and an input Keras does not list (another extension, a linked
    folder's) goes to training. None: the inputs themselves are taken as Keras' listing."""
    part = np.zeros(len(labels), dtype=np.int64)
    for label, group in _groups(labels):
        members = group.tolist()
        if listed is not None:
            keras = listed[label]
            validating = set(keras[:int(validation * len(keras))])
            part[[i for i in members if sources[i] in validating]] = 1
            continue
        # os.walk roots sorted as strings, then the files of each root sorted: the roots
        # share SRC as a prefix, so comparing the folder part of `source` is the same.
        members.sort(key=lambda i: posixpath.split(sources[i]))
        cut = int(validation * len(members))
        part[members[:cut]] = 1
    return part


def _groups(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(label, its inputs' indices in listing order) for each label, in label order."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    stops = [*starts[1:].tolist(), len(labels)] if len(labels) else []  # no inputs: no groups
    return [(int(v), order[a:b]) for v, a, b in zip(values.tolist(), starts.tolist(), stops, strict=True)]


def keras_rows(listed: np.ndarray, validation: float) -> np.ndarray:
    """flow_from_dataframe's cut (0 = train, 1 = val): of the rows Keras keeps (`listed`:
    their file exists, with one of `KERAS_FORMATS`), the first int(v * n) are validation."""
    listed = np.asarray(listed, dtype=bool)
    part = np.zeros(len(listed), dtype=np.int64)
    present = np.flatnonzero(listed)
    part[present[:int(validation * len(present))]] = 1
    return part


def keras_table(n: int, validation: float) -> np.ndarray:
    """model.fit(validation_split=v)'s cut (0 = train, 1 = val) of `n` rows."""
    part = np.ones(n, dtype=np.int64)
    part[:math.floor(n * (1.0 - validation))] = 0
    return part
