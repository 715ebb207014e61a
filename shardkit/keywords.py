"""The public keyword spellings, mapped onto the config objects (`shardkit.config`).

``shardkit.convert(src, out, size=150, shard_size="64MB", max_errors="1%", ...)`` and
``ShardLoader(path, 64, shuffle=False, ...)`` take keywords; `ConvertKeywords` and
`ReadKeywords` type them for editors and mypy (``**options: Unpack[...]``). Their names and
types are the config fields' (tests/test_options.py holds them to it), plus a few friendly
forms: ``size=224`` or ``"150x150"``, ``shard_size="256MB"``, ``max_errors="1%"`` or ``5``,
``label_col="a,b"``, ``split="train=0.8,val=0.2"``, ``validation_split=0.2``,
``hf_split="train"``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from shardkit.config import (
    Codec,
    ColorMode,
    ConvertConfig,
    CsvOptions,
    Decode,
    ErrorBudget,
    Filter,
    Format,
    HfOptions,
    ImageOptions,
    Pixels,
    ReadOptions,
    ResizeMode,
    RunOptions,
    SplitOptions,
)
from shardkit.errors import ConfigError
from shardkit.format.retry import RetryPolicy

if TYPE_CHECKING:
    from shardkit.format.storage import RetryPolicy
    from shardkit.reader.augment import Augment

__all__ = [
    "ConvertKeywords",
    "ReadKeywords",
    "configs_from_options",
    "parse_byte_size",
    "parse_max_errors",
    "parse_size",
    "parse_split",
    "parse_storage_options",
    "read_options",
]


class ReadKeywords(TypedDict, total=False):
    """`ReadOptions`' fields as keywords (see its docstring for what each does)."""

    shuffle: bool
    seed: int
    window: int | None
    drop_last: bool
    rank: int | None
    world_size: int | None
    fields: Sequence[str] | None
    verify: bool
    prefetch: int
    cache_shards: int | None
    decode: Decode
    copy_threads: int | None
    decode_threads: int | None
    torch_threads: int | None
    augment: Augment | None
    storage_options: dict[str, Any] | None
    cache_dir: str | None
    cache_limit: int | None
    prefetch_shards: int | None
    retry: RetryPolicy | None


class ConvertKeywords(TypedDict, total=False):
    """``shardkit.convert``'s keywords: the fields of `ImageOptions`, `ConvertConfig`,
    `RunOptions` and `CsvOptions`, plus the friendly forms the module docstring lists."""

    size: int | str | tuple[int, int]
    resize: ResizeMode
    mode: ColorMode
    filter: Filter
    background: tuple[int, int, int]
    pad_color: tuple[int, int, int]
    max_pixels: int
    draft: bool
    format: Format
    codec: Codec
    quality: int
    compression: Literal["none", "zstd"]
    pixels: Pixels
    shard_bytes: int | None
    shard_size: int | str
    samples_per_shard: int | None
    shuffle: bool
    seed: int
    workers: int | None
    overwrite: bool
    resume: bool
    max_errors: ErrorBudget | int | str
    progress: bool | None
    storage_options: dict[str, Any] | None
    retry: RetryPolicy | None
    image_col: str | None
    label_col: str | Sequence[str] | None
    label_cols: Sequence[str]
    root: str | None
    columns: str | Sequence[str]
    exclude: str | Sequence[str]
    delimiter: str
    encoding: str
    header: Literal["auto", "yes", "no"]
    keep_ints: bool
    csv: CsvOptions | None
    split: str | Mapping[str, float] | SplitOptions | None
    validation_split: float | None
    hf: HfOptions | None
    hf_split: str | None


def read_options(options: ReadOptions | None, keywords: dict[str, Any]) -> ReadOptions:
    """`options` (default ReadOptions()) with `keywords` put over it; ConfigError naming any
    unknown keyword."""
    unknown = set(keywords) - _READ_FIELDS
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}; valid: "
                          f"{', '.join(sorted(_READ_FIELDS))}")
    if keywords.get("fields", ()) is None:
        keywords = {**keywords, "fields": ()}
    return dataclasses.replace(options or ReadOptions(), **keywords)


_READ_FIELDS = frozenset(f.name for f in dataclasses.fields(ReadOptions))


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*$")
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """``"150x150"`` → (150, 150) as (width, height); ``"224"`` → (224, 224)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"--size must look like 224 or 150x100 (width x height); got {text!r}")
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    return width, height


def parse_byte_size(text: str) -> int:
    """``"256MB"`` → 256_000_000, ``"1GiB"`` → 1_073_741_824, ``"4096"`` → 4096."""
    match = _BYTES_RE.match(text)
    if not match:
        raise ConfigError(f"a size in bytes must look like 256MB, 1GiB or 4096; got {text!r}")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary else 1000
    power = " KMGT".index(unit) if unit else 0
    return int(number * base**power)


def parse_split(value: str | Mapping[str, float]) -> SplitOptions:
    """``"train=0.8,val=0.2"`` or ``{"train": 0.8, "val": 0.2}`` → a stratified split."""
    if isinstance(value, str):
        parts = []
        for item in value.split(","):
            name, sep, fraction = item.partition("=")
            try:
                parts.append((name.strip(), float(fraction)))
            except ValueError:
                sep = ""
            if not sep:
                raise ConfigError(f"--split takes name=fraction pairs like train=0.8,val=0.2; "
                                  f"got {value!r}") from None
        return SplitOptions(parts=tuple(parts))
    return SplitOptions(parts=tuple(value.items()))


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` (repeatable) → fsspec's storage_options. A value is a
    string, except one that reads as JSON: an object, array or quoted string, or exactly
    ``true``/``false``/``null`` (so ``client_kwargs={"region_name": "eu-west-1"}``, ``anon=true``).
    A dotted KEY sets a nested value (``client_kwargs.region_name=eu-west-1``). ConfigError
    names a pair without ``=`` or with malformed JSON."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--storage-option takes KEY=VALUE (e.g. endpoint_url=http://host:9000); "
                              f"got {pair!r}")
        value: Any = text
        if text[:1] in ("{", "[", '"') or text in ("true", "false", "null"):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"--storage-option {key}: the value is not valid JSON ({exc})") from None
        *path, last = key.split(".")
        target = options
        for part in path:
            nested = target.setdefault(part, {})
            if not isinstance(nested, dict):
                raise ConfigError(f"--storage-option {key}: {part} is already set to a value")
            target = nested
        if isinstance(value, dict) and isinstance(target.get(last), dict):
            target[last].update(value)  # client_kwargs.x=1 and client_kwargs={...} both apply
        else:
            target[last] = value
    return options


def parse_max_errors(text: str) -> ErrorBudget:
    """``"5"`` → at most 5 failures; ``"1%"`` → at most 1% of the inputs."""
    text = text.strip()
    try:
        if text.endswith("%"):
            return ErrorBudget(count=None, fraction=float(text[:-1]) / 100.0)
        return ErrorBudget(count=int(text))
    except ValueError:
        raise ConfigError(f"--max-errors must be a count (5) or a percentage (1%); got {text!r}") from None


_IMAGE_FIELDS = frozenset(f.name for f in dataclasses.fields(ImageOptions))
_CONVERT_FIELDS = frozenset(f.name for f in dataclasses.fields(ConvertConfig)) - {"image"}
_RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunOptions))
_CSV_FIELDS = frozenset(f.name for f in dataclasses.fields(CsvOptions))
#: Convenience spellings accepted by `configs_from_options` (and so by ``shardkit.convert``).
_ALIASES = frozenset({"shard_size", "label_col", "validation_split", "hf_split"}) | _CSV_FIELDS


def csv_options(options: dict[str, Any]) -> CsvOptions:
    """CsvOptions from keywords; ``label_col`` may be ``"a"``, ``"a,b"`` or a list."""
    kw = {k: v for k, v in options.items() if k in _CSV_FIELDS}
    label = options.get("label_col", kw.get("label_cols"))
    if isinstance(label, str):
        label = [p.strip() for p in label.split(",") if p.strip()]
    kw["label_cols"] = tuple(label or ())
    for name in ("columns", "exclude"):
        value = kw.get(name)
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        kw[name] = tuple(value or ())
    if kw.get("root") is not None:
        kw["root"] = str(kw["root"])
    return CsvOptions(**kw)


def configs_from_options(options: dict[str, Any], config: ConvertConfig | None = None,
                         run: RunOptions | None = None) -> tuple[ConvertConfig, RunOptions]:
    """Map ``shardkit.convert(**options)`` keywords onto the config objects.

    Accepts every field of ImageOptions, ConvertConfig, RunOptions and CsvOptions, plus
    friendly forms: ``size=224`` / ``"150x150"``, ``shard_size="256MB"``, ``max_errors="1%"``
    or ``5``. Given `config` (or `run`), keywords may not set its fields as well.
    """
    run_keys = set(options) & _RUN_FIELDS
    if (config is not None and set(options) - run_keys) or (run is not None and run_keys):
        both = sorted(set(options) - run_keys if config is not None else run_keys)
        raise ConfigError(f"give options either as config objects or as keywords, not both: {both}")
    built, built_run = _from_keywords(options)
    return config or built, run or built_run


def _from_keywords(options: dict[str, Any]) -> tuple[ConvertConfig, RunOptions]:
    unknown = set(options) - _IMAGE_FIELDS - _CONVERT_FIELDS - _RUN_FIELDS - _ALIASES
    if unknown:
        valid = sorted(_IMAGE_FIELDS | _CONVERT_FIELDS | _RUN_FIELDS | _ALIASES)
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")
    image_kw = {k: v for k, v in options.items() if k in _IMAGE_FIELDS}
    size = image_kw.get("size")
    if isinstance(size, str):
        image_kw["size"] = parse_size(size)
    elif isinstance(size, int):
        image_kw["size"] = (size, size)
    elif size is not None:
        image_kw["size"] = tuple(size)
    for name in ("background", "pad_color"):
        if name in image_kw:
            image_kw[name] = tuple(image_kw[name])
    convert_kw = {k: v for k, v in options.items() if k in _CONVERT_FIELDS}
    if "csv" not in convert_kw and (_CSV_FIELDS | {"label_col"}) & set(options):
        convert_kw["csv"] = csv_options(options)
    split = convert_kw.get("split")
    if isinstance(split, (str, Mapping)):
        convert_kw["split"] = parse_split(split)
    if options.get("validation_split") is not None:
        if split is not None:
            raise ConfigError("give --split or --validation-split, not both")
        convert_kw["split"] = SplitOptions.keras(options["validation_split"])
    if options.get("hf_split") is not None:
        if convert_kw.get("hf") is not None:
            raise ConfigError("give hf_split or hf=HfOptions(split=...), not both")
        convert_kw["hf"] = HfOptions(split=options["hf_split"])
    if "shard_size" in options:
        value = options["shard_size"]
        convert_kw["shard_bytes"] = parse_byte_size(value) if isinstance(value, str) else int(value)
    if convert_kw.get("samples_per_shard") is not None and "shard_size" not in options:
        convert_kw.setdefault("shard_bytes", None)
    run_kw = {k: v for k, v in options.items() if k in _RUN_FIELDS}
    budget = run_kw.get("max_errors")
    if isinstance(budget, str):
        run_kw["max_errors"] = parse_max_errors(budget)
    elif isinstance(budget, int):
        run_kw["max_errors"] = ErrorBudget(count=budget)
    return ConvertConfig(image=ImageOptions(**image_kw), **convert_kw), RunOptions(**run_kw)
