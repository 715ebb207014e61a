"""shardkit.reader.decode and the conversion's JPEG fast path, against Pillow.

Tolerance: none. simplejpeg and Pillow both bundle libjpeg-turbo and decode with the same
accurate integer IDCT and fancy chroma upsampling, so every comparison below is exact
(max abs diff 0); the fast path is used only where that holds, and Pillow decodes the rest.
Each case also checks which decoder took it, so a comparison never passes by comparing Pillow
with itself.
"""

from __future__ import annotations

import io
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import loader, small_dataset, small_tree, to_array
from PIL import Image
from test_images import BL, BR, TL, TR, close, quadrant_centres, quadrants, save_oriented

from shardkit import ConfigError, CorruptShardError, ShardLoader
from shardkit.config import ImageOptions
from shardkit.conversion.images import ImageFailure, load_image, pillow_limits
from shardkit.conversion.images import _turbo_jpeg as turbo_jpeg
from shardkit.reader import decode as decode_module
from shardkit.reader.decode import DecodePool, _fast_shape, decode, decode_into, jpeg_headers
from shardkit.reader.helpers import Helpers
from shardkit.tools.synth import photo_like


def picture(width: int = 67, height: int = 45, seed: int = 0) -> Image.Image:
    return photo_like(width, height, np.random.default_rng(seed))


def encoded(im: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def pillow(data: bytes, mode: str) -> np.ndarray:
    """What the reader decoded before shardkit.reader.decode: Pillow, converted to `mode`."""
    with Image.open(io.BytesIO(data)) as im:
        array = np.asarray(im.convert(mode))
    return array[:, :, None] if array.ndim == 2 else array


# Stored payloads of every codec and mode a dataset can hold, plus JPEG variants.
PAYLOADS = {
    "jpeg-rgb-420": lambda: encoded(picture(), "JPEG", quality=90),
    "jpeg-rgb-444": lambda: encoded(picture(seed=1), "JPEG", quality=95, subsampling=0),
    "jpeg-rgb-progressive": lambda: encoded(picture(seed=2), "JPEG", quality=85, progressive=True),
    "jpeg-l": lambda: encoded(picture(seed=3).convert("L"), "JPEG", quality=90),
    "png-rgb": lambda: encoded(picture(seed=4), "PNG"),
    "png-l": lambda: encoded(picture(seed=5).convert("L"), "PNG"),
    "jpeg-cmyk": lambda: encoded(picture(seed=6).convert("CMYK"), "JPEG", quality=95),
}
FAST = {"jpeg-rgb-420", "jpeg-rgb-444", "jpeg-rgb-progressive", "jpeg-l"}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
@pytest.mark.parametrize("channels", [1, 3, None])
def test_decode_gives_pillows_pixels(name: str, channels: int | None) -> None:
    data = PAYLOADS[name]()
    stored_grey = name.endswith("-l")
    mode = {1: "L", 3: "RGB", None: "L" if stored_grey else "RGB"}[channels]
    expected = pillow(data, mode)
    # libjpeg-turbo gives L only for a grey JPEG: L of a colour image is Pillow's luma of its
    # RGB pixels, not the stored Y channel, so Pillow decodes that case.
    uses_fast = name in FAST and (channels != 1 or stored_grey)
    assert (_fast_shape(data, channels) is not None) == uses_fast

    out = decode(data, channels)
    assert out.dtype == np.uint8 and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)

    batch = np.full((3, *expected.shape), 7, dtype=np.uint8)
    decode_into(data, batch[1], channels)
    np.testing.assert_array_equal(batch[1], expected)
    assert (batch[0] == 7).all() and (batch[2] == 7).all()  # neighbouring slots untouched


def test_decode_into_rejects_a_payload_of_another_size() -> None:
    data = PAYLOADS["jpeg-rgb-420"]()  # 67x45
    for shape in [(45, 66, 3), (46, 67, 3), (45, 67, 1)]:
        with pytest.raises(CorruptShardError, match=r"stored image is 45×67×3, index.json says"):
            decode_into(data, np.empty(shape, np.uint8), 3)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "does not decode"),
        (b"not an image at all", "does not decode"),
        (PAYLOADS["jpeg-rgb-420"]()[:300], "does not decode"),  # cut in the entropy data
        (PAYLOADS["png-rgb"]()[:200], "does not decode"),
        (b"\x93NUMPY garbage", "does not load"),
    ],
)
def test_bad_payloads_raise_corrupt_shard_error(payload: bytes, reason: str) -> None:
    with pytest.raises(CorruptShardError, match=reason):
        decode(payload, 3)
    with pytest.raises(CorruptShardError, match=reason):
        decode_into(payload, np.empty((45, 67, 3), np.uint8), 3)


def test_header_claiming_billions_of_pixels_is_refused_not_allocated() -> None:
    data = bytearray(PAYLOADS["jpeg-rgb-420"]())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
    assert _fast_shape(bytes(data), 3) is None  # left to Pillow's bomb check
    with pytest.raises(CorruptShardError, match="does not decode"):
        decode(bytes(data), 3)


def test_npy_payload_loads_without_pickle() -> None:
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    buffer = io.BytesIO()
    np.save(buffer, array)
    np.testing.assert_array_equal(decode(buffer.getvalue()), array)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3), np.float32))
    with pytest.raises(CorruptShardError, match="not H×W×C uint8"):
        decode(buffer.getvalue())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pool_decodes_every_slot_like_one_thread(threads: int) -> None:
    pictures = [picture(40, 30, seed=s) for s in range(11)]
    payloads = [encoded(p, "JPEG" if s % 3 else "PNG", quality=90) for s, p in enumerate(pictures)]
    expected = np.stack([pillow(d, "RGB") for d in payloads])
    out = np.zeros_like(expected)
    with DecodePool(threads) as pool:
        pool.decode_batch(payloads, out, 3)
        np.testing.assert_array_equal(out, expected)
        listed = pool.decode_list(payloads, 3)
    assert len(listed) == 11
    np.testing.assert_array_equal(np.stack(listed), expected)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_headers_read_at_open_give_the_same_pixels_and_choices(
        channels: int, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch given its payloads' `jpeg_headers` (what an opened jpeg shard holds) decodes
    every codec and mode to Pillow's pixels; exactly the payloads libjpeg-turbo decodes as
    Pillow does skip decode_into's per-image checks, and the rest go through them."""
    names = sorted(PAYLOADS)
    payloads = [PAYLOADS[name]() for name in names]
    mode = "L" if channels == 1 else "RGB"
    expected = np.stack([pillow(d, mode) for d in payloads])
    headers = jpeg_headers(payloads)
    assert headers.tolist() == [[45, 67, 1 if n == "jpeg-l" else 3] if n in FAST else [0, 0, 0]
                                for n in names]
    checked: list[int] = []
    real = decode_module.decode_into

    def counted(data: bytes, out: np.ndarray, channels: int | None = None) -> None:
        checked.append(payloads.index(data))
        real(data, out, channels)

    monkeypatch.setattr(decode_module, "decode_into", counted)
    slow = sorted(i for i, n in enumerate(names) if not (n in FAST and (channels == 3 or n == "jpeg-l")))
    with DecodePool(threads) as pool:
        out = np.zeros_like(expected)
        pool.decode_batch(payloads, out, channels, headers=headers)
        np.testing.assert_array_equal(out, expected)
        assert sorted(checked) == slow
        checked.clear()
        slots = np.zeros_like(expected)
        pool.decode_batch(payloads, list(slots), channels, headers=headers)  # slot views
        np.testing.assert_array_equal(slots, expected)
        assert sorted(checked) == slow
        checked.clear()
        pool.decode_batch(payloads, np.zeros_like(expected), channels)  # no headers: all checked
        assert sorted(checked) == list(range(len(names)))
        with pytest.raises(ValueError, match="headers for"):
            pool.decode_batch(payloads, out, channels, headers=headers[1:])


def test_headers_that_do_not_fit_leave_the_payload_to_the_checks() -> None:
    """A payload of another size than its slot, or one strict mode refuses, keeps the errors
    decode_into gives, whatever its header row says."""
    other = encoded(picture(66, 45), "JPEG", quality=90)
    cut = PAYLOADS["jpeg-rgb-420"]()[:800]  # its header is whole, its entropy data cut
    assert jpeg_headers([other, cut]).tolist() == [[45, 66, 3], [45, 67, 3]]
    where = ["s: sample 0"]
    slot = np.empty((1, 45, 67, 3), np.uint8)
    with DecodePool(1) as pool:
        with pytest.raises(CorruptShardError, match=r"s: sample 0: a stored image is 45×66×3"):
            pool.decode_batch([other], slot, 3, where, headers=jpeg_headers([other]))
        lying = np.array([[45, 67, 3]])  # a row not read from this payload
        with pytest.raises(CorruptShardError, match=r"s: sample 0: a stored image is 45×66×3"):
            pool.decode_batch([other], slot, 3, where, headers=lying)
        with pytest.raises(CorruptShardError, match=r"s: sample 0: a stored image does not decode"):
            pool.decode_batch([cut], slot, 3, where, headers=jpeg_headers([cut]))


@pytest.mark.parametrize("limit", [None, 10**9])
def test_headers_of_a_bomb_do_not_send_it_to_libjpeg_turbo(
        limit: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(PAYLOADS["jpeg-rgb-420"]())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 60000, 60000)
    headers = jpeg_headers([bytes(data)])
    assert headers.tolist() == [[60000, 60000, 3]]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    # 3.6e9 pixels: past twice a limit of 1e9, Pillow refuses it before allocating; without
    # a limit libjpeg-turbo may take it.
    assert decode_module._fits(60000, 60000, 3, (60000, 60000, 3)) is (limit is None)


@pytest.mark.parametrize("threads", [1, 3])
def test_pool_names_the_bad_sample(threads: int) -> None:
    payloads = [encoded(picture(40, 30, seed=s), "JPEG") for s in range(6)]
    payloads[4] = b"broken"
    where = [f"shard-00007.tar: sample {i}" for i in range(6)]
    with DecodePool(threads) as pool, pytest.raises(CorruptShardError,
                                                     match=r"shard-00007\.tar: sample 4: a stored image"):
        pool.decode_batch(payloads, np.empty((6, 30, 40, 3), np.uint8), 3, where)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_started_batches_finish_whole_and_help_with_the_next(threads: int) -> None:
    """`start_batch` hands a batch to the helpers; `finish(then=...)` completes it, taking
    images of the next batch while it waits: every slot of both is decoded exactly once."""
    payloads = [[encoded(picture(40, 30, seed=10 * b + s), "JPEG", quality=90) for s in range(9)]
                for b in range(3)]
    expected = [np.stack([pillow(d, "RGB") for d in batch]) for batch in payloads]
    outs = [np.zeros_like(e) for e in expected]
    with DecodePool(threads) as pool:
        started = [pool.start_batch(batch, out, 3) for batch, out in zip(payloads, outs, strict=True)]
        started[0].finish(then=started[1])
        np.testing.assert_array_equal(outs[0], expected[0])
        started[1].finish(then=started[2])
        started[2].finish()
    for out, want in zip(outs, expected, strict=True):
        np.testing.assert_array_equal(out, want)
    assert all(s.taken == s.finished == len(s.jobs) for s in started)


def test_a_cancelled_share_runs_no_further_job() -> None:
    ran: list[int] = []
    pool = Helpers(1, "test")
    share = pool.start([lambda i=i: ran.append(i) for i in range(5)])  # type: ignore[misc]
    assert ran == list(range(5))  # one thread: done at once
    gate = threading.Event()
    pool = Helpers(2, "test")
    try:
        # Two jobs, so one goes to the helper, which is busy with the first until the gate opens.
        def hold() -> None:
            gate.wait()

        blocked = pool.start([hold, lambda: None])
        later = pool.start([lambda i=i: ran.append(i) for i in range(5, 9)])  # type: ignore[misc]
        later.cancel()  # none taken yet: cancelled at once, nothing runs
        gate.set()
        blocked.finish()
        share.finish()
        assert later.done() and later.taken == 0
    finally:
        gate.set()
        pool.close()
    assert ran == list(range(5))


def test_an_error_in_a_started_batch_is_raised_by_finish() -> None:
    payloads = [encoded(picture(40, 30, seed=s), "JPEG") for s in range(6)]
    payloads[2] = b"broken"
    with DecodePool(2) as pool:
        started = pool.start_batch(payloads, np.empty((6, 30, 40, 3), np.uint8), 3,
                                   [f"sample {i}" for i in range(6)])
        with pytest.raises(CorruptShardError, match="sample 2: a stored image"):
            started.finish()
        assert started.done()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_decode_threads_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match="decode_threads"):
        DecodePool(bad)  # type: ignore[arg-type]


# --- through a real ShardLoader ------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = small_tree(tmp_path_factory.mktemp("src"), 9)
    return small_dataset(src, tmp_path_factory.mktemp("d") / "jpeg", 6, codec="jpeg")


def stored_files(path: Path) -> dict[int, bytes]:
    """Every stored JPEG by sample position, read with tarfile (no shardkit code)."""
    files: dict[int, bytes] = {}
    for shard in sorted(path.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    files[len(files)] = handle.read()
    return files


def epoch(path: Path, workers: int = 0, **options: object) -> list[dict[str, torch.Tensor]]:
    batches = loader(path, 4, workers, shuffle=True, seed=3, **options)
    return [{k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches]


def test_loader_batches_do_not_depend_on_decode_threads(jpeg_ds: Path) -> None:
    files = stored_files(jpeg_ds)
    assert len(files) == 27
    runs = {threads: epoch(jpeg_ds, decode_threads=threads) for threads in (1, 2, 3)}
    runs["workers"] = epoch(jpeg_ds, 2)  # DataLoader worker processes, one decoding thread each
    reference = runs[1]
    assert sorted(i for b in reference for i in b["index"].tolist()) == list(range(27))
    for batch in reference:
        expected = np.stack([pillow(files[i], "RGB") for i in batch["index"].tolist()])
        np.testing.assert_array_equal(batch["image"].numpy(), expected)
    for name, run in runs.items():
        assert len(run) == len(reference), name
        for got, want in zip(run, reference, strict=True):
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), (name, key)


def test_batches_over_several_shards_carry_their_payloads_headers(
        jpeg_ds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch hands the decoder the header rows of exactly its payloads, in their order,
    when its samples come from several shards. Every row read at open is tagged with its
    payload (a height no slot has: decode_into's checks then decode them all)."""
    from shardkit.reader import handles

    tags: dict[int, int] = {}

    def tagged(payloads: list[bytes]) -> np.ndarray:
        rows = jpeg_headers(payloads)
        assert (rows[:, 2] == 3).all()
        for row, data in zip(rows, payloads, strict=True):
            row[0] = tags[id(data)] = 1000 + len(tags)
        return rows

    calls: list[tuple[list[bytes], np.ndarray | None]] = []
    real = DecodePool.start_batch

    def spied(self: DecodePool, payloads: list[bytes], out: object, channels: object = None,
              where: object = None, headers: np.ndarray | None = None) -> object:
        calls.append((list(payloads), headers))
        return real(self, payloads, out, channels, where, headers)  # type: ignore[arg-type]

    monkeypatch.setattr(handles, "jpeg_headers", tagged)
    monkeypatch.setattr(DecodePool, "start_batch", spied)
    batches = epoch(jpeg_ds, decode_threads=2)
    assert len(calls) == len(batches) == 7 and len(tags) == 27
    assert max(len({i // 6 for i in b["index"].tolist()}) for b in batches) > 1  # 6 a shard
    for payloads, headers in calls:
        assert headers is not None
        assert headers[:, 0].tolist() == [tags[id(data)] for data in payloads]
    files = stored_files(jpeg_ds)
    for batch in batches:  # decoded all the same
        expected = np.stack([pillow(files[i], "RGB") for i in batch["index"].tolist()])
        np.testing.assert_array_equal(batch["image"].numpy(), expected)


def test_loader_names_a_corrupt_payload(jpeg_ds: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(jpeg_ds, tmp_path / "copy"))
    shard = copy / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    first = stored_files(jpeg_ds)[6]  # the first sample of shard 1
    start = data.index(first)
    data[start + 2: start + 2 + 64] = bytes(64)  # wreck its headers, keep every size
    shard.write_bytes(bytes(data))
    loader = ShardLoader(copy, 4, shuffle=False, decode_threads=2)
    with pytest.raises(CorruptShardError, match=r"shard-00001\.tar: sample 0: a stored image"):
        list(loader)


@pytest.mark.parametrize("threads", [1, 2])
def test_batches_before_a_corrupt_payload_arrive_whole_first(jpeg_ds: Path, tmp_path: Path,
                                                            threads: int) -> None:
    """A batch decoding on the helpers while the next one is prepared: the error of the next
    one still comes after the batch before it, whole, as with one thread."""
    import shutil

    copy = Path(shutil.copytree(jpeg_ds, tmp_path / "copy"))
    files = stored_files(jpeg_ds)
    shard = copy / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    start = data.index(files[6])  # sample 6, the first of shard 1, in the second batch
    data[start + 2: start + 2 + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    got: list[dict[str, torch.Tensor]] = []
    with pytest.raises(CorruptShardError, match=r"shard-00001\.tar: sample 0"):
        for batch in ShardLoader(copy, 4, shuffle=False, decode_threads=threads):
            got.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
    assert [b["index"].tolist() for b in got] == [[0, 1, 2, 3]]
    np.testing.assert_array_equal(got[0]["image"].numpy(),
                                  np.stack([pillow(files[i], "RGB") for i in range(4)]))


def test_leaving_a_pass_early_leaves_the_next_one_whole(jpeg_ds: Path) -> None:
    """Left after one batch (the next one still decoding on the helpers): the next pass, on
    the same loader and its kept threads, gives every batch as a fresh loader does."""
    files = stored_files(jpeg_ds)
    loader = ShardLoader(jpeg_ds, 4, shuffle=False, decode_threads=2)
    for _ in range(3):
        first = next(iter(loader))
        assert first["index"].tolist() == [0, 1, 2, 3]
    batches = [b["image"].clone() for b in loader]
    assert len(batches) == 7
    images = torch.cat(batches).numpy()
    np.testing.assert_array_equal(images, np.stack([pillow(files[i], "RGB") for i in range(27)]))


# --- conversion: the fast path against Pillow ----------------------------------------------


def convert_both(path: Path, **kwargs: object) -> tuple[np.ndarray, np.ndarray, bool]:
    """(fast path output, Pillow-only output, whether libjpeg-turbo decoded it)."""
    options = ImageOptions(**kwargs)  # type: ignore[arg-type]
    with pillow_limits():
        fast, orig_fast = load_image(path, options)
        slow, orig_slow = load_image(path, options, fast=False)
    assert orig_fast == orig_slow
    with Image.open(path) as im, open(path, "rb") as handle:
        taken = turbo_jpeg(im, handle) is not None  # undrafted: whether this file qualifies
    return to_array(fast), to_array(slow), taken


SOURCES = {
    "baseline": (lambda im, p: im.save(p, quality=90), True),
    "baseline-444": (lambda im, p: im.save(p, quality=95, subsampling=0), True),
    "progressive": (lambda im, p: im.save(p, quality=90, progressive=True), True),
    "grey": (lambda im, p: im.convert("L").save(p, quality=90), True),
    "cmyk": (lambda im, p: im.convert("CMYK").save(p, quality=95), False),
    "mpo": (lambda im, p: im.save(p, format="MPO", save_all=True, quality=90,
                                  append_images=[Image.new("RGB", im.size, (0, 0, 255))]), False),
    "png": (lambda im, p: im.save(p, format="PNG"), False),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize(("resize", "size"), [("center-crop", (150, 150)), ("center-crop", (64, 48)),
                                              ("pad", (100, 100)), ("shorter-side", (120, 120)),
                                              ("stretch", (700, 100))])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_conversion_fast_path_gives_pillows_pixels(
    tmp_path: Path, source: str, resize: str, size: tuple[int, int], mode: str,
) -> None:
    save, qualifies = SOURCES[source]
    path = tmp_path / "in.jpg"
    save(picture(640, 480, seed=9), path)  # drafts 1/2, 1/4 and 1/8 across the sizes above
    fast, slow, taken = convert_both(path, resize=resize, size=size, mode=mode)
    assert taken == qualifies
    assert fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_conversion_fast_path_keeps_exif_orientation(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "oriented.jpg"
    save_oriented(quadrants(960, 640), orientation, path, quality=95)
    for resize, size in [("stretch", (120, 80)), ("center-crop", (60, 60)), ("stretch", (960, 640))]:
        fast, slow, taken = convert_both(path, resize=resize, size=size)
        assert taken
        np.testing.assert_array_equal(fast, slow)
        assert fast.shape == (size[1], size[0], 3)
        for got, want in zip(quadrant_centres(fast), [TL, TR, BL, BR], strict=True):
            assert close(got, want, 12), (orientation, resize, got, want)


def test_conversion_fast_path_failures_match_pillow(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    picture(400, 300).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for fast in (True, False):
        options = ImageOptions(size=(100, 100))
        with pillow_limits(), pytest.raises(ImageFailure) as info:
            load_image(path, options, fast=fast)
        assert (info.value.stage, info.value.reason) == ("decode", "truncated")


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("source", ["baseline", "progressive", "grey"])
def test_turbo_jpeg_decodes_at_pillows_draft_scale(tmp_path: Path, scale: int, source: str) -> None:
    path = tmp_path / "in.jpg"
    SOURCES[source][0](picture(643, 481, seed=11), path)
    ask = (643 // scale, 481 // scale)
    with Image.open(path) as reference:
        reference.draft(None, ask)
        assert reference.size == (-(-643 // scale), -(-481 // scale))  # rounded up
        reference.load()
        expected = np.asarray(reference)
    with Image.open(path) as im, open(path, "rb") as handle:
        im.draft(None, ask)
        fast = turbo_jpeg(im, handle)
    assert fast is not None and fast.mode == ("L" if source == "grey" else "RGB")
    np.testing.assert_array_equal(np.asarray(fast), expected)


@pytest.mark.parametrize("codec", ["jpeg", "png", "raw"])
def test_conversion_fast_path_gives_the_same_output_bytes(tmp_path: Path, codec: str) -> None:
    # The source's ICC profile and comment travel with Pillow's image into what encode()
    # writes (PNG: iCCP, JPEG: COM): the fast path's image must carry them as well.
    from PIL import ImageCms

    from shardkit.conversion.images import encode

    path = tmp_path / "tagged.jpg"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    picture(500, 400, seed=12).save(path, quality=90, icc_profile=icc, comment=b"shot on a phone")
    options = ImageOptions(size=(96, 96))
    outputs = []
    for fast in (True, False):
        with pillow_limits():
            image, _ = load_image(path, options, fast=fast)
        outputs.append(image.tobytes() if codec == "raw" else encode(image, codec, 90))
    assert outputs[0] == outputs[1]


def test_a_decoding_pass_runs_the_loops_torch_single_threaded_and_puts_it_back(
        jpeg_ds: Path, tmp_path: Path) -> None:
    """torch's idle intra-op threads spin and would take the cores the decoding threads use:
    during a pass over jpeg shards the training thread runs torch on one thread, and gets
    its own count back after the pass; raw shards (nothing to decode) leave it alone."""
    before = torch.get_num_threads()
    if before < 2:
        pytest.skip("a single CPU: torch already runs on one thread")
    seen = [torch.get_num_threads() for _ in ShardLoader(jpeg_ds, 4, decode_threads=2)]
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
    passes = iter(ShardLoader(jpeg_ds, 4, decode_threads=2))
    next(passes)
    assert torch.get_num_threads() == 1
    passes.close()  # leaving the loop early gives it back too
    assert torch.get_num_threads() == before
    assert {torch.get_num_threads() for _ in ShardLoader(jpeg_ds, 4, decode_threads=1)} == {before}
    assert {torch.get_num_threads() for _ in ShardLoader(jpeg_ds, 4, torch_threads=2)} == {2}
    raw = small_dataset(small_tree(tmp_path / "src", 3), tmp_path / "raw", 4)
    assert {torch.get_num_threads() for _ in ShardLoader(raw, 4)} == {before}


def test_a_file_too_big_to_read_at_once_decodes_the_same(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Files up to _READ_AT_ONCE are read whole first; a bigger one goes to Pillow as a file.
    # Both must give the same pixels and the same failures.
    from shardkit.conversion import images

    jpeg, png, cut = tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "cut.jpg"
    picture(400, 300, seed=13).save(jpeg, quality=90)
    picture(120, 90, seed=14).save(png)
    cut.write_bytes(jpeg.read_bytes()[:5000])
    options = ImageOptions(size=(64, 64))

    def outcome(path: Path) -> object:
        with pillow_limits():
            try:
                return load_image(path, options)[0].tobytes()
            except ImageFailure as failure:
                return (failure.stage, failure.reason)

    whole = [outcome(p) for p in (jpeg, png, cut)]
    monkeypatch.setattr(images, "_READ_AT_ONCE", 16)
    assert [outcome(p) for p in (jpeg, png, cut)] == whole
    assert whole[2] == ("decode", "truncated")
