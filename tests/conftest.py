"""Fixtures for the remote-storage tests: real servers on 127.0.0.1 (tests/servers.py), each
stopped by the fixture that started it. Modules that use none of them import nothing of moto."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def moto_server() -> Iterator[Any]:
    """One moto S3 server per test module (starting one takes about a second)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from servers import MotoS3

    server = MotoS3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(moto_server: Any) -> Iterator[Any]:
    """The module's moto server, emptied, with a bucket named ``test``."""
    moto_server.reset()
    moto_server.client().create_bucket(Bucket="test")
    yield moto_server
    moto_server.reset()


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[Any]:
    """A plain HTTP server over ``tmp_path / "www"`` (created empty)."""
    from servers import FolderServer

    root = tmp_path / "www"
    root.mkdir()
    server = FolderServer(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str], Any]]:
    """``fault_proxy(upstream_url)`` starts a FaultProxy in front of it; all stop at teardown."""
    from servers import FaultProxy

    started: list[FaultProxy] = []

    def start(upstream: str) -> FaultProxy:
        proxy = FaultProxy(upstream)
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()
