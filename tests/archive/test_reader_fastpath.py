"""The reader's fast path (``TarReader._fast_next``) against its general path.

The fast path decodes members of the common shape with fewer calls and hands anything
else to the general path.  Here both read the same bytes — the corpus tars, and
thousands of generated members with mutated fields, checksums, PAX records and cuts,
through streams that return short reads — and must give the same entries (every field,
the raw header bytes with ``keep_raw``), the same data, the same trailer and the same
error (class, message, layer, path).
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.archive import reader
from lamina.errors import UnsafeArchive
from tests import tarbuild as tb
from tests.conftest import in_ci, lacking

FUZZ = settings(deadline=None, derandomize=in_ci(), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class GeneralReader(reader.TarReader):
    """The reader with its fast path off: every member through _next and _member."""

    def _fast_next(self) -> reader.Entry | None:
        return None


class ShortReads(io.RawIOBase):
    """``data`` handed out at most ``chunk`` bytes a read, so that members straddle the
    reader's buffer and the fast path meets its edges."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data = memoryview(data)
        self._chunk = chunk
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._chunk if size < 0 else min(size, self._chunk)
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(out)
        return out


def outcome(cls: type[reader.TarReader], data: bytes, *, keep_raw: bool, chunk: int,
            copy_every: int = 2) -> list[object]:
    """Everything a caller can see of reading ``data``: each entry (all fields), the
    stream position after it, its data (or CRC-32), the trailer, and the error."""
    seen: list[object] = []
    fd = os.memfd_create("fastpath")
    tar = cls(ShortReads(data, chunk), layer="L", keep_raw=keep_raw)  # type: ignore[arg-type]
    try:
        for i, entry in enumerate(tar):
            seen.append((dataclasses.astuple(entry), tar.consumed))
            if entry.type == reader.REG and i % copy_every == 0:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                crc = tar.copy_data(entry, fd, checksum=True)
                seen.append((crc, os.fstat(fd).st_size, tar.consumed))
        if keep_raw:
            seen.append(("trailer", tar.trailer()))
    except UnsafeArchive as e:
        seen.append(("error", type(e), str(e), e.layer, e.path, tar.consumed))
    finally:
        os.close(fd)
    return seen


def assert_same(data: bytes, chunk: int = 1 << 20) -> None:
    for keep_raw in (False, True):
        want = outcome(GeneralReader, data, keep_raw=keep_raw, chunk=chunk)
        got = outcome(reader.TarReader, data, keep_raw=keep_raw, chunk=chunk)
        assert got == want


# --- the corpus ------------------------------------------------------------------------------


def corpus_tars(root: Path) -> Iterator[Path]:
    yield from sorted(root.glob("*.tar"))
    yield from sorted(Path("/var/tmp/lamina-bench-data").glob("small-files.tar"))


@pytest.mark.corpus
@pytest.mark.slow
def test_corpus_tars_read_the_same(corpus_dir: Path) -> None:
    tars = list(corpus_tars(corpus_dir))
    if not tars:
        lacking("no corpus tars")
    for path in tars:
        data = path.read_bytes()
        for keep_raw in (False, True):
            want = outcome(GeneralReader, data, keep_raw=keep_raw, chunk=1 << 20, copy_every=3)
            got = outcome(reader.TarReader, data, keep_raw=keep_raw, chunk=1 << 20,
                          copy_every=3)
            assert got == want, path
        # The fast path takes nearly every member of a real layer.
        slow = 0

        class Counting(reader.TarReader):
            def _next(self) -> reader.Entry | None:
                nonlocal slow
                slow += 1
                return super()._next()

        members = sum(1 for _ in Counting(io.BytesIO(data)))
        assert slow <= members // 50 + 2, path


# --- built and mutated members ---------------------------------------------------------------

# A header's fields: (offset, width) of name mode uid gid size mtime chksum typeflag
# linkname magic version uname gname devmajor devminor prefix.
FIELDS = {
    "name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
    "mtime": (136, 12), "chksum": (148, 8), "type": (156, 1), "linkname": (157, 100),
    "magic": (257, 6), "version": (263, 2), "devmajor": (329, 8), "devminor": (337, 8),
    "prefix": (345, 155),
}
NUMBERS = [b"0000644\0", b"000644 \0", b" 0644\0  ", b"644", b"00000000644", b"", b"\0" * 8,
           b"-1\0", b"0_7\0", b"0o17\0", b"8\0", b"\0 0644\0", b" \0 12\0", b"12\0garb",
           b"\x80\0\0\0\0\0\0\x10", b"\xff" * 8, b"\x81\0\0\0", b"77777777777", b" +7\0",
           b"\t7\0", b"00000000001\0", b"00000001000\0"]
TYPES = [b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K",
         b"S", b"D", b"V", b"M", b"A"]
PAX_KEYS = ["mtime", "atime", "ctime", "path", "linkpath", "size", "uid", "gid", "uname",
            "SCHILY.xattr.user.a", "SCHILY.xattr.security.capability", "SCHILY.xattr.a\0b",
            "GNU.sparse.major", "GNU.sparse.size", "GNU.sparse.name", "comment", "\udcff",
            "", "a b", "k\nv"]
PAX_VALUES = [b"1700000000.123456789", b"1700000000.02387739", b"1700000000", b"17.",
              b".5", b"-1.5", b"-0.5", b" 17.5", b"17 .5", b"1_7.5", b"17.1_2345678",
              b"17.+12345678", b"17.1234567891", b"1" * 4296 + b".5", b"1" * 5000, b"42",
              b"-3", b"0", b"", b"\0", b"a\nb", b"dir/name", b"d\0n", b"x=y", b"\xff\xfe",
              b"1.5.3", b"+5.5", b"\xd9\xa3"]


def header(fields: dict[str, bytes], chksum: str = "unsigned") -> bytes:
    """A header with ``fields`` (each cut or NUL-padded to its width) and a checksum:
    'unsigned' or 'signed' (each valid), or 'keep' (the field as given)."""
    block = bytearray(tb.BLOCK)
    for key, value in fields.items():
        off, width = FIELDS[key]
        block[off : off + width] = value[:width].ljust(width, b"\0")
    if chksum in ("unsigned", "signed"):
        block[148:156] = b" " * 8
        total = sum(block) - (256 * sum(1 for b in block if b > 127) if chksum == "signed"
                              else 0)
        block[148:156] = b"%06o\0 " % (total & 0o777777)
    return bytes(block)


def plain(name: bytes, size: int, type: bytes = b"0", **extra: bytes) -> dict[str, bytes]:
    return {"name": name, "mode": b"0000644\0", "uid": b"0001750\0", "gid": b"0000144\0",
            "size": b"%011o\0" % size, "mtime": b"14760120123\0", "type": type,
            "magic": b"ustar\0", "version": b"00", **extra}


def pax_record(key: str, value: bytes, delta: int = 0) -> bytes:
    body = b" " + key.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length + delta).encode() + body


numbers = st.one_of(st.sampled_from(NUMBERS), st.binary(max_size=12))
# Near-times: what int() takes besides digits (signs, spaces, underscores) on either side.
times = st.builds(lambda *parts: b"".join(parts),
                  st.sampled_from([b"", b"", b"-", b"+", b" ", b" -", b"\t", b"0"]),
                  st.text("0123456789", min_size=0, max_size=11).map(str.encode),
                  st.sampled_from([b"", b"_", b" ", b"_1"]),
                  st.sampled_from([b".", b".", b"", b".."]),
                  st.text("0123456789", max_size=12).map(str.encode),
                  st.sampled_from([b"", b"", b"", b"_5", b" ", b"+1", b"-", b"x", b"\xd9\xa3"]))
records = st.lists(st.tuples(st.sampled_from(PAX_KEYS),
                             st.one_of(st.sampled_from(PAX_VALUES), st.binary(max_size=24),
                                       times),
                             st.sampled_from([0] * 8 + [-1, 1, -100, 10_000])),
                   max_size=5)


@st.composite
def members(draw: st.DrawFn) -> bytes:
    """One member, often behind a PAX header: plain, or with fields mutated."""
    body = draw(st.sampled_from([b"", b"hello\n", b"x" * 700, bytes(range(256)) * 3]))
    fields = plain(draw(st.sampled_from([b"f", b"dir/", b"a/b/c", b"\xff\xfe", b"n" * 100])),
                   len(body), draw(st.sampled_from(TYPES)))
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3)):
        fields[key] = draw(numbers if key in ("mode", "uid", "gid", "size", "mtime",
                                              "chksum", "devmajor", "devminor")
                           else st.binary(max_size=FIELDS[key][1]))
    if draw(st.booleans()):
        fields["prefix"] = draw(st.sampled_from([b"usr/lib", b"\0x", b"p" * 155]))
    chksum = draw(st.sampled_from(["unsigned"] * 6 + ["signed", "keep"]))
    out = header(fields, chksum) + tb.pad(body)
    if draw(st.integers(0, 3)):
        pax = b"".join(pax_record(k, v, d) for k, v, d in draw(records))
        pax += draw(st.sampled_from([b""] * 6 + [b"\n", b"junk", b"5 a=b\n", b"\0"]))
        pax_fields = plain(b"./PaxHeaders/f", len(pax), b"x")
        if draw(st.integers(0, 7)) == 0:
            pax_fields["size"] = draw(numbers)
        out = header(pax_fields, draw(st.sampled_from(["unsigned"] * 6 + ["signed", "keep"]))
                     ) + tb.pad(pax) + out
    return out


@st.composite
def archives(draw: st.DrawFn) -> tuple[bytes, int]:
    data = b"".join(draw(st.lists(members(), min_size=1, max_size=4)))
    data += draw(st.sampled_from([tb.END, tb.END, tb.END + b"\0" * 1024, tb.END + b"junk",
                                  b"\0" * 512 + b"x" * 512, b""]))
    if draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    chunk = draw(st.sampled_from([1 << 20, 1 << 20, 512, 700, 1536, 4096, 100]))
    return data, chunk


@settings(FUZZ, max_examples=3000)
@given(case=archives())
def test_generated_members_read_the_same(case: tuple[bytes, int]) -> None:
    data, chunk = case
    assert_same(data, chunk)


@settings(FUZZ, max_examples=1500)
@given(mtime=times, atime=times, key=st.sampled_from(["mtime", "atime", "ctime"]))
def test_pax_times_read_the_same(mtime: bytes, atime: bytes, key: str) -> None:
    pax = pax_record(key, mtime) + pax_record("atime", atime)
    data = (header(plain(b"./PaxHeaders/f", len(pax), b"x")) + tb.pad(pax)
            + header(plain(b"f", 1)) + tb.pad(b"x") + tb.END)
    assert_same(data)


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_flipped_bytes_read_the_same(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(BASES))
    mutable = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(mutable) - 1))
        mutable[pos] = data.draw(st.integers(0, 255))
    assert_same(bytes(mutable), data.draw(st.sampled_from([1 << 20, 512, 1000])))


def _tarfile(format: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=format) as tar:
        for name, kind, body in [("d/", tarfile.DIRTYPE, b""), ("d/f", tarfile.REGTYPE, b"hi"),
                                 ("d/l", tarfile.SYMTYPE, b""), ("p/" * 60 + "x",
                                                                 tarfile.REGTYPE, b"y" * 600),
                                 ("dev", tarfile.CHRTYPE, b""), ("h", tarfile.LNKTYPE, b"")]:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime, info.uid = kind, len(body), 1.5e9 + 0.25, 1000
            info.linkname = "d/f" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.devmajor, info.devminor = 1, 3
            if format == tarfile.PAX_FORMAT:
                info.pax_headers = {"mtime": "1500000000.25", "atime": "1500000001.5",
                                    "SCHILY.xattr.user.k": "v"}
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


BASES = [
    _tarfile(tarfile.PAX_FORMAT),
    _tarfile(tarfile.GNU_FORMAT),
    _tarfile(tarfile.USTAR_FORMAT),
    tb.raw_gnu_sparse("s", [(0, b"a" * 512), (4096, b"b" * 100)], 8192) + tb.END,
    tb.raw_pax_sparse_1_0("s", [(0, b"a" * 512), (4096, b"b" * 100)], 8192) + tb.END,
    tb.raw_pax_sparse_0_1("s", [(0, b"a" * 512), (4096, b"b" * 100)], 8192) + tb.END,
    tb.raw_gnu_long("l" * 200) + tb.raw_member("short", b"z") + tb.END,
]


@pytest.mark.parametrize("chunk", [1 << 20, 512, 513, 1000])
@pytest.mark.parametrize("index", range(len(BASES)))
def test_built_tars_read_the_same(index: int, chunk: int) -> None:
    assert_same(BASES[index], chunk)
