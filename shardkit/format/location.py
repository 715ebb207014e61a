"""Where a dataset lives: a local folder or an fsspec URL, told apart once.

A URL is never taken for a local path (``s3://b/x`` never becomes a folder named ``s3:``), and a
scheme shardkit cannot use, or whose extra is missing, is refused before anything is read or
written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from shardkit.errors import ConfigError, MissingExtraError

__all__ = ["READ_ONLY", "Location", "check_name", "filesystem_class", "parse_location"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
#: ``s3:bucket/x`` (slashes forgotten): refused rather than written as a folder named ``s3:``.
_BARE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
_LOCAL_SCHEMES = {"file", "local"}
#: Schemes whose implementation comes with one of our extras: the extra a missing import names.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
READ_ONLY = {"http", "https"}


@dataclass(frozen=True)
class Location:
    """Where a dataset lives: `protocol` ``file`` for a local folder (`path` absolute), else
    an fsspec protocol with `path` as fsspec names it (``bucket/prefix``; the whole URL for
    http(s))."""

    protocol: str
    path: str

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def url(self) -> str:
        """The location as a user would write it (a local path stays a path)."""
        if self.is_local or self.protocol in READ_ONLY:
            return self.path
        return f"{self.protocol}://{self.path}"

    def child(self, name: str) -> str:
        """The fsspec path (or local path) of file `name` inside this location."""
        check_name(name)
        return os.path.join(self.path, name) if self.is_local else f"{self.path}/{name}"

    def child_url(self, name: str) -> str:
        """The URL of file `name` inside this location, for messages."""
        return self.child(name) if self.is_local else f"{self.url}/{name}"


def check_name(name: str) -> None:
    """A file name directly inside a location: no separators, not empty, not ``.``/``..``."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")


def parse_location(where: str | os.PathLike[str]) -> Location:
    """Tell a URL from a local path. ``scheme://...`` is a URL (``file://`` a local path);
    ``s3:bucket`` without the slashes, a chained URL (``a::b``), a URL with a query or fragment
    and an empty bucket are refused with ConfigError; anything else is a local path."""
    text = os.fspath(where)
    if "::" in text and "://" in text:
        raise ConfigError(f"{text!r}: chained fsspec URLs are not supported (shardkit keeps its "
                          "own verified cache; give the dataset's URL alone)")
    match = _URL.match(text)
    if match is None and "://" in text:
        raise ConfigError(f"{text!r}: not a URL (the scheme must come first) and not a path "
                          "shardkit will create")
    if match is None:
        bare = _BARE.match(text)
        if bare and bare.group(1).lower() in (_EXTRAS.keys() | {"file"}):
            raise ConfigError(f"{text!r}: looks like a URL without '//' "
                              f"(did you mean {bare.group(1)}://{text[bare.end():].lstrip('/')}?)")
        return Location("file", os.path.abspath(text))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme in _LOCAL_SCHEMES:
        return Location("file", os.path.abspath(rest or "/"))
    if "?" in rest or "#" in rest:
        raise ConfigError(f"{text!r}: a dataset URL names a folder; queries and fragments "
                          "are not supported")
    rest = rest.rstrip("/")
    if not rest:
        raise ConfigError(f"{text!r}: no bucket or host after {scheme}://")
    path = f"{scheme}://{rest}" if scheme in READ_ONLY else rest
    return Location(scheme, path)


def filesystem_class(location: Location) -> Any:
    """The fsspec implementation of the location's protocol, or ConfigError/MissingExtraError."""
    try:
        import fsspec
    except ImportError as exc:  # a core dependency, but installs can be trimmed
        raise MissingExtraError("fsspec is not installed; install it with: pip install fsspec") from exc
    protocol = location.protocol
    if protocol not in fsspec.available_protocols() and protocol not in fsspec.registry:
        raise ConfigError(f"{location.url}: unsupported URL scheme {protocol!r} (shardkit reads "
                          "local paths, s3://, gs://, http(s):// and other fsspec protocols)")
    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        if extra is not None:
            raise MissingExtraError(f"{location.url}: {protocol}:// needs an extra; install it "
                                    f"with: pip install 'shardkit[{extra}]'") from exc
        raise MissingExtraError(f"{location.url}: {exc}") from exc
