"""The one storage layer: a dataset's folder on local disk or under an fsspec URL.

`open_storage(where)` parses `where` (a URL is never taken for a local path: ``s3://b/x``
never becomes a folder named ``s3:``), refuses an unsupported scheme or a missing extra before
anything is read or written, and returns a `Storage` with the few operations the rest of
shardkit needs: read a small file whole, stream a file in chunks, list the names under the
prefix, write or upload a file so that nothing half-written is ever visible under its final
name, delete names.

Remote requests go through fsspec with the caller's ``storage_options`` on every request. Each
request has a timeout; connection errors, timeouts, 408, 429 and 5xx answers are retried with
exponential backoff and jitter (`RetryPolicy`); past the budget, or on an answer no retry
mends (403, a missing bucket), a `RemoteError` names the URL and the last cause. A missing
file is a `FileNotFoundError` naming the URL: the caller knows what it means (not a dataset,
a shard gone).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from shardkit.errors import ConfigError, RemoteError
from shardkit.format.file_info import FileInfo, local_tree, remote_tree, version_of
from shardkit.format.files import atomic_write_bytes, publish
from shardkit.format.location import READ_ONLY, Location, filesystem_class, parse_location
from shardkit.format.manifest import INDEX_NAME, Manifest
from shardkit.format.remote_errors import MissingBucket, describe, http_status, is_retryable, no_bucket
from shardkit.format.retry import RetryPolicy

__all__ = [
    "CHUNK_BYTES",
    "FileInfo",
    "Location",
    "RetryPolicy",
    "Storage",
    "open_storage",
    "parse_location",
    "read_index",
]

T = TypeVar("T")

#: Bytes per ranged GET when streaming a file: large enough that a request's latency is small
#: beside its transfer time, small enough that a retry after a dropped connection repeats little.
CHUNK_BYTES = 16 * 1024 * 1024
_S3_MIN_PART = 5 * 1024 * 1024
#: Filesystems made in this process, by settings (see `FsspecStorage._filesystem`).
_SHARED: dict[str, tuple[int, Any]] = {}
_SHARED_LOCK = threading.Lock()


def open_storage(where: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None,
                 retry: RetryPolicy | None = None, writable: bool = False,
                 chunk_bytes: int = CHUNK_BYTES) -> Storage:
    """The Storage for `where` (a local path or a URL). Refuses, before any request, a URL
    that cannot be used: an unsupported scheme or a badly formed URL (ConfigError), a missing
    extra (MissingExtraError naming it), a read-only scheme when `writable` (ConfigError).
    `storage_options` go to the fsspec filesystem (endpoint, credentials, region) and so reach
    every request; they are ignored for local paths."""
    location = parse_location(where)
    if chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    policy = retry or RetryPolicy()
    if location.is_local:
        return Storage(location, policy, chunk_bytes)
    if writable and location.protocol in READ_ONLY:
        raise ConfigError(f"{location.url}: {location.protocol}:// is read-only; write to a "
                          "local folder or an object store (s3://, gs://)")
    return FsspecStorage(location, policy, chunk_bytes, filesystem_class(location),
                         dict(storage_options or {}))


class Storage:
    """A local folder; the base of `FsspecStorage`, which does the same over fsspec. Names are
    plain file names directly inside the location."""

    def __init__(self, location: Location, retry: RetryPolicy, chunk_bytes: int) -> None:
        self.location = location
        self.retry = retry
        self.chunk_bytes = chunk_bytes

    @property
    def url(self) -> str:
        return self.location.url

    def url_of(self, name: str) -> str:
        """The URL (or local path) of file `name`, for messages."""
        return self.location.child_url(name)

    def read_bytes(self, name: str) -> bytes:
        """The whole file (meant for small ones: index.json, errors.jsonl)."""
        return Path(self.location.child(name)).read_bytes()

    def iter_chunks(self, name: str, size: int) -> Iterator[bytes]:
        """The first `size` bytes of file `name`, in chunks of at most `chunk_bytes`; fewer in
        all when the file is shorter (the caller checks the count and hash)."""
        with open(self.location.child(name), "rb") as handle:
            left = size
            while left > 0 and (chunk := handle.read(min(self.chunk_bytes, left))):
                left -= len(chunk)
                yield chunk

    def list_names(self) -> list[str]:
        """Sorted names of the files directly under the location ([] when it does not exist)."""
        try:
            return sorted(e.name for e in os.scandir(self.location.path) if e.is_file())
        except FileNotFoundError:
            return []

    def size(self, name: str) -> int | None:
        """The file's size in bytes, None when it does not exist."""
        try:
            return os.stat(self.location.child(name)).st_size
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish `data` as file `name`: readers see the old file or all of the new one."""
        os.makedirs(self.location.path, exist_ok=True)
        atomic_write_bytes(self.location.child(name), data)

    def upload(self, local_path: str | os.PathLike[str], name: str) -> None:
        """Publish a copy of the local file `local_path` as `name` (temp + fsync + rename)."""
        os.makedirs(self.location.path, exist_ok=True)
        final = self.location.child(name)
        tmp = os.path.join(self.location.path, f".{name}.upload-{os.getpid()}")
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, self.chunk_bytes)
                dst.flush()
                os.fsync(dst.fileno())
            publish(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, names: Iterable[str]) -> None:
        """Remove files `names` (those already gone are fine)."""
        for name in names:
            Path(self.location.child(name)).unlink(missing_ok=True)

    def within(self, folder: str) -> Storage:
        """The storage of the sub-folder `folder` (a relative path with ``/``), sharing this
        one's retry policy and connection. ValueError for ``..``, an empty or absolute path."""
        clone = copy.copy(self)
        path = self.location.path
        for part in folder.split("/"):
            path = Location(self.location.protocol, path).child(part)
        clone.location = Location(self.location.protocol, path)
        return clone

    def walk(self) -> list[FileInfo]:
        """Every file under the location at any depth ([] when it does not exist), sorted by
        name components: a folder's files come where the folder's name sorts."""
        return local_tree(self.location.path)

    def info(self, name: str) -> FileInfo | None:
        """`name`'s size and version, None when it does not exist."""
        try:
            st = os.stat(self.location.child(name))
        except FileNotFoundError:
            return None
        return FileInfo(name, st.st_size, str(st.st_mtime_ns))

    def copy_to(self, name: str, target: Storage, new_name: str) -> None:
        """Publish a copy of file `name` as `target`'s `new_name` (a storage of the same store:
        for a remote one a server-side copy, nothing passes through this process)."""
        target.upload(self.location.child(name), new_name)


class FsspecStorage(Storage):
    """A location behind fsspec (s3://, gs://, http(s)://, ...), every request retried and
    bounded as `RetryPolicy` says. Safe to use from several threads; after a fork the child
    makes its own filesystem object (an async one's event loop does not survive a fork)."""

    def __init__(self, location: Location, retry: RetryPolicy, chunk_bytes: int,
                 fs_class: Any, options: dict[str, Any]) -> None:
        super().__init__(location, retry, chunk_bytes)
        self._fs_class = fs_class
        self._options = options
        self._fs: Any = None
        self._pid = -1
        self._rng = random.Random()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"], state["_pid"] = None, -1
        return state

    def _filesystem(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            # One filesystem (one connection pool) per process for equal settings: a task
            # arrives with its own unpickled copy of a storage, and a new client per task
            # would cost a connection set-up each.
            key = repr((self._fs_class, self.location.protocol, sorted(self._options.items()), self.retry))
            with _SHARED_LOCK:
                pid, fs = _SHARED.get(key, (-1, None))
                if pid != os.getpid():
                    options = _with_timeouts(self.location.protocol, self._options, self.retry)
                    fs = self._fs_class(skip_instance_cache=True, **options)
                    if self.location.protocol in ("s3", "s3a"):
                        fs.retries = 1  # s3fs's own retry loop: ours replaces it, so the budget is ours
                    _SHARED[key] = (os.getpid(), fs)
            self._fs, self._pid = fs, os.getpid()
        return self._fs

    def _call(self, action: str, name: str | None, request: Callable[[Any, dict[str, Any]], T],
              *, scale: int = 1) -> T:
        """Run `request(fs, timeout_kwargs)` under the retry policy."""
        url = self.url_of(name) if name is not None else self.url
        timeout = self.retry.timeout * scale
        last: BaseException | None = None
        for attempt in range(self.retry.attempts):
            if attempt:
                time.sleep(self.retry.delay(attempt, self._rng))
            fs = self._filesystem()
            try:
                if getattr(fs, "async_impl", False):
                    # fsspec's sync wrapper takes `timeout`: a hard bound on the request.
                    return request(fs, {"timeout": timeout})
                return _bounded(request, fs, timeout)
            except FileNotFoundError as exc:
                if no_bucket(exc):
                    raise MissingBucket(f"{url}: the bucket does not exist (or these "
                                        "credentials cannot see it)") from None
                raise FileNotFoundError(f"{url}: not found") from None
            except TypeError as exc:
                if "unexpected keyword argument" not in str(exc):
                    raise
                raise ConfigError(f"{url}: a storage option this filesystem does not take "
                                  f"({describe(exc)})") from None
            except Exception as exc:
                if not is_retryable(exc):
                    raise RemoteError(f"{action} {url} failed: {describe(exc)}") from exc
                last = exc
        raise RemoteError(f"{action} {url} failed {self.retry.attempts} times; last: "
                          f"{describe(last)}") from last

    def read_bytes(self, name: str) -> bytes:
        path = self.location.child(name)
        return self._call("GET", name, lambda fs, kw: bytes(fs.cat_file(path, **kw)))

    def iter_chunks(self, name: str, size: int) -> Iterator[bytes]:
        path = self.location.child(name)
        offset = 0
        while offset < size:
            end = min(offset + self.chunk_bytes, size)
            try:
                chunk = self._call("GET", name, _ranged(path, offset, end))
            except RemoteError as exc:
                if http_status(exc) == 416:  # the object is shorter than asked: caller checks
                    return
                raise
            if offset == 0 and len(chunk) > end:
                yield chunk[:size]  # a server that ignored Range sent the whole object
                return
            yield chunk
            if len(chunk) < end - offset:
                return  # the object ends early; the caller sees the short count
            offset = end

    def list_names(self) -> list[str]:
        path = self.location.path

        def ls(fs: Any, kw: dict[str, Any]) -> list[str]:
            fs.invalidate_cache(path)  # another process may have written since
            entries = fs.ls(path, detail=True, **kw)
            return [str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries
                    if e.get("type") == "file"]

        try:
            return sorted(set(self._call("LIST", None, ls)))
        except FileNotFoundError:
            return []

    def size(self, name: str) -> int | None:
        found = self.info(name)
        return None if found is None else found.size

    def write_bytes(self, name: str, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        path = self.location.child(name)
        self._call("PUT", name, lambda fs, kw: fs.pipe_file(path, data, **kw),
                   scale=1 + len(data) // self.chunk_bytes)

    def upload(self, local_path: str | os.PathLike[str], name: str) -> None:
        """One PUT, or for a large file a multipart upload that becomes visible only when it
        completes (s3fs aborts the upload on failure, so no parts linger)."""
        path = self.location.child(name)
        size = os.path.getsize(local_path)
        extra: dict[str, Any] = {}
        if self.location.protocol in ("s3", "s3a"):  # parts of chunk_bytes (S3's least is 5 MiB)
            extra["chunksize"] = max(self.chunk_bytes, _S3_MIN_PART)
        self._call("PUT", name, lambda fs, kw: fs.put_file(os.fspath(local_path), path, **extra, **kw),
                   scale=1 + size // self.chunk_bytes)

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            path = self.location.child(name)
            with contextlib.suppress(FileNotFoundError):
                self._call("DELETE", name, _removal(path))

    def within(self, folder: str) -> Storage:
        self._filesystem()  # made here, once: every sub-folder's storage shares it
        return super().within(folder)

    def walk(self) -> list[FileInfo]:
        path = self.location.path  # a missing bucket: FileNotFoundError naming the URL

        def find(fs: Any, kw: dict[str, Any]) -> dict[str, Any]:
            fs.invalidate_cache(path)
            return dict(fs.find(path, detail=True, **kw))

        return remote_tree(path, self._call("LIST", None, find))

    def info(self, name: str) -> FileInfo | None:
        path = self.location.child(name)
        try:
            info = self._call("HEAD", name, lambda fs, kw: fs.info(path, **kw))
        except FileNotFoundError:
            return None
        return FileInfo(name, int(info.get("size") or 0), version_of(info))

    def copy_to(self, name: str, target: Storage, new_name: str) -> None:
        source, destination = self.location.child(name), target.location.child(new_name)
        self._call("COPY", name, lambda fs, kw: fs.cp_file(source, destination, **kw))


def _bounded(request: Callable[[Any, dict[str, Any]], T], fs: Any, timeout: float) -> T:
    """`request(fs, {})` in a daemon thread, TimeoutError past `timeout` seconds: a synchronous
    fsspec implementation has no timeout of its own to rely on. A request that never returns
    leaves its thread behind, not the caller."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, request(fs, {})))
        except BaseException as exc:
            outcome.append((False, exc))

    worker = threading.Thread(target=run, name="shardkit-request", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise TimeoutError(f"no answer within {timeout:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _ranged(path: str, start: int, end: int) -> Callable[[Any, dict[str, Any]], bytes]:
    def request(fs: Any, kw: dict[str, Any]) -> bytes:
        return bytes(fs.cat_file(path, start=start, end=end, **kw))
    return request


def _removal(path: str) -> Callable[[Any, dict[str, Any]], None]:
    def request(fs: Any, kw: dict[str, Any]) -> None:
        fs.rm_file(path, **kw)
    return request


def read_index(storage: Storage) -> tuple[Manifest, bytes]:
    """The dataset's manifest and the exact bytes of its index.json (their sha256 keys a cache).
    DatasetError when there is no index.json or it is invalid; RemoteError when it cannot be
    fetched."""
    return Manifest.load(lambda: storage.read_bytes(INDEX_NAME), storage.url,
                         storage.url_of(INDEX_NAME))


def _with_timeouts(protocol: str, options: dict[str, Any], retry: RetryPolicy) -> dict[str, Any]:
    """The user's options plus, where the user set none, socket timeouts and no retries of the
    library's own (ours replace them, so the time a failure takes is bounded and known)."""
    out = dict(options)
    if protocol in ("s3", "s3a"):
        config = dict(out.get("config_kwargs") or {})
        config.setdefault("connect_timeout", retry.timeout)
        config.setdefault("read_timeout", retry.timeout)
        config.setdefault("retries", {"total_max_attempts": 1})
        out["config_kwargs"] = config
    elif protocol in ("gs", "gcs"):
        out.setdefault("requests_timeout", retry.timeout)
    elif protocol in READ_ONLY:
        import aiohttp

        client = dict(out.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=retry.timeout,
                                                           sock_read=retry.timeout))
        out["client_kwargs"] = client
    return out
