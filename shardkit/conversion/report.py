"""Per-input failure records, the errors.jsonl report, and the run summary."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardkit.format.files import atomic_write_bytes

__all__ = ["ConvertSummary", "FailureRecord", "error_reasons", "error_report", "human_bytes",
           "reasons_of", "write_error_report"]


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """One input that is not in the output, and why.

    index/key: the input's position in the plan (None when it failed while listing).
    stage: read, decode, transform, encode or plan. reason: a stable code (docs/format.md).
    """

    source: str
    stage: str
    reason: str
    detail: str
    index: int | None = None
    key: str | None = None
    #: CSV inputs: the row number in the CSV (header = row 1); None for folder inputs.
    row: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"index": self.index, "key": self.key, "path": self.source, "stage": self.stage,
               "reason": self.reason, "detail": self.detail}
        if self.row is not None:
            out["row"] = self.row
        return out


def error_reasons(path: str | os.PathLike[str]) -> dict[str, int]:
    """Failures per reason code in an existing errors.jsonl (a finished run's summary)."""
    with open(path, "rb") as report:
        return reasons_of(report.read())


def reasons_of(report: bytes) -> dict[str, int]:
    """Failures per reason code in the bytes of an errors.jsonl."""
    reasons: dict[str, int] = {}
    for line in report.decode("utf-8").splitlines():
        reason = json.loads(line)["reason"]
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def error_report(failures: Iterable[FailureRecord]) -> bytes:
    """errors.jsonl's bytes: one JSON object per line, listing failures first, then plan order."""
    ordered = sorted(failures, key=lambda f: (f.index is not None, f.index or 0, f.source))
    lines = [json.dumps(f.to_json(), sort_keys=True, ensure_ascii=False) + "\n" for f in ordered]
    return "".join(lines).encode()


def write_error_report(path: str | os.PathLike[str], failures: Iterable[FailureRecord]) -> None:
    """Atomically write `error_report(failures)` to `path`."""
    atomic_write_bytes(path, error_report(failures))


@dataclass(frozen=True, kw_only=True)
class ConvertSummary:
    """What a conversion did. ``inputs == samples + failed`` always holds."""

    #: OUT: a local folder, or the URL of a remote one.
    out: Path | str
    inputs: int
    samples: int
    failed: int
    shards: int
    bytes: int
    seconds: float
    workers: int
    errors_path: Path | str
    reasons: dict[str, int]
    #: CPU time the conversion tasks spent decoding, resizing and encoding, all workers summed.
    task_cpu_seconds: float = 0.0
    #: Shards kept from an earlier, interrupted run of the same conversion (--resume).
    reused_shards: int = 0
    #: True when OUT already held this exact conversion and nothing was done.
    up_to_date: bool = False
    #: What an input is, for the summary line ("images"; "rows" for tabular CSVs).
    unit: str = "images"

    @property
    def images_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0

    def reports(self) -> str:
        """Where the failures are listed: `errors_path` (a split names the report of each
        part that holds some)."""
        return str(self.errors_path)

    def line(self) -> str:
        if self.up_to_date:
            return (f"{self.out} is up to date: {self.samples:,} samples in {self.shards:,} shards "
                    f"({human_bytes(self.bytes)}), {self.failed:,} failed; nothing to do")
        text = (
            f"{self.samples:,} samples in {self.shards:,} shards ({human_bytes(self.bytes)}) "
            f"→ {self.out}; {self.failed:,} failed; {self.seconds:.1f} s, "
            f"{self.images_per_second:,.0f} {self.unit}/s on {self.workers} worker"
            f"{'' if self.workers == 1 else 's'}"
        )
        if self.reused_shards:
            text += f"; {self.reused_shards} shards kept from the interrupted run"
        if self.failed:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
            text += f" ({reasons}; see {self.reports()})"
        return text


def human_bytes(count: float) -> str:
    """1234567 → '1.2 MB' (decimal units, as disks are sold)."""
    if count < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB", "GB"):
        count /= 1000
        if count < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} TB"
