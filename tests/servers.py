"""Real servers on 127.0.0.1 for the remote-storage tests, each started and stopped by a fixture
(tests/conftest.py).

- `MotoS3`: moto's S3 in server mode (the way s3fs's own tests run: in-process patching does
  not reach aiobotocore), reset between tests with ``POST /moto-api/reset``.
- `FolderServer`: a plain HTTP server over a folder, with Range requests and a count of the
  GETs each path received.
- `FaultProxy`: an HTTP proxy in front of either that passes requests through, counts them,
  and on request answers 503/429, drops the connection mid-body, flips a byte or stalls.
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
                "upgrade", "proxy-connection"}


class _Server:
    """A ThreadingHTTPServer on a free port of 127.0.0.1 in a daemon thread."""

    def __init__(self, handler: Callable[..., BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer((HOST, 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.gets: Counter[str] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.httpd.server_address[1]}"

    def count(self, method: str, path: str) -> None:
        with self.lock:
            self.requests[(method, path)] += 1
            if method == "GET":
                self.gets[path] += 1

    def reset_counts(self) -> None:
        with self.lock:
            self.gets.clear()
            self.requests.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)


class MotoS3:
    """moto's S3 server on a free port; `options` are the storage_options that reach it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
        self._server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def options(self, endpoint: str | None = None) -> dict[str, Any]:
        """storage_options for s3fs: our endpoint (or a proxy's), fixed test credentials."""
        return {"endpoint_url": endpoint or self.endpoint, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}}

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()

    def client(self) -> Any:
        from botocore.session import Session

        return Session().create_client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                       aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self) -> None:
        self._server.stop()


class _FolderHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner: FolderServer = self.server.owner  # type: ignore[attr-defined]
        owner.count("GET", self.path)
        path = self.translate_path(self.path)
        match = _RANGE.match(self.headers.get("Range", ""))
        if match is None or not os.path.isfile(path):
            super().do_GET()
            return
        with open(path, "rb") as handle:
            data = handle.read()
        start = int(match.group(1))
        end = min(int(match.group(2)) + 1 if match.group(2) else len(data), len(data))
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        self.wfile.write(data[start:end])


class FolderServer(_Server):
    """Serves `root` read-only over HTTP (directory listings, Range requests)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        super().__init__(functools.partial(_FolderHandler, directory=self.root))


@dataclass
class Fault:
    """What the proxy does to the next `times` requests whose path contains `match`:
    ``status`` (answer `status` with no body), ``drop`` (send the headers and `after` bytes of
    the body, then close the connection), ``corrupt`` (flip the byte at `offset` of the body),
    ``stall`` (send the headers and `after` bytes, then wait `seconds` before the rest)."""

    kind: str
    match: str
    times: int = 1
    method: str = "GET"
    status: int = 503
    after: int = 0
    offset: int = 0
    seconds: float = 0.0


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while (size := int(self.rfile.readline().split(b";")[0].strip(), 16)) > 0:
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass  # trailers
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self) -> None:
        proxy: FaultProxy = self.server.owner  # type: ignore[attr-defined]
        proxy.count(self.command, self.path)
        body = self._body()
        fault = proxy.take(self.command, self.path)
        if fault is not None and fault.kind == "status":
            self.send_response(fault.status)
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        status, headers, data = proxy.upstream_request(self.command, self.path, self.headers, body)
        if fault is not None and fault.kind == "corrupt" and fault.offset < len(data):
            data = data[:fault.offset] + bytes([data[fault.offset] ^ 0xFF]) + data[fault.offset + 1:]
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in _HOP_HEADERS:
                self.send_header(key, value)
        if self.command == "HEAD":  # no body: the upstream's length is the object's
            self.send_header("Content-Length", dict(headers).get("Content-Length", "0"))
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault is not None and fault.kind in ("drop", "stall"):
            self.wfile.write(data[:fault.after])
            self.wfile.flush()
            if fault.kind == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            proxy.stopping.wait(fault.seconds)
            data = data[fault.after:]
        self.wfile.write(data)

    def _serve(self) -> None:
        try:
            self._forward()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout we provoked)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve


class FaultProxy(_Server):
    """An HTTP proxy to `upstream` (``http://host:port``) that injects `Fault`s."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or HOST, parts.port or 80)
        self.faults: list[Fault] = []
        super().__init__(_ProxyHandler)

    def add(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def take(self, method: str, path: str) -> Fault | None:
        """The first pending fault for this request, its count decremented."""
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.match in path:
                    fault.times -= 1
                    return fault
        return None

    def upstream_request(self, method: str, path: str, headers: Any,
                         body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
            if body is not None:
                forwarded["Content-Length"] = str(len(body))
            connection.request(method, path, body=body, headers=forwarded)
            answer = connection.getresponse()
            data = answer.read()
            return answer.status, answer.getheaders(), data
        finally:
            connection.close()


def wait_until(condition: Any, seconds: float = 10.0) -> bool:
    """Poll `condition()` until true or `seconds` pass; its last value."""
    deadline = time.monotonic() + seconds
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(value)


def upload_dataset(folder: str | os.PathLike[str], url: str, options: dict[str, Any] | None = None) -> None:
    """Upload a converted dataset folder through the storage layer: its shards and
    errors.jsonl first, index.json last (a prefix without index.json is not a dataset)."""
    from shardkit.format.manifest import INDEX_NAME, Manifest
    from shardkit.format.storage import RetryPolicy, open_storage

    storage = open_storage(url, storage_options=options, writable=True,
                           retry=RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.05, timeout=5))
    root = os.fspath(folder)
    names = [s.file for s in Manifest.read(root).shards]
    names += [n for n in ("errors.jsonl",) if os.path.exists(os.path.join(root, n))]
    for name in [*names, INDEX_NAME]:
        storage.upload(os.path.join(root, name), name)
