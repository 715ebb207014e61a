"""The commit journal: what a run has durably finished, so a rerun can continue from there.

Right after a shard is published (fsynced and renamed), its entry is written atomically to
``OUT/.shardkit-journal/<shard>.json``: the plan's fingerprint, the shard's record, its failed
inputs and label counts. ``index.json`` is written only when every shard is done, and the
journal is removed after it. A run killed at any moment (even ``kill -9``) leaves complete
shards with entries, at most one complete shard without an entry (redone on resume), and
temporary files that the next run deletes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardkit.conversion.report import FailureRecord
from shardkit.format.files import atomic_write_bytes, hash_file
from shardkit.format.manifest import ShardRecord, canonical_json

__all__ = ["JOURNAL_NAME", "Entry", "load", "remove", "write"]

JOURNAL_NAME = ".shardkit-journal"


@dataclass(frozen=True, kw_only=True)
class Entry:
    """A finished shard: enough to rebuild index.json and errors.jsonl without redoing it."""

    shard: int
    record: ShardRecord
    failures: tuple[FailureRecord, ...]
    label_counts: tuple[int, ...]


def write(out: Path, fingerprint: str, entry: Entry) -> None:
    folder = out / JOURNAL_NAME
    folder.mkdir(exist_ok=True)
    data = {
        "fingerprint": fingerprint,
        "shard": entry.shard,
        "record": entry.record.to_json(),
        "failures": [f.to_json() for f in entry.failures],
        "label_counts": list(entry.label_counts),
    }
    atomic_write_bytes(folder / f"{entry.record.file}.json", canonical_json(data))


def fingerprints(out: Path) -> set[str]:
    """The fingerprints of every entry in OUT's journal (empty when there is none)."""
    found = set()
    for path in sorted((out / JOURNAL_NAME).glob("*.json")):
        try:
            found.add(str(json.loads(path.read_bytes())["fingerprint"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable entries are simply not reused
    return found


def load(out: Path, fingerprint: str, shard_files: list[str]) -> dict[int, Entry]:
    """Entries whose fingerprint matches and whose shard file is on disk with exactly the
    recorded size and sha256. Anything else is left to be converted again."""
    entries: dict[int, Entry] = {}
    for shard, name in enumerate(shard_files):
        path = out / JOURNAL_NAME / f"{name}.json"
        try:
            data = json.loads(path.read_bytes())
            entry = _parse(data, shard)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if data.get("fingerprint") != fingerprint or entry.record.file != name:
            continue
        if _matches(out / name, entry.record):
            entries[shard] = entry
    return entries


def _parse(data: dict[str, Any], shard: int) -> Entry:
    raw = data["record"]
    record = ShardRecord(file=raw["file"], samples=int(raw["samples"]), bytes=int(raw["bytes"]),
                         sha256=str(raw["sha256"]), layout=raw.get("layout"))
    failures = tuple(
        FailureRecord(source=f["path"], stage=f["stage"], reason=f["reason"], detail=f["detail"],
                      index=f["index"], key=f["key"], row=f.get("row"))
        for f in data["failures"]
    )
    if int(data["shard"]) != shard:
        raise ValueError("journal entry for another shard")
    return Entry(shard=shard, record=record, failures=failures,
                 label_counts=tuple(int(c) for c in data["label_counts"]))


def _matches(path: Path, record: ShardRecord) -> bool:
    try:
        if path.stat().st_size != record.bytes:
            return False
        return hash_file(path)[1] == record.sha256
    except OSError:
        return False


def remove(out: Path) -> None:
    shutil.rmtree(out / JOURNAL_NAME, ignore_errors=True)
