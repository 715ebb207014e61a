"""Tar shards as the converter writes them: the member header (shardkit assembles the common
case itself; the bytes must be tarfile's, for every name and size, and tarfile must read them
back), and the joining of a shard's parts as they come back."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import tarfile
import threading
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkit.conversion.scheduler import Joiner
from shardkit.conversion.tasks import PartResult
from shardkit.conversion.writers import tar as tar_writer
from shardkit.conversion.writers.tar import assemble_tar
from shardkit.format.tar import BLOCK, END_OF_ARCHIVE, _tarfile_header, padding, tar_header

names = st.one_of(
    st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/"),
            min_size=1, max_size=110),
    st.text(min_size=1, max_size=60).filter(lambda n: "\0" not in n and "/" not in n),
)
sizes = st.one_of(st.integers(0, 10**7), st.integers(0o77777777770, 0o100000000010))


def reference(name: str, size: int) -> bytes | str:
    try:
        return _tarfile_header(name, size)
    except (ValueError, UnicodeError) as exc:
        return type(exc).__name__


@settings(max_examples=400, deadline=None)
@given(name=names, size=sizes)
def test_the_header_is_tarfiles_own(name: str, size: int) -> None:
    try:
        ours: bytes | str = tar_header(name, size)
    except (ValueError, UnicodeError) as exc:
        ours = type(exc).__name__
    assert ours == reference(name, size)


def test_tarfile_reads_the_members_back() -> None:
    payloads = {"000000.npy": b"\x93NUMPY" + bytes(70), "000000.cls": b"3", "long" * 25: b"x"}
    data = b"".join(tar_header(n, len(p)) + p + padding(len(p)) for n, p in payloads.items())
    with tarfile.open(fileobj=io.BytesIO(data + bytes(1024))) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == list(payloads)
        assert all(m.mtime == 0 and m.mode == 0o644 and m.isreg() for m in members)
        # extractfile is None only for members that are not regular files; these all are.
        assert {m.name: archive.extractfile(m).read() for m in members} == payloads  # type: ignore[union-attr]


def done(shard: int, part: int, path: str, offset: int = -1, nbytes: int = 0) -> PartResult:
    """What a part task returns, as far as the joiner reads it."""
    return PartResult(shard=shard, part=part, path=path, samples=0, failures=(), label_counts=(),
                      cpu_seconds=0.0, offset=offset, nbytes=nbytes)


def test_the_joiner_joins_parts_in_order_whatever_order_they_come_back(tmp_path: Path) -> None:
    parts = []
    for number in range(5):
        part = tmp_path / f"0.{number}.part"
        part.write_bytes(bytes([number + 1]) * (BLOCK * (number + 1)))
        parts.append(str(part))
    expected = tmp_path / "expected.tar"
    size, digest = assemble_tar(parts, str(expected))
    joiner = Joiner()
    try:
        futures = [joiner.add(done(0, number, parts[number]), 5, str(tmp_path / "joined.tar"))
                   for number in (3, 1, 0, 4, 2)]
        assert futures[:4] == [None] * 4  # handed over only once every part is there
        assert futures[4] is not None
        assert futures[4].result(timeout=30) == (size, digest)
    finally:
        joiner.close()
    assert (tmp_path / "joined.tar").read_bytes() == expected.read_bytes()
    assert digest == hashlib.sha256(expected.read_bytes()).hexdigest()


@pytest.mark.parametrize("chunk", [None, 700])
def test_parts_written_in_place_are_taken_in_order_and_moved_behind_short_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int | None) -> None:
    # A shard file as three part tasks leave it, each from its offset in a run without
    # failures (4 blocks a part): part 1 came back with 2 blocks (two failed inputs), so
    # garbage follows it; the joiner must close the gap and cut the tail. A 700-byte buffer
    # moves each part in pieces that overlap where they came from.
    if chunk is not None:
        monkeypatch.setattr(tar_writer, "CHUNK", chunk)
    shard = tmp_path / "s.tar"
    placed = [(0, 4), (4, 2), (8, 3)]  # (first block, blocks written)
    data = bytearray(os.urandom(12 * BLOCK))
    joined = b""
    for number, (first, count) in enumerate(placed):
        chunk = bytes([number + 1]) * (count * BLOCK)
        data[first * BLOCK:first * BLOCK + len(chunk)] = chunk
        joined += chunk
    shard.write_bytes(bytes(data))
    expected = joined + END_OF_ARCHIVE
    joiner = Joiner()
    try:
        futures = [joiner.add(done(0, n, str(shard), placed[n][0] * BLOCK, placed[n][1] * BLOCK),
                              3, str(shard)) for n in (2, 0, 1)]
        assert futures[:2] == [None, None] and futures[2] is not None
        assert futures[2].result(timeout=30) == (len(expected), hashlib.sha256(expected).hexdigest())
    finally:
        joiner.close()
    assert shard.read_bytes() == expected


@pytest.mark.parametrize(("blocks", "first", "second", "error", "message"), [
    # the second part starts inside the first: it would have written over it
    (8, (0, 4), (3, 2), ValueError, r"a part at byte 1536 overlaps the 2048 bytes"),
    # the file was cut short: the second part's last block is not there
    (3, (0, 2), (2, 2), OSError, r"s\.tar: 512 bytes of a part are missing"),
])
def test_a_part_that_is_not_where_it_should_be_fails_the_shard(
        tmp_path: Path, blocks: int, first: tuple[int, int], second: tuple[int, int],
        error: type[Exception], message: str) -> None:
    shard = tmp_path / "s.tar"
    shard.write_bytes(bytes(blocks * BLOCK))
    joiner = Joiner()
    try:
        for number, (start, count) in enumerate((first, second)):
            joined = joiner.add(done(0, number, str(shard), start * BLOCK, count * BLOCK), 2, str(shard))
        assert joined is not None
        with pytest.raises(error, match=message):
            joined.result(timeout=30)
    finally:
        joiner.close()


def test_a_part_that_cannot_be_read_fails_the_shard_not_the_thread(tmp_path: Path) -> None:
    good = tmp_path / "0.0.part"
    good.write_bytes(bytes(BLOCK))
    joiner = Joiner()
    try:
        assert joiner.add(done(7, 0, str(good)), 3, str(tmp_path / "a.tar")) is None
        assert joiner.add(done(7, 1, str(tmp_path / "missing.part")), 3, str(tmp_path / "a.tar")) is None
        failed = joiner.add(done(7, 2, str(good)), 3, str(tmp_path / "a.tar"))
        assert failed is not None
        with pytest.raises(FileNotFoundError, match=r"missing\.part"):
            failed.result(timeout=30)
        # The thread goes on joining other shards.
        other = joiner.add(done(8, 0, str(good)), 1, str(tmp_path / "b.tar"))
        assert other is not None and other.result(timeout=30)[0] == 3 * BLOCK
    finally:
        joiner.close()


def blocked_part(tmp_path: Path, other: str) -> tuple[Path, Path]:
    """A part that is a pipe (its append blocks until something is written into it) and a
    plain part `other` of one block."""
    pipe = tmp_path / "0.0.part"
    os.mkfifo(pipe)
    part = tmp_path / other
    part.write_bytes(bytes(BLOCK))
    return pipe, part


def test_a_joiner_that_falls_behind_says_so_and_catches_up(tmp_path: Path) -> None:
    pipe, part = blocked_part(tmp_path, "0.1.part")
    joiner = Joiner()
    try:
        assert joiner.add(done(0, 0, str(pipe)), 4, str(tmp_path / "a.tar")) is None
        assert joiner.backlog(2) == []
        for number in (1, 2):
            assert joiner.add(done(0, number, str(part)), 4, str(tmp_path / "a.tar")) is None
        assert len(joiner.backlog(2)) == 3  # three appends queued: behind a limit of 2
        with open(pipe, "wb") as writer:  # unblocks the first append
            writer.write(bytes(BLOCK))
        joined = joiner.add(done(0, 3, str(part)), 4, str(tmp_path / "a.tar"))
        assert joined is not None and joined.result(timeout=30)[0] == 6 * BLOCK
        assert joiner.backlog(0) == []
    finally:
        joiner.close()


def test_closing_a_joiner_with_joins_still_queued_closes_their_files(tmp_path: Path) -> None:
    pipe, part = blocked_part(tmp_path, "1.0.part")
    joiner = Joiner()
    queued = [joiner.add(done(0, 0, str(pipe)), 1, str(tmp_path / "a.tar")),
              joiner.add(done(1, 0, str(part)), 1, str(tmp_path / "b.tar"))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threading.Timer(0.2, lambda: pipe.write_bytes(b"")).start()  # lets the first finish
        joiner.close()  # the second shard's append and finish are dropped, unrun
        del queued, joiner
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
