"""index.json: the dataset manifest (format v1). docs/format.md is the user-facing spec.

A directory is a shardkit dataset exactly when it holds a valid ``index.json``; it is written
last, atomically, after every shard it names is durable.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardkit._version import __version__
from shardkit.config import DEFAULT_PIXELS
from shardkit.errors import DatasetError, RemoteError, ShardkitError
from shardkit.format.files import atomic_write_bytes
from shardkit.format.manifest_schema import check_manifest
from shardkit.format.remote_errors import MissingBucket
from shardkit.format.samples import TARGET_FIELD

__all__ = [
    "ERRORS_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "Manifest",
    "ShardRecord",
    "canonical_json",
    "fingerprint",
    "shard_name",
]

FORMAT_NAME = "shardkit"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
ERRORS_NAME = "errors.jsonl"


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8: the same value gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def shard_name(index: int, extension: str, total: int) -> str:
    """``shard-00042.tar``; the width grows past 5 digits only for more than 100,000 shards."""
    width = max(5, len(str(max(total - 1, 0))))
    return f"shard-{index:0{width}d}.{extension}"


def fingerprint(config: dict[str, Any], classes: list[str] | None,
                inputs: Iterable[tuple[str, int, int]]) -> str:
    """sha256 of the resolved config, the class names and every input's (path, size, mtime)."""
    digest = hashlib.sha256()
    digest.update(canonical_json({"config": config, "classes": classes}))
    for source, size, mtime_ns in inputs:
        digest.update(canonical_json([source, size, mtime_ns]) + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """One shard file: its name, sample count, size, hash, and (raw tar) its fixed layout.

    layout, when present: sample ``i``'s pixels start at byte ``i * stride + offset`` of the
    file and are ``prod(shape)`` bytes long.
    """

    file: str
    samples: int
    bytes: int
    sha256: str
    layout: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "samples": self.samples, "bytes": self.bytes,
                               "sha256": self.sha256}
        if self.layout is not None:
            out["layout"] = dict(self.layout)
        return out


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything a reader needs, and everything that says how the data was made."""

    kind: str
    schema: dict[str, Any]
    classes: list[str] | None
    class_counts: list[int] | None
    shards: list[ShardRecord]
    inputs: int
    failed: int
    config: dict[str, Any]
    fingerprint: str
    shardkit_version: str = __version__
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    # What readers ask of an image dataset, answered here once (validated by from_json).

    @property
    def format(self) -> str:
        """``tar`` or ``parquet`` (tables are always Parquet)."""
        return str(self.config.get("format", "parquet"))

    @property
    def codec(self) -> str:
        """``raw``, ``jpeg`` or ``png`` (images); ``table`` for tables."""
        return str(self.config.get("codec", "table"))

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) when every image has that shape; None when shapes vary (or a table)."""
        shape = self.schema.get("image", {}).get("shape", [None])
        return None if None in shape else (int(shape[0]), int(shape[1]), int(shape[2]))

    @property
    def channels(self) -> int:
        return int(self.schema["image"]["shape"][2])

    @property
    def csv_columns(self) -> tuple[tuple[str, str], ...]:
        """An image CSV's other columns as (name, dtype), in CSV order (empty for folders)."""
        found = sorted((spec["csv_column"], name, spec["dtype"]) for name, spec in self.schema.items()
                       if isinstance(spec, dict) and "csv_column" in spec)
        return tuple((name, dtype) for _, name, dtype in found)

    @property
    def targets(self) -> int:
        """Float targets per sample (image CSVs with several label columns, or one of
        fractions), else 0."""
        if self.kind != "images" or TARGET_FIELD not in self.schema:
            return 0
        return len(self.config["csv"]["label_cols"])

    @property
    def pixels(self) -> str:
        """How Parquet shards hold fixed-shape raw pixels: ``bytes`` or ``array3d``."""
        return str(self.config.get("pixels", DEFAULT_PIXELS))

    @property
    def mapped(self) -> bool:
        """True when the reader memory-maps the shards' pixels (fixed-shape raw images in tar,
        or in Parquet as bytes in an uncompressed image column)."""
        return (self.kind == "images" and self.codec == "raw" and self.image_shape is not None
                and (self.format == "tar" or (self.config.get("compression") == "none"
                                              and self.pixels == DEFAULT_PIXELS)))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "shardkit_version": self.shardkit_version,
            "kind": self.kind,
            "schema": self.schema,
            "classes": self.classes,
            "class_counts": self.class_counts,
            "shards": [s.to_json() for s in self.shards],
            "samples": self.samples,
            "inputs": self.inputs,
            "failed": self.failed,
            "config": self.config,
            "fingerprint": self.fingerprint,
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_bytes(self) -> builtins.bytes:
        """index.json's bytes (sorted keys, indented for people)."""
        return (json.dumps(self.to_json(), sort_keys=True, indent=1, ensure_ascii=False,
                           allow_nan=False) + "\n").encode()

    def write(self, folder: str | os.PathLike[str]) -> None:
        """Atomically write ``folder/index.json`` (`to_bytes`)."""
        atomic_write_bytes(Path(folder) / INDEX_NAME, self.to_bytes())

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> Manifest:
        """Read and validate ``folder/index.json``; DatasetError says what is wrong (for the
        folder of a split conversion: that it holds the parts' datasets, naming them)."""
        try:
            return cls.load(lambda: (Path(folder) / INDEX_NAME).read_bytes(), str(folder),
                            str(Path(folder) / INDEX_NAME))[0]
        except DatasetError:
            root = Path(folder)
            if (root / INDEX_NAME).exists() or not root.is_dir():
                raise
            parts = sorted(p.name for p in root.iterdir() if (p / INDEX_NAME).is_file())
            if not parts:
                raise
            raise DatasetError(f"{folder}: not a shardkit dataset (no {INDEX_NAME}): it holds the "
                               f"parts of a split ({', '.join(p + '/' for p in parts)}); name one, "
                               f"e.g. {root / parts[0]}") from None

    @classmethod
    def load(cls, read: Callable[[], builtins.bytes], dataset: str,
             where: str) -> tuple[Manifest, builtins.bytes]:
        """The manifest of `dataset` and the exact bytes of its index.json, which `read`
        returns (from a local file or a URL) and `where` names. DatasetError when there is no
        index.json (`read` raises FileNotFoundError), it is unreadable, or it is invalid."""
        try:
            data = read()
            parsed = json.loads(data)
        except MissingBucket as exc:  # not the dataset's fault: where it should be is not there
            raise RemoteError(str(exc)) from None
        except FileNotFoundError:
            raise DatasetError(f"{dataset}: not a shardkit dataset (no {INDEX_NAME})") from None
        except ShardkitError:
            raise  # the storage's own verdict (a bad option, a bucket that does not exist)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{where}: unreadable: {exc}") from None
        return cls.from_json(parsed, where=where), data

    @classmethod
    def from_json(cls, data: Any, *, where: str = INDEX_NAME) -> Manifest:
        """The manifest in the parsed index.json `data`. Raises DatasetError naming `where`
        and the first field that is missing, mistyped or inconsistent (`check_manifest`)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            found = data.get("format") if isinstance(data, dict) else data
            raise DatasetError(f"{where}: not a shardkit index (format {found!r})")
        version = data.get("format_version")
        if type(version) is int and version > FORMAT_VERSION:
            raise DatasetError(
                f"{where}: format version {version} is newer than this shardkit reads "
                f"({FORMAT_VERSION}); upgrade shardkit"
            )
        check_manifest(data, where)
        for i, raw in enumerate(data["shards"]):  # shard k is always the same inputs
            expected = shard_name(i, data["config"]["format"], len(data["shards"]))
            if raw["file"] != expected:
                raise DatasetError(f"{where}: shards[{i}].file is {raw['file']!r}, not {expected!r}")
        shards = [ShardRecord(file=raw["file"], samples=raw["samples"], bytes=raw["bytes"],
                              sha256=raw["sha256"], layout=raw.get("layout")) for raw in data["shards"]]
        manifest = cls(
            kind=data["kind"], schema=data["schema"], classes=data["classes"],
            class_counts=data["class_counts"], shards=shards, inputs=data["inputs"],
            failed=data["failed"], config=data["config"], fingerprint=data["fingerprint"],
            shardkit_version=data["shardkit_version"], format_version=data["format_version"],
            extra=data.get("extra") or {},
        )
        if data["samples"] != manifest.samples:
            raise DatasetError(f"{where}: 'samples' is {data['samples']} but the shards hold "
                               f"{manifest.samples}")
        return manifest
