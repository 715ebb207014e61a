"""Per-sample augmentation: geometry against torchvision, colour against numpy, Keras'
semantics against Keras itself, independence, determinism through a real ShardLoader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from corpus import loader, small_dataset, small_tree

import shardkit
from shardkit import Augment, ConfigError, ShardLoader, to_device
from shardkit.reader.augment_apply import apply_augment
from shardkit.reader.augment_params import COL, Draws, compose, draw_params

BILINEAR = TF.InterpolationMode.BILINEAR
# grid_sample reproduces a pixel centre only to float rounding: identity maps, flips and
# quarter turns land within this of the exact value (in grey levels, 0-255) and round to it.
EXACT = 1e-3
# Same resampling as torchvision, computed in another order: a few thousandths of a grey level.
CLOSE = 5e-3


def fixed(stored: tuple[int, int], n: int = 1, *, box: tuple[float, ...] | None = None,
          hflip: Any = False, vflip: Any = False, angle: float = 0.0, shift: tuple[float, float] = (0, 0),
          zoom: tuple[float, float] = (1, 1), shear: float = 0.0,
          colour: Any = (1.0, 1.0, 1.0)) -> Draws:
    """Parameters chosen by the test instead of drawn."""
    def rows(value: Any) -> np.ndarray:
        value = np.asarray(value, dtype=np.float64)
        return value if value.ndim == 2 else np.tile(value, (n, 1))
    return Draws(box=rows(box or (0, 0, *stored)), hflip=np.broadcast_to(hflip, n).copy(),
                 vflip=np.broadcast_to(vflip, n).copy(), angle=np.full(n, float(angle)),
                 shift=rows(shift), zoom=rows(zoom), shear=np.full(n, float(shear)), colour=rows(colour))


def run(images: np.ndarray, augment: Augment, draws: Draws) -> torch.Tensor:
    """[B, C, h, w] float on the 0-255 scale."""
    params = compose(augment, draws, images.shape[1:3])
    return apply_augment(torch.from_numpy(images), torch.from_numpy(params), scale=1.0)


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """[1, 40, 48, 3] uint8: smooth structure plus noise, asymmetric in every direction."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:40, 0:48]
    base = np.stack([x * 5, y * 6, (x * y) % 256], axis=-1) + rng.integers(0, 40, (40, 48, 3))
    return np.clip(base, 0, 255).astype(np.uint8)[None]


@pytest.mark.parametrize("angle,shift,zoom,shear", [
    (30.0, (3.0, -2.0), 1.2, 10.0), (-17.0, (1.5, 2.25), 0.8, -20.0), (0.0, (-4.0, 0.0), 1.0, 0.0),
    (5.0, (0.0, 0.0), 1.7, 0.0), (0.0, (0.0, 0.0), 1.0, 35.0)])
def test_affine_alone_equals_torchvision(photo: np.ndarray, angle: float, shift: tuple[float, float],
                                         zoom: float, shear: float) -> None:
    # torchvision's affine pads with zeros (fill=None): our constant fill of 0, edges included.
    out = run(photo, Augment(fill="constant"), fixed((40, 48), angle=angle, shift=shift,
                                                       zoom=(zoom, zoom), shear=shear))[0]
    ref = TF.affine(chw(photo[0]), angle=angle, translate=list(shift), scale=zoom, shear=[shear, 0.0],
                    interpolation=BILINEAR)
    assert (out - ref).abs().max() < CLOSE


def test_resized_crop_alone_equals_torchvision(photo: np.ndarray) -> None:
    augment = Augment(size=(50, 60), scale=(0.1, 1.0))
    out = run(photo, augment, fixed((40, 48), box=(5, 7, 20, 30)))[0]
    ref = TF.resized_crop(chw(photo[0]), 5, 7, 20, 30, [50, 60], interpolation=BILINEAR, antialias=True)
    # torchvision crops first, so its edge rows repeat the crop's edge; we read the stored
    # pixels just outside the box instead. Everything else is the same resampling.
    assert (out - ref)[:, 2:-2, 2:-2].abs().max() < CLOSE
    assert (out - ref).abs().max() > 1.0  # the edges do differ: the crop is not a copy


def test_shrinking_more_than_twice_is_antialiased(photo: np.ndarray) -> None:
    stripes = np.zeros((1, 64, 64, 3), np.uint8)
    stripes[:, :, ::2] = 255  # one-pixel stripes: bilinear taps alone alias them to bands
    params = compose(Augment(size=20), fixed((64, 64)), (64, 64))
    assert params[0, COL["level"]] == 1  # 3.2 stored pixels per output pixel
    out = apply_augment(torch.from_numpy(stripes), torch.from_numpy(params), scale=1.0)
    aliased = torch.nn.functional.interpolate(chw(stripes[0])[None], size=(20, 20), mode="bilinear")
    assert aliased.std() > 40
    assert (out - 127.5).abs().max() < 0.5
    # A picture shrunk 3× lands near torchvision's antialiased resize (a triangle filter; ours
    # is a 2×2 box then bilinear): at least 2.5× nearer than bilinear taps alone.
    out = run(photo, Augment(size=(13, 16)), fixed((40, 48)))[0]
    ref = TF.resize(chw(photo[0]), [13, 16], interpolation=BILINEAR, antialias=True)
    naive = TF.resize(chw(photo[0]), [13, 16], interpolation=BILINEAR, antialias=False)
    assert (out - ref).abs().mean() < 0.4 * (naive - ref).abs().mean()


@pytest.mark.parametrize("hflip,vflip", [(True, False), (False, True), (True, True)])
def test_flips_are_exact(photo: np.ndarray, hflip: bool, vflip: bool) -> None:
    out = run(photo, Augment(), fixed((40, 48), hflip=hflip, vflip=vflip))[0]
    ref = chw(photo[0]).flip([d for d, on in ((2, hflip), (1, vflip)) if on])
    assert torch.equal(out.round(), ref)
    assert (out - ref).abs().max() < EXACT
    vref = TF.horizontal_flip(chw(photo[0])) if hflip else chw(photo[0])
    assert torch.equal((TF.vertical_flip(vref) if vflip else vref), ref)


def test_quarter_turns_are_exact() -> None:
    square = np.random.default_rng(0).integers(0, 256, (1, 30, 30, 3), dtype=np.uint8)
    for turns in range(4):
        out = run(square, Augment(), fixed((30, 30), angle=90.0 * turns))[0]
        # torchvision's positive angle turns counter-clockwise on screen: rot90 by -turns.
        ref = torch.rot90(chw(square[0]), -turns, dims=(1, 2))
        assert torch.equal(out.round(), ref) and (out - ref).abs().max() < EXACT


def shifted_reference(image: np.ndarray, dx: float, dy: float, mode: str, value: float = 0.0) -> np.ndarray:
    """numpy: `image` [H, W, C] moved by (dx, dy) pixels, bilinear, padded as `mode`."""
    pad = 128
    np_mode = {"reflect": "symmetric", "nearest": "edge", "constant": "constant"}[mode]
    extra = {"constant_values": value} if mode == "constant" else {}
    padded = np.pad(image.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode=np_mode, **extra)
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx, sy = xs - dx + pad, ys - dy + pad
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    top = padded[y0, x0] * (1 - fx) + padded[y0, x0 + 1] * fx
    bottom = padded[y0 + 1, x0] * (1 - fx) + padded[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("fill,value,shift", [
    ("reflect", 0.0, (5.5, -3.25)), ("nearest", 0.0, (5.5, -3.25)), ("constant", 200.0, (5.5, -3.25)),
    ("reflect", 0.0, (70.5, -45.25))])  # beyond one mirror image: the periodic fold
def test_fill_modes_equal_a_numpy_reference(photo: np.ndarray, fill: str, value: float,
                                            shift: tuple[float, float]) -> None:
    out = run(photo, Augment(fill=fill, fill_value=value), fixed((40, 48), shift=shift))[0]
    ref = shifted_reference(photo[0], *shift, fill, value)
    assert np.abs(out.permute(1, 2, 0).numpy() - ref).max() < CLOSE


def colour_reference(image: np.ndarray, b: float, c: float, s: float) -> np.ndarray:
    """numpy, torchvision's definitions on the 0-255 scale: brightness, contrast, saturation."""
    x = np.clip(image.astype(np.float64) * b, 0, 255)
    grey = x @ np.array([0.2989, 0.587, 0.114])
    x = np.clip(c * x + (1 - c) * grey.mean(), 0, 255)
    grey = (x @ np.array([0.2989, 0.587, 0.114]))[..., None]
    return np.clip(s * x + (1 - s) * grey, 0, 255)


def test_colour_factors_equal_a_numpy_reference(photo: np.ndarray) -> None:
    factors = np.array([[1.3, 0.6, 1.5], [0.7, 1.4, 0.2], [1.0, 1.0, 0.0]])
    images = np.repeat(photo, 3, axis=0)
    out = run(images, Augment(brightness=(0.5, 1.5)), fixed((40, 48), 3, colour=factors))
    for k, (b, c, s) in enumerate(factors):
        ref = colour_reference(photo[0], b, c, s)
        assert np.abs(out[k].permute(1, 2, 0).numpy() - ref).max() < 1e-3
        # torchvision on the 0-1 scale agrees too.
        tv = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(chw(photo[0]) / 255, b), c), s)
        assert (out[k] / 255 - tv).abs().max() < 1e-5


def test_grey_images_take_contrast_and_ignore_saturation(photo: np.ndarray) -> None:
    grey = photo[..., :1]
    out = run(grey, Augment(contrast=(0.5, 1.5)), fixed((40, 48), colour=(1.0, 0.6, 0.3)))[0, 0]
    x = grey[0, ..., 0].astype(np.float64)
    np.testing.assert_allclose(out.numpy(), np.clip(0.6 * x + 0.4 * x.mean(), 0, 255), atol=1e-3)


def test_parameters_differ_within_a_batch() -> None:
    rows = draw_params(Augment.imagenet(24), seed=0, epoch=0, index=np.arange(64), stored=(32, 32))
    assert len(np.unique(rows[:, :6], axis=0)) == 64
    # ...and depend on nothing but (seed, epoch, index): any subset, in any order, agrees.
    picked = draw_params(Augment.imagenet(24), seed=0, epoch=0, index=np.array([40, 3, 17]),
                         stored=(32, 32))
    np.testing.assert_array_equal(picked, rows[[40, 3, 17]])


def test_half_of_the_samples_flip_each_exactly() -> None:
    n = 10_000
    images = np.random.default_rng(1).integers(0, 256, (n, 8, 10, 3), dtype=np.uint8)
    params = draw_params(Augment(hflip=0.5), seed=5, epoch=0, index=np.arange(n), stored=(8, 10))
    flipped = params[:, COL["hflip"]] == 1
    # binomial(10,000, 1/2): sd 0.005, so 0.02 is 4 sd.
    assert abs(flipped.mean() - 0.5) < 0.02
    out = apply_augment(torch.from_numpy(images), torch.from_numpy(params), scale=1.0)
    plain = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    as_is = (out - plain).abs().amax(dim=(1, 2, 3)) < EXACT
    mirrored = (out - plain.flip(3)).abs().amax(dim=(1, 2, 3)) < EXACT
    assert bool((as_is ^ mirrored).all())  # every sample exactly one of the two
    np.testing.assert_array_equal(mirrored.numpy(), flipped)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = small_tree(tmp_path_factory.mktemp("src"), 9)
    return small_dataset(src, tmp_path_factory.mktemp("d") / "tar", 6)  # 27 samples, 10 × 12


TRAIN = Augment(size=8, scale=(0.3, 1.0), ratio=(0.75, 1.33), hflip=0.5, degrees=20,
                brightness=(0.7, 1.3), saturation=(0.5, 1.5))


def per_sample(loader: Any) -> dict[int, tuple[bytes, bytes]]:
    """stored index → (its augment row, its augmented pixels), over one pass."""
    seen = {}
    for batch in loader:
        pixels = to_device(batch, "cpu", mean=[0.5] * 3, std=[0.25] * 3)["image"]
        for k, index in enumerate(batch["index"].tolist()):
            seen[index] = (batch["augment"][k].numpy().tobytes(), pixels[k].numpy().tobytes())
    return seen


def test_same_seed_and_epoch_same_augmentation_for_any_workers_batches_ranks(dataset: Path) -> None:
    single = per_sample(ShardLoader(dataset, 4, seed=3, augment=TRAIN))
    assert len(single) == 27
    for workers in (2, 4):  # worker processes of a DataLoader(ShardDataset) built by hand
        assert per_sample(loader(dataset, 4, workers, seed=3, augment=TRAIN)) == single
    assert per_sample(ShardLoader(dataset, 7, seed=3, augment=TRAIN)) == single
    ranks: dict[int, tuple[bytes, bytes]] = {}
    for rank in (0, 1):
        ranks.update(per_sample(ShardLoader(dataset, 4, seed=3, rank=rank, world_size=2, augment=TRAIN)))
    assert ranks == single
    other_seed = per_sample(ShardLoader(dataset, 4, seed=4, augment=TRAIN))
    assert all(other_seed[i][0] != single[i][0] for i in single)


def test_a_new_epoch_draws_anew_and_a_resume_cut_changes_nothing(dataset: Path) -> None:
    loader = ShardLoader(dataset, 4, seed=3, augment=TRAIN)
    epoch0, epoch1 = per_sample(loader), per_sample(loader)
    assert all(epoch0[i][0] != epoch1[i][0] for i in epoch0)
    whole = [b["augment"] for b in ShardLoader(dataset, 4, seed=3, augment=TRAIN)]
    cut = ShardLoader(dataset, 4, seed=3, augment=TRAIN)
    batches = iter(cut)
    first = [next(batches)["augment"] for _ in range(3)]
    state = cut.state_dict()
    resumed = ShardLoader(dataset, 4, seed=3, augment=TRAIN)
    resumed.load_state_dict(state)
    rest = [b["augment"] for b in resumed]
    assert len(first) + len(rest) == len(whole)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, whole, strict=True))


def test_to_device_applies_the_rows_then_normalises(dataset: Path) -> None:
    batch = next(iter(ShardLoader(dataset, 5, seed=1, augment=Augment.imagenet((6, 8)))))
    out = to_device(batch, "cpu", mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], channels_last=False)
    assert out["image"].shape == (5, 3, 6, 8) and out["image"].dtype == torch.float32
    raw = apply_augment(batch["image"], batch["augment"], scale=1 / 255)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    expected = (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(out["image"], expected)
    evaluation = ShardLoader(dataset, 5, shuffle=False, augment=Augment.center(10))
    evaluated = to_device(next(iter(evaluation)), "cpu")
    assert evaluated["image"].shape == (5, 3, 10, 10)


def test_augment_needs_images_of_one_size(tmp_path: Path) -> None:
    src = small_tree(tmp_path / "src", 2)
    out = shardkit.convert(src, tmp_path / "v", size=(12, 12), resize="shorter-side", workers=0)
    with pytest.raises(ConfigError, match="one size"):
        ShardLoader(out.out, 2, augment=Augment(hflip=0.5))


def keras_generator(**kwargs: Any) -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")  # the test's choice of Keras backend, not shardkit's
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    return ImageDataGenerator(**kwargs)


KERAS_SCIPY = "ignore:Please import `affine_transform`:DeprecationWarning"  # inside Keras' own code


@pytest.mark.filterwarnings(KERAS_SCIPY)
@pytest.mark.parametrize("fill", ["nearest", "reflect", "constant"])
@pytest.mark.parametrize("theta,tx,ty,shear,zx,zy,flip_h,flip_v", [
    (0, 4.5, -2.0, 0, 1, 1, False, False),        # shift alone
    (0, 0, 0, 0, 1.4, 0.75, False, False),        # zoom alone, x and y apart
    (25, 3.5, -2.0, 10, 0.9, 1.3, True, False),   # all of it: Keras' order of composition
    (-40, -5.0, 4.0, -15, 1.1, 1.1, True, True)])
def test_keras_transform_equals_keras_apply_transform(fill: str, theta: float, tx: float, ty: float,
                                                      shear: float, zx: float, zy: float, flip_h: bool,
                                                      flip_v: bool) -> None:
    image = np.random.default_rng(1).integers(0, 256, (1, 33, 33, 3), dtype=np.uint8)
    gen = keras_generator(fill_mode=fill, cval=17.0)
    # Keras' "tx" moves the picture horizontally (see shardkit/reader/augment_keras.py).
    ref = gen.apply_transform(image[0].astype(np.float64), {
        "theta": theta, "tx": tx, "ty": ty, "shear": shear, "zx": zx, "zy": zy,
        "flip_horizontal": flip_h, "flip_vertical": flip_v})
    augment = Augment.from_keras(fill_mode=fill, cval=17.0)
    out = run(image, augment, fixed((33, 33), angle=theta, shift=(tx, ty), shear=shear, zoom=(zx, zy),
                                    hflip=flip_h, vflip=flip_v))[0]
    assert np.abs(out.permute(1, 2, 0).numpy() - ref).max() < CLOSE


def test_keras_brightness_equals_keras_within_its_rounding(photo: np.ndarray) -> None:
    gen = keras_generator(brightness_range=(0.5, 1.5))
    for factor in (0.55, 1.0, 1.37):
        ref = gen.apply_transform(photo[0].astype(np.float64), {"brightness": factor})
        out = run(photo, Augment.from_keras(brightness_range=(0.5, 1.5)),
                  fixed((40, 48), colour=(factor, 1.0, 1.0)))[0]
        # Keras passes the picture through PIL's 8-bit blend, which truncates.
        error = out.permute(1, 2, 0).numpy() - ref
        assert error.min() >= -1e-3 and error.max() < 1.0


def test_from_keras_draws_from_keras_ranges() -> None:
    index = np.arange(4000)
    aug = Augment.from_keras(width_shift_range=0.2, height_shift_range=5.0, zoom_range=0.25,
                             rotation_range=30, horizontal_flip=True, rescale=1 / 255)
    assert aug.fill == "nearest" and aug.rescale == 1 / 255 and aug.zoom == (0.75, 1.25)
    from shardkit.reader.augment_params import draw

    d = draw(aug, seed=1, epoch=0, index=index, stored=(40, 50))
    # width: a fraction of the 50-pixel width; height: 5 pixels, as Keras reads 5.0.
    assert 9.9 < np.abs(d.shift[:, 0]).max() <= 10.0 and 4.9 < np.abs(d.shift[:, 1]).max() <= 5.0
    assert d.zoom.min() >= 0.75 and d.zoom.max() <= 1.25
    assert np.corrcoef(d.zoom[:, 0], d.zoom[:, 1])[0, 1] < 0.1  # x and y zoom drawn apart
    assert 29.9 < np.abs(d.angle).max() <= 30 and abs(d.hflip.mean() - 0.5) < 0.04
    rows = draw_params(aug, seed=1, epoch=0, index=index[:3], stored=(40, 50))
    assert (rows[:, COL["rescale"]] == np.float32(1 / 255)).all()
    assert (draw_params(Augment.from_keras(), seed=0, epoch=0, index=index[:1], stored=(4, 4))
            [:, COL["rescale"]] == 1.0).all()  # Keras without rescale keeps 0-255


@pytest.mark.parametrize("kwargs,named", [
    ({"featurewise_center": True}, "featurewise_center"), ({"zca_whitening": True}, "zca_whitening"),
    ({"preprocessing_function": abs}, "preprocessing_function"),
    ({"channel_shift_range": 10.0}, "channel_shift_range"), ({"fill_mode": "wrap"}, "wrap"),
    ({"width_shift_range": 10}, "width_shift_range"), ({"height_shift_range": [1, 2]}, "height_shift_range"),
    ({"interpolation_order": 3}, "interpolation_order"), ({"data_format": "channels_first"}, "data_format"),
    ({"rotaton_range": 10}, "rotaton_range"), ({"zoom_range": 1.5}, "zoom_range"),
    ({"rotation_range": 400}, "rotation_range")])
def test_from_keras_refuses_what_it_cannot_honour(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Augment.from_keras(**kwargs)


def test_from_keras_accepts_keras_defaults_of_what_it_cannot_honour() -> None:
    aug = Augment.from_keras(featurewise_center=False, zca_whitening=False, zca_epsilon=1e-6,
                             channel_shift_range=0.0, interpolation_order=1, width_shift_range=0,
                             data_format="channels_last")
    assert aug == Augment.from_keras()


def test_numpy_scalars_are_numbers_and_a_full_turn_is_a_range() -> None:
    aug = Augment(size=np.int64(32), degrees=np.float32(360), hflip=np.float64(0.5))
    assert (aug.size, aug.degrees, aug.hflip) == ((32, 32), 360.0, 0.5)
    keras = Augment.from_keras(rotation_range=np.float32(15), zoom_range=np.float32(0.5),
                               width_shift_range=np.float32(0.25))
    assert (keras.degrees, keras.zoom, keras.translate) == (15.0, (0.5, 1.5), (0.25, 0.0))
    with pytest.raises(ConfigError, match="by name"):
        Augment((8, 8))  # type: ignore[misc]


def test_to_device_names_a_mean_or_std_of_the_wrong_length(dataset: Path) -> None:
    batch = next(iter(ShardLoader(dataset, 4, shuffle=False, augment=Augment(hflip=0.5))))
    for stats in ({"mean": [0.5, 0.5]}, {"std": [0.2] * 4}):
        with pytest.raises(ConfigError, match=next(iter(stats))):
            to_device(batch, "cpu", **stats)
        with pytest.raises(ConfigError, match=next(iter(stats))):
            to_device({"image": batch["image"]}, "cpu", **stats)
    assert to_device(batch, "cpu", mean=[0.5], std=[0.25])["image"].shape[1] == 3


@pytest.mark.parametrize("kwargs,named", [
    ({"size": 0}, "size"), ({"size": (3, 4, 5)}, "size"), ({"scale": (0.5, 0.2)}, "scale"),
    ({"scale": (0.0, 1.0)}, "scale"), ({"ratio": (-1, 1)}, "ratio"), ({"hflip": 1.5}, "hflip"),
    ({"vflip": True}, "vflip"), ({"degrees": 361}, "degrees"), ({"translate": (0.5, 2.0)}, "translate"),
    ({"zoom": (0, 1)}, "zoom"), ({"shear": 90}, "shear"), ({"brightness": 1.2}, "brightness"),
    ({"contrast": (1.2, 0.8)}, "contrast"), ({"saturation": (-0.1, 1)}, "saturation"),
    ({"fill": "wrap"}, "fill"), ({"fill_value": float("nan")}, "fill_value"),
    ({"center_crop": 0.0}, "center_crop"), ({"center_crop": 0.9, "scale": (0.5, 1)}, "center_crop"),
    ({"convention": "pil"}, "convention"), ({"convention": "keras", "scale": (0.5, 1)}, "keras"),
    ({"rescale": 0}, "rescale"), ({"bogus": 1}, "bogus"), ({"size": np.float32(8)}, "size")])
def test_bad_options_raise_config_error_naming_the_option(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Augment(**kwargs)
