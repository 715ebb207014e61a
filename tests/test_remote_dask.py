"""A Dask cluster (a real scheduler and two workers on 127.0.0.1, each in its own folder)
converting into S3 (moto): the workers upload their own shards, so no filesystem is shared
with the client, and the objects equal a local conversion's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from corpus import add_bad_files, hashes, image_tree
from s3_objects import OPTIONS, cli, objects, storage_args
from test_dask import Cluster, cluster  # noqa: F401 - the module-scoped cluster fixture

import shardkit

pytest.importorskip("distributed")


def test_workers_upload_their_shards_with_no_shared_out(cluster: Cluster, s3: Any,  # noqa: F811
                                                        tmp_path: Path, fault_proxy: Any) -> None:
    src = tmp_path / "src"
    image_tree(src, per_class=8)
    add_bad_files(src / "cat")
    options = {**OPTIONS, "samples_per_shard": 6}
    local = shardkit.convert(src, tmp_path / "local", workers=0, **options)
    proxy = fault_proxy(s3.endpoint)
    summary = shardkit.convert(src, "s3://test/ds", executor=cluster.client.get_executor(),
                               storage_options=s3.options(proxy.url), **options)
    assert (summary.samples, summary.failed, summary.shards, summary.workers) == \
        (local.samples, local.failed, local.shards, 2)
    assert objects(s3, "ds") == hashes(tmp_path / "local")
    # Each shard went up from a worker, under this run's temporary prefix (the client only
    # asks the server to copy it onto its final name); nothing of it is left there.
    uploads = [path for method, path in proxy.requests if method == "PUT" and "/.shardkit-tmp/" in path]
    assert sorted(p.rsplit("/", 1)[1] for p in uploads) == [f"shard-{k:05d}.tar" for k in range(local.shards)]
    assert summary.task_cpu_seconds > 0
    # The same through the command line, with a remote SRC too: the workers fetch the images.
    client = s3.client()
    for path in sorted(src.rglob("*")):
        if path.is_file():
            client.put_object(Bucket="test", Key=f"src/{path.relative_to(src).as_posix()}",
                              Body=path.read_bytes())
    done = cli("convert", "s3://test/src", "s3://test/ds2", "--size", "16", "--samples-per-shard", "6",
               "--max-errors", "10", "--dask-scheduler", cluster.address, *storage_args(s3))
    assert done.returncode == 0, done.stderr
    remote = objects(s3, "ds2")
    assert {k: v for k, v in remote.items() if k != "index.json"} == \
        {k: v for k, v in hashes(tmp_path / "local").items() if k != "index.json"}
