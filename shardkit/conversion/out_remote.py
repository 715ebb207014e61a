"""OUT under an object-store prefix (``s3://bucket/prefix``): the commit protocol's operations
(`shardkit.conversion.out_folder.OutFolder`) over the storage layer.

Shards are assembled in a local scratch folder, as for a local OUT, and each is uploaded as it
commits (a single PUT, or a multipart upload for a large one; either becomes visible whole or
not at all), a few at a time in background threads, each followed by its journal entry
``OUT/.shardkit-journal/<shard>.json`` (with the object's version, its ETag). A cluster's
tasks upload their shard under the run's own ``OUT/.shardkit-tmp/<id>/`` instead, and the
client copies it onto its final name on the server. `finish` waits for every upload, then
writes errors.jsonl, then index.json. An upload that fails past the retry budget fails the run
(RemoteError, raised by the next `publish` or by `finish`); nothing is swallowed and, since
index.json is never written, no dataset appears.

A finished shard is checked on resume by its size and version as the listing gives them (no
download): an object is only ever replaced whole, and its version changes when it is. A run
killed at any moment leaves complete objects only; up to `UPLOADS` of its shards may be up
without their journal entry (they are redone on resume).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from shardkit.conversion.out_folder import JOURNAL_NAME, TMP_NAME, written_by_us
from shardkit.conversion.report import reasons_of
from shardkit.errors import RemoteError
from shardkit.format.file_info import FileInfo
from shardkit.format.manifest import ERRORS_NAME, INDEX_NAME, Manifest, ShardRecord, canonical_json
from shardkit.format.storage import Storage, read_index

__all__ = ["UPLOADS", "RemoteOut"]

#: Uploads (and server-side copies) in flight at once: a single stream rarely fills the
#: bandwidth to an object store.
UPLOADS = 4
#: Shards published but not yet uploaded before `publish` waits: bounds the scratch disk.
_QUEUED = 2 * UPLOADS


class RemoteOut:
    """OUT under the prefix of `storage` (see the module docstring)."""

    remote = True

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.where: str = storage.url
        self.run_id = secrets.token_hex(4)
        self.journal_store = storage.within(JOURNAL_NAME)
        self._task_store = storage.within(TMP_NAME).within(self.run_id)
        self.tasks_uploaded = False
        self._tree: dict[str, FileInfo] | None = None
        self._pool = cf.ThreadPoolExecutor(UPLOADS, thread_name_prefix="shardkit-upload")
        self._pending: set[cf.Future[None]] = set()

    @property
    def task_store(self) -> Storage:
        """Where a cluster's tasks upload this run's shards before they are published (asked
        for once tasks may upload there: `close` then clears it)."""
        self.tasks_uploaded = True
        return self._task_store

    def tree(self) -> dict[str, FileInfo]:
        """Every object under OUT by its relative name, listed once per run."""
        if self._tree is None:
            try:
                files = self.storage.walk()
            except FileNotFoundError:
                raise RemoteError(f"{self.where}: the bucket does not exist (or these credentials "
                                  "cannot see it); create it first") from None
            self._tree = {f.name: f for f in files}
        return self._tree

    def names(self) -> list[str]:
        names = set()
        for name in self.tree():
            top = name.split("/", 1)[0]
            names.add(top if "/" not in name or top in (JOURNAL_NAME, TMP_NAME) else name)
        return sorted(names)

    def manifest(self) -> Manifest:
        return read_index(self.storage)[0]

    def journal(self) -> list[dict[str, Any]]:
        names = sorted(n.split("/", 1)[1] for n in self.tree()
                       if n.startswith(f"{JOURNAL_NAME}/") and n.endswith(".json") and n.count("/") == 1)

        def read(name: str) -> dict[str, Any] | None:
            try:
                data = json.loads(self.journal_store.read_bytes(name))
            except (FileNotFoundError, ValueError):
                return None  # an unreadable entry is not reused
            return data if isinstance(data, dict) else None

        return [e for e in self._pool.map(read, names) if e is not None]

    def intact(self, record: ShardRecord, entry: dict[str, Any]) -> bool:
        info = self.tree().get(record.file)
        version = entry.get("version") or ""
        return info is not None and info.size == record.bytes and \
            (not version or not info.version or info.version == version)

    def clear(self, names: list[str]) -> None:
        tree = self.tree()
        if INDEX_NAME in tree:  # first: from then on the prefix is no longer a dataset
            self.storage.delete([INDEX_NAME])
        self._delete_all([n for n in tree if n != INDEX_NAME])
        self._tree = {}

    def clear_tmp(self) -> None:
        self._delete_all([n for n in self.tree() if n.startswith(f"{TMP_NAME}/")])

    def _delete_all(self, names: Iterable[str]) -> None:
        """Delete objects by relative name, several requests at once."""
        def delete(name: str) -> None:
            folder, _, base = name.rpartition("/")
            (self.storage.within(folder) if folder else self.storage).delete([base])

        list(self._pool.map(delete, names))

    def scratch(self) -> Path:
        return Path(tempfile.gettempdir()) / f"shardkit-{self.run_id}"

    def publish(self, scratch: Path, entry: dict[str, Any]) -> None:
        name = entry["record"]["file"]

        def upload() -> None:
            self.storage.upload(scratch, name)
            scratch.unlink(missing_ok=True)  # its space is freed as soon as it is uploaded

        self._submit(upload, entry)

    def publish_uploaded(self, entry: dict[str, Any]) -> None:
        """Publish the shard a cluster task uploaded under `task_store` (same name)."""
        name = entry["record"]["file"]

        def adopt() -> None:
            self._task_store.copy_to(name, self.storage, name)
            self._task_store.delete([name])

        self._submit(adopt, entry)

    def _submit(self, transfer: Callable[[], None], entry: dict[str, Any]) -> None:
        self._raise_failures(block=len(self._pending) >= _QUEUED)
        name = entry["record"]["file"]

        def run() -> None:
            try:
                transfer()
                info = self.storage.info(name)
            except FileNotFoundError as exc:  # the bucket went away mid-run
                raise RemoteError(f"uploading {self.storage.url_of(name)} failed: {exc}") from None
            version = info.version if info is not None else ""
            self.journal_store.write_bytes(f"{name}.json", canonical_json({**entry, "version": version}))

        self._pending.add(self._pool.submit(run))

    def _raise_failures(self, *, block: bool, every: bool = False) -> None:
        """Collect finished uploads (waiting for one when `block`, for all when `every`); the
        first that failed is raised."""
        if not self._pending:
            return
        how = cf.ALL_COMPLETED if every else cf.FIRST_COMPLETED
        done, self._pending = cf.wait(self._pending, timeout=None if block or every else 0,
                                      return_when=how)
        for future in done:
            future.result()

    def finish(self, errors: bytes, index: bytes) -> None:
        self._raise_failures(block=True, every=True)
        self.storage.write_bytes(ERRORS_NAME, errors)
        self.storage.write_bytes(INDEX_NAME, index)
        with contextlib.suppress(RemoteError):  # leftover entries are harmless once index.json is up
            self._delete_all(f"{JOURNAL_NAME}/{n}" for n in self.journal_store.list_names())

    def reasons(self) -> dict[str, int]:
        try:
            return reasons_of(self.storage.read_bytes(ERRORS_NAME))
        except FileNotFoundError:
            return {}

    def foreign(self, names: list[str]) -> list[str]:
        return [n for n in names if not written_by_us(n)]

    def hold(self) -> None:
        """Nothing: an object store offers no lock, so two runs into one remote OUT at once
        are not told apart (a local OUT refuses the second)."""

    def close(self, scratch: Path) -> None:
        """Stop the uploads (those not started are cancelled; those running end within the
        retry policy's bounds), remove the scratch folder and this run's task uploads."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        shutil.rmtree(scratch, ignore_errors=True)
        if self.tasks_uploaded:
            with contextlib.suppress(RemoteError, FileNotFoundError):  # the next run clears them
                self._task_store.delete([f.name for f in self._task_store.walk() if "/" not in f.name])
