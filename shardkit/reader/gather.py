"""Gather a batch's samples out of opened shards with one copy per shard it touches.

`Pieces` holds a shard's images as consecutive arrays (say, one per Parquet data page) and,
when they are views of one mapped file, every image's byte offset in it, so a shuffled batch
is one `torch.index_select` whatever the number of pieces. `gather` picks the copy: a slice
copy for a run of consecutive samples, else torch's index_select (numpy would copy twice).
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from shardkit.reader.mapping import address

__all__ = ["Pieces", "gather", "torch_or_none"]

_THREAD = threading.local()

# Shards are mapped read-only, and torch warns (once) when it wraps a read-only array. The
# tensors made here are only ever read (the source of a gather), so the warning says nothing
# to the user; it is silenced for this module's calls only, once, at import.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning, module=__name__)


class Pieces:
    """A shard's images as consecutive [n_i,H,W,C] arrays (say, one per Parquet data page),
    gathered from without joining them first.

    When the pieces are views of one flat uint8 buffer (a memory-mapped file) and torch is
    present, every image's byte offset in that buffer is known (`offsets`), and a shuffled
    batch is gathered from all the pieces with one `index_select` (see `gather`) instead of
    one call per piece.
    """

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = list(arrays)
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays], dtype=np.int64)
        self.offsets: np.ndarray | None = None
        self._rows: Any = None  # the buffer as overlapping rows, one starting at every byte
        base = self.arrays[0].base if self.arrays else None
        torch = torch_or_none()
        if torch is None or not isinstance(base, np.ndarray) or base.ndim != 1 \
                or base.dtype != np.uint8 or not all(a.base is base and a.flags.c_contiguous
                                                     for a in self.arrays):
            return
        width = int(np.prod(self.arrays[0].shape[1:]))
        origin = address(base)
        self.offsets = np.concatenate(
            [address(a) - origin + width * np.arange(len(a), dtype=np.int64) for a in self.arrays])
        # Row k holds bytes k .. k+width-1, so row offsets[i] is image i. Only ever read.
        self._rows = torch.from_numpy(base).as_strided((len(base) - width + 1, width), (1, 1))

    def __len__(self) -> int:
        return int(self.starts[-1])


def gather(images: np.ndarray | Pieces, local: np.ndarray, out: np.ndarray) -> None:
    """out[:] = images[local] with one copy: a slice copy for a run of consecutive samples,
    else torch's index_select when torch is present (numpy would copy twice). `local` is
    sorted (see `assign`), so with `Pieces` each piece's samples are one run of `out`."""
    if not len(local):
        return
    consecutive = int(local[-1]) - int(local[0]) == len(local) - 1
    torch = None if consecutive else torch_or_none()
    if torch is not None:
        _one_thread(torch)
    if isinstance(images, Pieces):
        if torch is not None and images.offsets is not None:
            torch.index_select(images._rows, 0, torch.from_numpy(images.offsets[local]),
                               out=torch.from_numpy(out).view(len(local), -1))
            return
        cuts = np.searchsorted(local, images.starts).tolist()
        for piece, (begin, end) in enumerate(itertools.pairwise(cuts)):
            if end > begin:
                gather(images.arrays[piece], local[begin:end] - images.starts[piece],
                       out[begin:end])
        return
    if consecutive:
        np.copyto(out, images[int(local[0]):int(local[-1]) + 1])
    elif torch is None:
        out[...] = images[local]
    else:
        torch.index_select(torch.from_numpy(images), 0, torch.from_numpy(local),
                           out=torch.from_numpy(out))


def _one_thread(torch: Any) -> None:
    """Make torch's ops in this thread single-threaded, when it is one of shardkit's (the
    thread a caller iterates in is left alone): shardkit splits a batch's copies itself
    (`batches.Copier`), and torch's own threads would only add their spinning CPU time.

    torch.set_num_threads sets this thread's OpenMP count, but also the count that threads
    which have not run a torch op yet will take, and MKL's: that value is put back at once,
    from a short-lived thread, so the training thread's ops keep their threads.
    """
    if getattr(_THREAD, "single", False):
        return
    if not threading.current_thread().name.startswith("shardkit-"):
        _THREAD.single = True  # a caller's own thread (prefetch=0): its torch settings are its own
        return
    default = torch.get_num_threads()  # this thread's first op: the count new threads take
    torch.set_num_threads(1)
    restore = threading.Thread(target=torch.set_num_threads, args=(default,),
                               name="shardkit-threads")
    restore.start()
    restore.join()
    _THREAD.single = True


_TORCH: list[Any] = []


def torch_or_none() -> Any:
    """torch when it is installed (its gather copies once), else None."""
    if not _TORCH:
        try:
            import torch as module
        except ImportError:
            module = None  # type: ignore[assignment]
        _TORCH.append(module)
    return _TORCH[0]


