"""Helpers of the tests that convert into and from object storage (moto's S3 on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from shardkit.format.retry import RetryPolicy

OPTIONS: dict[str, Any] = {"size": 16, "samples_per_shard": 5, "max_errors": 10, "progress": False}
FAST = RetryPolicy(attempts=2, first_delay=0.01, max_delay=0.02, timeout=5)


def objects(s3: Any, prefix: str) -> dict[str, str]:
    """sha256 of every object under `prefix`/, by name relative to it."""
    client = s3.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="test", Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket="test", Key=item["Key"])["Body"].read()
            found[item["Key"][len(prefix) + 1:]] = hashlib.sha256(body).hexdigest()
    return found


def cli(*args: object, cwd: Path | None = None, wait: bool = True) -> Any:
    command = [sys.executable, "-m", "shardkit", *map(str, args)]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd)


def storage_args(s3: Any, endpoint: str | None = None) -> list[str]:
    options = s3.options(endpoint)
    return ["--storage-option", f"endpoint_url={options['endpoint_url']}", "--storage-option",
            "key=testing", "--storage-option", "secret=testing",
            "--storage-option", "client_kwargs.region_name=us-east-1"]
