"""A whole shard as one task, for a cluster converting into object storage: its parts encoded
and joined on the worker, in a local temporary folder, and the shard uploaded by the worker
under the run's own temporary prefix (the client then publishes it; see
`shardkit.conversion.out_remote`). So no filesystem is shared: a worker needs its own disk
and the store, and the shard's bytes never travel through the client.

Locally and on a cluster writing to a shared filesystem the parts remain separate tasks
(`shardkit.conversion.tasks`), so that parallelism does not depend on the shard count; here a
shard's parts must meet on one machine.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass

from shardkit.conversion.tasks import PartResult, PartTask, ShardTask, run_part, run_shard
from shardkit.format.storage import Storage

__all__ = ["WholeShardResult", "WholeShardTask", "run_whole_shard"]


@dataclass(frozen=True, slots=True)
class WholeShardTask:
    #: The shard's parts (their paths name files; the task writes them in its own folder).
    parts: tuple[PartTask, ...]
    #: The assembly (its `parts` are filled in by the task, `tmp_path` names the shard file).
    shard: ShardTask
    #: Where the finished shard is uploaded, under its own file name.
    upload: Storage


@dataclass(frozen=True, slots=True)
class WholeShardResult:
    parts: tuple[PartResult, ...]
    bytes: int
    sha256: str


def run_whole_shard(task: WholeShardTask) -> WholeShardResult:
    """Encode the parts, join them and upload the shard (see the module docstring). A retried
    task uploads the same bytes under the same name again."""
    name = os.path.basename(task.shard.tmp_path)
    with tempfile.TemporaryDirectory(prefix="shardkit-shard-") as folder:
        parts = tuple(run_part(dataclasses.replace(p, path=os.path.join(folder, os.path.basename(p.path))))
                      for p in task.parts)
        shard = dataclasses.replace(task.shard, parts=tuple(r.path for r in parts),
                                    tmp_path=os.path.join(folder, name))
        size, digest = run_shard(shard)
        task.upload.upload(shard.tmp_path, name)
    return WholeShardResult(parts=parts, bytes=size, sha256=digest)
