"""Decode stored jpeg/png payloads to H×W×C uint8, on a pool of threads in the reading process.

* JPEG goes through libjpeg-turbo by way of `simplejpeg`: it decodes with the GIL released,
  straight into a caller's buffer (a slot of the reusable batch array), with no Python per
  row or tile. Its wheels carry libjpeg-turbo statically (no system library to install),
  and it decodes the same pixels as Pillow, which bundles libjpeg-turbo too (both use the
  accurate integer IDCT and fancy chroma upsampling; tests/test_decode.py checks it).
* Pillow decodes PNG, and every JPEG simplejpeg refuses or would decode differently:
  CMYK/YCCK (simplejpeg's own CMYK→RGB formula is not Pillow's), and anything it rejects
  in strict mode (a warning such as "extraneous bytes" that Pillow tolerates).
* A raw dataset of variable-size images (``--resize shorter-side``) stores ``.npy`` files:
  they are read with numpy (``allow_pickle=False``), never decoded by an image library.
* Modes: ``channels=1`` gives L (Pillow's ITU-R 601-2 luma of a colour image), ``3`` gives
  RGB, ``None`` keeps what is stored (L stays one channel, anything else becomes RGB).

`DecodePool` spreads a batch's payloads over threads: the calling one and ``threads - 1``
helpers, each decoding a contiguous run of slots, so a single loader uses every core
without worker processes. Bad payloads raise `CorruptShardError` naming the sample.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from shardkit.config import usable_cpus
from shardkit.config.common import check_count
from shardkit.errors import CorruptShardError
from shardkit.reader.helpers import Helpers, Share

__all__ = ["DecodePool", "decode", "decode_into", "jpeg_headers", "resolve_decode_threads"]

#: A stored file: bytes from a tar member or a Parquet cell, or a 1-D uint8 array.
Payload = bytes | bytearray | memoryview | np.ndarray

_JPEG_MAGIC: Final = b"\xff\xd8\xff"
_NPY_MAGIC: Final = b"\x93NUMPY"
#: Colour spaces of a JPEG header (simplejpeg's names) that libjpeg-turbo turns into the same
#: RGB or L pixels as Pillow does.
_EXACT_COLORSPACES: Final = frozenset({"YCbCr", "Gray", "RGB"})
_PILLOW_ERRORS: Final = (OSError, SyntaxError, ValueError, EOFError, IndexError,
                         UnidentifiedImageError, Image.DecompressionBombError)


def jpeg_headers(payloads: Sequence[Payload]) -> np.ndarray:
    """[N, 3] int64: (height, width, stored channels) from each payload's JPEG header, the
    channels 1 (grey) or 3 (YCbCr, RGB) for a JPEG libjpeg-turbo decodes as Pillow does, and
    a row of zeros for anything Pillow must decode. A shard's are read once, when it is
    opened, so that its batches decode without reading them again (`DecodePool.start_batch`)."""
    out = np.zeros((len(payloads), 3), dtype=np.int64)
    for i, data in enumerate(payloads):
        header = _jpeg_header(data)
        if header is not None:
            out[i] = header
    return out


def _jpeg_header(data: Payload) -> tuple[int, int, int] | None:
    """(height, width, stored channels) of a JPEG libjpeg-turbo decodes exactly as Pillow,
    else None (not a JPEG, CMYK/YCCK, a header libjpeg-turbo refuses)."""
    if bytes(data[:3]) != _JPEG_MAGIC:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in _EXACT_COLORSPACES:
        return None
    return int(height), int(width), 1 if colorspace == "Gray" else 3


def _fits(height: int, width: int, stored: int, shape: tuple[int, ...]) -> bool:
    """Whether simplejpeg decodes a JPEG of that header (`_jpeg_header`: stored channels 0
    when Pillow must decode it) into an H×W×C slot of `shape` exactly as Pillow would."""
    limit = Image.MAX_IMAGE_PIXELS
    if (height, width) != shape[:2] or (limit is not None and height * width > 2 * limit):
        return False  # another size, or one Pillow refuses as a decompression bomb
    # L of a colour JPEG is Pillow's luma of the RGB pixels, not the stored Y channel; a
    # grey JPEG's RGB is its Y three times over, in both.
    return stored == 1 if shape[2] == 1 else stored > 0 and shape[2] == 3


def _fast_shape(data: Payload, channels: int | None) -> tuple[int, int, int] | None:
    """(H, W, C) that simplejpeg decodes `data` to exactly as Pillow would, or None when
    Pillow must do it. `channels` None: as many as it stores."""
    header = _jpeg_header(data)
    if header is None:
        return None
    height, width, stored = header
    shape = (height, width, stored if channels is None else channels)
    return shape if _fits(*header, shape) else None


def decode_into(data: Payload, out: np.ndarray, channels: int | None = None) -> None:
    """Decode a stored jpeg/png payload into `out` (a writable, C-contiguous H×W×C uint8
    array: a slot of a batch). Raises CorruptShardError when the payload does not decode or
    its size or channel count is not `out`'s. `channels` None: as many as `out` has."""
    if channels is None:
        channels = int(out.shape[2])
    if _fast_shape(data, channels) == out.shape and out.flags.c_contiguous \
            and _turbo_into(data, out):
        return
    _pillow_into(data, out, channels)


def _turbo_into(data: Payload, out: np.ndarray) -> bool:
    """Decode a JPEG that `_fits` `out` (C-contiguous) into it with libjpeg-turbo; False when
    simplejpeg's strict mode refuses it or it is not `out`'s size after all (Pillow decides)."""
    try:
        decoded = simplejpeg.decode_jpeg(data, colorspace="gray" if out.shape[2] == 1 else "rgb",
                                         buffer=out)
    except ValueError:
        return False
    return bool(decoded.shape == out.shape)


def _pillow_into(data: Payload, out: np.ndarray, channels: int) -> None:
    decoded = _decode_pillow(data, channels)
    if decoded.shape != out.shape:
        raise CorruptShardError(f"a stored image is {_shape_text(decoded.shape)}, "
                                f"index.json says {_shape_text(out.shape)}")
    out[...] = decoded


def decode(data: Payload, channels: int | None = None) -> np.ndarray:
    """H×W×C uint8 pixels of a stored jpeg/png payload (see the module docstring for
    `channels`). Raises CorruptShardError when it does not decode."""
    shape = _fast_shape(data, channels)
    if shape is not None:
        out = np.empty(shape, dtype=np.uint8)
        if _turbo_into(data, out):
            return out
    return _decode_pillow(data, channels)


def _decode_pillow(data: Payload, channels: int | None) -> np.ndarray:
    if bytes(data[:6]) == _NPY_MAGIC:
        return _load_npy(data)
    try:
        with Image.open(io.BytesIO(bytes(data)), formats=("JPEG", "PNG")) as im:
            mode = ("L" if im.mode == "L" else "RGB") if channels is None \
                else "L" if channels == 1 else "RGB"
            array = np.asarray(im.convert(mode))
    except _PILLOW_ERRORS as exc:
        raise CorruptShardError(f"a stored image does not decode: {exc}") from None
    return array[:, :, None] if array.ndim == 2 else array


def _load_npy(data: Payload) -> np.ndarray:
    try:
        array: np.ndarray = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptShardError(f"stored .npy does not load: {exc}") from None
    if array.dtype != np.uint8 or array.ndim != 3:
        raise CorruptShardError(f"stored .npy holds {array.dtype} {_shape_text(array.shape)}, "
                                "not H×W×C uint8")
    return array


def _all_fit(out: Sequence[np.ndarray] | np.ndarray, shape: tuple[int, ...]) -> bool:
    """Every slot of `out` is a C-contiguous uint8 array of `shape` (what simplejpeg writes)."""
    if isinstance(out, np.ndarray):
        return out.dtype == np.uint8 and out.flags.c_contiguous and out.shape[1:] == shape
    return all(o.dtype == np.uint8 and o.flags.c_contiguous and o.shape == shape for o in out)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(v) for v in shape)


def resolve_decode_threads(value: int | None) -> int:
    """The number of decoding threads for a `decode_threads` option: None means one per CPU
    this process may use. Raises ConfigError below 1."""
    if value is None:
        return usable_cpus()
    return check_count("decode_threads", value, 1)


Job = Callable[[int], None]  # decode item i


class DecodePool:
    """Decodes a batch's payloads on `threads` threads (None: one per usable CPU): the
    calling thread and ``threads - 1`` helpers started on first use. `close` stops them.

    libjpeg-turbo runs with the GIL released; what holds it is a few microseconds of call
    overhead per image, so threads scale with cores. Each image is decoded into its own slot,
    so the result never depends on the thread count or on which thread took it.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = resolve_decode_threads(threads)
        self._helpers = Helpers(self.threads, "shardkit-decode")

    def decode_batch(self, payloads: Sequence[Any], out: Sequence[np.ndarray] | np.ndarray,
                     channels: int | None = None, where: Sequence[str] | None = None,
                     headers: np.ndarray | None = None) -> None:
        """Decode ``payloads[i]`` into ``out[i]`` for every i (`out`: a [B,H,W,C] array or a
        list of slot views of one shape). `where` names each sample in errors (say, its shard
        and index); `headers`, the payloads' `jpeg_headers` rows when the caller has them.
        Raises CorruptShardError naming the first bad sample."""
        self._helpers.run(self._batch_jobs(payloads, out, channels, where, headers))

    def start_batch(self, payloads: Sequence[Any], out: Sequence[np.ndarray] | np.ndarray,
                    channels: int | None = None, where: Sequence[str] | None = None,
                    headers: np.ndarray | None = None) -> Share:
        """`decode_batch` handed to the helper threads without waiting: the caller goes on
        (preparing the next batch, say) and then calls ``finish()`` on what this returns, which
        decodes what is left in the calling thread and raises as `decode_batch` would, or
        ``cancel()``. The helpers finish earlier batches first, so they always have work."""
        return self._helpers.start(self._batch_jobs(payloads, out, channels, where, headers))

    def _batch_jobs(self, payloads: Sequence[Any], out: Sequence[np.ndarray] | np.ndarray,
                    channels: int | None, where: Sequence[str] | None,
                    headers: np.ndarray | None) -> list[Callable[[], None]]:
        if len(payloads) != len(out):
            raise ValueError(f"{len(payloads)} payloads for {len(out)} slots")
        if headers is not None and headers.shape != (len(payloads), 3):
            raise ValueError(f"{headers.shape} headers for {len(payloads)} payloads")
        if not len(payloads):
            return []
        # With the headers known, an image whose size and kind fit its slot goes straight to
        # libjpeg-turbo: no header read again, no check per image with the GIL held.
        shape = tuple(out[0].shape)
        fast = [_fits(h, w, c, shape) for h, w, c in headers.tolist()] \
            if headers is not None and len(shape) == 3 and channels in (None, shape[-1]) \
            and _all_fit(out, shape) else [False] * len(payloads)

        def one(i: int) -> None:
            if not fast[i]:
                decode_into(payloads[i], out[i], channels)  # its own checks and errors
            elif not _turbo_into(payloads[i], out[i]):
                _pillow_into(payloads[i], out[i], shape[-1])  # refused, or not its header's size

        return self._jobs(len(payloads), one, where)

    def decode_list(self, payloads: Sequence[Any], channels: int | None = None,
                    where: Sequence[str] | None = None) -> list[np.ndarray]:
        """Each payload decoded to its own H×W×C array (images of different sizes)."""
        results: list[np.ndarray] = [np.empty(0, np.uint8)] * len(payloads)

        def one(i: int) -> None:
            results[i] = decode(payloads[i], channels)

        self._helpers.run(self._jobs(len(payloads), one, where))
        return results

    def _jobs(self, count: int, job: Job, where: Sequence[str] | None) -> list[Callable[[], None]]:
        def span(start: int, stop: int) -> None:
            for i in range(start, stop):
                try:
                    job(i)
                except CorruptShardError as exc:
                    name = where[i] if where is not None else f"batch item {i}"
                    raise CorruptShardError(f"{name}: {exc}") from None

        # Runs of a few images, taken by whichever thread is free (see `Helpers`).
        parts = max(1, min(count, 4 * self.threads))
        cuts = [count * k // parts for k in range(parts + 1)]
        return [functools.partial(span, cuts[k], cuts[k + 1]) for k in range(parts)]

    def close(self) -> None:
        self._helpers.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
