"""``shardkit verify URL``: the checks of `shardkit.tools.verify` on a dataset in object
storage or behind HTTP, each shard downloaded into a temporary folder for the time of its
check (one at a time, so the disk holds one shard; a table's shards all at once), never into
the reader's cache: what is checked is what the store serves."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardkit.errors import DatasetError
from shardkit.format.manifest import ERRORS_NAME, INDEX_NAME, ShardRecord
from shardkit.format.storage import Storage, open_storage, read_index
from shardkit.tools.verify import verify_folder

__all__ = ["verify_url"]


def verify_url(url: str, *, quick: bool = False, storage_options: dict[str, Any] | None = None) -> list[str]:
    """One line per problem of the dataset at `url` (see `verify_dataset`). A transport
    failure past the retry budget raises RemoteError: it says nothing about the dataset."""
    storage = open_storage(url, storage_options=storage_options)
    try:
        _, index = read_index(storage)
    except DatasetError as exc:
        return [str(exc)]
    names = storage.list_names()
    with tempfile.TemporaryDirectory(prefix="shardkit-verify-") as scratch:
        folder = Path(scratch)
        (folder / INDEX_NAME).write_bytes(index)
        with contextlib.suppress(FileNotFoundError):
            (folder / ERRORS_NAME).write_bytes(storage.read_bytes(ERRORS_NAME))

        @contextlib.contextmanager
        def fetch(record: ShardRecord) -> Iterator[None]:
            path = folder / record.file
            try:
                if record.file in names:
                    _download(storage, record, path)
                yield
            finally:
                path.unlink(missing_ok=True)

        return verify_folder(folder, quick=quick, fetch=fetch, names=names)


def _download(storage: Storage, record: ShardRecord, path: Path) -> None:
    """The object as the store serves it, whatever its size (one byte past the record's, so
    that a longer object is seen as longer)."""
    size = storage.size(record.file)
    with open(path, "wb") as handle:
        for chunk in storage.iter_chunks(record.file, record.bytes + 1 if size is None else size):
            handle.write(chunk)
