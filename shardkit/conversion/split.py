"""Which part of a split each input goes to: pure functions of the listing and the options.

``stratified`` (``--split train=0.8,val=0.2 --seed S``): the inputs are grouped by label (an
unlabelled dataset is one group). Each group's count per part is its share by largest
remainders (ties go to the earlier part); which of the group's inputs go where is a
permutation drawn from (S, label). Every class is split in the same proportions, the same
seed gives the same split every time, and one class's split does not depend on any other.

``keras`` (``--validation-split v``), Keras' own cuts:

* class folders: ``ImageDataGenerator(validation_split=v).flow_from_directory(subset=...)``:
  per class, the files in Keras' order (``os.walk`` sorted by folder path, then file names
  sorted), validation the first ``int(v * n)``, training the rest (Keras'
  ``_list_valid_filenames_in_directory`` with ``split=(0, v)`` and ``(v, 1)``). Exact when
  the class folders hold only what Keras lists too: its extensions (png, jpg, jpeg, bmp,
  ppm, tif, tiff), no hidden files, no linked folders.
* image CSVs (and Hugging Face datasets): ``flow_from_dataframe(validation_split=v)``: over
  the rows whose file exists, in CSV order, validation the first ``int(v * n)``; rows whose
  file is missing go to training (and are reported there).
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

__all__ = ["keras_folder", "keras_rows", "keras_table", "shares", "stratified"]


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


def keras_folder(labels: np.ndarray, sources: Sequence[str], validation: float) -> np.ndarray:
    """flow_from_directory's cut (0 = train, 1 = val) of class-folder inputs; `sources` are
    paths relative to SRC (``class/sub/file.jpg``)."""
    part = np.zeros(len(labels), dtype=np.int64)
    for _label, group in _groups(labels):
        members = group.tolist()
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


def keras_rows(exists: np.ndarray, validation: float) -> np.ndarray:
    """flow_from_dataframe's cut (0 = train, 1 = val): the first int(v * n) rows whose file
    exists are validation."""
    exists = np.asarray(exists, dtype=bool)
    part = np.zeros(len(exists), dtype=np.int64)
    present = np.flatnonzero(exists)
    part[present[:int(validation * len(present))]] = 1
    return part


def keras_table(n: int, validation: float) -> np.ndarray:
    """model.fit(validation_split=v)'s cut (0 = train, 1 = val) of `n` rows."""
    part = np.ones(n, dtype=np.int64)
    part[:math.floor(n * (1.0 - validation))] = 0
    return part
