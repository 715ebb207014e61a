"""Per-sample augmentation: the `Augment` configuration.

The loader draws each sample's parameters (``augment_params``: a pure function of seed, epoch
and the sample's stored index) and ships them with the batch as one float32 tensor;
`to_device` moves the pixels on the accelerator (``augment_apply``). This module only holds
the validated options, so it needs neither torch nor a device.

What one sample goes through, in this order (``convention="torchvision"``)::

    crop      a RandomResizedCrop box (area fraction `scale`, aspect `ratio`), or a centred
              box (the defaults, or `center_crop`), resized to `size`
    flip      horizontal with probability `hflip`, vertical with `vflip`
    affine    RandomAffine on the `size` image: rotation ±`degrees`, translation ±`translate`
              (fractions of width, height), scale factor in `zoom`, x-shear ±`shear` degrees
    colour    brightness, contrast, saturation factors (torchvision's definitions), clamped
    scale     × `rescale` (or `to_device`'s ``scale``), then ``(x - mean) / std``

``convention="keras"`` (what `Augment.from_keras` sets) is ImageDataGenerator's transform
instead: no random crop; Keras' affine (zoom a per-axis *sampling* factor drawn for x and y
independently, the shift applied inside the rotation, in pixels when a `translate` entry is
1 or more); then the flips; then brightness. The geometry is composed into one affine per
sample, so the pixels are resampled once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Literal

from shardkit.config.common import as_integer
from shardkit.errors import ConfigError

__all__ = ["CONVENTIONS", "FILLS", "Augment"]

Fill = Literal["reflect", "nearest", "constant"]
Convention = Literal["torchvision", "keras"]
FILLS: tuple[str, ...] = ("reflect", "nearest", "constant")
CONVENTIONS: tuple[str, ...] = ("torchvision", "keras")

_Pair = tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class Augment:
    """Random per-sample augmentation, applied on the device by `to_device`.

    size: output (height, width), or one int for a square; None: the stored size.
    scale / ratio: RandomResizedCrop's area fraction (0 < a <= b <= 1) and aspect range
        (width / height). Left at (1, 1) there is no random crop: the largest centred box with
        the output's aspect ratio is resized to `size` (the whole image when the aspects
        agree). Boxes are continuous (sub-pixel), not rounded to whole pixels.
    hflip / vflip: flip probabilities (0-1).
    degrees: rotation drawn uniformly in ±degrees (0-360).
    translate: maximum shift as fractions of (width, height), each 0-1 (torchvision's
        RandomAffine; continuous, not whole pixels). With ``convention="keras"`` an entry of
        1 or more is a number of pixels, as Keras reads width/height_shift_range.
    zoom: range of scale factors; torchvision: one factor, > 1 enlarges; keras: a factor
        per axis, drawn independently, > 1 shrinks the content (Keras' zoom_range).
    shear: x-shear drawn uniformly in ±shear degrees (0 <= shear < 90).
    brightness / contrast / saturation: ranges of multiplicative factors (0 <= a <= b);
        brightness multiplies, contrast blends with the sample's mean grey, saturation
        blends with each pixel's grey (0.299/0.587/0.114), each clamped to the pixel range.
    fill: what is sampled outside the stored image: ``reflect`` (mirror, edge pixel
        repeated), ``nearest`` (the edge pixel), ``constant`` (`fill_value`, on the stored
        0-255 scale).
    center_crop: a deterministic centre crop instead of a random one: the largest centred
        box of the output's aspect ratio with its sides multiplied by `center_crop`
        (0 < center_crop <= 1); `scale` and `ratio` must stay (1, 1). See `Augment.center`.
    convention: ``torchvision`` (default) or ``keras`` (ImageDataGenerator's transform, which
        allows no random crop; `Augment.from_keras` sets it).
    rescale: multiplies the pixels after the colour factors instead of `to_device`'s
        ``scale`` (Keras' rescale); None: `to_device` decides.

    Anything invalid raises ConfigError naming the option, an unknown option too. Numbers
    may be numpy scalars.
    """

    size: int | tuple[int, int] | None = None
    scale: _Pair = (1.0, 1.0)
    ratio: _Pair = (1.0, 1.0)
    hflip: float = 0.0
    vflip: float = 0.0
    degrees: float = 0.0
    translate: _Pair = (0.0, 0.0)
    zoom: _Pair = (1.0, 1.0)
    shear: float = 0.0
    brightness: _Pair = (1.0, 1.0)
    contrast: _Pair = (1.0, 1.0)
    saturation: _Pair = (1.0, 1.0)
    fill: Fill = "reflect"
    fill_value: float = 0.0
    center_crop: float | None = None
    convention: Convention = "torchvision"
    rescale: float | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Augment:
        # Ahead of the dataclass __init__, whose TypeError for a stray keyword is not ours.
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if args or unknown:
            what = f"unknown option(s) {', '.join(unknown)}" if unknown else "options go by name"
            raise ConfigError(f"Augment: {what}; options: {', '.join(names)}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the stored values once, here
        set_(self, "size", _size(self.size))
        for name in ("scale", "ratio", "translate", "zoom", "brightness", "contrast", "saturation"):
            set_(self, name, _pair(name, getattr(self, name)))
        for name in ("hflip", "vflip", "degrees", "shear", "fill_value"):
            set_(self, name, _number(name, getattr(self, name)))
        if self.center_crop is not None:
            set_(self, "center_crop", _number("center_crop", self.center_crop))
        if self.rescale is not None:
            set_(self, "rescale", _number("rescale", self.rescale))
        self._check_ranges()
        self._check_combinations()

    def _check_ranges(self) -> None:
        _ordered("scale", self.scale, low=0.0, high=1.0, open_low=True)
        _ordered("ratio", self.ratio, low=0.0, open_low=True)
        _ordered("zoom", self.zoom, low=0.0, open_low=True)
        for name in ("brightness", "contrast", "saturation"):
            _ordered(name, getattr(self, name), low=0.0)
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"Augment: {name} is a probability (0-1); got {getattr(self, name)}")
        if not 0.0 <= self.degrees <= 360.0:
            raise ConfigError(f"Augment: degrees must be 0-360; got {self.degrees}")
        if not 0.0 <= self.shear < 90.0:
            raise ConfigError(f"Augment: shear must be 0 <= shear < 90 degrees; got {self.shear}")
        if self.fill not in FILLS:
            raise ConfigError(f"Augment: fill must be one of {', '.join(FILLS)}; got {self.fill!r}")
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"Augment: convention must be one of {', '.join(CONVENTIONS)}; "
                              f"got {self.convention!r}")
        if self.center_crop is not None and not 0.0 < self.center_crop <= 1.0:
            raise ConfigError(f"Augment: center_crop must be 0 < center_crop <= 1; got {self.center_crop}")
        if self.rescale is not None and self.rescale <= 0.0:
            raise ConfigError(f"Augment: rescale must be positive; got {self.rescale}")
        if any(t < 0.0 for t in self.translate):
            raise ConfigError(f"Augment: translate must be >= 0; got {self.translate}")

    def _check_combinations(self) -> None:
        if self.convention == "torchvision" and any(t > 1.0 for t in self.translate):
            raise ConfigError(f"Augment: translate holds fractions of width and height (0-1); got "
                              f"{self.translate} (pixels only with convention='keras')")
        cropped = self.scale != (1.0, 1.0) or self.ratio != (1.0, 1.0)
        if self.center_crop is not None and cropped:
            raise ConfigError("Augment: center_crop (a fixed centre crop) and scale/ratio (a random crop) "
                              "exclude each other; leave scale and ratio at (1, 1)")
        if self.convention == "keras" and (cropped or self.center_crop is not None):
            raise ConfigError("Augment: convention='keras' has no crop: leave scale, ratio and "
                              "center_crop at their defaults")

    @property
    def random_crop(self) -> bool:
        """Whether the crop box is drawn (RandomResizedCrop) rather than centred."""
        return self.scale != (1.0, 1.0) or self.ratio != (1.0, 1.0)

    def output_size(self, stored: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the augmented images for images stored at `stored` (h, w)."""
        return stored if self.size is None else self.size  # type: ignore[return-value]

    @classmethod
    def imagenet(cls, size: int | tuple[int, int] = 224) -> Augment:
        """The standard ImageNet training recipe: RandomResizedCrop(size, scale 0.08-1, ratio
        3/4-4/3) and a horizontal flip with probability 0.5."""
        return cls(size=size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)

    @classmethod
    def center(cls, size: int | tuple[int, int], fraction: float = 1.0) -> Augment:
        """Deterministic evaluation crop: the largest centred box of the output's aspect
        ratio, sides × `fraction`, resized to `size`. ``fraction=1`` is torchvision's
        ``Resize(size) + CenterCrop(size)``; images stored at 256 and ``center(224,
        fraction=0.875)`` give the classic evaluation crop (the centre 224 × 224, not
        resampled)."""
        return cls(size=size, center_crop=fraction)

    @classmethod
    def from_keras(cls, **kwargs: Any) -> Augment:
        """The `Augment` of ``keras.preprocessing.image.ImageDataGenerator(**kwargs)``.

        Honoured: rotation_range, width_shift_range, height_shift_range (a fraction of the
        width/height when < 1, else pixels, drawn uniformly), zoom_range (a float z: [1-z,
        1+z], or a pair), shear_range (degrees), horizontal_flip, vertical_flip (p = 0.5),
        brightness_range (a multiplicative pair), fill_mode (constant, nearest, reflect),
        cval, rescale. Options Keras has but shardkit cannot honour (featurewise_center,
        samplewise_center, the std normalisations, zca_whitening, zca_epsilon,
        channel_shift_range, preprocessing_function, data_format, validation_split, dtype,
        interpolation_order other than 1, fill_mode='wrap', an int or a list as a shift
        range) raise ConfigError naming them, unless given at Keras' default value. Unknown
        names raise ConfigError too.
        """
        from shardkit.reader.augment_keras import keras_options

        options = keras_options(kwargs)
        try:
            return cls(**options)
        except ConfigError as error:  # name the Keras arguments the bad value came from
            raise ConfigError(f"Augment.from_keras({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): "
                              f"{error}") from None


def _size(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if as_integer(value) is not None:
        value = (value, value)
    sides = tuple(as_integer(v) for v in value) if isinstance(value, (tuple, list)) else ()
    if len(sides) == 2 and all(v is not None and 0 < v <= 65535 for v in sides):
        return (sides[0], sides[1])  # type: ignore[return-value]  # both checked above
    raise ConfigError(f"Augment: size must be a positive int or (height, width); got {value!r}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"Augment: {name} must be a finite number; got {value!r}")
    return float(value)


def _pair(name: str, value: object) -> _Pair:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"Augment: {name} must be a pair of numbers; got {value!r}")
    return (_number(name, value[0]), _number(name, value[1]))


def _ordered(name: str, value: _Pair, *, low: float, high: float = math.inf,
             open_low: bool = False) -> None:
    a, b = value
    above = a > low if open_low else a >= low
    if not (above and a <= b <= high):
        bound = f"{low} {'<' if open_low else '<='} a <= b" + (f" <= {high}" if high < math.inf else "")
        raise ConfigError(f"Augment: {name} must be a range (a, b) with {bound}; got {value}")



