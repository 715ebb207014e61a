"""What a transport exception means: its HTTP status (whichever library raised it), whether a
retry may mend it, and a one-line description for RemoteError's message.

fsspec's implementations each raise their own types: aiohttp's ``ClientResponseError``
(``.status``) for http(s), s3fs an ``OSError`` whose ``__cause__`` is botocore's
``ClientError`` (``.response["ResponseMetadata"]["HTTPStatusCode"]``), gcsfs an ``HttpError``
(``.code``). We read the status from the chain rather than import any of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

__all__ = ["MissingBucket", "describe", "http_status", "is_retryable", "no_bucket"]

#: Answers a retry may mend: request timeout, too many requests, and every server error.
RETRY_STATUS = frozenset({408, 429})
#: Libraries whose exceptions (without a status) are transport failures: connections refused
#: or reset, bodies cut short, timeouts, DNS.
_TRANSPORT_MODULES = frozenset({"aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "http",
                                "ssl", "socket", "google", "fsspec", "gcsfs", "s3fs"})
#: Failures no retry mends even though they come from a transport library.
_FINAL_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError", "ParamValidationError",
                          "InvalidURL", "NoRegionError", "UnknownServiceError"})
_FINAL_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                FileExistsError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status_of(exc: BaseException) -> int | None:
    if type(exc).__module__.startswith("aiohttp.http_exceptions"):
        return None  # a malformed or cut-short answer: its `code` is a parser's 400, not the server's
    candidates = [getattr(exc, "status", None)]
    if type(exc).__name__.lower().endswith("httperror") or type(exc).__module__.startswith("google"):
        candidates.append(getattr(exc, "code", None))
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        candidates.append(response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    else:  # requests' HTTPError
        candidates.append(getattr(response, "status_code", None))
    for value in candidates:
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status anywhere in `exc`'s cause chain, None when there is none."""
    for link in _chain(exc):
        status = _status_of(link)
        if status is not None:
            return status
    return None


def is_retryable(exc: BaseException) -> bool:
    """True for connection errors, timeouts, cut bodies, 408, 429 and 5xx; False for a
    missing file, a refused permission, any other 4xx and anything that is not a transport
    failure (a bug is not retried)."""
    status = http_status(exc)
    if status is not None:
        return status in RETRY_STATUS or status >= 500
    for link in _chain(exc):
        if isinstance(link, _FINAL_TYPES) or type(link).__name__ in _FINAL_NAMES:
            return False
    for link in _chain(exc):
        if isinstance(link, (OSError, TimeoutError, asyncio.TimeoutError, ConnectionError)):
            return True
        root = type(link).__module__.split(".", 1)[0]
        if root in _TRANSPORT_MODULES:
            return True
    return False


def describe(exc: BaseException | None) -> str:
    """``HTTP 503: ClientResponseError: Service Unavailable`` and the like, on one line."""
    if exc is None:
        return "no attempt made"
    status = http_status(exc)
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 300:
        text = text[:300] + "..."
    prefix = f"HTTP {status}: " if status is not None else ""
    return f"{prefix}{type(exc).__name__}: {text}"


class MissingBucket(FileNotFoundError):
    """The bucket itself is not there (or these credentials cannot see it), not one key of
    it: the storage says so, each caller says what that means (a SRC that is missing, a
    store to create first, a failed read)."""


def no_bucket(exc: BaseException) -> bool:
    """True when a FileNotFoundError is the bucket's, not a key's: s3fs raises it from
    botocore's NoSuchBucket."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code == "NoSuchBucket" or "NoSuchBucket" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
