"""`Augment.from_keras`: ImageDataGenerator's keyword arguments read as Keras reads them.

Keras' own code (``keras.src.legacy.preprocessing.image``, the same in keras-preprocessing)
is the reference: ``get_random_transform`` draws the rotation uniformly in ±rotation_range
degrees, each shift uniformly in ±range (× the image side when the range is < 1), x and y
zoom independently in zoom_range, each flip with p = 0.5, brightness uniformly in
brightness_range; ``apply_transform`` then applies one affine (rotation · shift · shear ·
zoom about the centre, scipy order 1), the flips, and PIL's brightness enhancer.

One deliberate difference: since keras-preprocessing PR #318, Keras applies
height_shift_range horizontally and width_shift_range vertically (keras #17398, tf-keras
#310), and centres the transform at (h/2, w/2) read as (x, y). shardkit follows the
documented meaning (width_shift_range moves along the width) and the true centre; the two
agree on square images with equal shift ranges.
"""

from __future__ import annotations

import numbers
from typing import Any

from shardkit.errors import ConfigError

__all__ = ["KERAS_UNSUPPORTED", "keras_options"]

#: ImageDataGenerator options shardkit cannot honour, with Keras' default (accepted, since it
#: changes nothing) and where to go instead.
KERAS_UNSUPPORTED: dict[str, tuple[object, str]] = {
    "featurewise_center": (False, "pass the dataset mean to to_device(mean=...)"),
    "featurewise_std_normalization": (False, "pass the dataset std to to_device(std=...)"),
    "samplewise_center": (False, "per-image statistics are not supported"),
    "samplewise_std_normalization": (False, "per-image statistics are not supported"),
    "zca_whitening": (False, "ZCA whitening is not supported"),
    "zca_epsilon": (1e-6, "ZCA whitening is not supported"),
    "channel_shift_range": (0.0, "channel shifts are not supported"),
    "preprocessing_function": (None, "apply it to to_device's output instead"),
    "data_format": ("channels_last", "the batches are NHWC; to_device(channels_last=...) "
                    "sets the memory layout of its NCHW output"),
    "validation_split": (0.0, "split at conversion: shardkit convert --validation-split"),
    "dtype": (None, "the dtype is to_device(dtype=...)'s"),
    "interpolation_order": (1, "only bilinear (order 1) resampling is supported"),
}

_KERAS_HONOURED = ("rotation_range", "width_shift_range", "height_shift_range", "brightness_range",
                   "shear_range", "zoom_range", "fill_mode", "cval", "horizontal_flip",
                   "vertical_flip", "rescale")


def keras_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`Augment` keyword arguments equivalent to ``ImageDataGenerator(**kwargs)``; raises
    ConfigError naming any argument that cannot be honoured or is not Keras'."""
    for name, value in kwargs.items():
        if name in KERAS_UNSUPPORTED:
            default, instead = KERAS_UNSUPPORTED[name]
            if not _same(value, default):
                raise ConfigError(f"Augment.from_keras: {name}={value!r} cannot be honoured ({instead})")
        elif name not in _KERAS_HONOURED:
            raise ConfigError(f"Augment.from_keras: {name!r} is not an ImageDataGenerator argument")
    fill = kwargs.get("fill_mode", "nearest")
    if fill == "wrap":
        raise ConfigError("Augment.from_keras: fill_mode='wrap' cannot be honoured "
                          "(use constant, nearest or reflect)")
    flip = {True: 0.5, False: 0.0}
    rescale = kwargs.get("rescale")
    return {
        "convention": "keras",
        "degrees": _keras_number("rotation_range", kwargs.get("rotation_range", 0)),
        "translate": (_shift("width_shift_range", kwargs.get("width_shift_range", 0.0)),
                      _shift("height_shift_range", kwargs.get("height_shift_range", 0.0))),
        "zoom": _zoom(kwargs.get("zoom_range", 0.0)),
        "shear": _keras_number("shear_range", kwargs.get("shear_range", 0.0)),
        "hflip": flip[bool(kwargs.get("horizontal_flip", False))],
        "vflip": flip[bool(kwargs.get("vertical_flip", False))],
        "brightness": _brightness(kwargs.get("brightness_range")),
        "fill": fill,
        "fill_value": _keras_number("cval", kwargs.get("cval", 0.0)),
        # Keras skips rescaling when rescale is None or 0: its images stay on the 0-255 scale.
        "rescale": float(rescale) if rescale else 1.0,
    }


def _same(value: object, default: object) -> bool:
    if default is None or isinstance(default, bool):
        return value is default or (default is False and value is None)
    if isinstance(default, str):  # data_format: None is Keras' "channels_last" too
        return value is None or value == default
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == default


def _keras_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"Augment.from_keras: {name} must be a number; got {value!r}")
    return float(value)


def _shift(name: str, value: object) -> float:
    """A shift range as Keras reads a float: a fraction of the side when < 1, else pixels."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value != 0:
        # Keras draws np.random.choice(n): whole pixels from range(n), times a random sign.
        raise ConfigError(f"Augment.from_keras: {name}={value} (an int) makes Keras draw whole-pixel "
                          f"shifts from range({value}); shardkit draws continuous shifts: pass "
                          f"{float(value)} for a uniform ±{value} px, or a fraction of the side")
    if isinstance(value, (list, tuple)):
        raise ConfigError(f"Augment.from_keras: {name}={value!r} (a list of shifts to choose "
                          "from) cannot be honoured; pass one float")
    return _keras_number(name, value)


def _zoom(value: object) -> tuple[float, float]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        low, high = 1.0 - float(value), 1.0 + float(value)
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = (_keras_number("zoom_range", v) for v in value)
    else:
        raise ConfigError(f"Augment.from_keras: zoom_range must be a float or a pair; got {value!r}")
    if not 0.0 < low <= high:
        raise ConfigError(f"Augment.from_keras: zoom_range {value!r} gives zoom factors "
                          f"[{low}, {high}]; they must be positive and in order")
    return (low, high)


def _brightness(value: object) -> tuple[float, float]:
    if value is None:
        return (1.0, 1.0)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"Augment.from_keras: brightness_range must be a pair; got {value!r}")
    low, high = (_keras_number("brightness_range", v) for v in value)
    return (low, high)
