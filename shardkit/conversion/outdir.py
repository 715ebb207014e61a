"""What a conversion finds in OUT, and what it may do there.

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
"""

from __future__ import annotations

import shutil
from enum import Enum
from pathlib import Path

from shardkit.conversion import journal
from shardkit.errors import OutputExistsError
from shardkit.format.manifest import ERRORS_NAME, INDEX_NAME, Manifest

__all__ = ["TMP_NAME", "State", "prepare"]

TMP_NAME = ".shardkit-tmp"


class State(Enum):
    FRESH = "fresh"
    RESUME = "resume"
    DONE = "done"


def prepare(out: Path, fingerprint: str, *, overwrite: bool, resume: bool) -> State:
    """Decide what to do with `out` (see the table above) and clear it when starting over."""
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
    found = journal.fingerprints(out)
    if found - {fingerprint}:
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
        name in (INDEX_NAME, ERRORS_NAME, TMP_NAME, journal.JOURNAL_NAME)
        or (name.startswith("shard-") and name.endswith((".tar", ".parquet")))
        or name.startswith((f".{INDEX_NAME}.tmp-", f".{ERRORS_NAME}.tmp-"))
    )
