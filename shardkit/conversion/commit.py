"""The commit protocol, for image and tabular conversions alike: what a run may do with
what OUT holds, the journal of finished shards, publication, and index.json last.

=====================================  ====================================================
OUT holds                              the run
=====================================  ====================================================
nothing (or does not exist)            converts everything
a finished dataset, same fingerprint   does nothing (Make-friendly rerun), reports it
a finished dataset, other fingerprint  refuses (inputs or options changed) unless overwrite
an interrupted run, same fingerprint   refuses unless resume (then reuses finished shards)
                                       or overwrite
an interrupted run, other fingerprint  refuses unless overwrite
files shardkit did not write           refuses, even with overwrite
=====================================  ====================================================

A shard is written under a scratch name in the run's own folder ``OUT/.shardkit-tmp/<id>/``
and fsynced; `Commit.publish` renames it into place, fsyncs OUT and writes its journal entry
``OUT/.shardkit-journal/<shard>.json`` (fingerprint, record, failed inputs, label counts),
atomically. `Commit.complete` writes ``errors.jsonl``, then ``index.json``, then removes the
journal. A run killed at any moment (even ``kill -9``) leaves complete shards with entries,
at most one complete shard without an entry (redone on resume), and temporary files that the
next run deletes; without index.json, OUT is not a dataset.

OUT may be an object-store prefix (``s3://bucket/prefix``): the same protocol, with uploads for
renames (`shardkit.conversion.out_remote`); the table above holds as it stands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from shardkit.conversion.out_folder import (
    JOURNAL_NAME,
    TMP_NAME,
    LocalOut,
    OutFolder,
    make_folder,
    write_journal,
    written_by_us,
)
from shardkit.conversion.report import ConvertSummary, FailureRecord, error_report
from shardkit.errors import OutputExistsError
from shardkit.format.manifest import ERRORS_NAME, INDEX_NAME, Manifest, ShardRecord
from shardkit.format.storage import Storage

__all__ = ["JOURNAL_NAME", "TMP_NAME", "Commit", "Entry", "Out", "State", "out_child", "out_where",
           "write_entry"]


#: OUT: a local folder (as the user spelled it), or a storage (`open_storage(..., writable=True)`).
Out = Path | Storage


def out_child(out: Out, name: str) -> Out:
    """The folder `name` inside OUT (a split's part)."""
    return out / name if isinstance(out, Path) else out.within(name)


def out_where(out: Out) -> Path | str:
    """OUT for messages and summaries: the local path, or the URL."""
    return out if isinstance(out, Path) else out.url if not out.location.is_local else Path(out.location.path)


class State(Enum):
    FRESH = "fresh"
    RESUME = "resume"
    DONE = "done"


@dataclass(frozen=True, kw_only=True)
class Entry:
    """A finished shard: enough to rebuild index.json and errors.jsonl without redoing it."""

    shard: int
    record: ShardRecord
    failures: tuple[FailureRecord, ...]
    label_counts: tuple[int, ...]


class Commit:
    """One run's dealings with `out` (a local folder, or a `Storage`: a local one or an
    object-store prefix; see the module docstring). Use as a context manager: leaving it,
    however, removes the run's temporary files."""

    def __init__(self, out: Out, fingerprint: str, *, overwrite: bool, resume: bool) -> None:
        self.target: OutFolder
        if isinstance(out, Path) or out.location.is_local:
            self.target = LocalOut(out if isinstance(out, Path) else Path(out.location.path))
        else:
            from shardkit.conversion.out_remote import RemoteOut

            self.target = RemoteOut(out)
        self.out, self.fingerprint = self.target.where, fingerprint
        #: Where this run's tasks write their files (on this machine).
        self.tmp = self.target.scratch()
        self.target.hold()
        try:
            self.state = _prepare(self.target, fingerprint, overwrite=overwrite, resume=resume)
            if self.state is not State.DONE:
                make_folder(self.tmp, "the run's temporary folder")
        except BaseException:
            self.close()
            raise

    @property
    def remote(self) -> bool:
        """True when OUT is not on this machine's filesystem (an object store)."""
        return self.target.remote

    def __enter__(self) -> Commit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finished(self, name_of: Callable[[int], str], count: int | None = None) -> dict[int, Entry]:
        """Journal entries of this conversion (same fingerprint) of shards below `count` (if
        given) whose shard, named ``name_of(shard)``, is in OUT with exactly the recorded size
        and sha256 (a remote OUT: size and version). Anything else is converted again."""
        entries: dict[int, Entry] = {}
        for data in self.target.journal():
            try:
                entry = _parse(data)
                if data["fingerprint"] != self.fingerprint or entry.record.file != name_of(entry.shard) \
                        or (count is not None and not 0 <= entry.shard < count):
                    continue
                if not self.target.intact(entry.record, data):
                    continue
            except (OSError, ValueError, KeyError, TypeError):  # an unusable entry is not reused
                continue
            entries[entry.shard] = entry
        return entries

    def publish(self, scratch: Path, entry: Entry) -> None:
        """Make the fsynced `scratch` file the shard's final file and journal it (a remote
        OUT: queue its upload; a failed upload is raised by a later call or `complete`)."""
        self.target.publish(scratch, _entry_data(self.fingerprint, entry))

    def publish_uploaded(self, entry: Entry) -> None:
        """Publish the shard a cluster task uploaded to `task_store` (a remote OUT only)."""
        from shardkit.conversion.out_remote import RemoteOut

        assert isinstance(self.target, RemoteOut)
        self.target.publish_uploaded(_entry_data(self.fingerprint, entry))

    @property
    def task_store(self) -> Storage:
        """Where a cluster's tasks upload this run's shards (a remote OUT only)."""
        from shardkit.conversion.out_remote import RemoteOut

        assert isinstance(self.target, RemoteOut)
        return self.target.task_store

    def complete(self, manifest: Manifest, failures: Sequence[FailureRecord], *,
                 summary: dict[str, Any]) -> ConvertSummary:
        """errors.jsonl, then index.json, then the journal goes: the dataset exists. Returns the
        run's summary (`summary`: its other fields)."""
        self.target.finish(error_report(failures), manifest.to_bytes())
        reasons: dict[str, int] = {}
        for failure in failures:
            reasons[failure.reason] = reasons.get(failure.reason, 0) + 1
        return self._summary(manifest, reasons=reasons, **summary)

    def up_to_date(self, **summary: Any) -> ConvertSummary:
        """The summary of the dataset already complete in OUT (a rerun with nothing to do)."""
        manifest = self.target.manifest()
        return self._summary(manifest, reasons=self.target.reasons(),
                             reused_shards=len(manifest.shards), up_to_date=True, **summary)

    def _summary(self, manifest: Manifest, **fields: Any) -> ConvertSummary:
        out = self.out
        errors = out / ERRORS_NAME if isinstance(out, Path) else f"{out}/{ERRORS_NAME}"
        return ConvertSummary(out=out, inputs=manifest.inputs, samples=manifest.samples,
                              failed=manifest.failed, shards=len(manifest.shards),
                              bytes=manifest.bytes, errors_path=errors, **fields)

    def close(self) -> None:
        """Remove the run's temporary folder (and OUT/.shardkit-tmp around it); a remote OUT
        first stops its uploads."""
        self.target.close(self.tmp)


def _entry_data(fingerprint: str, entry: Entry) -> dict[str, Any]:
    return {"fingerprint": fingerprint, "shard": entry.shard, "record": entry.record.to_json(),
            "failures": [f.to_json() for f in entry.failures],
            "label_counts": list(entry.label_counts)}


def write_entry(out: Path, fingerprint: str, entry: Entry) -> None:
    """Atomically journal `entry` as a shard this conversion has durably finished (local OUT)."""
    write_journal(out, _entry_data(fingerprint, entry))


def _parse(data: dict[str, Any]) -> Entry:
    raw = data["record"]
    record = ShardRecord(file=str(raw["file"]), samples=int(raw["samples"]), bytes=int(raw["bytes"]),
                         sha256=str(raw["sha256"]), layout=raw.get("layout"))
    failures = tuple(
        FailureRecord(source=f["path"], stage=f["stage"], reason=f["reason"], detail=f["detail"],
                      index=f["index"], key=f["key"], row=f.get("row"))
        for f in data["failures"]
    )
    return Entry(shard=int(data["shard"]), record=record, failures=failures,
                 label_counts=tuple(int(c) for c in data["label_counts"]))


def _prepare(out: OutFolder, fingerprint: str, *, overwrite: bool, resume: bool) -> State:
    """Decide what to do with `out` (see the module docstring) and clear it when starting over."""
    names = out.names()
    others = out.foreign(names)
    if others:
        raise OutputExistsError(
            f"{out.where}: not empty: it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
            ", which shardkit did not write; choose an empty or new folder"
        )
    if names and not overwrite:
        state = _existing(out, names, fingerprint, resume)
        if state is not None:
            return state
    out.clear(names)
    return State.FRESH


def _existing(out: OutFolder, names: list[str], fingerprint: str, resume: bool) -> State | None:
    if INDEX_NAME in names:
        try:
            same = out.manifest().fingerprint == fingerprint
        except Exception:
            same = False
        if same:
            return State.DONE
        raise OutputExistsError(
            f"{out.where}: holds a conversion of other inputs or options (its fingerprint differs); "
            "pass --overwrite to replace it"
        )
    parts = [n for n in names if not written_by_us(n)]  # an earlier split's part folders
    if parts:
        raise OutputExistsError(
            f"{out.where}: holds a split conversion ({', '.join(p + '/' for p in parts[:3])}"
            f"{' ...' if len(parts) > 3 else ''}); pass --overwrite to replace it"
        )
    if {str(e.get("fingerprint")) for e in out.journal()} - {fingerprint}:
        raise OutputExistsError(
            f"{out.where}: holds an interrupted conversion of other inputs or options; pass "
            "--overwrite to start over"
        )
    if not resume:
        raise OutputExistsError(
            f"{out.where}: holds an interrupted conversion; pass --resume to finish it (finished "
            "shards are kept) or --overwrite to start over"
        )
    out.clear_tmp()
    return State.RESUME
