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
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from shardkit.conversion.report import ConvertSummary, FailureRecord, error_reasons, write_error_report
from shardkit.errors import OutputExistsError
from shardkit.format.files import atomic_write_bytes, check_shard, publish
from shardkit.format.manifest import ERRORS_NAME, INDEX_NAME, Manifest, ShardRecord, canonical_json

__all__ = ["JOURNAL_NAME", "TMP_NAME", "Commit", "Entry", "State", "write_entry"]

TMP_NAME = ".shardkit-tmp"
JOURNAL_NAME = ".shardkit-journal"


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
    """One run's dealings with `out` (see the module docstring). Use as a context manager:
    leaving it, however, removes the run's temporary folder."""

    def __init__(self, out: Path, fingerprint: str, *, overwrite: bool, resume: bool) -> None:
        self.out, self.fingerprint = out, fingerprint
        self.state = _prepare(out, fingerprint, overwrite=overwrite, resume=resume)
        # A folder of this run's own: a task of an earlier run still running on a cluster
        # (Ctrl-C cannot stop a running Dask task) never writes where this run reads.
        self.tmp = out.absolute() / TMP_NAME / secrets.token_hex(4)
        if self.state is not State.DONE:
            self.tmp.mkdir(parents=True)

    def __enter__(self) -> Commit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finished(self, name_of: Callable[[int], str], count: int | None = None) -> dict[int, Entry]:
        """Journal entries of this conversion (same fingerprint) of shards below `count` (if
        given) whose shard, named ``name_of(shard)``, is on disk with exactly the recorded size
        and sha256. Anything else is left to be converted again."""
        entries: dict[int, Entry] = {}
        for path in sorted((self.out / JOURNAL_NAME).glob("*.json")):
            try:
                data = json.loads(path.read_bytes())
                entry = _parse(data)
                if data["fingerprint"] != self.fingerprint or entry.record.file != name_of(entry.shard) \
                        or (count is not None and not 0 <= entry.shard < count):
                    continue
                check_shard(self.out / entry.record.file, entry.record, verify=True)
            except (OSError, ValueError, KeyError, TypeError):  # an unusable entry is not reused
                continue
            entries[entry.shard] = entry
        return entries

    def publish(self, scratch: Path, entry: Entry) -> None:
        """Rename the fsynced `scratch` file onto its final name and journal it."""
        publish(scratch, self.out / entry.record.file)
        write_entry(self.out, self.fingerprint, entry)

    def complete(self, manifest: Manifest, failures: Sequence[FailureRecord], *,
                 summary: dict[str, Any]) -> ConvertSummary:
        """errors.jsonl, then index.json, then the journal goes: the dataset exists. Returns the
        run's summary (`summary`: its other fields)."""
        write_error_report(self.out / ERRORS_NAME, failures)
        manifest.write(self.out)
        shutil.rmtree(self.out / JOURNAL_NAME, ignore_errors=True)
        reasons: dict[str, int] = {}
        for failure in failures:
            reasons[failure.reason] = reasons.get(failure.reason, 0) + 1
        return self._summary(manifest, reasons=reasons, **summary)

    def up_to_date(self, **summary: Any) -> ConvertSummary:
        """The summary of the dataset already complete in OUT (a rerun with nothing to do)."""
        manifest = Manifest.read(self.out)
        return self._summary(manifest, reasons=error_reasons(self.out / ERRORS_NAME),
                             reused_shards=len(manifest.shards), up_to_date=True, **summary)

    def _summary(self, manifest: Manifest, **fields: Any) -> ConvertSummary:
        return ConvertSummary(out=self.out, inputs=manifest.inputs, samples=manifest.samples,
                              failed=manifest.failed, shards=len(manifest.shards),
                              bytes=manifest.bytes, errors_path=self.out / ERRORS_NAME, **fields)

    def close(self) -> None:
        """Remove the run's temporary folder and OUT/.shardkit-tmp around it. Renamed first:
        a cancelled task still running on a cluster may create files in it by name while
        rmtree works, and after the rename none can."""
        if not self.tmp.exists():
            return
        gone = self.tmp.with_name(f"{self.tmp.name}.gone")
        try:
            self.tmp.rename(gone)
        except OSError:
            gone = self.tmp
        shutil.rmtree(gone, ignore_errors=True)
        shutil.rmtree(self.tmp.parent, ignore_errors=True)


def write_entry(out: Path, fingerprint: str, entry: Entry) -> None:
    """Atomically journal `entry` as a shard this conversion has durably finished."""
    folder = out / JOURNAL_NAME
    folder.mkdir(exist_ok=True)
    data = {"fingerprint": fingerprint, "shard": entry.shard, "record": entry.record.to_json(),
            "failures": [f.to_json() for f in entry.failures],
            "label_counts": list(entry.label_counts)}
    atomic_write_bytes(folder / f"{entry.record.file}.json", canonical_json(data))


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


def _journal_fingerprints(out: Path) -> set[str]:
    found = set()
    for path in sorted((out / JOURNAL_NAME).glob("*.json")):
        try:
            found.add(str(json.loads(path.read_bytes())["fingerprint"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable entries are simply not reused
    return found


def _prepare(out: Path, fingerprint: str, *, overwrite: bool, resume: bool) -> State:
    """Decide what to do with `out` (see the module docstring) and clear it when starting over."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    entries = sorted(out.iterdir()) if out.exists() else []
    others = [e.name for e in entries if not _written_by_us(e.name)]
    if others:
        raise OutputExistsError(
            f"{out}: not empty: it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
            ", which shardkit did not write; choose an empty or new folder"
        )
    if entries and not overwrite:
        state = _existing(out, fingerprint, resume)
        if state is not None:
            return state
    # index.json goes first: from then on the folder is no longer a dataset.
    for entry in sorted(entries, key=lambda e: e.name != INDEX_NAME):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return State.FRESH


def _existing(out: Path, fingerprint: str, resume: bool) -> State | None:
    if (out / INDEX_NAME).exists():
        try:
            same = Manifest.read(out).fingerprint == fingerprint
        except Exception:
            same = False
        if same:
            return State.DONE
        raise OutputExistsError(
            f"{out}: holds a conversion of other inputs or options (its fingerprint differs); "
            "pass --overwrite to replace it"
        )
    if _journal_fingerprints(out) - {fingerprint}:
        raise OutputExistsError(
            f"{out}: holds an interrupted conversion of other inputs or options; pass "
            "--overwrite to start over"
        )
    if not resume:
        raise OutputExistsError(
            f"{out}: holds an interrupted conversion; pass --resume to finish it (finished "
            "shards are kept) or --overwrite to start over"
        )
    shutil.rmtree(out / TMP_NAME, ignore_errors=True)
    return State.RESUME


def _written_by_us(name: str) -> bool:
    return (
        name in (INDEX_NAME, ERRORS_NAME, TMP_NAME, JOURNAL_NAME)
        or (name.startswith("shard-") and name.endswith((".tar", ".parquet")))
        or name.startswith((f".{INDEX_NAME}.tmp-", f".{ERRORS_NAME}.tmp-"))
    )
