"""Convert SRC into ``OUT/<part>/`` for each part of a split (``ConvertConfig.split``).

SRC is listed once; `shardkit.conversion.split` assigns every input to exactly one part;
each part is then planned and committed as a dataset of its own (own index.json, the same
classes in the same order, its own fingerprint: the config with the split, the part's name
and its inputs). So resume and "up to date" work part by part: a rerun skips the finished
parts and resumes an interrupted one.

Error report: **per part**. A part's ``errors.jsonl`` lists the failures of its own inputs
(an image that does not decode is reported by the part it was drawn into). Inputs rejected
while listing (an image beside the class folders, a CSV row without a label) have no label
to be drawn by and are listed once, in the first part's report. Each part is a complete
dataset (``samples + failed == inputs``) and the parts' inputs add up to SRC's. The error
budget (``--max-errors``) applies to the whole split; when it is exceeded, the message names
the report of every part that holds failures.

A source with no usable input at all (every input rejected while listing, every CSV row bad)
splits as it converts without a split: each part is written, empty, and the first part's
report lists the failures. Otherwise a part that would hold no input is a ConfigError.

OUT holds nothing but the parts' folders; anything else there is refused.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardkit.config import ConvertConfig, RunOptions, SplitOptions
from shardkit.conversion.commit import Out, out_child, out_where
from shardkit.conversion.out_folder import LocalOut, converted_here
from shardkit.conversion.plan import list_inputs, plan_of
from shardkit.conversion.report import ConvertSummary
from shardkit.conversion.run import convert_images, convert_table, local_src, resolve_out, spill_dir
from shardkit.conversion.sources.imagefolder import Listing
from shardkit.conversion.split import KERAS_FORMATS, keras_folder, keras_rows, keras_table, stratified
from shardkit.conversion.tabular import good_rows, plan_table
from shardkit.errors import ConfigError, OutputExistsError, RemoteError
from shardkit.format.manifest import INDEX_NAME, Manifest
from shardkit.format.storage import Storage, read_index

__all__ = ["SplitSummary", "run_split"]


@dataclass(frozen=True, kw_only=True)
class SplitSummary(ConvertSummary):
    """A split conversion: the totals over its parts, and each part's own summary
    (``errors_path`` is the first part's report; `reports` names each that holds failures)."""

    splits: dict[str, ConvertSummary] = field(default_factory=dict)

    def reports(self) -> str:
        holding = [str(s.errors_path) for s in self.splits.values() if s.failed]
        return " and ".join(holding) or str(self.errors_path)

    def line(self) -> str:
        return "\n".join(f"{name}: {summary.line()}" for name, summary in self.splits.items())


def run_split(src: str | os.PathLike[str], out: str | os.PathLike[str] | Out, config: ConvertConfig,
              run: RunOptions, *, executor: cf.Executor | None = None,
              source: Storage | None = None) -> SplitSummary:
    """Convert `src` into OUT/<part>/ per part of ``config.split`` (see the module docstring);
    the caller checks the error budget. `source`: the storage of a remote SRC's inputs.
    Raises what `convert` raises, and ConfigError when a part would hold no inputs."""
    assert config.split is not None
    started = time.perf_counter()
    root = out if isinstance(out, (Path, Storage)) else resolve_out(out, run)
    guard = LocalOut(root) if isinstance(root, Path) else None
    if guard is not None:
        guard.hold()  # for the whole split: a second one into OUT is refused
    try:
        earlier = _check_out(root, config.split.names, overwrite=run.overwrite)
        if config.csv is not None and config.csv.image_col is None:
            if executor is not None:
                raise ConfigError(f"{src}: a tabular CSV converts in this process; executor= "
                                  "and --dask-scheduler apply to image inputs")
            summaries = _split_table(src, root, config, run, earlier)
        else:
            summaries = _split_images(src, root, config, run, executor, source, earlier)
    finally:
        if guard is not None:
            guard.release()
    return _combined(root, summaries, time.perf_counter() - started)


def _split_images(src: str | os.PathLike[str], root: Out, config: ConvertConfig, run: RunOptions,
                  executor: cf.Executor | None, source: Storage | None,
                  earlier: list[str]) -> dict[str, ConvertSummary]:
    split = config.split
    assert split is not None
    listing = list_inputs(local_src(src, source), config, spill_dir=spill_dir(root), run=run,
                          source=source)
    try:
        keras = None
        if _keras_folders(config, split) and source is None \
                and listing.classes is not None:  # Keras lists class folders only
            keras = _keras_listing(Path(local_src(src, source)), listing.classes)
        part = _assign_records(listing, config, split, keras)
        selects = _parts(part, split, len(listing.records))
        _remove(root, earlier)  # now that the split is known to go ahead
        summaries = {}
        for k, name in enumerate(split.names):
            plan = plan_of(listing, config, select=selects[k], failures=None if k == 0 else [],
                           subset=name)
            summaries[name] = convert_images(plan, out_child(root, name), run, executor,
                                             time.perf_counter())
        return summaries
    finally:
        listing.records.close()  # the shared input list (the parts' plans are views of it)


def _assign_records(listing: Listing, config: ConvertConfig, split: SplitOptions,
                    keras: list[list[str]] | None) -> np.ndarray:
    """The part of each input. `keras`: per class, what flow_from_directory lists in its
    folder (`_keras_listing`; None for a remote SRC, whose own inputs stand for it)."""
    keras_folders = _keras_folders(config, split)
    labels, sources, listed = [], [], []
    for record in listing.records:
        labels.append(-1 if record.label is None else record.label)
        # flow_from_dataframe keeps the rows whose file exists and ends like an image it reads
        listed.append(record.size >= 0 and (config.csv is None
                                            or record.path.lower().endswith(KERAS_FORMATS)))
        if keras_folders:
            sources.append(record.source)
    if split.method == "stratified":
        return stratified(np.asarray(labels), [f for _, f in split.parts], config.seed)
    validation = split.parts[1][1]
    if keras_folders:
        return keras_folder(np.asarray(labels), sources, validation, keras)
    return keras_rows(np.asarray(listed, dtype=bool), validation)


def _keras_folders(config: ConvertConfig, split: SplitOptions) -> bool:
    """Keras' cut of an image folder (flow_from_directory's), not of rows."""
    return split.method == "keras" and config.csv is None and config.hf is None


def _keras_listing(src: Path, classes: Sequence[str]) -> list[list[str]]:
    """Per class, the files flow_from_directory lists in ``SRC/<class>``, in its order, as
    paths relative to SRC: ``os.walk`` not following linked folders, the folders sorted, then
    each one's file names sorted, keeping those whose lower-cased name ends with one of
    `KERAS_FORMATS` (hidden files too: Keras' own ``_iter_valid_files``)."""
    listed = []
    for name in classes:
        files: list[str] = []
        for folder, _, names in sorted(os.walk(src / name), key=lambda walked: walked[0]):
            below = os.path.relpath(folder, src).replace(os.sep, "/")
            files += [f"{below}/{f}" for f in sorted(names) if f.lower().endswith(KERAS_FORMATS)]
        listed.append(files)
    return listed


def _parts(part: np.ndarray, split: SplitOptions, total: int) -> list[np.ndarray]:
    """The inputs of each part; ConfigError when one would be empty (before anything is
    written), unless there are no inputs to split at all."""
    selects = [np.flatnonzero(part == k) for k in range(len(split.parts))]
    if total == 0:
        return selects  # nothing usable: every part empty, as the source converts unsplit
    for (name, fraction), select in zip(split.parts, selects, strict=True):
        if not len(select):
            raise ConfigError(f"split part {name!r} ({fraction:g}) would hold none of the "
                              f"{total} inputs; give it a larger share or use more data")
    return selects


def _split_table(src: str | os.PathLike[str], root: Out, config: ConvertConfig,
                 run: RunOptions, earlier: list[str]) -> dict[str, ConvertSummary]:
    split = config.split
    assert split is not None
    plans = [plan_table(src, config, subset=name) for name in split.names]
    if not run.overwrite and all(_done(out_child(root, name), p.fingerprint) for name, p in zip(
            split.names, plans, strict=True)):
        rows = labels = None  # up to date: nothing to draw, every part says so
    else:
        rows, labels = good_rows(plans[0])
    if rows is not None:
        if split.method == "keras":
            part = keras_table(len(rows), split.parts[1][1])
        else:
            strata = labels if labels is not None else np.full(len(rows), -1)
            part = stratified(strata, [f for _, f in split.parts], config.seed)
        selects = _parts(part, split, len(rows))
        plans = [plan_table(src, config, subset=name, rows=rows[selects[k]], report_bad=k == 0)
                 for k, name in enumerate(split.names)]
    _remove(root, earlier)  # now that the split is known to go ahead
    return {name: convert_table(plan, out_child(root, name), run, time.perf_counter())
            for name, plan in zip(split.names, plans, strict=True)}


def _done(out: Out, fingerprint: str) -> bool:
    try:
        if isinstance(out, Storage):
            return read_index(out)[0].fingerprint == fingerprint
        return (out / INDEX_NAME).is_file() and Manifest.read(out).fingerprint == fingerprint
    except Exception:  # any unreadable index.json: not done; the commit says why
        return False


def _check_out(root: Out, names: tuple[str, ...], *, overwrite: bool) -> list[str]:
    """OUT as a split's root: refused when it holds anything but the parts' folders, unless
    `overwrite` is given and that is an earlier conversion's (a dataset's own files, or the
    folders of an earlier split's parts; a local OUT): those names are returned, for
    `_remove` once the split has been planned."""
    if isinstance(root, Storage):
        try:
            files = [f.name for f in root.walk()]
        except FileNotFoundError:
            raise RemoteError(f"{root.url}: the bucket does not exist (or these credentials cannot "
                              "see it); create it first") from None
        # A file beside the parts, or a folder that is not one of them, is not ours.
        folders = {name.split("/", 1)[0] for name in files if "/" in name}
        _refuse_others(root.url, sorted((folders - set(names)) | {n for n in files if "/" not in n}),
                       names)
        return []
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"{root}: exists and is not a folder")
    others = sorted(e.name for e in root.iterdir() if e.name not in names) if root.exists() else []
    earlier = [n for n in others if converted_here(root / n)] if overwrite else []
    _refuse_others(root, [n for n in others if n not in earlier], names)
    root.mkdir(parents=True, exist_ok=True)
    return earlier


def _remove(root: Out, earlier: list[str]) -> None:
    """Remove the earlier conversion's `earlier` names from the local OUT `root` (as a
    plain conversion's --overwrite clears its OUT)."""
    if earlier:
        assert isinstance(root, Path)  # `_check_out` names some for a local OUT only
        LocalOut(root).clear(earlier)


def _refuse_others(root: Path | str, others: list[str], names: tuple[str, ...]) -> None:
    if others:
        raise OutputExistsError(
            f"{root}: holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}; a split "
            f"conversion writes only {', '.join(n + '/' for n in names)} there; choose an empty "
            "or new folder")


def _combined(root: Out, summaries: dict[str, ConvertSummary], seconds: float) -> SplitSummary:
    parts = list(summaries.values())
    reasons: dict[str, int] = {}
    for summary in parts:
        for reason, count in summary.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
    return SplitSummary(
        out=out_where(root), inputs=sum(s.inputs for s in parts), samples=sum(s.samples for s in parts),
        failed=sum(s.failed for s in parts), shards=sum(s.shards for s in parts),
        bytes=sum(s.bytes for s in parts), seconds=seconds, workers=parts[0].workers,
        errors_path=parts[0].errors_path, reasons=reasons,
        task_cpu_seconds=sum(s.task_cpu_seconds for s in parts),
        reused_shards=sum(s.reused_shards for s in parts),
        up_to_date=all(s.up_to_date for s in parts), unit=parts[0].unit, splits=summaries)
