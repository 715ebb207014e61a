"""``shardkit verify``: check a dataset against its index.json, one line per problem.

What is checked (docs/format.md is the spec it is checked against):

1. ``index.json`` reads and validates (:meth:`Manifest.read`, which also checks that the
   shard records' samples add up to ``samples``), and names a format, codec and image shape
   this version knows.
2. Every listed shard exists, has the recorded size and (unless quick) sha256; a raw
   fixed-shape tar record's size is ``samples * stride + 1024``.
3. Every sample, one shard at a time. Tar: the safe member walk (no links, no unsafe names),
   members grouped per key as image, ``.cls``, ``.json``; keys increasing through the whole
   dataset; ``.npy`` headers read with ``numpy.lib.format`` (never unpickled) and matching the
   schema; jpeg/png decoding to the schema's shape; labels in range, all of one width, naming
   the class the ``.json`` names; raw fixed-shape samples exactly where the record's
   ``layout`` puts them. Parquet: columns and types, row groups, keys, labels, image sizes.
   The samples found must be the record's ``samples``.
4. Totals: ``samples + failed == inputs``; ``errors.jsonl`` holds one well-formed line per
   failed input; ``class_counts`` equals the labels found (when every shard could be read).
5. No ``shard-*.tar`` / ``shard-*.parquet`` file that index.json does not list.

Quick mode skips the sha256 and the pixel decoding of jpeg/png (their headers are still read).
A shard's walk stops at its first problem: one damage, one line (a size that is off also gets
the sample count the walk found, when it differs).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from shardkit.errors import CorruptShardError, DatasetError, UnsafeContentError
from shardkit.format.files import check_shard
from shardkit.format.location import parse_location
from shardkit.format.manifest import ERRORS_NAME, INDEX_NAME, Manifest, ShardRecord
from shardkit.format.tar import END_OF_ARCHIVE
from shardkit.tools.verify_walk import Problem, Spec, Tally, walk_parquet, walk_tar

__all__ = ["Fetch", "verify_dataset", "verify_folder"]

#: Brings one shard's file into the folder being verified for the time of its check.
Fetch = Callable[[ShardRecord], AbstractContextManager[None]]

_ERROR_KEYS = ("index", "key", "path", "stage", "reason", "detail")


def verify_dataset(path: str | os.PathLike[str], *, quick: bool = False,
                   storage_options: dict[str, Any] | None = None) -> list[str]:
    """Check the dataset folder `path` (or a dataset at a URL, each shard downloaded into a
    temporary folder for its check: `shardkit.tools.verify_remote`) against its index.json.

    Returns one human-readable line per problem, each starting with the file it is about
    (``shard-00002.tar: ...``, ``errors.jsonl: ...``, ``index.json: ...``); an empty list
    means the dataset is sound. A missing or invalid index.json is the only problem reported
    (nothing else can be checked without it; that line gives its full path). Damaged shards
    are findings, never exceptions; only an I/O error outside the dataset's files (e.g. the
    folder being unreadable) raises.
    `quick` skips the sha256 of every shard and the decoding of jpeg/png pixels.
    """
    if not parse_location(path).is_local:
        from shardkit.tools.verify_remote import verify_url

        return verify_url(os.fspath(path), quick=quick, storage_options=storage_options)
    return verify_folder(Path(path), quick=quick)


def verify_folder(folder: Path, *, quick: bool, fetch: Fetch | None = None,
                  names: list[str] | None = None) -> list[str]:
    """`verify_dataset` of a local folder. `fetch(record)`, when given, is entered around
    each shard's check to bring its file into `folder`; `names`: the files the dataset holds
    (default: the folder's)."""
    try:
        manifest = Manifest.read(folder)
        if manifest.kind == "table":  # tabular CSVs: shardkit.reader.table reads their shards
            from shardkit.reader.table import verify_table

            with contextlib.ExitStack() as stack:
                for record in manifest.shards:
                    if fetch is not None:
                        stack.enter_context(fetch(record))
                # No per-sample walk tallies a table's labels: class counts are not compared.
                return [*verify_table(folder, manifest, quick=quick),
                        *_check_totals(folder, manifest, Tally(complete=False), names)]
        spec = Spec.of(manifest)
    except DatasetError as exc:
        return [str(exc)]
    problems: list[str] = []
    tally = Tally()
    for record in manifest.shards:
        with fetch(record) if fetch is not None else contextlib.nullcontext():
            problems += _check_shard(folder, spec, record, tally, quick=quick)
    problems += _check_totals(folder, manifest, tally, names)
    return problems


# --- one shard ---------------------------------------------------------------------------


def _check_shard(folder: Path, spec: Spec, record: ShardRecord, tally: Tally, *,
                 quick: bool) -> list[str]:
    name, path = record.file, folder / record.file
    layout = None
    problems = []
    if spec.format == "tar" and spec.raw_fixed:
        layout, problem = _record_layout(record, labeled=spec.classes is not None)
        problems += [f"{name}: {problem}"] if problem else []
    try:
        check_shard(path, record, verify=not quick)
    except CorruptShardError as exc:
        problem = str(exc).removeprefix(f"{path}: ")
        problems.append(f"{name}: {problem}")
        if not path.is_file() or problem.startswith("unreadable"):  # nothing to walk
            tally.complete = False
            return problems
    try:
        if spec.format == "tar":
            found = walk_tar(path, spec, layout, tally, decode=not quick)
        else:
            found = walk_parquet(path, spec, tally, decode=not quick)
    except Problem as exc:
        tally.complete = False
        return [*problems, f"{name}: {exc}"]
    except (CorruptShardError, UnsafeContentError) as exc:
        tally.complete = False
        return [*problems, f"{name}: {str(exc).removeprefix(f'{path}: ')}"]
    except OSError as exc:
        tally.complete = False
        return [*problems, f"{name}: unreadable: {exc.strerror or exc}"]
    if found != record.samples:
        tally.complete = False
        problems.append(f"{name}: holds {found} samples, index.json says {record.samples}")
    return problems


def _record_layout(record: ShardRecord, *, labeled: bool) -> tuple[dict[str, int] | None, str]:
    """(the record's layout, "") when it is usable, else (None, what is wrong with it)."""
    layout: Any = record.layout
    needed = ["stride", "offset", "meta_offset", *(["label_offset", "label_digits"] if labeled else [])]
    if not (isinstance(layout, dict) and all(type(layout.get(k)) is int for k in needed)):
        return None, f"index.json gives no usable layout ({', '.join(needed)}) for this raw shard"
    if record.bytes != record.samples * layout["stride"] + len(END_OF_ARCHIVE):
        return None, (f"index.json says {record.samples} samples of layout stride {layout['stride']} "
                      f"bytes in {record.bytes} bytes (should be samples * stride + 1024)")
    return layout, ""


# --- totals ------------------------------------------------------------------------------


def _check_totals(folder: Path, manifest: Manifest, tally: Tally, names: list[str] | None) -> list[str]:
    problems = []
    if manifest.samples + manifest.failed != manifest.inputs:
        problems.append(f"{INDEX_NAME}: {manifest.samples} samples + {manifest.failed} failed != "
                        f"{manifest.inputs} inputs")
    problems += _check_errors(folder / ERRORS_NAME, manifest.failed)
    problems += _check_class_counts(manifest, tally)
    listed = {s.file for s in manifest.shards}
    if names is None:
        names = [p.name for p in [*folder.glob("shard-*.tar"), *folder.glob("shard-*.parquet")]]
    unlisted = {n for n in names if n.startswith("shard-") and n.endswith((".tar", ".parquet"))}
    problems += [f"{name}: a shard file index.json does not list" for name in sorted(unlisted - listed)]
    return problems


def _check_class_counts(manifest: Manifest, tally: Tally) -> list[str]:
    counts, classes = manifest.class_counts, manifest.classes
    if counts is None:
        return []
    if classes is None or not isinstance(counts, list) or len(counts) != len(classes):
        return [f"{INDEX_NAME}: class_counts {counts} does not give one count per class"]
    # A shard that could not be walked to its end has been reported already; its labels are
    # unknown, so comparing would only add a second line for the same damage.
    found = [tally.labels.get(i, 0) for i in range(len(classes))]
    if tally.complete and found != counts:
        return [f"{INDEX_NAME}: class_counts {counts}, the shards hold {found}"]
    return []


def _check_errors(path: Path, failed: int) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [f"{ERRORS_NAME}: missing (index.json says {failed} failed)"]
    except (OSError, ValueError) as exc:
        return [f"{ERRORS_NAME}: unreadable: {exc}"]
    problems = []
    for number, line in enumerate(lines, start=1):
        try:
            row: Any = json.loads(line)
        except ValueError:
            problems.append(f"{ERRORS_NAME}: line {number} is not JSON")
            continue
        missing = [k for k in _ERROR_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            problems.append(f"{ERRORS_NAME}: line {number} lacks {', '.join(missing)}")
    if len(lines) != failed:
        problems.append(f"{ERRORS_NAME}: {len(lines)} line{'' if len(lines) == 1 else 's'}, "
                        f"index.json says {failed} failed")
    return problems
