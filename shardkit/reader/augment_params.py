"""Per-sample augmentation parameters: drawn from (seed, epoch, sample index), composed
into one affine per sample, packed into one float32 row per sample.

The generator is counter-based: every uniform is a splitmix64 hash of (seed, epoch, stored
index, draw number), so a sample's augmentation depends on nothing else — not on its batch,
position, rank, worker count or a resume cut — and a new epoch gives new draws. Everything
is vectorised over the batch in numpy; no Python runs per sample.

The row (``COLUMNS``) carries what `augment_apply` needs without being told the `Augment`
again: the 2×3 matrix mapping output to input in ``affine_grid``'s normalised coordinates
(``align_corners=False``), the colour factors, the output and expected input sizes, the fill
mode and value, the rescale factor, the pyramid level for antialiasing, and the flips drawn
(for inspection; they are already in the matrix). A rescale of 0 leaves the factor to
`to_device`'s ``scale``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from shardkit.errors import ConfigError
from shardkit.format.manifest import Manifest
from shardkit.reader.augment import Augment

__all__ = ["COLUMNS", "FILL_CODES", "Draws", "compose", "draw", "draw_params", "stored_size", "uniforms"]

COLUMNS: tuple[str, ...] = (
    "t00", "t01", "t02", "t10", "t11", "t12",      # output → input, normalised coordinates
    "brightness", "contrast", "saturation",
    "out_h", "out_w", "in_h", "in_w",
    "fill", "fill_value", "rescale", "level", "hflip", "vflip",
)
COL = {name: i for i, name in enumerate(COLUMNS)}
#: fill column codes. 2 blends with fill_value across the edge (bilinear with a constant
#: border, like grid_sample's zeros); 3 is scipy's "constant" that Keras uses: a sample
#: point outside the outermost pixel centres takes fill_value outright.
FILL_CODES = {"reflect": 0, "nearest": 1, "constant": 2, "constant-hard": 3}
#: Most pyramid levels used for antialiasing (a 2**6 = 64× shrink).
MAX_LEVEL = 6

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM = np.uint64(0x5AF3_6B9D_A7C4_1E27)  # keeps these draws apart from other seeded uses
# Slots of the uniforms each sample draws: fixed, so one option never shifts another's draws.
_ATTEMPTS = 10  # RandomResizedCrop's tries
_CROP = 0  # 4 per attempt: area, log-ratio, y, x
_HFLIP, _VFLIP, _ANGLE, _TX, _TY, _ZX, _ZY, _SHEAR, _BRIGHT, _CONTRAST, _SAT = range(40, 51)
_DRAWS = 51


class Draws(NamedTuple):
    """One batch's drawn parameters, one row per sample."""

    box: np.ndarray      # [B, 4] crop box in stored pixels: top, left, height, width
    hflip: np.ndarray    # [B] bool
    vflip: np.ndarray    # [B] bool
    angle: np.ndarray    # [B] degrees
    shift: np.ndarray    # [B, 2] (x, y) in output pixels
    zoom: np.ndarray     # [B, 2] (x, y); torchvision uses x for both
    shear: np.ndarray    # [B] degrees
    colour: np.ndarray   # [B, 3] brightness, contrast, saturation


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arrays wrap silently, as the hash needs)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    out: np.ndarray = z ^ (z >> np.uint64(31))
    return out


def uniforms(seed: int, epoch: int, index: np.ndarray, count: int) -> np.ndarray:
    """float64 [B, count] in [0, 1): uniform j of sample `index[b]` in (`seed`, `epoch`)."""
    key = np.array([seed % 2**64], dtype=np.uint64)
    key = _mix(_mix(key ^ _STREAM) + np.array([epoch % 2**64], dtype=np.uint64) * _GOLDEN)
    per_sample = _mix(key + np.asarray(index, dtype=np.int64).astype(np.uint64) * _GOLDEN)
    slots = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
    bits = _mix(_mix(per_sample[:, None] ^ slots[None, :]))
    return np.asarray((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def _between(u: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    return bounds[0] + u * (bounds[1] - bounds[0])


def draw(augment: Augment, *, seed: int, epoch: int, index: np.ndarray,
         stored: tuple[int, int]) -> Draws:
    """The parameters of samples `index` (stored positions) for images stored at
    `stored` (height, width)."""
    u = uniforms(seed, epoch, index, _DRAWS)
    out_h, out_w = augment.output_size(stored)
    keras = augment.convention == "keras"
    zx = _between(u[:, _ZX], augment.zoom)
    zy = _between(u[:, _ZY], augment.zoom) if keras else zx
    shift = np.stack([_between(u[:, _TX], (-1.0, 1.0)) * _shift_extent(augment.translate[0], out_w, keras),
                      _between(u[:, _TY], (-1.0, 1.0)) * _shift_extent(augment.translate[1], out_h, keras)],
                     axis=1)
    colour = np.stack([_between(u[:, slot], bounds) for slot, bounds in (
        (_BRIGHT, augment.brightness), (_CONTRAST, augment.contrast), (_SAT, augment.saturation))], axis=1)
    return Draws(box=crop_boxes(augment, u, stored), hflip=u[:, _HFLIP] < augment.hflip,
                 vflip=u[:, _VFLIP] < augment.vflip,
                 angle=_between(u[:, _ANGLE], (-augment.degrees, augment.degrees)),
                 shift=shift, zoom=np.stack([zx, zy], axis=1),
                 shear=_between(u[:, _SHEAR], (-augment.shear, augment.shear)), colour=colour)


def _shift_extent(value: float, side: int, keras: bool) -> float:
    # Keras: a range below 1 is a fraction of the side, otherwise pixels.
    return value if keras and value >= 1.0 else value * side


def crop_boxes(augment: Augment, u: np.ndarray, stored: tuple[int, int]) -> np.ndarray:
    """[B, 4] (top, left, height, width): RandomResizedCrop's boxes (continuous), or the
    centred box of the output's aspect when there is no random crop."""
    height, width = stored
    n = len(u)
    if not augment.random_crop:
        out_h, out_w = augment.output_size(stored)
        aspect = out_w / out_h
        box_h, box_w = (height, height * aspect) if width / height > aspect else (width / aspect, width)
        fraction = 1.0 if augment.center_crop is None else augment.center_crop
        box_h, box_w = box_h * fraction, box_w * fraction
        box = [(height - box_h) / 2, (width - box_w) / 2, box_h, box_w]
        return np.tile(np.asarray(box, dtype=np.float64), (n, 1))
    tries = u[:, _CROP:_CROP + 4 * _ATTEMPTS].reshape(n, _ATTEMPTS, 4)
    area = height * width * _between(tries[..., 0], augment.scale)
    log_ratio = np.log(np.asarray(augment.ratio))
    ratio = np.exp(_between(tries[..., 1], (float(log_ratio[0]), float(log_ratio[1]))))
    cw, ch = np.sqrt(area * ratio), np.sqrt(area / ratio)
    fits = (cw <= width) & (ch <= height)
    first = np.argmax(fits, axis=1)  # the first attempt that fits, as torchvision takes it
    rows = np.arange(n)
    ch, cw = ch[rows, first], cw[rows, first]
    top = tries[rows, first, 2] * (height - ch)
    left = tries[rows, first, 3] * (width - cw)
    # No attempt fits: torchvision's fallback, the whole image with its aspect clamped into
    # `ratio`, centred.
    in_ratio = width / height
    low, high = augment.ratio
    fb_h, fb_w = ((width / low, width) if in_ratio < low else
                  (height, height * high) if in_ratio > high else (height, width))
    missed = ~fits.any(axis=1)
    ch, cw = np.where(missed, fb_h, ch), np.where(missed, fb_w, cw)
    top = np.where(missed, (height - fb_h) / 2, top)
    left = np.where(missed, (width - fb_w) / 2, left)
    return np.stack([top, left, ch, cw], axis=1)


def _affine(augment: Augment, d: Draws) -> tuple[np.ndarray, np.ndarray]:
    """The flips and the affine as a map from centred output pixels to centred pixels of the
    resized crop: linear [B, 2, 2] and offset [B, 2]."""
    rot, shear = np.radians(d.angle), np.radians(d.shear)
    cos, sin = np.cos(rot), np.sin(rot)
    flips = np.stack([np.where(d.hflip, -1.0, 1.0), np.where(d.vflip, -1.0, 1.0)], axis=1)
    if augment.convention == "keras":
        # Keras' matrix is already output → input: rotation · shift · shear · zoom about the
        # centre; its flips come after the affine, so they act on the output side.
        zx, zy = d.zoom[:, 0], d.zoom[:, 1]
        linear = np.stack([np.stack([cos * zx, (-cos * np.sin(shear) - sin * np.cos(shear)) * zy], -1),
                           np.stack([sin * zx, (-sin * np.sin(shear) + cos * np.cos(shear)) * zy], -1)], 1)
        rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)
        offset = np.einsum("bij,bj->bi", rotation, d.shift)
        return linear * flips[:, None, :], offset
    # torchvision's _get_inverse_affine_matrix (centre 0, x-shear only), then the flips,
    # which come before the affine, on the input side.
    tan = np.tan(shear)
    a, b, c, dd = cos, -(cos * tan + sin), sin, cos - sin * tan
    zoom = d.zoom[:, 0]
    linear = np.stack([np.stack([dd, -b], -1), np.stack([-c, a], -1)], 1) / zoom[:, None, None]
    offset = -np.einsum("bij,bj->bi", linear, d.shift)
    return linear * flips[:, :, None], offset * flips


def compose(augment: Augment, d: Draws, stored: tuple[int, int]) -> np.ndarray:
    """float32 [B, len(COLUMNS)]: `d` as the rows `augment_apply` consumes."""
    height, width = stored
    out_h, out_w = augment.output_size(stored)
    linear, offset = _affine(augment, d)
    top, left, ch, cw = d.box.T
    crop = np.stack([cw / out_w, ch / out_h], axis=1)  # crop box pixels per output pixel
    crop_offset = np.stack([left + cw / 2 - width / 2, top + ch / 2 - height / 2], axis=1)
    pixel_linear = crop[:, :, None] * linear  # input pixels per output pixel
    to_input = np.array([2.0 / width, 2.0 / height])
    theta_linear = to_input[None, :, None] * pixel_linear * np.array([out_w / 2, out_h / 2])[None, None, :]
    theta_offset = to_input[None, :] * (crop * offset + crop_offset)
    rows = np.zeros((len(d.box), len(COLUMNS)), dtype=np.float64)
    rows[:, 0:3] = np.concatenate([theta_linear[:, 0], theta_offset[:, :1]], axis=1)
    rows[:, 3:6] = np.concatenate([theta_linear[:, 1], theta_offset[:, 1:]], axis=1)
    rows[:, COL["brightness"]:COL["saturation"] + 1] = d.colour
    rows[:, COL["out_h"]], rows[:, COL["out_w"]] = out_h, out_w
    rows[:, COL["in_h"]], rows[:, COL["in_w"]] = height, width
    hard = augment.fill == "constant" and augment.convention == "keras"
    rows[:, COL["fill"]] = FILL_CODES["constant-hard" if hard else augment.fill]
    rows[:, COL["fill_value"]] = augment.fill_value
    rows[:, COL["rescale"]] = 0.0 if augment.rescale is None else augment.rescale  # 0: to_device's scale
    rows[:, COL["level"]] = _levels(pixel_linear, min(height, width))
    rows[:, COL["hflip"]], rows[:, COL["vflip"]] = d.hflip, d.vflip
    return rows.astype(np.float32)


def _levels(pixel_linear: np.ndarray, min_side: int) -> np.ndarray:
    """The pyramid level each sample samples from: 0 (the stored image) unless one output
    pixel spans more than 2 stored pixels along an output axis; level L halves the image L
    times, so that the span there is at most 2 (no aliasing from bilinear taps)."""
    footprint = np.linalg.norm(pixel_linear, axis=1).max(axis=1)  # column norms: per output axis
    level = np.ceil(np.log2(np.maximum(footprint, 1.0))) - 1
    top = min(MAX_LEVEL, int(np.log2(max(min_side, 1))))
    return np.asarray(np.clip(level, 0, top))


def draw_params(augment: Augment, *, seed: int, epoch: int, index: np.ndarray,
                stored: tuple[int, int]) -> np.ndarray:
    """float32 [B, len(COLUMNS)]: the augmentation rows of samples `index` (stored
    positions) in `epoch`, for images stored at `stored` (height, width)."""
    index = np.asarray(index, dtype=np.int64)
    return compose(augment, draw(augment, seed=seed, epoch=epoch, index=index, stored=stored), stored)


def stored_size(manifest: Manifest, path: object) -> tuple[int, int]:
    """(height, width) every image of `manifest` is stored at; ConfigError when the dataset
    cannot be augmented (a table, or images of varying size)."""
    shape = manifest.schema.get("image", {}).get("shape", [None])
    if manifest.kind != "images" or len(shape) != 3 or None in shape:
        raise ConfigError(f"{path}: augment needs images converted to one size "
                          f"(this dataset: {manifest.kind}, image shape {shape})")
    return int(shape[0]), int(shape[1])
