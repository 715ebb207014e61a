"""A RemoteCache reader in its own process, for tests/test_remote_cache.py.

Argument: JSON {url, cache, shards, prefetch, go, hold}. Waits until the file `go` exists,
reads `shards` in order through the cache, prints {shard: sha256} as JSON; with `hold`, prints
once after pinning the last shard and keeps it pinned until the file `hold` exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

from shardkit.format.storage import RetryPolicy
from shardkit.reader.remote_cache import RemoteCache


def wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.005)


def main(args: dict[str, Any]) -> None:
    wait_for(str(args["go"]))
    shards = [int(k) for k in args["shards"]]
    cache = RemoteCache.open(str(args["url"]), cache_dir=str(args["cache"]),
                             prefetch_shards=int(args["prefetch"]),
                             retry=RetryPolicy(attempts=4, first_delay=0.01, timeout=3))
    cache.announce(shards)
    out = {}
    for k in shards:
        with open(cache.path(k), "rb") as handle:
            out[k] = hashlib.sha256(handle.read()).hexdigest()
        if args.get("hold") and k == shards[-1]:
            print(json.dumps(out), flush=True)
            wait_for(str(args["hold"]))
        cache.release(k)
    print(json.dumps(out), flush=True)
    cache.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
