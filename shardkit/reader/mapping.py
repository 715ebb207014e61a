"""Shards mapped into memory copy-on-write, and batches lent out of them without a copy.

A raw shard is mapped privately, readable and writable (`map_shard`): its pages are the
page cache's until something writes one, which then becomes this process's own copy; the
file never changes. A batch of consecutive samples of one shard can therefore be handed out
as a view of the mapping (`Lender.lend`) instead of a copy: its owner may change it as it
would a copy, and the change reaches nothing else a pass reads (a pass holds every sample
once). A mapping serves the next pass only when it is as the file is (`Lender.fresh`): no
batch lent out of it is still alive (its owner could still write into it), and no page of
it was written (``/proc/self/pagemap`` tells the pages that became private copies). Else
the shard is opened afresh, so that a change never comes back in a later pass.

Lending spares the copy into a batch array, which on a machine whose memory is slow is half
of what reading a raw shard in stored order costs (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import weakref
from typing import Any

import numpy as np

from shardkit.format.files import map_read_only

__all__ = ["Lender", "address", "map_shard", "written"]

# madvise(2)'s MADV_POPULATE_READ (Linux 5.14): fill the page tables from the page cache
# without writing (MAP_POPULATE on a private writable mapping copies every page).
_POPULATE_READ = 22
_LIBC: list[Any] = []


def map_shard(path: str) -> mmap.mmap:
    """Map a shard copy-on-write (see the module docstring). On Linux its page tables are
    filled at once: this runs in the prefetch thread, so the copies in the hot loop take no
    page faults, and a shard not yet in the page cache is read ahead in one go.

    A writable private mapping counts against the process's commit charge (and
    RLIMIT_DATA) as if it were memory: where the system refuses it, the shard is mapped
    shared and read-only (MAP_POPULATE), and nothing is lent out of it."""
    with open(path, "rb") as handle:
        if not hasattr(mmap, "MAP_PRIVATE"):
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            mapped = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            if exc.errno != errno.ENOMEM:
                raise
            return map_read_only(handle)
    if len(mapped) and not _populate(mapped):
        mapped.madvise(mmap.MADV_WILLNEED)
    return mapped


def _populate(mapped: mmap.mmap) -> bool:
    """Fill `mapped`'s page tables (ctypes lets the GIL go meanwhile); False where the
    system cannot."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            libc = None
        _LIBC.append(libc)
    libc = _LIBC[0]
    if libc is None:
        return False
    flat = np.frombuffer(mapped, dtype=np.uint8)
    if libc.madvise(address(flat), len(flat), _POPULATE_READ) == 0:
        return True
    _LIBC[0] = None  # an older kernel: not again
    return False


def written(buffer: np.ndarray) -> bool:
    """Whether a page of `buffer` (a mapping made by `map_shard`) was written since it was
    mapped: a page that is present but no longer the file's, or swapped out (only a
    private copy can be). True where the system cannot tell (no pagemap)."""
    if not len(buffer):
        return False
    page = mmap.PAGESIZE
    first, last = address(buffer) // page, (address(buffer) + len(buffer) - 1) // page
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return True
    try:
        entries = np.frombuffer(os.pread(fd, (last - first + 1) * 8, first * 8), dtype=np.uint64)
    except OSError:
        return True
    finally:
        os.close(fd)
    if len(entries) != last - first + 1:
        return True
    present, swapped, mapped_file = (entries >> np.uint64(bit) & np.uint64(1) for bit in (63, 62, 61))
    return bool((swapped | (present & ~mapped_file & np.uint64(1))).any())


class Lender:
    """The batches lent out of one shard's mapping (from `map_shard`)."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self.mapping = mapping
        self.buffer = np.frombuffer(mapping, dtype=np.uint8)
        self._origin = address(self.buffer)
        self._lent: list[weakref.ref[np.ndarray]] = []

    @classmethod
    def of(cls, mapping: mmap.mmap | None) -> Lender | None:
        """The lender of `mapping`, when there is one and it can be written to (a shared
        read-only fallback of `map_shard` lends nothing)."""
        if mapping is None:
            return None
        lender = cls(mapping)
        return lender if lender.buffer.flags.writeable else None

    def lend(self, view: np.ndarray) -> np.ndarray:
        """The writable twin of `view` (a read-only view into the mapping): the same bytes,
        for a caller to own. Kept track of until `fresh` is asked."""
        twin: np.ndarray = np.ndarray(view.shape, np.uint8, self.mapping,
                                      address(view) - self._origin, view.strides)
        self._lent.append(weakref.ref(twin))
        return twin

    @property
    def lent(self) -> bool:
        """Whether anything was lent since `fresh` was last asked."""
        return bool(self._lent)

    def fresh(self) -> bool:
        """Whether the mapping may serve another pass: nothing lent out of it is alive, and
        none of its pages was written. Forgets what was lent."""
        if not self._lent:
            return True
        alive = any(ref() is not None for ref in self._lent)
        self._lent.clear()
        return not alive and not written(self.buffer)


def address(array: np.ndarray) -> int:
    """Where `array`'s first byte lies in memory."""
    return int(array.__array_interface__["data"][0])
