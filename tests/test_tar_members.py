"""`iter_members`, the tar parser every reader of a tar shard goes through: the same members
and bytes as tarfile reads from real shards and from hand-built tars, the names tarfile's own
encoding writes, nothing but zeros after the end of the archive, and each kind of damage
ending in the stated error naming the file."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from corpus import small_dataset, small_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkit.errors import CorruptShardError, UnsafeContentError
from shardkit.format.tar import (
    BLOCK,
    CHECKSUM_FIELD,
    END_OF_ARCHIVE,
    KNOWN_FIELDS,
    PREFIX,
    SIZE_FIELD,
    TYPEFLAG,
    _tarfile_header,
    checksum_bytes,
    padding,
    tar_header,
)
from shardkit.format.tar_members import _number, iter_members

MEMBERS = [("000000.jpg", b"\xff\xd8" + bytes(998)), ("000000.cls", b"7"),
           ("000000.json", b'{"a": 1}'), ("000001.jpg", bytes(512)), ("000001.cls", b"12"),
           ("000001.json", b"{}")]


def archive(members: list[tuple[str, bytes]], end: bytes = END_OF_ARCHIVE) -> bytes:
    """A tar of `members` as the converter writes one (`tar_header`, padding, the end blocks)."""
    return b"".join(tar_header(n, len(p)) + p + padding(len(p)) for n, p in members) + end


def starts(data: bytes) -> list[int]:
    """Offsets of the member headers of `data` (a tar `archive` built)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar.getmembers()]


def sums(header: bytes | bytearray) -> tuple[int, int]:
    """The unsigned and the signed checksum of `header` (512 bytes), as tarfile computes them."""
    return tarfile.calc_chksums(bytes(header))  # type: ignore[attr-defined,no-any-return]


def with_checksum(header: bytes | bytearray) -> bytes:
    """`header` (512 bytes) with its checksum field made right, as the writer writes it."""
    fixed = bytearray(header)
    fixed[CHECKSUM_FIELD] = checksum_bytes(sums(fixed)[0])
    return bytes(fixed)


def edited(data: bytes, offset: int, position: int, value: bytes) -> bytes:
    """`data` with `value` written at `position` of the header at `offset`, its checksum kept
    right: damage that only the fields' meaning can tell."""
    header = bytearray(data[offset:offset + BLOCK])
    header[position:position + len(value)] = value
    return data[:offset] + with_checksum(header) + data[offset + BLOCK:]


def by_tarfile(path: Path) -> list[tuple[str, str, bytes]]:
    with tarfile.open(path) as tar:
        return [(*m.name.partition(".")[::2], tar.extractfile(m).read())  # type: ignore[union-attr]
                for m in tar]


def write(tmp_path: Path, data: bytes, name: str = "shard-00000.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(path: Path, error: type[Exception], message: str = "") -> None:
    """Reading `path` ends in `error`, its message naming the file (then saying `message`)."""
    with pytest.raises(error, match=f"^{path}: .*{message}") as caught:
        list(iter_members(path))
    assert type(caught.value) is error


# --- what a sound shard holds -----------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    src = small_tree(tmp_path_factory.mktemp("src"), 5)
    out = tmp_path_factory.mktemp("out")
    found: list[Path] = []
    for codec in ("jpeg", "png", "raw"):
        dataset = small_dataset(src, out / codec, 6, codec=codec)
        found += sorted(dataset.glob("shard-*.tar"))
    return found


def test_real_shards_read_as_tarfile_reads_them(shards: list[Path]) -> None:
    assert len(shards) == 9  # 15 samples, 6 to a shard, three codecs
    for path in shards:
        ours = list(iter_members(path))
        assert ours == by_tarfile(path)
        assert {field for _, field, _ in ours} <= KNOWN_FIELDS and len(ours) >= 9
        assert all(type(data) is bytes for _, _, data in ours)


def test_every_payload_size_around_a_block(tmp_path: Path) -> None:
    sizes = (0, 1, 511, 512, 513, 1023, 1024, 1025, 4096, 10_000)
    members = [(f"{i:06d}.json", (bytes(range(256)) * 40)[:size]) for i, size in enumerate(sizes)]
    path = write(tmp_path, archive(members))
    assert list(iter_members(path)) == by_tarfile(path) == [
        (name.split(".")[0], "json", data) for name, data in members]


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(sorted(KNOWN_FIELDS)), st.binary(max_size=2000)),
                max_size=8))
def test_any_members_read_as_tarfile_reads_them(tmp_path: Path,
                                                members: list[tuple[str, bytes]]) -> None:
    named = [(f"{i:06d}.{field}", data) for i, (field, data) in enumerate(members)]
    path = write(tmp_path, archive(named))
    assert list(iter_members(path)) == by_tarfile(path)


def test_a_name_filling_its_field_has_no_nul(tmp_path: Path) -> None:
    name = "7" * 96 + ".cls"
    header = tar_header(name, 1)
    assert len(name) == 100 and header[99:101] == b"s0"  # the name runs into the mode field
    path = write(tmp_path, archive([(name, b"1")]))
    assert list(iter_members(path)) == [("7" * 96, "cls", b"1")]


def test_a_non_ascii_name_reads_back(tmp_path: Path) -> None:
    name = "ключ-é.json"  # goes through tarfile's own encoding
    assert tar_header(name, 2) == _tarfile_header(name, 2)
    path = write(tmp_path, archive([(name, b"{}")]))
    assert list(iter_members(path)) == by_tarfile(path) == [("ключ-é", "json", b"{}")]


def test_a_long_name_is_joined_from_the_prefix_field(tmp_path: Path) -> None:
    """A name over 100 bytes goes into the ustar prefix and name fields; read back whole, it
    is refused for its "/" (what tarfile's name would be)."""
    name = "k" * 120 + "/000000.jpg"
    header = _tarfile_header(name, 1)
    assert header[PREFIX:PREFIX + 120] == b"k" * 120 and header[:11] == b"000000.jpg\0"
    path = write(tmp_path, header + b"x" + padding(1) + END_OF_ARCHIVE)
    with tarfile.open(path) as tar:
        assert tar.getnames() == [name]
    refused(path, UnsafeContentError, f"member name '{name}' is not a plain key")


@pytest.mark.parametrize("field", [
    b"%06o\0 ",  # tarfile, GNU tar
    b"%07o\0",  # other writers: seven digits and a NUL
    b"  %04o \0",
    b"%o\0",  # then spaces
    b"%o",  # no NUL at all
])
def test_checksum_fields_as_other_writers_write_them(tmp_path: Path, field: bytes) -> None:
    data = archive(MEMBERS)
    for offset in starts(data):
        header = bytearray(data[offset:offset + BLOCK])
        value = (field % sums(header)[0]).ljust(8, b" ")
        assert len(value) == 8
        header[CHECKSUM_FIELD] = value
        data = data[:offset] + bytes(header) + data[offset + BLOCK:]
    path = write(tmp_path, data)
    assert list(iter_members(path)) == by_tarfile(path)
    assert [(k, f) for k, f, _ in iter_members(path)] == [tuple(n.split(".")) for n, _ in MEMBERS]


def test_the_signed_checksum_is_accepted_as_by_tarfile(tmp_path: Path) -> None:
    """Some old tars summed the header's bytes as signed chars; tarfile takes either sum."""
    header = bytearray(tar_header("ключ.cls", 1))
    unsigned, signed = sums(header)
    assert max(header) >= 0x80 and signed != unsigned
    header[CHECKSUM_FIELD] = checksum_bytes(signed)
    path = write(tmp_path, bytes(header) + b"3" + padding(1) + END_OF_ARCHIVE)
    assert list(iter_members(path)) == by_tarfile(path) == [("ключ", "cls", b"3")]
    header[CHECKSUM_FIELD] = checksum_bytes(signed + 1)
    refused(write(tmp_path, bytes(header) + b"3" + padding(1) + END_OF_ARCHIVE),
            CorruptShardError, "bad checksum in the header at offset 0")


@pytest.mark.parametrize("size_field", [
    b"00000000003\0", b"3\0" + bytes(10), b"        3 \0\0", b"3           ",
    b"\x80" + (3).to_bytes(11, "big"),  # GNU base-256
])
def test_size_fields_as_tarfile_reads_them(tmp_path: Path, size_field: bytes) -> None:
    data = edited(archive([("000000.cls", b"123")]), 0, SIZE_FIELD.start, size_field)
    path = write(tmp_path, data)
    assert list(iter_members(path)) == by_tarfile(path) == [("000000", "cls", b"123")]


fields = st.integers(0, 1).flatmap(lambda wide: st.one_of(
    st.text(" 0123456789\0\t\x1c+-_oxé", min_size=8 + 4 * wide, max_size=8 + 4 * wide)
    .map(lambda text: text.encode()[:8 + 4 * wide].ljust(8 + 4 * wide, b"\0")),
    st.binary(min_size=8 + 4 * wide, max_size=8 + 4 * wide),
    st.tuples(st.sampled_from([b"\x80", b"\xff"]), st.binary(min_size=7 + 4 * wide,
                                                           max_size=7 + 4 * wide)).map(b"".join),
))


@settings(max_examples=2000, deadline=None)
@given(fields)
def test_number_fields_as_tarfile_reads_them(field: bytes) -> None:
    """Size and checksum fields (12 and 8 bytes): octal in any spacing tarfile allows, or
    base-256; None where tarfile finds an invalid header."""
    try:
        expected: int | None = tarfile.nti(field)  # type: ignore[attr-defined]
    except tarfile.HeaderError:
        expected = None
    assert _number(field) == expected


@pytest.mark.parametrize("end", [bytes(BLOCK), END_OF_ARCHIVE, bytes(BLOCK + 100),
                                 bytes(20 * BLOCK)])
def test_zeros_to_the_end_of_the_file_end_the_archive(tmp_path: Path, end: bytes) -> None:
    """A zero block, then nothing but zeros: shardkit writes two blocks, tarfile pads an
    archive to a whole record of 20."""
    path = write(tmp_path, archive(MEMBERS[:2], end))
    assert list(iter_members(path)) == by_tarfile(path) == [
        ("000000", "jpg", MEMBERS[0][1]), ("000000", "cls", b"7")]
    assert list(iter_members(write(tmp_path, end))) == []


def test_a_tar_written_by_tarfile(tmp_path: Path) -> None:
    """A tar that tarfile writes (zero blocks to a whole record at the end) reads as tarfile
    reads it: the tests that rewrite a shard with tarfile count on it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in MEMBERS:
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    assert len(buffer.getvalue()) % (20 * BLOCK) == 0
    path = write(tmp_path, buffer.getvalue())
    assert list(iter_members(path)) == by_tarfile(path)
    assert len(by_tarfile(path)) == len(MEMBERS)


@pytest.mark.parametrize("after", ["members", "a zeroed header", "noise", "one byte"])
def test_data_after_a_zero_block(tmp_path: Path, after: str) -> None:
    """The first zero block ends the archive, and anything but zeros after it is damage (a
    header zeroed in place, members after an end marker): an error naming both offsets."""
    data = archive(MEMBERS)
    at = starts(data)
    zero, follows = at[2], at[2] + BLOCK
    if after == "members":
        damaged = archive(MEMBERS[:2], bytes(BLOCK)) + archive(MEMBERS[2:])
    elif after == "a zeroed header":  # member 3's payload is zeros: member 4's header follows
        zero, follows = at[3], at[4]
        damaged = data[:zero] + bytes(BLOCK) + data[zero + BLOCK:]
    elif after == "noise":
        noise = np.random.default_rng(7).integers(1, 256, 3000, dtype=np.uint8).tobytes()
        damaged = archive(MEMBERS[:2], bytes(BLOCK)) + noise
    else:
        follows = zero + 700
        damaged = archive(MEMBERS[:2], bytes(700) + b"\x01" + bytes(323))
    refused(write(tmp_path, damaged), CorruptShardError,
            f"not a readable tar file: the zero block at offset {zero} ends the archive, "
            f"but data follows at offset {follows}$")


def test_a_file_cut_at_a_member_boundary_reads_as_a_shorter_archive(tmp_path: Path) -> None:
    """As with tarfile: readers count the samples and verify looks for the end blocks."""
    data = archive(MEMBERS)
    path = write(tmp_path, data[:starts(data)[3]])
    assert list(iter_members(path)) == by_tarfile(path) == [
        (*n.split("."), p) for n, p in MEMBERS[:3]]


def test_a_damaged_end_marker_is_left_to_verify(tmp_path: Path) -> None:
    """A header with a wrong checksum that starts the file's last 1,024 bytes, after a
    member, is where the end-of-archive marker belongs: it ends the archive, and verify
    reports the marker (tests/test_verify.py). Anywhere else it is an error."""
    path = write(tmp_path, archive(MEMBERS, b"\x01" * len(END_OF_ARCHIVE)))
    assert [(k, f, len(d)) for k, f, d in iter_members(path)] == [
        (*name.split("."), len(payload)) for name, payload in MEMBERS]
    members_end = len(archive(MEMBERS, b""))
    refused(write(tmp_path, archive(MEMBERS, b"\x01" * len(END_OF_ARCHIVE) + END_OF_ARCHIVE)),
            CorruptShardError, f"bad checksum in the header at offset {members_end}$")


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(iter_members(tmp_path / "absent.tar"))


# --- damage: CorruptShardError ----------------------------------------------------------


@pytest.mark.parametrize("member", [0, 3, 5])
@pytest.mark.parametrize("byte", [CHECKSUM_FIELD.start, CHECKSUM_FIELD.start + 2,
                                  CHECKSUM_FIELD.stop - 2])  # digits, the NUL after them
def test_a_flipped_checksum_byte(tmp_path: Path, member: int, byte: int) -> None:
    """A wrong checksum is an error naming its header's offset, in the first header as in
    any later one."""
    data = bytearray(archive(MEMBERS))
    offset = starts(bytes(data))[member]
    data[offset + byte] ^= 0x01
    refused(write(tmp_path, bytes(data)), CorruptShardError,
            f"not a readable tar file: bad checksum in the header at offset {offset}")


@pytest.mark.parametrize("position", [0, 5, 100, SIZE_FIELD.start + 3, TYPEFLAG, 257, 400, 511])
def test_a_flipped_header_byte(tmp_path: Path, position: int) -> None:
    data = bytearray(archive(MEMBERS))
    offset = starts(bytes(data))[4]
    data[offset + position] ^= 0x10
    refused(write(tmp_path, bytes(data)), CorruptShardError, "bad checksum")


@pytest.mark.parametrize("member", [0, 2, 5])
@pytest.mark.parametrize("into", [1, 100, 511])
def test_a_file_cut_inside_a_header(tmp_path: Path, member: int, into: int) -> None:
    data = archive(MEMBERS)
    offset = starts(data)[member]
    refused(write(tmp_path, data[:offset + into]), CorruptShardError,
            f"truncated header at offset {offset}")


@pytest.mark.parametrize("member,into", [(0, 1), (0, 300), (3, 511), (5, 1),
                                         (0, len(MEMBERS[0][1]) + 10)])  # the last: in the padding
def test_a_file_cut_inside_a_payload(tmp_path: Path, member: int, into: int) -> None:
    data = archive(MEMBERS)
    offset = starts(data)[member]
    refused(write(tmp_path, data[:offset + BLOCK + into]), CorruptShardError,
            f"unexpected end of data: the member at offset {offset} ends at byte")


@pytest.mark.parametrize("size_field", [
    b"%011o\0" % 2000,  # a few blocks past the end
    b"77777777777\0",  # 8 GiB
    b"\x80" + (1 << 80).to_bytes(11, "big"),  # base-256: far more than any file
])
def test_a_size_past_the_end_of_the_file(tmp_path: Path, size_field: bytes) -> None:
    data = edited(archive(MEMBERS[:2]), starts(archive(MEMBERS[:2]))[1], SIZE_FIELD.start, size_field)
    refused(write(tmp_path, data), CorruptShardError, "unexpected end of data")


@pytest.mark.parametrize("size_field", [
    b"\xff" + bytes(10) + b"\x05",  # base-256, negative
    b"-0000000005\0",
    b"00000000009\0",  # not octal
    b"\xe9" * 12,
])
def test_a_size_field_that_is_no_size(tmp_path: Path, size_field: bytes) -> None:
    data = edited(archive(MEMBERS), 0, SIZE_FIELD.start, size_field)
    refused(write(tmp_path, data), CorruptShardError, "invalid size field in the header at offset 0")


def test_an_empty_file(tmp_path: Path) -> None:
    refused(write(tmp_path, b""), CorruptShardError, "not a readable tar file: empty file")


@pytest.mark.parametrize("length", [1, 100, 511, 512, 1024, 5000, 1 << 16])
def test_random_bytes(tmp_path: Path, length: int) -> None:
    data = np.random.default_rng(length).integers(1, 256, length, dtype=np.uint8).tobytes()
    refused(write(tmp_path, data), CorruptShardError, "not a readable tar file")


@pytest.mark.parametrize("data", [b"not a tar file\n" * 100, b"PK\x03\x04" + bytes(2000),
                                  b"\x89PNG\r\n\x1a\n" + bytes(600)])
def test_other_files(tmp_path: Path, data: bytes) -> None:
    refused(write(tmp_path, data), CorruptShardError, "not a readable tar file")


def test_damage_anywhere_raises_before_any_member(tmp_path: Path) -> None:
    """Every header is checked before the first member comes out: no caller acts on a part
    of a damaged shard."""
    data = bytearray(archive(MEMBERS))
    data[starts(bytes(data))[-1] + 3] ^= 0x01
    members = iter_members(write(tmp_path, bytes(data)))
    with pytest.raises(CorruptShardError):
        next(members)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_flipped_bit_or_cut(tmp_path: Path, data: st.DataObject) -> None:
    """Whatever the damage, one of the two errors or every member the damage leaves: all of
    them after a flipped bit (in a payload, its padding, the end marker's first block, a
    checksum field's NUL or space), the ones before a cut that falls on a member boundary.
    A shard never reads as a shorter one than the damage made it."""
    original = archive(MEMBERS)
    boundaries = [*starts(original), len(original) - len(END_OF_ARCHIVE)]
    damaged = bytearray(original)
    cut = None
    if data.draw(st.booleans()):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] ^= 1 << data.draw(st.integers(0, 7))
    else:
        cut = data.draw(st.integers(0, len(damaged) - 1))
        del damaged[cut:]
    try:
        members = list(iter_members(write(tmp_path, bytes(damaged))))
    except (CorruptShardError, UnsafeContentError):
        return
    expected = [(*name.split("."), len(payload)) for name, payload in MEMBERS]
    read = [(k, f, len(d)) for k, f, d in members]
    if cut is None:
        assert read == expected
    else:  # a cut after the last member leaves them all, but only from the marker's start
        assert read == expected[:len(read)]
        assert cut == boundaries[len(read)] if len(read) < len(MEMBERS) else cut >= boundaries[-1]


# --- unsafe members: UnsafeContentError -------------------------------------------------


def spliced(member: bytes, before: int = 3) -> bytes:
    """A sound archive with `member` (headers and data) in it, after the first `before`."""
    data = archive(MEMBERS)
    at = starts(data)[before]
    return data[:at] + member + data[at:]


def info(name: str, kind: bytes, **fields: object) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    for field, value in fields.items():
        setattr(member, field, value)
    return member


@pytest.mark.parametrize("member", [
    info("000000.jpg", tarfile.SYMTYPE, linkname="/etc/passwd"),
    info("000000.jpg", tarfile.LNKTYPE, linkname="000000.cls"),
    info("000000.jpg", tarfile.DIRTYPE),
    info("000000.jpg", tarfile.CHRTYPE, devmajor=1, devminor=3),
    info("000000.jpg", tarfile.FIFOTYPE),
    info("000000.jpg", tarfile.CONTTYPE),  # tarfile reads it as a regular file
])
def test_members_that_are_not_regular_files(tmp_path: Path, member: tarfile.TarInfo) -> None:
    path = write(tmp_path, spliced(member.tobuf(tarfile.USTAR_FORMAT)))
    # (tarfile writes a directory's name with a "/" at the end)
    refused(path, UnsafeContentError, "member '000000.jpg/?' is not a regular file$")


@pytest.mark.parametrize("header", ["pax", "pax global", "gnu long name", "gnu long link"])
def test_extended_headers(tmp_path: Path, header: str) -> None:
    """Pax and GNU extended headers (type flags x, g, L, K), which shardkit never writes:
    tarfile applies them to the member after them (a pax header can rename it, give it any
    size) and lists no member for them; they are refused here as members that are not
    regular files."""
    payload = b"x"
    if header == "pax":
        member = info("000001.jpg", tarfile.REGTYPE, size=1, pax_headers={"comment": "hi"})
        data = member.tobuf(tarfile.PAX_FORMAT)
    elif header == "pax global":
        data = tarfile.TarInfo.create_pax_global_header({"comment": "hi"})
        data += info("000001.jpg", tarfile.REGTYPE, size=1).tobuf(tarfile.USTAR_FORMAT)
    elif header == "gnu long name":
        data = info("1" * 120 + ".jpg", tarfile.REGTYPE, size=1).tobuf(tarfile.GNU_FORMAT)
    else:
        data = info("000001.jpg", tarfile.SYMTYPE, linkname="l" * 120).tobuf(tarfile.GNU_FORMAT)
        payload = b""
    flag = {"pax": b"x", "pax global": b"g", "gnu long name": b"L", "gnu long link": b"K"}[header]
    assert data[TYPEFLAG:TYPEFLAG + 1] == flag
    path = write(tmp_path, spliced(data + payload + padding(len(payload))))
    if header != "gnu long link":  # what tarfile's stream mode makes of it
        with tarfile.open(path, mode="r|") as tar:
            assert all(m.isreg() for m in tar)
    refused(path, UnsafeContentError, "is not a regular file$")


@pytest.mark.parametrize("name", ["/tmp/000000.jpg", "../000000.jpg", "../x.jpg", "sub/000000.jpg",
                                  "000000..jpg", "a\\000000.jpg", "000000.jpg/"])
def test_names_that_are_not_plain_keys(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, spliced(_tarfile_header(name, 1) + b"x" + padding(1)))
    refused(path, UnsafeContentError, "is not a plain key")


@pytest.mark.parametrize("name", ["000000.pyd", "000000.pickle", "000000", "000000.jpg.exe",
                                  "000000.JPG", "000000.j\udcffg"])
def test_unknown_fields(tmp_path: Path, name: str) -> None:
    header = bytearray(tar_header("x.cls", 1))
    header[:100] = name.encode("utf-8", "surrogateescape").ljust(100, b"\0")
    path = write(tmp_path, spliced(with_checksum(header) + b"x" + padding(1)))
    refused(path, UnsafeContentError, "has an unknown field")


def test_an_unsafe_member_after_damage_is_corrupt(tmp_path: Path) -> None:
    """Headers are checked in order: damage before a link is what a reader hears of."""
    link = info("000009.jpg", tarfile.SYMTYPE, linkname="/etc/passwd").tobuf(tarfile.USTAR_FORMAT)
    data = bytearray(spliced(link, before=3))
    data[starts(archive(MEMBERS))[2] + 1] ^= 0x01
    refused(write(tmp_path, bytes(data)), CorruptShardError, "bad checksum")
