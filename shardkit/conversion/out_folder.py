"""What the commit protocol (`shardkit.conversion.commit`) does to OUT, as operations: the
`OutFolder` interface, and `LocalOut` for a folder on this machine's disk. `RemoteOut`
(`shardkit.conversion.out_remote`) does the same under an object-store prefix.

The names shardkit writes are defined here, once: ``index.json``, ``errors.jsonl``,
``shard-*.tar`` / ``shard-*.parquet``, the journal folder ``.shardkit-journal/`` and the
temporary folder ``.shardkit-tmp/``. Anything else in OUT is someone else's.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Protocol

from shardkit.conversion.report import error_reasons
from shardkit.errors import ConfigError, CorruptShardError, OutputExistsError
from shardkit.format.files import atomic_write_bytes, check_shard, publish
from shardkit.format.manifest import ERRORS_NAME, INDEX_NAME, Manifest, ShardRecord, canonical_json

__all__ = ["JOURNAL_NAME", "TMP_NAME", "LocalOut", "OutFolder", "converted_here", "make_folder",
           "written_by_us"]

TMP_NAME = ".shardkit-tmp"
JOURNAL_NAME = ".shardkit-journal"

#: The descriptors of the OUT folders this process holds flocked (`LocalOut.hold`). Process
#: state, because fork copies descriptors: a child forked during a run (the workers of a
#: fork-started pool passed as executor=) would hold the lock for as long as it lives, and a
#: next run into OUT would be refused. The child closes its copies at once; the parent's
#: own keep the lock.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for descriptor in _HELD:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def written_by_us(name: str) -> bool:
    """True for a top-level name of OUT that shardkit writes."""
    return (
        name in (INDEX_NAME, ERRORS_NAME, TMP_NAME, JOURNAL_NAME)
        or (name.startswith("shard-") and name.endswith((".tar", ".parquet")))
        or name.startswith((f".{INDEX_NAME}.tmp-", f".{ERRORS_NAME}.tmp-"))
    )


def converted_here(path: Path) -> bool:
    """`path`, an entry of a local OUT, is what a conversion wrote: one of a dataset's own
    names (`written_by_us`), or a folder holding only those (a split conversion's part)."""
    if written_by_us(path.name):
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    entries = [e.name for e in path.iterdir()]
    return bool(entries) and all(written_by_us(name) for name in entries)


class OutFolder(Protocol):
    """OUT as the commit protocol uses it (a local folder or an object-store prefix)."""

    def hold(self) -> None:
        """Keep other conversions out of OUT for this run (released by `close`);
        OutputExistsError when one is writing it now."""
        ...

    @property
    def where(self) -> Path | str:
        """OUT as the user named it: a Path for a local folder, the URL of a remote one."""
        ...

    @property
    def remote(self) -> bool:
        """True when OUT is not on this machine: cluster tasks cannot write next to it."""
        ...

    def names(self) -> list[str]:
        """OUT's top-level names ([] when it does not exist); nested names that no shardkit
        folder explains come whole (``a/b``), so that they are never taken for ours."""
        ...

    def foreign(self, names: list[str]) -> list[str]:
        """Those of `names` (from `names`) that no conversion wrote: never cleared, not even
        by --overwrite."""
        ...

    def manifest(self) -> Manifest:
        """OUT's index.json (DatasetError when missing or invalid)."""
        ...

    def journal(self) -> list[dict[str, Any]]:
        """The parsed journal entries (unreadable ones left out)."""
        ...

    def intact(self, record: ShardRecord, entry: dict[str, Any]) -> bool:
        """Whether shard `record.file` is in OUT exactly as its journal `entry` recorded it."""
        ...

    def clear(self, names: list[str]) -> None:
        """Remove `names` (all shardkit's): index.json first, so OUT stops being a dataset."""
        ...

    def clear_tmp(self) -> None:
        """Remove what earlier runs left in the temporary folder."""
        ...

    def scratch(self) -> Path:
        """A new local folder (not created) where this run's tasks write their files."""
        ...

    def publish(self, scratch: Path, entry: dict[str, Any]) -> None:
        """Make the finished file `scratch` the shard ``entry["record"]["file"]``, then journal
        `entry`."""
        ...

    def finish(self, errors: bytes, index: bytes) -> None:
        """errors.jsonl, then index.json, then the journal goes."""
        ...

    def reasons(self) -> dict[str, int]:
        """Failures per reason in OUT's errors.jsonl."""
        ...

    def close(self, scratch: Path) -> None:
        """Remove the run's scratch folder (and anything else temporary of this run)."""
        ...


class LocalOut:
    """OUT on this machine's disk: shards renamed into place after fsync, the journal as files."""

    remote = False

    def __init__(self, out: Path) -> None:
        self.where: Path = out
        self.out = out
        self._lock: int | None = None  # the folder's descriptor, flocked while this run lasts
        self._made = False  # `hold` made the folder: `release` removes it if it stayed empty

    def hold(self) -> None:
        """An exclusive flock on the OUT folder (made now if need be), which goes with the
        process: a second run into OUT, by its --resume or --overwrite, cleared the first
        one's temporary files under it. A filesystem without locks is used without."""
        if self.out.exists() and not self.out.is_dir():
            return  # `names` says what is wrong with it
        self._made = not self.out.exists()
        make_folder(self.out, "OUT")
        try:
            import fcntl
        except ImportError:  # no flock here (Windows): OUT is used without a lock
            return
        try:
            descriptor = os.open(self.out, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise OutputExistsError(f"{self.out}: another conversion is writing into it now; "
                                    "wait for it to end (then rerun: it finds OUT up to date, or "
                                    "resumes it with --resume)") from None
        except OSError:
            os.close(descriptor)
            return
        self._lock = descriptor
        _HELD.add(descriptor)

    def names(self) -> list[str]:
        if self.out.exists() and not self.out.is_dir():
            raise OutputExistsError(f"{self.out}: exists and is not a folder")
        return sorted(e.name for e in self.out.iterdir()) if self.out.exists() else []

    def foreign(self, names: list[str]) -> list[str]:
        return [n for n in names if not converted_here(self.out / n)]

    def manifest(self) -> Manifest:
        return Manifest.read(self.out)

    def journal(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted((self.out / JOURNAL_NAME).glob("*.json")):
            try:
                found.append(json.loads(path.read_bytes()))
            except (OSError, ValueError):
                continue  # an unreadable entry is not reused
        return found

    def intact(self, record: ShardRecord, entry: dict[str, Any]) -> bool:
        try:
            check_shard(self.out / record.file, record, verify=True)
        except CorruptShardError:
            return False
        return True

    def clear(self, names: list[str]) -> None:
        try:
            for name in sorted(names, key=lambda n: n != INDEX_NAME):
                entry = self.out / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        except OSError as exc:  # a read-only filesystem, no permission
            raise ConfigError(f"{exc.filename or self.out}: OUT cannot be cleared: "
                              f"{exc.strerror or exc}") from None
        make_folder(self.out, "OUT")

    def clear_tmp(self) -> None:
        shutil.rmtree(self.out / TMP_NAME, ignore_errors=True)

    def scratch(self) -> Path:
        # A folder of this run's own: a task of an earlier run still running on a cluster
        # (Ctrl-C cannot stop a running Dask task) never writes where this run reads.
        return self.out.absolute() / TMP_NAME / secrets.token_hex(4)

    def publish(self, scratch: Path, entry: dict[str, Any]) -> None:
        publish(scratch, self.out / entry["record"]["file"])
        write_journal(self.out, entry)

    def finish(self, errors: bytes, index: bytes) -> None:
        atomic_write_bytes(self.out / ERRORS_NAME, errors)
        atomic_write_bytes(self.out / INDEX_NAME, index)
        shutil.rmtree(self.out / JOURNAL_NAME, ignore_errors=True)

    def reasons(self) -> dict[str, int]:
        return error_reasons(self.out / ERRORS_NAME)

    def close(self, scratch: Path) -> None:
        """Renamed first: a cancelled task still running on a cluster may create files in it
        by name while rmtree works, and after the rename none can. Then OUT is let go."""
        try:
            if not scratch.exists():
                return
            gone = scratch.with_name(f"{scratch.name}.gone")
            try:
                scratch.rename(gone)
            except OSError:
                gone = scratch
            shutil.rmtree(gone, ignore_errors=True)
            shutil.rmtree(scratch.parent, ignore_errors=True)
        finally:
            self.release()

    def release(self) -> None:
        """Let go of OUT (`hold`); a folder `hold` made that is still empty (the run was
        refused before writing anything) is removed: a refusal leaves nothing behind."""
        if self._lock is not None:
            _HELD.discard(self._lock)
            os.close(self._lock)  # the flock goes with it
            self._lock = None
        if self._made:
            self._made = False
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                self.out.rmdir()


def make_folder(path: Path, what: str) -> None:
    """`path` as a folder, its parents too; ConfigError naming it when it cannot be one (a
    file in the way, no permission, a filesystem that takes no folders)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{path}: {what} cannot be made a folder: {exc.strerror or exc}") from None


def write_journal(out: Path, entry: dict[str, Any]) -> None:
    """Atomically write the journal entry `entry` into the local OUT `out`."""
    folder = out / JOURNAL_NAME
    folder.mkdir(exist_ok=True)
    atomic_write_bytes(folder / f"{entry['record']['file']}.json", canonical_json(entry))
