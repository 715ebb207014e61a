"""Decode, orient, normalise and resize one image; encode it for a shard.

Policy (docs/format.md repeats it for users):

* Formats are recognised by content, from an allow-list (`ALLOWED_FORMATS`); the file
  extension only selects candidates when walking a folder.
* The pixel limit is checked from the header, before any pixel is decoded.
* JPEG ``draft()`` decodes at 1/2, 1/4 or 1/8 scale when the output is at least that much
  smaller, then one antialiased resize finishes the job.
* Baseline and progressive RGB/L JPEGs are decoded by libjpeg-turbo through `simplejpeg`
  (Pillow still reads the header: size, mode, EXIF, and picks the draft scale), which gives
  Pillow's own pixels with less overhead (the two bundle the same libjpeg-turbo, with the
  same IDCT and upsampling); anything else, or anything simplejpeg refuses, goes through
  Pillow as before. Output bytes do not depend on which of the two decoded.
* EXIF orientation is applied before resizing. Animated images use their first frame.
* Modes: 1, L, P, RGB, CMYK, YCbCr, LAB, HSV → RGB; anything with alpha (RGBA, LA, PA, and P,
  1, L, 16-bit or RGB with a transparency key) is composited on ``ImageOptions.background``
  (white by default); 16-bit (I;16*, I) is scaled to 8 bits (v * 255 / 65535, rounded),
  never clipped at 255; float (F) is clipped to 0-255. ``mode="L"`` then takes the ITU-R 601-2 luma.

Failures are raised as `ImageFailure` (a reason code and a human detail); the conversion task
turns them into error-report records, so one bad file never stops a run.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import warnings
from collections.abc import Iterator
from typing import BinaryIO, Final

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, UnidentifiedImageError

from shardkit.config import ImageOptions

__all__ = [
    "ALLOWED_FORMATS",
    "IMAGE_EXTENSIONS",
    "ImageFailure",
    "encode",
    "load_image",
    "load_image_bytes",
    "pillow_limits",
]

#: Pillow format names we decode. Anything else is "not_an_image", whatever its extension.
#: MPO (multi-picture JPEG) is opened by Pillow's JPEG opener and has no opener of its own:
#: naming it in ``Image.open(formats=...)`` raises KeyError for every non-JPEG input.
ALLOWED_FORMATS: Final = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

#: Extensions (lower case) that make a file a candidate input when walking a folder.
IMAGE_EXTENSIONS: Final = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff",
     ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)

_FILTERS: Final = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG: Final = 0x0112
_SIXTEEN_BIT: Final = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES: Final = ("RGBA", "LA", "PA", "La", "RGBa")


#: Files up to this size are read whole before decoding (one read for Pillow's header
#: parsing and libjpeg-turbo both; a read error is ``read/unreadable``); a larger one is
#: handed to Pillow as a file (a read error then surfaces as Pillow's ``decode_error``).
_READ_AT_ONCE: Final = 64 * 1024 * 1024

#: The details of ``empty_file`` and ``missing_file`` failures, for a local file or a fetched
#: object alike (the same inputs give the same errors.jsonl wherever SRC is).
EMPTY_FILE = "file is empty (0 bytes)"
MISSING_FILE = "file not found"


class ImageFailure(Exception):
    """One input could not be converted. `stage` and `reason` are stable codes."""

    def __init__(self, stage: str, reason: str, detail: str) -> None:
        super().__init__(f"{stage}/{reason}: {detail}")
        self.stage = stage
        self.reason = reason
        self.detail = detail


class _PillowLimits:
    """Pillow's process-wide limits, set while any task runs in this process.

    Pillow's own bomb check (at open, with its own numbers: it refuses 2 × MAX_IMAGE_PIXELS)
    is switched off: `load_image` checks ``options.max_pixels`` from the header itself, before
    decoding, and its message quotes the configured limit. Warnings about odd EXIF or palette
    transparency are noise in a worker: the outcome of each input is decided by exceptions and
    recorded. Tasks may share a process as threads (a Dask worker runs ``--nthreads`` tasks at
    once): the first task in sets the globals and the last one out restores them, so one task
    finishing never restores Pillow's defaults under another. The values do not depend on the
    task's options, so tasks of different configs can share them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._stack.enter_context(self._set())
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._stack.close()

    @staticmethod
    @contextlib.contextmanager
    def _set() -> Iterator[None]:
        saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
        Image.MAX_IMAGE_PIXELS = None
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


#: ``with pillow_limits(): ...`` around a task's decoding (see `_PillowLimits`). One per
#: process, like the Pillow globals it guards.
pillow_limits = _PillowLimits().hold


def load_image(path: str | os.PathLike[str], options: ImageOptions, *,
               fast: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `path` into a resized RGB or L image.

    Returns (image, (width, height) of the source after orientation). Raises `ImageFailure`.
    fast: decode what it can with libjpeg-turbo directly (see the module docstring); False
    decodes everything with Pillow (the same pixels, for comparisons).
    """
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except FileNotFoundError:
        raise ImageFailure("read", "missing_file", MISSING_FILE) from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ImageFailure("read", "unreadable", exc.strerror or str(exc)) from None
    except OSError as exc:
        raise ImageFailure("read", "unreadable", str(exc)) from None
    try:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise ImageFailure("read", "empty_file", EMPTY_FILE)
        if size > _READ_AT_ONCE:
            return _decode(handle, options, fast)  # Pillow reads what it needs
        try:
            data = handle.read()  # one read for Pillow's header parsing and libjpeg-turbo both
        except OSError as exc:
            raise ImageFailure("read", "unreadable", str(exc)) from None
        return _decode(io.BytesIO(data), options, fast)
    finally:
        handle.close()


def load_image_bytes(data: bytes, options: ImageOptions) -> tuple[Image.Image, tuple[int, int]]:
    """`load_image` for an image held in memory (a Hugging Face dataset's bytes)."""
    if not data:
        raise ImageFailure("read", "empty_file", "the image bytes are empty")
    return _decode(io.BytesIO(data), options, True)


def _decode(handle: BinaryIO, options: ImageOptions,
            fast: bool) -> tuple[Image.Image, tuple[int, int]]:
    with _decoding():
        try:
            im = Image.open(handle, formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageFailure("decode", "not_an_image", "not a recognised image (allowed: "
                               + ", ".join(ALLOWED_FORMATS) + ")") from None

    width, height = im.size
    if width * height > options.max_pixels:
        raise ImageFailure(
            "decode", "too_many_pixels",
            f"{width}x{height} = {width * height} pixels exceeds the limit of {options.max_pixels}",
        )
    jpeg = im.format in ("JPEG", "MPO")
    if not jpeg:
        # Decode now, so that a decoding error is a failure: reading the EXIF loads some
        # formats (a PNG without an eXIf chunk before its pixels), and a load that failed
        # there would leave partial pixels that a second load() returns without a word. A
        # JPEG's EXIF never loads it, and it must not be loaded before draft() (nor decoded
        # twice: libjpeg-turbo may decode it below).
        with _decoding():
            im.load()
    try:
        orientation = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block: the pixels are fine, take them as they are
        orientation = 1
    swap = orientation in (5, 6, 7, 8)
    oriented = (height, width) if swap else (width, height)
    if jpeg and options.draft:
        need = _needed_size(oriented, options)
        if need is not None:
            im.draft(None, (need[1], need[0]) if swap else need)
    with _decoding():
        decoded = _turbo_jpeg(im, handle) if fast else None
        if decoded is None:
            im.load()
            decoded = im
    try:
        upright = decoded.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else decoded
        return resize(normalise_mode(upright, options), options, source_size=oriented), oriented
    except (OSError, ValueError) as exc:
        raise ImageFailure("transform", "transform_error", _describe(exc)) from None


def _turbo_jpeg(im: Image.Image, handle: BinaryIO) -> Image.Image | None:
    """`im` (opened, drafted, not loaded) decoded by libjpeg-turbo at its drafted size, or
    None when Pillow must decode it: not a plain JPEG (MPO, CMYK, YCCK), or refused by
    simplejpeg's strict mode (Pillow then decides, with its own error, as before).

    The draft scale 1/s is the only n/8 factor giving im.size once the image is 8 pixels or
    more on a side (a smaller factor is short by a pixel), so libjpeg-turbo scales exactly as
    Pillow's draft does.
    """
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    width, height = im.size
    handle.seek(0)
    data = handle.read()
    try:
        full_h, full_w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray", "RGB") or (colorspace == "Gray") != (im.mode == "L"):
            return None
        if (full_w, full_h) != (width, height) and max(full_w, full_h) < 8:
            return None
        pixels = simplejpeg.decode_jpeg(data, colorspace="gray" if im.mode == "L" else "rgb",
                                        min_height=height, min_width=width)
    except ValueError:
        return None
    if pixels.shape[:2] != (height, width):
        return None
    decoded = Image.fromarray(pixels[:, :, 0] if im.mode == "L" else pixels)
    # What Pillow's loaded image carries on: encoding writes some of it (a PNG takes the
    # ICC profile, a JPEG the comment), so the output bytes stay the same.
    decoded.info = dict(im.info)
    return decoded


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Opening or decoding an image: Pillow's and libjpeg-turbo's errors become
    `ImageFailure`s of stage ``decode`` (``too_many_pixels``, ``truncated``, ``decode_error``,
    ``out_of_memory``); an `ImageFailure` raised inside passes as it is."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise ImageFailure("decode", "too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise ImageFailure("decode", _decode_reason(exc), _describe(exc)) from None
    except MemoryError:
        raise ImageFailure("decode", "out_of_memory", "ran out of memory decoding") from None


def _decode_reason(exc: BaseException) -> str:
    # Pillow says "image file is truncated" or "Truncated File Read" depending on where
    # the data ran out (pixel data or header tables).
    return "truncated" if "truncated" in str(exc).lower() else "decode_error"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _needed_size(oriented: tuple[int, int], options: ImageOptions) -> tuple[int, int] | None:
    """The smallest decode size (oriented frame) the final resize can start from, or None
    when the output is not smaller than the source."""
    w, h = oriented
    out_w, out_h = options.size
    if options.resize == "center-crop":
        scale = max(out_w / w, out_h / h)
    elif options.resize == "pad":
        scale = min(out_w / w, out_h / h)
    elif options.resize == "stretch":
        return (out_w, out_h) if out_w < w and out_h < h else None
    else:  # shorter-side
        scale = out_w / min(w, h)
    if scale >= 1.0:
        return None
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def normalise_mode(im: Image.Image, options: ImageOptions) -> Image.Image:
    """Bring any supported mode to RGB or L as the module docstring describes."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        wide = np.asarray(im, dtype=np.int64)
        scaled = (np.clip(wide, 0, 65535) * 255 + 32767) // 65535
        im = _keyed(scaled.astype(np.uint8), wide, im.info.get("transparency"))
    elif mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).round().astype(np.uint8), mode="L")
    elif mode == "1":
        im = im.convert("LA" if "transparency" in im.info else "L")  # Pillow keys 1-bit alpha
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "L" and "transparency" in im.info:
        im = im.convert("LA")
    elif mode == "RGB" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        im = _composite(im, options.background)
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    if im.mode != options.mode:
        im = im.convert(options.mode)
    return im


def _keyed(grey: np.ndarray, raw: np.ndarray, key: object) -> Image.Image:
    """The L image `grey`, or, with a transparency `key` (a 16-bit grey PNG's tRNS, which
    Pillow's convert drops), LA whose pixels of `raw` value `key` are transparent: composited
    on the background as any alpha."""
    if not isinstance(key, int) or isinstance(key, bool):
        return Image.fromarray(grey, mode="L")
    alpha = np.where(raw == key, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([grey, alpha]))


def _composite(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def resize(im: Image.Image, options: ImageOptions,
           source_size: tuple[int, int] | None = None) -> Image.Image:
    """Resize an oriented RGB/L image by ``options.resize``; see `ImageOptions`.

    source_size: the oriented size before JPEG draft scaling. Output shapes (shorter-side,
    pad) are computed from it, so they never depend on whether draft was used.
    """
    method = _FILTERS[options.filter]
    out_w, out_h = options.size
    w, h = im.size
    src_w, src_h = source_size or (w, h)
    if options.resize == "stretch":
        return im if (w, h) == (out_w, out_h) else im.resize((out_w, out_h), method)
    if options.resize == "shorter-side":
        scale = out_w / min(src_w, src_h)
        size = (max(1, round(src_w * scale)), max(1, round(src_h * scale)))
        return im if size == (w, h) else im.resize(size, method)
    if options.resize == "center-crop":
        return im.resize((out_w, out_h), method, box=_center_box(w, h, out_w, out_h))
    return _letterbox(im, method, (src_w, src_h), options.size, options.pad_color)


def _center_box(w: int, h: int, out_w: int, out_h: int) -> tuple[float, float, float, float]:
    """The centred region of a w×h image with the output's aspect ratio (as ImageOps.fit)."""
    if w / h >= out_w / out_h:
        crop_w, crop_h = out_w / out_h * h, float(h)
    else:
        crop_w, crop_h = float(w), w / (out_w / out_h)
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


def _letterbox(im: Image.Image, method: Image.Resampling, source: tuple[int, int],
               out: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    """Fit inside `out` keeping the aspect ratio of `source`, centred on `color` (as
    ImageOps.pad)."""
    (w, h), (out_w, out_h) = source, out
    if w / h > out_w / out_h:
        size = (out_w, max(1, round(h / w * out_w)))
    elif w / h < out_w / out_h:
        size = (max(1, round(w / h * out_h)), out_h)
    else:
        size = (out_w, out_h)
    fitted = im if size == im.size else im.resize(size, method)
    if size == (out_w, out_h):
        return fitted
    fill: float | tuple[int, ...] | None = color
    if im.mode == "L":
        # Pillow's own RGB→L luma, so the padding agrees with convert("L") of the same colour.
        fill = Image.new("RGB", (1, 1), color).convert("L").getpixel((0, 0))
    canvas = Image.new(im.mode, (out_w, out_h), fill)
    canvas.paste(fitted, (round((out_w - size[0]) / 2), round((out_h - size[1]) / 2)))
    return canvas


def encode(im: Image.Image, codec: str, quality: int) -> bytes:
    """Encode a final image as JPEG or PNG bytes, deterministically."""
    buffer = io.BytesIO()
    if codec == "jpeg":
        im.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    elif codec == "png":
        im.save(buffer, format="PNG", compress_level=6)
    else:
        raise ValueError(f"encode() takes jpeg or png, not {codec!r}")
    return buffer.getvalue()
