"""Conversion tasks: pure functions of (task, config) that run in any executor.

`run_part` decodes a run of inputs and writes them to a part file (or, `PartTask.offset`, into
the shard's own file); `run_shard` joins a shard's parts into its temporary file. Both return
small picklable records, so the same code runs in-process, in a local process pool or on a
Dask cluster. Per-input failures are returned as records, never raised; an exception out of a
task means the task itself failed.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import PIL
import pyarrow as pa

from shardkit.config import ConvertConfig
from shardkit.conversion.images import ImageFailure, encode, load_image, load_image_bytes, pillow_limits
from shardkit.conversion.report import FailureRecord
from shardkit.conversion.sources.records import InputRecord
from shardkit.conversion.writers import EncodedSample
from shardkit.conversion.writers.parquet import ParquetPartWriter, assemble_parquet
from shardkit.conversion.writers.tar import TarPartWriter, assemble_tar
from shardkit.format.samples import arrow_schema, part_schema

if TYPE_CHECKING:
    from shardkit.conversion.sources.remote import Fetched
    from shardkit.format.storage import Storage

__all__ = ["PartResult", "PartTask", "ShardTask", "run_part", "run_shard"]


@dataclass(frozen=True, slots=True)
class PartTask:
    shard: int
    part: int
    first: int
    records: tuple[InputRecord, ...]
    classes: tuple[str, ...] | None
    path: str
    key_width: int
    json_blocks: int
    config: ConvertConfig
    #: CSV metadata columns (name, type): the Parquet columns after the fixed ones.
    meta_types: tuple[tuple[str, str], ...] = ()
    #: A Hugging Face source: the column of the records' data files holding their images.
    image_col: str | None = None
    #: A remote source: the storage the records' inputs (their paths are URLs) are fetched from.
    source: Storage | None = None
    #: -1: write the part file `path`. Otherwise `path` is the shard's temporary file, made by
    #: the scheduler, and the samples are written into it from this byte offset (fixed-layout
    #: raw tar, joined by this machine: see `shardkit.conversion.writers.tar.TarInPlace`).
    #: Such a task runs once, on the machine that made the file: once the joiner has moved a
    #: later part down into its space, running it again would overwrite that part.
    offset: int = -1


@dataclass(frozen=True, slots=True)
class PartResult:
    shard: int
    part: int
    path: str
    samples: int
    failures: tuple[FailureRecord, ...]
    label_counts: tuple[int, ...]
    cpu_seconds: float
    #: The task's `offset` (-1: a part file), and the bytes its samples took.
    offset: int = -1
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class ShardTask:
    shard: int
    parts: tuple[str, ...]
    tmp_path: str
    labeled: bool
    rows_per_group: int
    config: ConvertConfig
    meta_types: tuple[tuple[str, str], ...] = ()
    #: The class names (labelled datasets): Parquet shards name them for Hugging Face.
    classes: tuple[str, ...] | None = None


def run_part(task: PartTask) -> PartResult:
    """Decode, resize and encode `task.records` into the part file `task.path` (or into the
    shard file `task.path` from `task.offset`)."""
    cpu_start = time.process_time()
    in_place = task.offset >= 0
    scratch = task.path if in_place else _scratch(task.path)
    writer = _part_writer(task, scratch)
    failures: list[FailureRecord] = []
    counts = [0] * len(task.classes or ())
    written = 0
    held = _held_images(task)
    fetched = _fetched_inputs(task)
    with pillow_limits():
        try:
            for offset, record in enumerate(task.records):
                key = f"{task.first + offset:0{task.key_width}d}"
                given = held[offset] if held is not None else next(fetched) if fetched is not None else None
                try:
                    sample = _convert_one(record, key, task, given)
                except ImageFailure as failure:
                    if failure.reason == "missing_file" and task.source is None:  # one file, or all of SRC?
                        _require_source_root(record.path, record.source)
                    failures.append(FailureRecord(
                        source=record.source, stage=failure.stage, reason=failure.reason,
                        detail=failure.detail, index=task.first + offset, key=key,
                        row=record.row,
                    ))
                    continue
                writer.add(sample)
                written += 1
                if record.label is not None:
                    counts[record.label] += 1
        finally:
            writer.close()
            if fetched is not None:
                fetched.close()
    nbytes = writer.written if isinstance(writer, TarPartWriter) else 0
    if not in_place:
        os.replace(scratch, task.path)
    return PartResult(shard=task.shard, part=task.part, path=task.path, samples=written,
                      failures=tuple(failures), label_counts=tuple(counts),
                      cpu_seconds=time.process_time() - cpu_start, offset=task.offset,
                      nbytes=nbytes)


def _held_images(task: PartTask) -> list[tuple[bytes | None, str | None] | ImageFailure] | None:
    """A Hugging Face source's images of `task`, read from its data files (else None)."""
    if not task.image_col:
        return None
    from shardkit.conversion.sources.hf import read_images  # only Hugging Face sources need it

    return read_images(task.records, task.image_col)


def _fetched_inputs(task: PartTask) -> Generator[Fetched, None, None] | None:
    """A remote source's inputs of `task`, fetched ahead as the task goes (else None)."""
    if task.source is None:
        return None
    from shardkit.conversion.sources.remote import fetch_inputs  # only remote sources need it

    return fetch_inputs(task.source, task.records)


def _require_source_root(path: str, source: str) -> None:
    """Called by a task when the input `path` is missing: if the SRC it was listed from is
    missing too, this machine cannot see SRC (a cluster worker without the shared filesystem,
    or SRC removed mid-run). Raise then, failing the task, instead of reporting every input
    of the run as missing."""
    root = path[: -len(source)] if source and path.endswith(source) else ""
    if root and not os.path.isdir(root):
        raise FileNotFoundError(
            f"SRC {root.rstrip(os.sep)} is not visible on {socket.gethostname()} (pid {os.getpid()}): "
            f"it was removed or unmounted during the run, or (on a cluster) this worker does not "
            f"mount it: SRC and OUT must be on a filesystem every worker mounts at the same path "
            f"(see docs/scale-out.md)"
        )


def _scratch(path: str) -> str:
    # A task may run twice at once on a cluster (a worker presumed dead still running it):
    # each run writes its own file and renames it into place, so readers see one whole file.
    return f"{path}.{uuid.uuid4().hex}.tmp"


def _part_writer(task: PartTask, path: str) -> TarPartWriter | ParquetPartWriter:
    config = task.config
    if config.format == "tar":
        classes = len(task.classes) if task.classes is not None else None
        return TarPartWriter(path, codec=config.codec, json_blocks=task.json_blocks,
                             classes=classes, offset=task.offset)
    return ParquetPartWriter(path, schema=part_schema(shard_schema(
        config, task.classes is not None, task.meta_types, task.classes)))


def shard_schema(config: ConvertConfig, labeled: bool,
                 meta_types: tuple[tuple[str, str], ...] = (),
                 classes: tuple[str, ...] | None = None) -> pa.Schema:
    """The Arrow schema of a Parquet shard under `config` (plus CSV metadata columns)."""
    return arrow_schema(shape=config.image.fixed_shape if config.codec == "raw" else None,
                        labeled=labeled, meta=meta_types, codec=config.codec, classes=classes,
                        pixels=config.pixels)


def _convert_one(record: InputRecord, key: str, task: PartTask,
                 held: tuple[bytes | None, str | None] | ImageFailure | None) -> EncodedSample:
    config = task.config
    try:
        if isinstance(held, ImageFailure):  # a remote input not fetched, a pixel row no image
            raise held
        if held is None:
            image, orig_size = load_image(record.path, config.image)
        elif held[0] is not None:
            image, orig_size = load_image_bytes(held[0], config.image)
        elif held[1] is not None:
            image, orig_size = load_image(held[1], config.image)
        else:
            raise ImageFailure("read", "missing_image", "the row holds no image (null)")
    except ImageFailure:
        raise
    except Exception as exc:
        if not _raised_by_pillow(exc):
            raise  # a bug of ours, not the input's fault: the task fails (WorkerError)
        raise ImageFailure("decode", "decode_error", f"{type(exc).__name__}: {exc}") from None
    channels = 3 if image.mode == "RGB" else 1
    shape = (image.height, image.width, channels)
    if config.codec == "raw":
        payload = image.tobytes()
    else:
        try:
            payload = encode(image, config.codec, config.quality)
        except (OSError, ValueError) as exc:
            raise ImageFailure("encode", "encode_error", str(exc)) from None
    class_name = task.classes[record.label] if task.classes and record.label is not None else None
    return EncodedSample(key=key, label=record.label, class_name=class_name, payload=payload,
                         shape=shape, source=record.source, orig_size=orig_size,
                         meta=record.meta)


_PILLOW = os.path.dirname(PIL.__file__) + os.sep


def _raised_by_pillow(exc: BaseException) -> bool:
    """True when `exc` comes out of Pillow's own code (its plugins raise struct.error,
    TypeError, KeyError... on damaged files as well as OSError): the input is at fault.
    Raised anywhere else, it is a bug of ours and must not be recorded as a bad input."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PILLOW)


def run_shard(task: ShardTask) -> tuple[int, str]:
    """Join the parts of one shard into `task.tmp_path` (fsynced); (bytes, sha256).

    The part files are left for the caller to remove once it has published the shard, so a
    retried task (its worker lost) finds them again.
    """
    config = task.config
    scratch = _scratch(task.tmp_path)
    if config.format == "tar":
        result = assemble_tar(task.parts, scratch)
    else:
        result = assemble_parquet(
            task.parts, scratch, schema=shard_schema(config, task.labeled, task.meta_types,
                                                     task.classes),
            rows_per_group=task.rows_per_group, compression=config.compression,
        )
    os.replace(scratch, task.tmp_path)
    return result
