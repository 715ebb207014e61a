"""What a listing says about a file: its name under the listed folder, size and version.

One definition for local folders and fsspec stores alike (`Storage.walk`, `Storage.info`): a
remote input is fingerprinted by it, a remote OUT's finished shards are checked by it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FileInfo", "local_tree", "remote_tree", "version_of"]

#: Keys fsspec implementations state a file's version under: an ETag (S3, GCS, HTTP) first,
#: then a modification time.
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "LastModified", "updated", "mtime", "created")


@dataclass(frozen=True)
class FileInfo:
    """A file under a location: its name relative to it (``cat/001.jpg``), its size, and its
    version as the store states it (an ETag, else a modification time; "" when it gives
    neither), which changes whenever the file is rewritten."""

    name: str
    size: int
    version: str


def version_of(info: Mapping[str, Any]) -> str:
    """The version in an fsspec ``info()`` / ``find(detail=True)`` entry."""
    for key in _VERSION_KEYS:
        if info.get(key) not in (None, ""):
            return str(info[key]).strip('"')
    return ""


def _order(info: FileInfo) -> list[str]:
    # Component-wise: a folder's files come where the folder's name sorts, as a sorted walk
    # of a local tree visits them.
    return info.name.split("/")


def local_tree(root: str) -> list[FileInfo]:
    """Every file under the local folder `root` ([] when it does not exist), in walk order."""
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            found.append(FileInfo(relative, st.st_size, str(st.st_mtime_ns)))
    return sorted(found, key=_order)


def remote_tree(prefix: str, entries: Mapping[str, Mapping[str, Any]]) -> list[FileInfo]:
    """The files of an fsspec ``find(prefix, detail=True)`` answer, named relative to
    `prefix`, in walk order (directory markers left out)."""
    start = prefix.rstrip("/") + "/"
    found = [FileInfo(name[len(start):], int(info.get("size") or 0), version_of(info))
             for name, info in entries.items()
             if name.startswith(start) and not name.endswith("/")
             and info.get("type", "file") == "file"]
    return sorted(found, key=_order)
