"""Conversion options: `ImageOptions`, `CsvOptions`, `SplitOptions`, `HfOptions` and
`ConvertConfig` (what decides a dataset's bytes; recorded in index.json and hashed into its
fingerprint), `ErrorBudget` and `RunOptions` (how a run goes: never the bytes)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from shardkit.config.common import as_integer, check_choice, check_count, usable_cpus
from shardkit.errors import ConfigError
from shardkit.format.retry import RetryPolicy

__all__ = ["ConvertConfig", "CsvOptions", "ErrorBudget", "HfOptions", "ImageOptions", "RunOptions",
           "SplitOptions"]

ResizeMode = Literal["center-crop", "pad", "stretch", "shorter-side"]
ColorMode = Literal["RGB", "L"]
Filter = Literal["bilinear", "bicubic", "lanczos"]
Format = Literal["tar", "parquet"]
Codec = Literal["raw", "jpeg", "png"]
Pixels = Literal["bytes", "array3d"]

RESIZE_MODES: tuple[str, ...] = ("center-crop", "pad", "stretch", "shorter-side")
COLOR_MODES: tuple[str, ...] = ("RGB", "L")
FILTERS: tuple[str, ...] = ("bilinear", "bicubic", "lanczos")
FORMATS: tuple[str, ...] = ("tar", "parquet")
CODECS: tuple[str, ...] = ("raw", "jpeg", "png")
COMPRESSIONS: tuple[str, ...] = ("none", "zstd")
#: How Parquet shards store fixed-shape raw pixels (ConvertConfig.pixels); the first is the
#: default, which index.json does not record.
PIXELS: tuple[str, ...] = ("bytes", "array3d")
DEFAULT_PIXELS: Pixels = "bytes"
#: An Array3D column's offsets are int32: the most pixel values a row group may hold.
ARRAY3D_VALUES = (1 << 31) - 1

#: Pillow's own default limit (``Image.MAX_IMAGE_PIXELS``), about 89 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_SHARD_BYTES = 256 * 1000 * 1000


def _check_rgb(name: str, value: tuple[int, ...]) -> None:
    if len(value) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        raise ConfigError(f"{name} must be three integers 0-255; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ImageOptions:
    """How each image is decoded, oriented, normalised and resized.

    size: output (width, height). For ``shorter-side`` both must be equal: the shorter
        side becomes that length and the other keeps the aspect ratio (variable shapes).
    resize: ``center-crop`` (scale the shorter side to fit, crop the centre), ``pad``
        (letterbox: scale to fit inside, pad with `pad_color`), ``stretch`` (ignore the
        aspect ratio), ``shorter-side``.
    mode: ``RGB`` (3 channels) or ``L`` (1 channel).
    background: colour that transparent pixels are composited on (default white).
    max_pixels: images whose header claims more pixels are rejected before decoding.
    draft: let JPEG decode at 1/2, 1/4 or 1/8 scale when the output is smaller.
    """

    size: tuple[int, int] = (224, 224)
    resize: ResizeMode = "center-crop"
    mode: ColorMode = "RGB"
    filter: Filter = "bilinear"
    background: tuple[int, int, int] = (255, 255, 255)
    pad_color: tuple[int, int, int] = (0, 0, 0)
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True

    def __post_init__(self) -> None:
        sides = tuple(as_integer(v) for v in self.size) if isinstance(self.size, (tuple, list)) else ()
        if len(sides) != 2 or not all(v is not None and v > 0 for v in sides):
            raise ConfigError(f"size must be two positive integers (width, height); got {self.size!r}")
        object.__setattr__(self, "size", sides)  # frozen: normalised once, here
        if max(self.size) > 65535:
            raise ConfigError(f"size {self.size} is larger than 65535 pixels on a side")
        check_choice("resize", self.resize, RESIZE_MODES)
        check_choice("mode", self.mode, COLOR_MODES)
        check_choice("filter", self.filter, FILTERS)
        _check_rgb("background", self.background)
        _check_rgb("pad_color", self.pad_color)
        if self.resize == "shorter-side" and self.size[0] != self.size[1]:
            raise ConfigError(
                "--resize shorter-side takes one length (e.g. --size 256), not WxH; "
                f"got {self.size[0]}x{self.size[1]}"
            )
        object.__setattr__(self, "max_pixels", check_count("max_pixels", self.max_pixels, 1))

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    @property
    def fixed_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) when every output has the same shape, else None."""
        if self.resize == "shorter-side":
            return None
        return (self.size[1], self.size[0], self.channels)


HEADER_MODES: tuple[str, ...] = ("auto", "yes", "no")


@dataclass(frozen=True, kw_only=True)
class CsvOptions:
    """How a CSV source is read (SRC ending in ``.csv``); see docs/format.md, "CSV inputs".

    image_col: the column of image paths (an image CSV); None: a tabular CSV.
    label_cols: label column(s); one column of strings or integers gives int64 labels
        (strings become sorted classes); one column of fractions, or several numeric ones,
        give float32 targets (``label`` float32 [B, K] when reading).
    root: folder that relative image paths start from (None: the CSV's folder).
    columns / exclude: the columns to keep / drop beside the image and label columns (a tabular
        CSV's features, an image CSV's metadata); default every column.
    delimiter, encoding: passed to the CSV parser. header: ``auto`` (the first record is a
        header unless every field of it is a number), ``yes`` or ``no``.
    keep_ints: store integer columns as int64 instead of float32 (tabular).
    """

    image_col: str | None = None
    label_cols: tuple[str, ...] = ()
    root: str | None = None
    columns: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    delimiter: str = ","
    encoding: str = "utf8"
    header: str = "auto"
    keep_ints: bool = False

    def __post_init__(self) -> None:
        check_choice("header", self.header, HEADER_MODES)
        if len(self.delimiter) != 1:
            raise ConfigError(f"delimiter must be one character; got {self.delimiter!r}")
        if self.columns and self.exclude:
            raise ConfigError("give --columns or --exclude, not both")
        named = {self.image_col, *self.label_cols} - {None}
        if named & set(self.exclude) or named & set(self.columns):
            raise ConfigError("--columns/--exclude name only feature columns, not the image "
                              "or label columns")


SPLIT_METHODS: tuple[str, ...] = ("stratified", "keras")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True, kw_only=True)
class SplitOptions:
    """A split at conversion: OUT/<name>/ for each part, each a complete dataset (own
    index.json, the same classes in the same order); every input is in exactly one part.

    parts: (name, fraction) pairs: at least two, names unique (letters, digits, _ and -),
        fractions > 0 adding up to 1.
    method: ``stratified`` (per class, a seeded random choice: ConvertConfig.seed) or
        ``keras`` (Keras' own cut, two parts ``train`` and ``val``; `keras` builds it): see
        shardkit.conversion.split.
    """

    parts: tuple[tuple[str, float], ...] = (("train", 0.8), ("val", 0.2))
    method: Literal["stratified", "keras"] = "stratified"

    def __post_init__(self) -> None:
        parts = tuple((str(n), float(f)) for n, f in self.parts)
        object.__setattr__(self, "parts", parts)
        check_choice("split method", self.method, SPLIT_METHODS)
        if len(parts) < 2 or len({n for n, _ in parts}) != len(parts):
            raise ConfigError(f"split needs two or more parts with distinct names; got {self.names}")
        for name, fraction in parts:
            if not _SPLIT_NAME.match(name):
                raise ConfigError(f"split part name {name!r}: use letters, digits, _ and -")
            if not 0.0 < fraction < 1.0:
                raise ConfigError(f"split part {name!r}: fraction must be between 0 and 1; got {fraction}")
        if abs(sum(f for _, f in parts) - 1.0) > 1e-6:
            raise ConfigError(f"split fractions must add up to 1; got {sum(f for _, f in parts):g}")
        if self.method == "keras" and self.names != ("train", "val"):
            raise ConfigError("a Keras split has the parts train and val (SplitOptions.keras)")

    @classmethod
    def keras(cls, validation_split: float) -> SplitOptions:
        """``ImageDataGenerator(validation_split=v)``'s cut: val is v of each class."""
        if isinstance(validation_split, bool) or not 0.0 < float(validation_split) < 1.0:
            raise ConfigError(f"validation_split must be between 0 and 1; got {validation_split!r}")
        v = float(validation_split)
        return cls(parts=(("train", 1.0 - v), ("val", v)), method="keras")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.parts)


@dataclass(frozen=True, kw_only=True)
class HfOptions:
    """A Hugging Face SRC (conversion.sources.hf): its image column (None: ``image``), label
    column (None: ``label`` when there is one), and the split to convert when a folder of
    Parquet files holds several (``--hf-split``; None: refused when it does)."""

    image_col: str | None = None
    label_col: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if self.split is not None and (not isinstance(self.split, str) or not self.split.strip()):
            raise ConfigError(f"hf_split must name a split; got {self.split!r}")


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """Every option that decides the bytes of a converted dataset.

    format: ``tar`` (WebDataset-compatible) or ``parquet``.
    codec: ``raw`` (uint8 pixels, nothing to decode when training), ``jpeg`` or ``png``.
    quality: JPEG quality (1-100; above 95 files grow with little gain), jpeg codec only.
    compression: Parquet compression of the image column (``none`` or ``zstd``).
    pixels: how Parquet shards store raw pixels of a fixed shape: ``bytes`` (one
        fixed_size_binary(H*W*C) per image, which the reader memory-maps) or ``array3d``
        (Hugging Face's ``Array3D``, so ``datasets`` gives arrays: nested lists, dictionary-
        encoded, about 1.25 bytes a pixel, read through pyarrow).
    shard_bytes / samples_per_shard: give exactly one; shard_bytes is converted to a sample
        count at plan time (exact for raw bytes, an estimate for jpeg/png and array3d).
    shuffle / seed: a seeded global shuffle of the input order at plan time (the seed
        also draws a stratified split).
    split: OUT/<part>/ per part of a `SplitOptions`; hf: the columns of a Hugging Face SRC.
    """

    image: ImageOptions = field(default_factory=ImageOptions)
    format: Format = "tar"
    codec: Codec = "raw"
    quality: int = 90
    compression: str = "none"
    pixels: Pixels = DEFAULT_PIXELS
    shard_bytes: int | None = DEFAULT_SHARD_BYTES
    samples_per_shard: int | None = None
    shuffle: bool = False
    seed: int = 0
    #: Set when SRC is a CSV file (image or tabular CSV); None for image folders.
    csv: CsvOptions | None = None
    #: A train/validation split: OUT/<part>/ per part (None: OUT is one dataset).
    split: SplitOptions | None = None
    #: Set when SRC is a Hugging Face dataset on disk.
    hf: HfOptions | None = None

    def __post_init__(self) -> None:
        check_choice("format", self.format, FORMATS)
        check_choice("codec", self.codec, CODECS)
        check_choice("compression", self.compression, COMPRESSIONS)
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be 1-100; got {self.quality}")
        if self.compression != "none" and self.format != "parquet":
            raise ConfigError("--compression applies to --format parquet only")
        check_choice("pixels", self.pixels, PIXELS)
        if self.pixels != DEFAULT_PIXELS:
            shape = self.image.fixed_shape
            if (self.format, self.codec) != ("parquet", "raw"):
                raise ConfigError(f"--pixels {self.pixels} applies to --format parquet --codec raw only")
            if shape is None:
                raise ConfigError(f"--pixels {self.pixels} needs one image shape (not --resize "
                                  "shorter-side)")
            if math.prod(shape) > ARRAY3D_VALUES:
                raise ConfigError(f"--pixels {self.pixels} holds at most {ARRAY3D_VALUES:,} pixel "
                                  f"values an image; {shape[1]}x{shape[0]}x{shape[2]} is more")
        if (self.shard_bytes is None) == (self.samples_per_shard is None):
            raise ConfigError("give exactly one of shard_bytes (--shard-size) and samples_per_shard")
        if self.shard_bytes is not None and self.shard_bytes <= 0:
            raise ConfigError(f"shard size must be positive; got {self.shard_bytes}")
        if self.samples_per_shard is not None and self.samples_per_shard <= 0:
            raise ConfigError(f"samples per shard must be positive; got {self.samples_per_shard}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0; got {self.seed}")

    def to_json(self) -> dict[str, Any]:
        """The resolved configuration as JSON-ready values (tuples become lists)."""
        resolved: dict[str, Any] = _jsonable(dataclasses.asdict(self))
        for name in ("csv", "split", "hf"):
            if getattr(self, name) is None:
                del resolved[name]  # folder conversions keep the manifest they always had
        if self.pixels == DEFAULT_PIXELS:
            del resolved["pixels"]  # and so do conversions in the default layout
        if self.hf is not None and self.hf.split is None:
            del resolved["hf"]["split"]  # and Hugging Face folders of one split
        return resolved


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class ErrorBudget:
    """How many failed inputs a run tolerates: a count, or a fraction of the inputs."""

    count: int | None = 0
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.fraction is None):
            raise ConfigError("an error budget is either a count or a fraction")
        if self.count is not None and self.count < 0:
            raise ConfigError(f"max errors must be >= 0; got {self.count}")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"max errors must be between 0% and 100%; got {self.fraction:.2%}")

    def allowed(self, inputs: int) -> int:
        if self.count is not None:
            return self.count
        assert self.fraction is not None  # guaranteed by __post_init__
        return math.floor(self.fraction * inputs + 1e-9)

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{(self.fraction or 0.0) * 100:g}%"


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How a conversion runs; none of it changes the output bytes.

    workers: worker processes (0 = convert in the calling process; None = all cores).
    overwrite: replace whatever conversion OUT holds. resume: finish an interrupted
    conversion of the same inputs and options, keeping its finished shards.
    storage_options: what the fsspec filesystem of a URL SRC or OUT takes (endpoint_url, key,
    secret, region...), on every request. retry: how its requests are retried and bounded.
    """

    workers: int | None = None
    overwrite: bool = False
    resume: bool = False
    max_errors: ErrorBudget = field(default_factory=ErrorBudget)
    progress: bool | None = None
    storage_options: dict[str, Any] | None = field(default=None, hash=False, repr=False)
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0; got {self.workers}")
        options = self.storage_options  # never printed: it may hold credentials
        if options is not None and not (isinstance(options, dict) and all(type(k) is str for k in options)):
            raise ConfigError(f"storage_options must be a dict with string keys; got {type(options)}")
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy or None; got {self.retry!r}")

    @property
    def resolved_workers(self) -> int:
        return self.workers if self.workers is not None else usable_cpus()
