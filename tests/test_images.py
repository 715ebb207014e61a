"""shardkit.conversion.images on real files: resize modes, JPEG draft, EXIF orientation, mode
normalisation, failure reason codes and degenerate shapes.

Every input is written by Pillow into ``tmp_path``; expectations are exact shapes, exact
pixels (or a mean absolute difference against an independent Pillow computation) and exact
``(stage, reason)`` codes.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from corpus import to_array
from PIL import Image, ImageOps

from shardkit.config import ImageOptions
from shardkit.conversion.images import (
    ALLOWED_FORMATS,
    ImageFailure,
    load_image,
    pillow_limits,
)
from shardkit.tools.synth import photo_like

#: The resampling filter conversion uses unless told otherwise (ImageOptions.filter).
DEFAULT_FILTER = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "lanczos": Image.Resampling.LANCZOS}[ImageOptions().filter]
RESIZE_MODES = ("center-crop", "pad", "stretch", "shorter-side")

# Solid quadrant colours of the asymmetric test picture: any flip or rotation moves at least
# two of them, so each EXIF orientation is told apart by the four quadrant centres.
TL, TR, BL, BR = (230, 20, 20), (20, 200, 20), (20, 20, 230), (240, 220, 20)


# --- helpers -------------------------------------------------------------------------------


def load(path: Path, **kwargs: object) -> tuple[np.ndarray, tuple[int, int]]:
    """load_image under pillow_limits; returns (H×W×C array, oriented source size)."""
    options = ImageOptions(**kwargs)  # type: ignore[arg-type]
    with pillow_limits():
        im, orig = load_image(path, options)
    assert im.mode == options.mode
    return to_array(im), orig


def failure(path: Path, **kwargs: object) -> tuple[str, str]:
    options = ImageOptions(**kwargs)  # type: ignore[arg-type]
    with pillow_limits(), pytest.raises(ImageFailure) as info:
        load_image(path, options)
    return info.value.stage, info.value.reason


def mad(a: np.ndarray | Image.Image, b: np.ndarray | Image.Image) -> float:
    a_arr = np.asarray(a, dtype=np.int16).reshape(np.shape(np.asarray(b)))
    return float(np.abs(a_arr - np.asarray(b, dtype=np.int16)).mean())


def photo(tmp_path: Path, width: int, height: int, seed: int = 0, ext: str = "png") -> Path:
    path = tmp_path / f"photo_{width}x{height}_{seed}.{ext}"
    photo_like(width, height, np.random.default_rng(seed)).save(path)
    return path


def quadrants(width: int, height: int) -> Image.Image:
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    pixels[:h2, :w2], pixels[:h2, w2:] = TL, TR
    pixels[h2:, :w2], pixels[h2:, w2:] = BL, BR
    return Image.fromarray(pixels, "RGB")


def quadrant_centres(array: np.ndarray) -> list[tuple[int, ...]]:
    h, w = array.shape[:2]
    points = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    return [tuple(int(v) for v in array[y, x]) for y, x in points]


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# Inverse of the transpose that EXIF orientation n asks for (what ImageOps.exif_transpose
# applies): storing inverse(picture) makes the *displayed* image equal to the picture.
INVERSE_OF_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # orientation 6 displays after ROTATE_270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # orientation 8 displays after ROTATE_90
}


def save_oriented(picture: Image.Image, orientation: int, path: Path, **save: object) -> None:
    inverse = INVERSE_OF_ORIENTATION[orientation]
    stored = picture if inverse is None else picture.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, **save)


# --- 1. resize modes -----------------------------------------------------------------------


def reference(src: Image.Image, resize: str, size: tuple[int, int],
              method: Image.Resampling = DEFAULT_FILTER,
              pad_color: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """What each resize mode means, computed with Pillow's own helpers."""
    if resize == "center-crop":
        return ImageOps.fit(src, size, method=method)
    if resize == "pad":
        return ImageOps.pad(src, size, method=method, color=pad_color)
    if resize == "stretch":
        return src.resize(size, method)
    scale = size[0] / min(src.size)
    return src.resize((round(src.width * scale), round(src.height * scale)), method)


@pytest.mark.parametrize("source", [(320, 200), (200, 320)])
@pytest.mark.parametrize(
    ("resize", "size", "shape"),
    [
        ("center-crop", (100, 100), (100, 100, 3)),
        ("center-crop", (150, 100), (100, 150, 3)),
        ("pad", (100, 100), (100, 100, 3)),
        ("pad", (150, 100), (100, 150, 3)),
        ("stretch", (100, 100), (100, 100, 3)),
        ("stretch", (150, 100), (100, 150, 3)),
        ("shorter-side", (100, 100), None),
    ],
)
def test_resize_modes_match_pillow_reference(
    tmp_path: Path, source: tuple[int, int], resize: str, size: tuple[int, int],
    shape: tuple[int, int, int] | None,
) -> None:
    path = photo(tmp_path, *source)
    src = Image.open(path).convert("RGB")
    pad_color = (12, 34, 56)
    out, orig = load(path, resize=resize, size=size, draft=False, pad_color=pad_color)
    if shape is None:  # shorter-side: 320x200 -> 160x100, 200x320 -> 100x160
        shape = (160, 100, 3) if source[1] > source[0] else (100, 160, 3)
    assert out.shape == shape
    assert orig == source
    assert mad(out, reference(src, resize, size, pad_color=pad_color)) < 1.0


@pytest.mark.parametrize(
    ("source", "size", "band"),
    [
        # 300x200 into 150x100: the same 1.5 ratio, no padding at all.
        ((300, 200), (150, 100), None),
        # 320x200 into 150x100 -> 150x94 centred: rows 0-2 and 97-99 are padding.
        ((320, 200), (150, 100), ("rows", 3, 97)),
        # 320x200 into 100x100 -> 100x62 centred: rows 0-18 and 81-99 are padding.
        ((320, 200), (100, 100), ("rows", 19, 81)),
        # 200x320 into 150x100 -> 62x100 centred: columns 0-43 and 106-149 are padding.
        ((200, 320), (150, 100), ("cols", 44, 106)),
    ],
)
def test_pad_fills_exactly_the_letterbox_band(
    tmp_path: Path, source: tuple[int, int], size: tuple[int, int],
    band: tuple[str, int, int] | None,
) -> None:
    out, _ = load(photo(tmp_path, *source), resize="pad", size=size, pad_color=(12, 34, 56))
    is_pad = np.all(out == (12, 34, 56), axis=2)
    if band is None:
        assert not is_pad.all(axis=0).any() and not is_pad.all(axis=1).any()
        return
    axis, start, stop = band
    lines = is_pad.all(axis=1) if axis == "rows" else is_pad.all(axis=0)
    expected = np.ones(len(lines), dtype=bool)
    expected[start:stop] = False
    np.testing.assert_array_equal(lines, expected)


@pytest.mark.parametrize("filter_name", ["bilinear", "lanczos"])
@pytest.mark.parametrize("resize", ["center-crop", "pad", "stretch", "shorter-side"])
def test_filter_option_is_honoured(tmp_path: Path, filter_name: str, resize: str) -> None:
    path = photo(tmp_path, 320, 200, seed=3)
    src = Image.open(path).convert("RGB")
    method = {"bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}[
        filter_name
    ]
    size = (100, 100) if resize == "shorter-side" else (150, 100)
    out, _ = load(path, resize=resize, size=size, filter=filter_name, draft=False)
    bicubic, _ = load(path, resize=resize, size=size, filter="bicubic", draft=False)
    assert out.shape == bicubic.shape
    assert not np.array_equal(out, bicubic)
    assert mad(out, reference(src, resize, size, method=method)) < 1.0
    assert mad(out, reference(src, resize, size, method=method)) < mad(
        bicubic, reference(src, resize, size, method=method)
    )


def test_no_resize_when_size_already_matches(tmp_path: Path) -> None:
    path = photo(tmp_path, 120, 80)
    src = np.asarray(Image.open(path).convert("RGB"))
    for resize in ("stretch", "pad", "center-crop"):
        out, _ = load(path, resize=resize, size=(120, 80))
        np.testing.assert_array_equal(out, src)
    out, _ = load(path, resize="shorter-side", size=(80, 80))
    np.testing.assert_array_equal(out, src)


# --- 2. JPEG draft -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("draft") / "big.jpg"
    photo_like(1200, 900, np.random.default_rng(7)).save(path, quality=90)
    return path


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_jpeg_draft_close_to_full_decode(big_jpeg: Path, resize: str) -> None:
    with_draft, orig = load(big_jpeg, resize=resize, size=(150, 150), draft=True)
    without, orig_full = load(big_jpeg, resize=resize, size=(150, 150), draft=False)
    expected = (150, 200, 3) if resize == "shorter-side" else (150, 150, 3)
    assert with_draft.shape == without.shape == expected
    assert orig == orig_full == (1200, 900)
    assert mad(with_draft, without) < 4.0


def test_jpeg_draft_is_really_used(big_jpeg: Path) -> None:
    # center-crop 150x150 of 1200x900 needs a 200x150 decode: draft picks 1/4 (300x225).
    reduced = Image.open(big_jpeg)
    reduced.draft("RGB", (200, 150))
    assert reduced.size == (300, 225)
    expected = ImageOps.fit(reduced.convert("RGB"), (150, 150), method=DEFAULT_FILTER)
    with_draft, _ = load(big_jpeg, resize="center-crop", size=(150, 150), draft=True)
    without, _ = load(big_jpeg, resize="center-crop", size=(150, 150), draft=False)
    np.testing.assert_array_equal(with_draft, np.asarray(expected))
    assert not np.array_equal(with_draft, without)


def test_output_shape_does_not_depend_on_draft(tmp_path: Path) -> None:
    # 600x409 with a 100-pixel target drafts to 150x103 (1/4), whose ratio rounds
    # differently: sizes must come from the 600x409 header, not from the drafted image.
    path = tmp_path / "odd.jpg"
    photo_like(600, 409, np.random.default_rng(8)).save(path, quality=90)
    reduced = Image.open(path)
    reduced.draft("RGB", (147, 100))
    assert reduced.size == (150, 103)
    for draft in (True, False):
        out, orig = load(path, resize="shorter-side", size=(100, 100), draft=draft)
        assert orig == (600, 409)
        assert out.shape == (100, 147, 3)  # 600 * 100 / 409 = 146.7
        out, _ = load(path, resize="pad", size=(100, 100), draft=draft, pad_color=(12, 34, 56))
        is_pad_row = np.all(out == (12, 34, 56), axis=(1, 2))
        # content 100x68 (409 * 100 / 600 = 68.2) at rows 16-83
        np.testing.assert_array_equal(np.nonzero(~is_pad_row)[0], np.arange(16, 84))


def test_draft_not_used_for_png_or_upscaling(tmp_path: Path, big_jpeg: Path) -> None:
    png = photo(tmp_path, 400, 300)
    a, _ = load(png, size=(100, 100), draft=True)
    b, _ = load(png, size=(100, 100), draft=False)
    np.testing.assert_array_equal(a, b)
    # The output is bigger than the source: decode at full size either way.
    a, _ = load(big_jpeg, resize="stretch", size=(1300, 100), draft=True)
    b, _ = load(big_jpeg, resize="stretch", size=(1300, 100), draft=False)
    np.testing.assert_array_equal(a, b)


# --- 3. EXIF orientation -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_displayed_picture(
    tmp_path: Path, orientation: int, fmt: str
) -> None:
    picture = quadrants(60, 40)
    path = tmp_path / f"oriented_{orientation}.{'jpg' if fmt == 'jpeg' else 'png'}"
    save_oriented(picture, orientation, path, **({"quality": 95} if fmt == "jpeg" else {}))
    stored = Image.open(path)
    assert stored.size == ((40, 60) if orientation >= 5 else (60, 40))
    # The file really displays as the picture (Pillow's own view of the EXIF tag).
    tolerance = 12 if fmt == "jpeg" else 0
    displayed = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    assert all(
        close(c, e, tolerance)
        for c, e in zip(quadrant_centres(displayed), [TL, TR, BL, BR], strict=True)
    )

    out, orig = load(path, resize="stretch", size=(60, 40))
    assert out.shape == (40, 60, 3)
    assert orig == (60, 40)
    centres = quadrant_centres(out)
    for got, want in zip(centres, [TL, TR, BL, BR], strict=True):
        assert close(got, want, tolerance), (orientation, centres)
    if fmt == "png":
        np.testing.assert_array_equal(out, np.asarray(picture))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_with_draft(tmp_path: Path, orientation: int) -> None:
    picture = quadrants(1600, 1200)
    path = tmp_path / "big_oriented.jpg"
    save_oriented(picture, orientation, path, quality=90)
    for resize, size, shape in [
        ("stretch", (160, 120), (120, 160, 3)),
        ("center-crop", (100, 100), (100, 100, 3)),
        ("pad", (200, 100), (100, 200, 3)),
        ("shorter-side", (120, 120), (120, 160, 3)),
    ]:
        with_draft, orig = load(path, resize=resize, size=size, draft=True)
        without, _ = load(path, resize=resize, size=size, draft=False)
        assert with_draft.shape == without.shape == shape
        assert orig == (1600, 1200)
        assert mad(with_draft, without) < 4.0
    out, _ = load(path, resize="stretch", size=(160, 120), draft=True)
    for got, want in zip(quadrant_centres(out), [TL, TR, BL, BR], strict=True):
        assert close(got, want, 12)


def test_broken_exif_orientation_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "odd.jpg"
    exif = Image.Exif()
    exif[0x0112] = 9  # not an EXIF orientation
    quadrants(60, 40).save(path, exif=exif, quality=95)
    out, orig = load(path, resize="stretch", size=(60, 40))
    assert orig == (60, 40)
    for got, want in zip(quadrant_centres(out), [TL, TR, BL, BR], strict=True):
        assert close(got, want, 12)


# --- 4. modes ------------------------------------------------------------------------------


def same_size(path: Path, **kwargs: object) -> np.ndarray:
    """Load without resizing (stretch to the source's own size)."""
    with Image.open(path) as im:
        size = im.size
    out, _ = load(path, resize="stretch", size=size, **kwargs)
    return out


def test_mode_1_to_rgb(tmp_path: Path) -> None:
    bits = np.zeros((4, 8), dtype=bool)
    bits[::2, ::3] = True
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    assert Image.open(path).mode == "1"
    out = same_size(path)
    expected = np.where(bits[:, :, None], 255, 0).repeat(3, axis=2)
    np.testing.assert_array_equal(out, expected)


def test_mode_l_to_rgb_and_l(tmp_path: Path) -> None:
    grey = np.arange(0, 256, 8, dtype=np.uint8).reshape(4, 8)
    path = tmp_path / "grey.png"
    Image.fromarray(grey, "L").save(path)
    np.testing.assert_array_equal(same_size(path), np.stack([grey] * 3, axis=2))
    np.testing.assert_array_equal(same_size(path, mode="L"), grey[:, :, None])


def test_mode_la_composited(tmp_path: Path) -> None:
    la = np.array([[[200, 255], [200, 0], [0, 128], [255, 51]]], dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    assert Image.open(path).mode == "LA"
    out = same_size(path)
    # On white: opaque 200, transparent -> 255, 0 at alpha 128 -> 127, 255 at alpha 51 -> 255.
    expected = [[200] * 3, [255] * 3, [127] * 3, [255] * 3]
    np.testing.assert_array_equal(out[0], expected)
    out = same_size(path, background=(0, 0, 0))
    np.testing.assert_array_equal(out[0], [[200] * 3, [0] * 3, [0] * 3, [51] * 3])


def test_mode_p_without_transparency(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 128, 255), (10, 20, 30), (250, 250, 5)]
    rgb = np.array([colours], dtype=np.uint8)
    path = tmp_path / "palette.png"
    Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    with Image.open(path) as im:
        assert im.mode == "P" and "transparency" not in im.info
    np.testing.assert_array_equal(same_size(path), rgb)


@pytest.mark.parametrize("background", [None, (10, 20, 30)])
@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_mode_p_with_transparency(
    tmp_path: Path, background: tuple[int, int, int] | None, fmt: str
) -> None:
    im = Image.new("P", (4, 2), 0)
    im.putpalette([255, 0, 255, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putpixel((1, 0), 1)
    im.putpixel((2, 1), 2)
    path = tmp_path / f"transparent.{fmt}"
    im.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info["transparency"] == 0
    kwargs = {} if background is None else {"background": background}
    out = same_size(path, **kwargs)
    bg = (255, 255, 255) if background is None else background
    expected = np.empty((2, 4, 3), dtype=np.uint8)
    expected[:] = bg  # index 0 (magenta) is transparent
    expected[0, 1] = (0, 255, 0)
    expected[1, 2] = (0, 0, 255)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("background", [(255, 255, 255), (10, 20, 30)])
def test_rgba_fully_transparent_becomes_background(
    tmp_path: Path, background: tuple[int, int, int]
) -> None:
    rgba = photo_like(40, 30, np.random.default_rng(1)).convert("RGBA")
    rgba.putalpha(0)
    path = tmp_path / "clear.png"
    rgba.save(path)
    out = same_size(path, background=background)
    assert out.shape == (30, 40, 3)
    assert (out == background).all()
    # Resized too: still nothing but background.
    out, _ = load(path, size=(16, 16), background=background)
    assert (out == background).all()


def test_rgba_half_transparent_exact_composite(tmp_path: Path) -> None:
    rgba = np.array(
        [[[0, 0, 0, 128], [255, 0, 0, 51], [100, 200, 50, 102], [7, 8, 9, 255]]],
        dtype=np.uint8,
    )
    path = tmp_path / "half.png"
    Image.fromarray(rgba, "RGBA").save(path)
    # v·a/255 + bg·(1 − a/255), chosen so every value is an exact integer.
    out = same_size(path)  # on white
    np.testing.assert_array_equal(
        out[0], [[127, 127, 127], [255, 204, 204], [193, 233, 173], [7, 8, 9]]
    )
    out = same_size(path, background=(0, 0, 0))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [51, 0, 0], [40, 80, 20], [7, 8, 9]])


def test_rgb_png_with_transparent_colour(tmp_path: Path) -> None:
    rgb = np.array([[[1, 2, 3], [200, 100, 50]]], dtype=np.uint8)
    path = tmp_path / "trns.png"
    Image.fromarray(rgb, "RGB").save(path, transparency=(1, 2, 3))
    np.testing.assert_array_equal(
        same_size(path, background=(9, 9, 9))[0], [[9, 9, 9], [200, 100, 50]]
    )


def test_cmyk_jpeg_matches_pillow_conversion(tmp_path: Path) -> None:
    cmyk = photo_like(64, 48, np.random.default_rng(2)).convert("CMYK")
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=95)
    with Image.open(path) as decoded:
        assert decoded.mode == "CMYK"
        expected = np.asarray(decoded.convert("RGB"))
    np.testing.assert_array_equal(same_size(path), expected)
    resized, _ = load(path, resize="stretch", size=(32, 24), draft=False)
    assert resized.shape == (24, 32, 3)
    assert mad(resized, Image.fromarray(expected).resize((32, 24), DEFAULT_FILTER)) < 1.0


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535, 1000, 65280]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.array([0, 1, 128, 255, 4, 254], dtype=np.uint8)  # round(v * 255 / 65535)
    np.testing.assert_array_equal(same_size(path, mode="L")[0, :, 0], expected)
    np.testing.assert_array_equal(same_size(path)[0], np.stack([expected] * 3, axis=1))


def test_mode_i_tiff_scaled_and_clipped_to_range(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535, 70000, -5]], dtype=np.int32)
    path = tmp_path / "wide.tif"
    Image.fromarray(values, "I").save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(same_size(path, mode="L")[0, :, 0], [0, 1, 128, 255, 255, 0])


def test_mode_f_tiff_clipped(tmp_path: Path) -> None:
    values = np.array([[-10.0, 0.4, 127.6, 254.2, 300.0]], dtype=np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values, "F").save(path)
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(same_size(path, mode="L")[0, :, 0], [0, 0, 128, 254, 255])
    np.testing.assert_array_equal(same_size(path)[0, 2], [128, 128, 128])


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 3
    out = same_size(path)
    assert (out == (255, 0, 0)).all()
    out, orig = load(path, size=(8, 8))
    assert orig == (20, 10)
    assert (out == (255, 0, 0)).all()


@pytest.mark.parametrize("colour", [(200, 100, 50), (0, 255, 0), (17, 33, 250)])
def test_mode_l_is_pillow_luma(tmp_path: Path, colour: tuple[int, int, int]) -> None:
    path = tmp_path / "colour.png"
    Image.new("RGB", (6, 4), colour).save(path)
    luma = Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0))
    out = same_size(path, mode="L")
    assert out.shape == (4, 6, 1)
    assert (out == luma).all()


# (0, 70, 65): round(0.299 R + 0.587 G + 0.114 B) = 48, Pillow's luma is 49.
@pytest.mark.parametrize("pad_color", [(200, 100, 50), (0, 70, 65), (0, 90, 155)])
def test_mode_l_pad_uses_luma_of_pad_colour(
    tmp_path: Path, pad_color: tuple[int, int, int]
) -> None:
    path = photo(tmp_path, 320, 200)
    out, _ = load(path, resize="pad", size=(100, 100), mode="L", pad_color=pad_color)
    luma = Image.new("RGB", (1, 1), pad_color).convert("L").getpixel((0, 0))
    assert out.shape == (100, 100, 1)
    assert (out[:19] == luma).all() and (out[81:] == luma).all()


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes(tmp_path: Path, fmt: str) -> None:
    picture = quadrants(60, 40)
    path = tmp_path / f"picture.{fmt.lower()}"
    if fmt == "PPM":
        picture.save(path, format="PPM")
    elif fmt == "WEBP":
        picture.save(path, format="WEBP", lossless=True)
    else:
        picture.save(path, format=fmt)
    with Image.open(path) as im:
        assert im.format == fmt
    out, orig = load(path, resize="stretch", size=(60, 40))
    assert orig == (60, 40)
    tolerance = 12 if fmt == "JPEG" else 0
    for got, want in zip(quadrant_centres(out), [TL, TR, BL, BR], strict=True):
        assert close(got, want, tolerance)


def test_mpo_decodes_first_picture_with_draft(tmp_path: Path) -> None:
    first = photo_like(800, 600, np.random.default_rng(4))
    second = Image.new("RGB", (800, 600), (0, 0, 255))
    path = tmp_path / "stereo.mpo"
    first.save(path, format="MPO", save_all=True, append_images=[second], quality=90)
    with Image.open(path) as im:
        assert im.format == "MPO"
    with_draft, orig = load(path, size=(100, 100), draft=True)
    without, _ = load(path, size=(100, 100), draft=False)
    assert orig == (800, 600) and with_draft.shape == (100, 100, 3)
    assert mad(without, ImageOps.fit(first, (100, 100), method=DEFAULT_FILTER)) < 4.0
    assert mad(with_draft, without) < 4.0
    assert not np.array_equal(with_draft, without)


# --- 5. failures ---------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert failure(path) == ("read", "empty_file")


def test_missing_file(tmp_path: Path) -> None:
    assert failure(tmp_path / "nope.jpg") == ("read", "missing_file")


def test_directory_is_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    assert failure(folder) == ("read", "unreadable")


def test_permission_denied_is_unreadable(tmp_path: Path) -> None:
    path = photo(tmp_path, 20, 20)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who can read a mode-000 file (root)")
        assert failure(path) == ("read", "unreadable")
    finally:
        path.chmod(0o644)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    assert failure(path) == ("decode", "not_an_image")


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX"])
def test_valid_image_outside_allow_list(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"picture.{fmt.lower()}"
    quadrants(32, 32).save(path, format=fmt)
    with Image.open(path) as im:  # Pillow itself reads it ...
        assert im.format == fmt
    assert failure(path) == ("decode", "not_an_image")  # ... we refuse it by content
    renamed = path.rename(tmp_path / "picture.jpg")
    assert failure(renamed) == ("decode", "not_an_image")


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = photo(tmp_path, 400, 300, ext="jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert failure(path) == ("decode", "truncated")
    assert failure(path, draft=False) == ("decode", "truncated")


def test_truncated_png(tmp_path: Path) -> None:
    path = photo(tmp_path, 400, 300)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert failure(path) == ("decode", "truncated")


def test_garbage_after_jpeg_header(tmp_path: Path) -> None:
    path = photo(tmp_path, 64, 64, ext="jpg")
    data = bytearray(path.read_bytes())
    # Keep SOI + the first segments, scribble over the entropy-coded data and the end.
    data[len(data) // 3 :] = bytes(len(data) - len(data) // 3)
    path.write_bytes(bytes(data))
    stage, reason = failure(path)
    assert stage == "decode" and reason in ("truncated", "decode_error")


def patch_png_size(path: Path, width: int, height: int) -> None:
    """Rewrite the IHDR width/height (and its CRC) of a PNG, leaving the pixel data alone."""
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_header_claims_too_many_pixels(tmp_path: Path) -> None:
    path = photo(tmp_path, 16, 16)
    patch_png_size(path, 40000, 40000)
    assert struct.unpack(">II", path.read_bytes()[16:24]) == (40000, 40000)
    assert failure(path) == ("decode", "too_many_pixels")
    # The pixel data is 16x16: had it been decoded, the failure would have been another one.
    assert failure(path, max_pixels=2_000_000_000) == ("decode", "truncated")


@pytest.mark.parametrize("max_pixels", [1000, 9999])
def test_max_pixels_from_config(tmp_path: Path, max_pixels: int) -> None:
    # 1000 (over twice the limit) and 9999: both refused by the header check.
    path = photo(tmp_path, 100, 100)
    assert failure(path, max_pixels=max_pixels) == ("decode", "too_many_pixels")
    out, _ = load(path, max_pixels=10_000)  # exactly at the limit is allowed
    assert out.shape == (224, 224, 3)
    # Checked before decoding: a file cut just after the start of its pixel data fails the
    # same way, not as truncated.
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"IDAT") + 20])
    assert failure(path, max_pixels=10_000) == ("decode", "truncated")
    assert failure(path, max_pixels=max_pixels) == ("decode", "too_many_pixels")
    # Without pillow_limits the config limit still holds.
    with pytest.raises(ImageFailure) as info:
        load_image(path, ImageOptions(max_pixels=max_pixels))
    assert (info.value.stage, info.value.reason) == ("decode", "too_many_pixels")
    # The report quotes the configured limit, not a number of Pillow's own.
    assert f"limit of {max_pixels}" in info.value.detail


def test_pillow_limits_restored() -> None:
    from PIL import ImageFile

    saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with pillow_limits():
        assert Image.MAX_IMAGE_PIXELS is None  # our own header check applies the limit
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert saved == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_failure_carries_codes_and_detail() -> None:
    failure_ = ImageFailure("decode", "truncated", "cut short")
    assert (failure_.stage, failure_.reason, failure_.detail) == ("decode", "truncated", "cut short")
    assert str(failure_) == "decode/truncated: cut short"


# --- 6. thin images ------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["png", "jpg"])
@pytest.mark.parametrize(
    ("source", "shorter_side_shape"),
    [((1, 1000), (32000, 32, 3)), ((64, 640), (320, 32, 3)), ((1000, 1), (32, 32000, 3))],
)
@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_thin_images(
    tmp_path: Path, resize: str, source: tuple[int, int],
    shorter_side_shape: tuple[int, int, int], ext: str,
) -> None:
    path = tmp_path / f"thin.{ext}"
    photo_like(*source, np.random.default_rng(5)).save(path)
    out, orig = load(path, resize=resize, size=(32, 32))
    assert orig == source
    assert out.shape == (shorter_side_shape if resize == "shorter-side" else (32, 32, 3))
    if resize == "pad":
        assert (out == 0).any()  # some of the canvas is padding
