"""A SRC in object storage: a prefix of images (``s3://bucket/train/`` with class folders, or
flat), or an image CSV whose images live under a URL (the CSV's own folder, or ``--root``).

Listing goes through the storage layer once (one recursive LIST); the rules are those of a
local folder (`shardkit.conversion.sources.imagefolder`: class folders sorted, files sorted
at every level, hidden names skipped, an image beside class folders reported), so the same
images give the same records and the same shards. A record's ``path`` is the input's URL; the
conversion tasks fetch the bytes through the storage (`fetch_inputs`), a few at once.

Remote inputs are fingerprinted by (name, size, version): the version is the ETag (or
modification time) the store gives, kept as an integer in the record's ``mtime_ns``
(`version_number`), so that a rewritten object makes a new fingerprint.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import os
import posixpath
import tempfile
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

from shardkit.config import ConvertConfig, RunOptions
from shardkit.conversion.images import EMPTY_FILE, IMAGE_EXTENSIONS, MISSING_FILE, ImageFailure
from shardkit.conversion.sources.image_csv import list_image_csv
from shardkit.conversion.sources.imagefolder import Listing
from shardkit.conversion.sources.records import InputRecord, RecordSpool, plan_failure
from shardkit.errors import ConfigError, InputError
from shardkit.format.file_info import FileInfo
from shardkit.format.location import parse_location
from shardkit.format.storage import Storage, open_storage

__all__ = ["RemotePaths", "fetch_inputs", "list_remote", "remote_source", "version_number"]

#: Inputs a task fetches at once: enough to hide a store's latency behind the decoding.
FETCH_AHEAD = 8


def version_number(version: str) -> int:
    """A remote file's version as the int64 an input record fingerprints (sha256, 63 bits)."""
    return int.from_bytes(hashlib.sha256(version.encode()).digest()[:8], "big") >> 1


def remote_source(src: str | os.PathLike[str], config: ConvertConfig, run: RunOptions) -> Storage | None:
    """The storage the inputs of `src` are read through when they are remote (None: local):
    SRC itself for a folder of images; the images' root for an image CSV (``--root``, else
    the CSV's folder). ConfigError for a remote SRC that is not one of those."""
    csv = config.csv
    src_remote = not parse_location(src).is_local
    if config.hf is not None and src_remote:
        raise ConfigError(f"{src}: a Hugging Face dataset converts from a local folder; download it first")
    if csv is not None and csv.image_col is None:
        if src_remote:
            raise ConfigError(f"{src}: a tabular CSV converts from a local file; download it first")
        return None
    if csv is not None:
        if csv.root is not None:
            root = csv.root if not parse_location(csv.root).is_local else None
        else:
            root = posixpath.dirname(os.fspath(src)) if src_remote else None
        if root is None and src_remote:
            raise ConfigError(f"{src}: an image CSV at a URL names images under a URL (its own "
                              "folder, or --root URL); for local images, download the CSV")
        return None if root is None else _open(root, run)
    return _open(os.fspath(src), run) if src_remote else None


def _open(url: str, run: RunOptions) -> Storage:
    return open_storage(url, storage_options=run.storage_options, retry=run.retry)


def list_remote(src: str | os.PathLike[str], config: ConvertConfig, source: Storage, run: RunOptions, *,
                spill_dir: str | os.PathLike[str] | None = None) -> Listing:
    """The inputs of the remote `src` (see the module docstring), read through `source`
    (`remote_source`). Raises InputError (nothing there), RemoteError."""
    if config.csv is None:
        listing = _list_folder(source, spill_dir)
    else:
        with _local_csv(src, run) as (csv_path, extra):
            listing = list_image_csv(csv_path, config.csv, spill_dir=spill_dir, paths=RemotePaths(source))
            if extra is not None:
                listing.extra_inputs = (extra,)
    listing.source = source
    return listing


def _visible(info: FileInfo) -> bool:
    return not any(part.startswith(".") for part in info.name.split("/"))


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_folder(source: Storage, spill_dir: str | os.PathLike[str] | None) -> Listing:
    try:
        files = [f for f in source.walk() if _visible(f)]
    except FileNotFoundError:
        raise InputError(f"{source.url}: the bucket does not exist (or these credentials cannot "
                         "see it)") from None
    classes = sorted({f.name.split("/", 1)[0] for f in files if "/" in f.name})
    listing = Listing(records=RecordSpool(spill_dir), classes=classes or None)
    label_of = {name: label for label, name in enumerate(classes)}
    for info in files:
        if not _is_image(info.name):
            continue
        if classes and "/" not in info.name:
            listing.failures.append(plan_failure(
                info.name, "outside_class_folder",
                "image lies directly in SRC next to class folders, so it has no label"))
            continue
        label = label_of[info.name.split("/", 1)[0]] if classes else None
        listing.records.append(InputRecord(path=f"{source.url}/{info.name}", source=info.name,
                                           label=label, size=info.size,
                                           mtime_ns=version_number(info.version)))
    if not listing.records and not listing.failures:
        raise InputError(f"{source.url}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return listing


@contextlib.contextmanager
def _local_csv(src: str | os.PathLike[str],
               run: RunOptions) -> Iterator[tuple[Path, tuple[str, int, int] | None]]:
    """The CSV `src` as a local file (a remote one downloaded to a temporary folder, under its
    own name), and what fingerprints a remote one: (name, size, version)."""
    if parse_location(src).is_local:
        yield Path(src), None
        return
    url = os.fspath(src)
    folder, name = posixpath.split(url.rstrip("/"))
    storage = _open(folder, run)
    info = storage.info(name)
    if info is None:
        raise InputError(f"{url}: not found")
    with tempfile.TemporaryDirectory(prefix="shardkit-csv-") as scratch:
        local = Path(scratch) / name
        with open(local, "wb") as handle:
            for chunk in storage.iter_chunks(name, info.size):
                handle.write(chunk)
        if local.stat().st_size != info.size:
            raise InputError(f"{url}: {local.stat().st_size} of its {info.size} bytes arrived")
        yield local, (name, info.size, version_number(info.version))


class RemotePaths:
    """Where an image CSV's paths point when its images are under the URL of `storage`: a
    path relative to it, or a URL inside it; anything else (another store, a local path, one
    leaving the root with ``..``) is outside it. Sizes and versions come from one listing."""

    def __init__(self, storage: Storage) -> None:
        self.base = storage.url
        self.files = {f.name: f for f in storage.walk()}

    def locate(self, written: str) -> str | None:
        if written.startswith(self.base + "/"):
            relative = written[len(self.base) + 1:]
        elif "://" in written or written.startswith(("/", "\\")):
            return None
        else:
            relative = written
        relative = posixpath.normpath(relative)
        if relative in (".", "..") or relative.startswith("../"):
            return None
        return f"{self.base}/{relative}"

    def stat(self, target: str) -> tuple[int, int]:
        info = self.files.get(target[len(self.base) + 1:])
        return (info.size, version_number(info.version)) if info is not None else (-1, 0)


Fetched = tuple[bytes, None] | ImageFailure


def fetch_inputs(source: Storage, records: Sequence[InputRecord]) -> Generator[Fetched, None, None]:
    """The bytes of each record's input, in order, `FETCH_AHEAD` fetched at once: ``(bytes,
    None)``, or an `ImageFailure` (missing_file) for an object that is not there. A transport
    failure past the retry budget raises RemoteError (the task fails: it is not the input's
    fault)."""
    prefix = source.url + "/"

    def fetch(record: InputRecord) -> Fetched:
        if not record.path.startswith(prefix):
            return ImageFailure("read", "missing_file", f"{record.path} is not under {source.url}")
        folder, _, name = record.path[len(prefix):].rpartition("/")
        try:
            data = (source.within(folder) if folder else source).read_bytes(name)
        except FileNotFoundError:
            return ImageFailure("read", "missing_file", MISSING_FILE)
        return (data, None) if data else ImageFailure("read", "empty_file", EMPTY_FILE)

    with cf.ThreadPoolExecutor(FETCH_AHEAD, thread_name_prefix="shardkit-fetch") as pool:
        try:
            ahead: deque[cf.Future[Fetched]] = deque()
            todo = iter(records)
            for record in todo:
                ahead.append(pool.submit(fetch, record))
                if len(ahead) >= FETCH_AHEAD:
                    break
            while ahead:
                result = ahead.popleft().result()
                following = next(todo, None)
                if following is not None:
                    ahead.append(pool.submit(fetch, following))
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
