"""``shardkit info`` and ``shardkit preview``: what a dataset holds, in words and in pictures."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shardkit.config import ReadOptions
from shardkit.config.common import as_integer, check_local_file
from shardkit.conversion.report import human_bytes
from shardkit.errors import ConfigError
from shardkit.format.manifest import Manifest
from shardkit.format.samples import TARGET_FIELD
from shardkit.reader import open_dataset

__all__ = ["contact_sheet", "describe", "info_text"]


def describe(path: str | os.PathLike[str], options: ReadOptions | None = None) -> dict[str, Any]:
    """The facts ``shardkit info`` prints, as JSON-ready values, of the dataset in `path` (a
    folder or a URL, read with `options`' storage_options: only index.json is fetched)."""
    dataset = open_dataset(path, options)
    manifest = dataset.manifest
    if manifest.kind == "table":
        return _describe_table(path, manifest)
    samples = manifest.samples
    classes = _classes(manifest)
    return {
        "path": str(path),
        "kind": manifest.kind,
        "samples": samples,
        "inputs": manifest.inputs,
        "failed": manifest.failed,
        "classes": classes,
        "shards": len(manifest.shards),
        "bytes": manifest.bytes,
        "bytes_per_sample": manifest.bytes / samples if samples else 0.0,
        "format": manifest.config["format"],
        "codec": manifest.config["codec"],
        "schema": manifest.schema,
        "config": manifest.config,
        "fingerprint": manifest.fingerprint,
        "shardkit_version": manifest.shardkit_version,
    }


def info_text(facts: dict[str, Any]) -> str:
    """A human rendering of `describe`'s facts."""
    if facts["kind"] == "table":
        return _table_text(facts)
    image = facts["schema"]["image"]
    shape = "x".join("?" if s is None else str(s) for s in image["shape"])
    lines = [
        f"dataset     {facts['path']}",
        f"samples     {facts['samples']:,} of {facts['inputs']:,} inputs ({facts['failed']:,} failed)",
        f"shards      {facts['shards']:,} {facts['format']} files, {human_bytes(facts['bytes'])} "
        f"({human_bytes(facts['bytes_per_sample'])} per sample)",
        f"image       uint8 {shape} (HxWxC), codec {image['codec']}"
        + (f", stored as {facts['config']['pixels']}" if "pixels" in facts["config"] else ""),
    ]
    if facts["classes"] is None and TARGET_FIELD in facts["schema"]:
        columns = (facts["config"].get("csv") or {}).get("label_cols") or []
        lines.append(f"labels      float32 targets [{len(columns)}]: {', '.join(columns)}")
    elif facts["classes"] is None:
        lines.append("labels      none (unlabelled)")
    else:
        lines.append(f"classes     {len(facts['classes'])}")
        width = max(len(c["name"]) for c in facts["classes"]) if facts["classes"] else 0
        for c in facts["classes"]:
            lines.append(f"  {c['label']:>4}  {c['name']:<{width}}  {c['count']:,}")
    lines.append("schema      " + ", ".join(
        f"{name}:{spec['dtype']}" for name, spec in facts["schema"].items() if "dtype" in spec))
    config = facts["config"]
    opts = config["image"]
    lines.append(
        f"config      size {opts['size'][0]}x{opts['size'][1]}, resize {opts['resize']}, mode "
        f"{opts['mode']}, filter {opts['filter']}, draft {'on' if opts['draft'] else 'off'}, "
        f"shuffle {'seed ' + str(config['seed']) if config['shuffle'] else 'off'}"
    )
    lines.append(f"fingerprint {facts['fingerprint'][:16]}…  (shardkit {facts['shardkit_version']})")
    return "\n".join(lines)


def _classes(manifest: Manifest) -> list[dict[str, Any]] | None:
    if manifest.classes is None:
        return None
    counts = manifest.class_counts or [0] * len(manifest.classes)
    return [{"label": i, "name": name, "count": int(counts[i])}
            for i, name in enumerate(manifest.classes)]


def _describe_table(path: str | os.PathLike[str], manifest: Manifest) -> dict[str, Any]:
    classes = _classes(manifest)
    samples = manifest.samples
    return {
        "path": str(path), "kind": "table", "samples": samples, "inputs": manifest.inputs,
        "failed": manifest.failed, "classes": classes, "shards": len(manifest.shards),
        "bytes": manifest.bytes, "bytes_per_sample": manifest.bytes / samples if samples else 0.0,
        "format": "parquet", "schema": manifest.schema, "columns": manifest.schema["columns"],
        "config": manifest.config, "fingerprint": manifest.fingerprint,
        "shardkit_version": manifest.shardkit_version,
    }


def _table_text(facts: dict[str, Any]) -> str:
    schema = facts["schema"]
    label = schema.get("label")
    lines = [
        f"dataset     {facts['path']} (table)",
        f"rows        {facts['samples']:,} of {facts['inputs']:,} CSV rows ({facts['failed']:,} failed)",
        f"shards      {facts['shards']:,} parquet files, {human_bytes(facts['bytes'])} "
        f"({human_bytes(facts['bytes_per_sample'])} per row)",
        f"features    float32 [{schema['features']['shape'][0]}]: "
        + ", ".join(schema["features"]["names"]),
        "label       none" if label is None else
        f"label       {label['dtype']} {label['shape']} from {', '.join(label['names'])}",
    ]
    if facts["classes"] is not None:
        lines.append("classes     " + ", ".join(f"{c['name']} ({c['count']:,})"
                                                for c in facts["classes"]))
    lines.append(f"  {'column':<16} {'role':<8} {'dtype':<10} {'min':>11} {'mean':>11} "
                 f"{'max':>11} {'nulls':>8}")
    for column in facts["columns"]:
        numbers = [("-" if column[k] is None else f"{column[k]:.4g}") for k in ("min", "mean", "max")]
        lines.append(f"  {column['name'][:16]:<16} {column['role']:<8} {column['dtype']:<10} "
                     f"{numbers[0]:>11} {numbers[1]:>11} {numbers[2]:>11} {column['nulls']:>8,}")
    lines.append(f"fingerprint {facts['fingerprint'][:16]}…  (shardkit {facts['shardkit_version']})")
    return "\n".join(lines)


def contact_sheet(path: str | os.PathLike[str], output: str | os.PathLike[str], *,
                  n: int = 64, cell: int = 128, options: ReadOptions | None = None) -> int:
    """Write a grid of `n` samples spread evenly over the dataset (a folder, or a URL read
    with `options`), each captioned with its index and class name. Returns the number of
    samples shown. ConfigError for an output that cannot be written or an `n` below 1
    (checked first), and for a table."""
    if (count := as_integer(n)) is None or count < 1:
        raise ConfigError(f"the preview shows n >= 1 samples; got {n!r}")
    output = check_local_file("the preview", output)
    dataset = open_dataset(path, options)
    if dataset.is_table:
        raise ConfigError(f"{path}: holds a table (a converted tabular CSV); preview shows image "
                          "datasets (shardkit info describes its columns)")
    total = len(dataset)
    wanted = sorted({int(i) for i in np.linspace(0, total - 1, num=min(n, total))}) if total else []
    tiles = _pick(dataset, wanted)
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = max(1, math.ceil(len(tiles) / cols))
    caption = 14
    sheet = Image.new("RGB", (cols * cell, rows * (cell + caption)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for slot, (index, pixels, label) in enumerate(tiles):
        im = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).convert("RGB")
        im.thumbnail((cell, cell))
        x, y = (slot % cols) * cell, (slot // cols) * (cell + caption)
        sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        name = dataset.classes[label] if dataset.classes is not None and label is not None else ""
        draw.text((x + 3, y + cell), f"{index} {name}"[:22], fill=(230, 230, 230), font=font)
    # PNG, unless the name asks for another image format Pillow writes (grid.jpg, grid.webp)
    kind = Image.registered_extensions().get(os.path.splitext(output)[1].lower())
    try:
        sheet.save(output, format=kind if kind in Image.SAVE else "PNG")
    except OSError as exc:
        raise ConfigError(f"the preview {output}: cannot be written: {exc.strerror or exc}") from None
    return len(tiles)


def _pick(dataset: Any, wanted: list[int]) -> list[tuple[int, np.ndarray, int | None]]:
    tiles = []
    start = 0
    wanted_set = set(wanted)
    for number, record in enumerate(dataset.manifest.shards):
        stop = start + record.samples
        if any(start <= i < stop for i in wanted_set):
            shard = dataset.read_shard(number)
            for i in range(start, stop):
                if i in wanted_set:
                    # A class index to caption with; float targets name no class.
                    labels = shard.labels
                    label = int(labels[i - start]) if labels is not None and labels.ndim == 1 \
                        and labels.dtype.kind in "iu" else None
                    tiles.append((i, np.asarray(shard.images[i - start]), label))
        start = stop
    return tiles
