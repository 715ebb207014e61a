"""The one way the benchmark scripts write their block into docs/performance.md."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_block"]


def write_block(path: Path, begin: str, end: str, block: str) -> None:
    """Replace the text from the marker `begin` to the marker `end` in `path` with `block`
    (which holds both markers); append `block` when the markers are absent, and start the
    file when it does not exist."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Performance\n"
    if begin in text and end in text[text.index(begin):]:
        start = text.index(begin)
        stop = text.index(end, start) + len(end)
        text = text[:start] + block.rstrip("\n") + text[stop:]
    else:
        text = text.rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
