"""Resource abuse: layer tars built to exhaust memory, disk or time.

Huge PAX records, size fields larger than the stream, names past PATH_MAX, millions of tiny
entries, gzip and zstd bombs: each is a clean ``UnsafeArchive`` (or completes), quickly, and
with bounded memory, which the tests measure: the caller's peak RSS (``VmHWM``, reset
before the apply) and, with the isolated child, the child's (``ru_maxrss``, which it sends
back).  The streams are generated as they are read: a bomb never sits in the test's memory.
``apply.max_entries`` and ``apply.max_size`` are the driver options that cap an apply.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard

import lamina
from lamina import errors
from lamina.archive import isolate
from lamina.archive.export import open_stream
from lamina.archive.reader import MAX_META
from tests import tarbuild as tb
from tests.conftest import Stores
from tests.layers import apply, names, read

pytestmark = pytest.mark.root

MiB = 1 << 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


class Outcome:
    """What an apply did: its error (or size), its time and its memory."""

    def __init__(self) -> None:
        self.error: errors.LaminaError | None = None
        self.size: int | None = None
        self.seconds = 0.0
        self.caller_mib = 0.0
        self.child_mib = 0.0


def measure(drv: lamina.Driver, stream: BinaryIO, *, id: str = "l",
            parent: str | None = None) -> Outcome:
    """Apply ``stream``; how it ended, how long it took, the peak memory it needed."""
    out = Outcome()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process's peak RSS (VmHWM)
    before = _status_kb("VmRSS")
    start = time.monotonic()
    try:
        out.size = drv.apply_diff(id, parent, stream)
    except errors.LaminaError as e:
        out.error = e
    out.seconds = time.monotonic() - start
    out.caller_mib = (_status_kb("VmHWM") - before) / 1024
    usage = isolate.last_child_usage()
    out.child_mib = usage["maxrss_kb"] / 1024 if usage else 0.0
    return out


def refused(out: Outcome, match: str, *, mib: float = 64, seconds: float = 20) -> None:
    """The apply was refused as unsafe with ``match`` in its message, in bounds."""
    assert isinstance(out.error, errors.UnsafeArchive), f"not refused: {out.error!r}"
    assert match in str(out.error), str(out.error)
    bounded(out, mib=mib, seconds=seconds)


def bounded(out: Outcome, *, mib: float = 64, seconds: float = 20) -> None:
    assert out.caller_mib < mib, f"the caller's peak RSS grew by {out.caller_mib:.0f} MiB"
    assert out.child_mib < mib + 60, f"the child's peak RSS was {out.child_mib:.0f} MiB"
    assert out.seconds < seconds, f"took {out.seconds:.1f} s"


def generated(parts: Iterator[bytes]) -> BinaryIO:
    """A stream whose bytes are made as they are read."""
    return open_stream(parts)


def repeat(block: bytes, times: int, tail: bytes = b"") -> Iterator[bytes]:
    for _ in range(times):
        yield block
    yield tail


# --- huge PAX records -------------------------------------------------------------------------


def _pax_entry(records: dict[str, bytes | str], type: bytes = tarfile.XHDTYPE) -> bytes:
    return tb.raw_pax(records, type=type)


def _base256_header(name: str, size: int, type: bytes = tarfile.REGTYPE) -> bytes:
    header = bytearray(tb.raw_header(name, size=0, type=type))
    header[124:136] = b"\x80" + size.to_bytes(11, "big")
    header[148:156] = b"%06o\0 " % tb.checksum(bytes(header))
    return bytes(header)


PAX_CASES: dict[str, Callable[[], BinaryIO]] = {
    "record-past-the-limit": lambda: io.BytesIO(
        _pax_entry({"path": "a" * (MAX_META + 10)}) + tb.raw_member("x", b"x") + tb.END),
    "records-piling-up": lambda: generated(iter(
        [_pax_entry({f"k{i}": "v" * 900_000}) for i in range(6)]
        + [tb.raw_member("x", b"x"), tb.END])),
    "huge-length-field": lambda: io.BytesIO(
        tb.raw_member("PaxHeaders/x", b"99999999999999999999 path=x\n", type=tarfile.XHDTYPE)
        + tb.raw_member("x", b"x") + tb.END),
    "global-past-the-limit": lambda: io.BytesIO(
        _pax_entry({"comment": "c" * (MAX_META + 10)}, type=tarfile.XGLTYPE)
        + tb.raw_member("x", b"x") + tb.END),
    "size-of-a-petabyte": lambda: io.BytesIO(
        _base256_header("PaxHeaders/x", 1 << 50, type=tarfile.XHDTYPE) + b"1 x" * 100),
}


@pytest.mark.usefixtures("isolation")
@pytest.mark.parametrize("make", PAX_CASES.values(), ids=PAX_CASES.keys())
def test_huge_pax_records(driver: lamina.Driver, make: Callable[[], BinaryIO]) -> None:
    out = measure(driver, make())
    refused(out, "")
    assert not driver.exists("l")


@pytest.mark.usefixtures("isolation")
def test_many_global_headers_are_read_and_dropped(driver: lamina.Driver) -> None:
    """200 global PAX headers of 900 kB each (180 MB) before one file: read and ignored,
    none kept in memory."""
    header = _pax_entry({"comment": "c" * 900_000}, type=tarfile.XGLTYPE)
    out = measure(driver, generated(repeat(header, 200, tb.raw_member("x", b"x") + tb.END)))
    assert out.error is None, out.error
    assert names(driver, "l") == {"/x"}
    bounded(out)


@pytest.mark.usefixtures("isolation")
def test_many_xattrs_in_one_record(driver: lamina.Driver) -> None:
    """A PAX header of 20,000 xattrs on one file: more than a filesystem holds; a
    ``LaminaError``, not an ``OSError``, and nothing left."""
    records = {f"SCHILY.xattr.user.k{i}": "v" * 20 for i in range(20_000)}
    data = _pax_entry(records) + tb.raw_member("x", b"x") + tb.END
    out = measure(driver, io.BytesIO(data))
    assert out.error is not None
    assert not driver.exists("l")
    bounded(out)


# --- size fields larger than the stream -------------------------------------------------------


SIZE_CASES: dict[str, Callable[[], bytes]] = {
    "octal-8GiB": lambda: tb.raw_header("f", size=(8 << 30) - 1) + b"x" * 1024,
    "base-256-2**62": lambda: _base256_header("f", 1 << 62) + b"x" * 1024,
    "pax-size-2**62": lambda: tb.raw_pax({"size": str(1 << 62)}) + tb.raw_member("f", b"x"),
    "second-file": lambda: tb.raw_member("a", b"a") + tb.raw_header("b", size=50 * MiB) + b"b",
}


@pytest.mark.usefixtures("isolation")
@pytest.mark.parametrize("make", SIZE_CASES.values(), ids=SIZE_CASES.keys())
def test_size_larger_than_the_stream(driver: lamina.Driver, make: Callable[[], bytes]) -> None:
    refused(measure(driver, io.BytesIO(make())), "truncated")
    assert not driver.exists("l")


@pytest.mark.usefixtures("isolation")
@pytest.mark.parametrize("make", SIZE_CASES.values(), ids=SIZE_CASES.keys())
def test_max_size_refuses_before_writing(stores: Stores, make: Callable[[], bytes]) -> None:
    drv = stores.open(options={"apply.max_size": "1M"})
    refused(measure(drv, io.BytesIO(make())), "more than 1048576 bytes")


@pytest.mark.usefixtures("isolation")
def test_sparse_file_larger_than_a_filesystem(driver: lamina.Driver) -> None:
    """A sparse member whose real size is a petabyte, holding one block: refused (the
    filesystem's limit, or ``apply.max_size``), never a petabyte of anything."""
    data = tb.raw_gnu_sparse("s", [(0, b"x" * 512)], 1 << 50) + tb.END
    out = measure(driver, io.BytesIO(data))
    if out.error is None:  # a filesystem that takes it: it is a sparse file, all holes
        meta = driver.metadata("l")
        st = os.stat(Path(meta.get("UpperDir", meta["dir"])) / "s")
        assert st.st_blocks * 512 < MiB
    bounded(out)


# --- names past PATH_MAX ----------------------------------------------------------------------


NAME_CASES: dict[str, Callable[[], bytes]] = {
    "component-past-NAME_MAX": lambda: tb.build([tb.file("n" * 300, b"x")]),
    "path-past-PATH_MAX": lambda: tb.build([tb.file("/".join(["x" * 250] * 20), b"x")]),
    "path-of-a-MiB": lambda: tb.build([tb.file("a/" * (MiB // 2 - 8) + "f", b"x")]),
    "600-directories-deep": lambda: tb.build([tb.file("d/" * 600 + "f", b"x")]),
    "symlink-leads-past-PATH_MAX": lambda: tb.build([
        tb.symlink("s", "/".join(["y" * 200] * 19)),
        tb.file("s/" + "z" * 250 + "/" + "w" * 200 + "/f", b"x"),
    ]),
    "symlinks-lead-deep": lambda: tb.build([
        tb.symlink("s", "/".join(["d"] * 300)),
        tb.symlink("t", "s/" + "/".join(["e"] * 300)),
        tb.file("t/f", b"x"),
    ]),
}


@pytest.mark.usefixtures("isolation")
@pytest.mark.parametrize("make", NAME_CASES.values(), ids=NAME_CASES.keys())
def test_names_past_path_max(driver: lamina.Driver, make: Callable[[], bytes]) -> None:
    """Refused: Docker's extraction fails on them too (ENAMETOOLONG), and a layer holding
    them would break every later tool that names its files by path."""
    refused(measure(driver, io.BytesIO(make())), "")
    assert not driver.exists("l")


def test_names_up_to_path_max_work_everywhere(stores: Stores, home: Path) -> None:
    """A path just inside the limit: applied, and changes, diff, diff_size, a child layer,
    a re-apply of the diff and removal all work."""
    drv = stores.open()
    # The limit: the host path of the file, from the staging dir of the layer, fits PATH_MAX.
    room = 4094 - len(str(home / "staging" / "l.01234567" / "diff"))  # one-letter ids
    deep = "/".join(["x" * 200] * (room // 201)) + "/" + "f" * (room % 201 - 2)
    assert len(deep) == room - 2
    apply(drv, "l", None, [tb.file(deep, b"deep")])
    assert read(drv, "l", deep) == b"deep"
    assert len(drv.changes("l")) == deep.count("/") + 1
    assert drv.diff_size("l") == 4
    with drv.diff("l") as tar:
        drv.apply_diff("m", None, tar)
    assert read(drv, "m", deep) == b"deep"
    drv.create_rw("c", "l")
    assert drv.changes("c") == []
    for id in ("c", "m", "l"):
        drv.remove(id)


# --- millions of tiny entries -----------------------------------------------------------------


def _tiny_entries(count: int) -> Iterator[bytes]:
    """``count`` empty files, 1,000 to a directory, made as they are read."""
    block = []
    for i in range(count):
        if i % 1000 == 0:
            block.append(tb.raw_member(f"d{i // 1000}/", type=tarfile.DIRTYPE))
        block.append(tb.raw_header(f"d{i // 1000}/f{i % 1000}"))
        if len(block) >= 2048:
            yield b"".join(block)
            block = []
    block.append(tb.END)
    yield b"".join(block)


@pytest.mark.usefixtures("isolation")
def test_millions_of_tiny_entries_past_max_entries(stores: Stores) -> None:
    """Two million entries (1 GB of headers, generated as read) with ``apply.max_entries``
    at 2,000: refused at entry 2,001; the rest is never read, let alone generated."""
    drv = stores.open(options=["apply.max_entries=2000"])
    out = measure(drv, generated(_tiny_entries(2_000_000)))
    refused(out, "more than 2000 entries")
    assert not drv.exists("l")


def _repeated_entries(count: int) -> Iterator[bytes]:
    """A directory, then ``count`` entries that cost no disk: the directory again and
    again, and whiteouts of what is not there."""
    again = tb.raw_member("d/", type=tarfile.DIRTYPE, mtime=1)
    gone = tb.raw_header("d/.wh.nothing")
    yield again
    for _ in range(count // 2000):
        yield (again + gone) * 1000
    yield tb.END


def test_repeated_entries_take_no_memory(stores: Stores,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """100,000 entries that write nothing new (a directory repeated, whiteouts of nothing):
    applied, in as much memory as 2,000 of them (lamina remembers what the tar wrote, for
    the whiteouts that may follow: by name on disk, never by entry)."""
    drv = stores.open()
    small = measure(drv, generated(_repeated_entries(2_000)), id="small")
    big = measure(drv, generated(_repeated_entries(100_000)), id="big")
    assert small.error is None and big.error is None, (small.error, big.error)
    with capsys.disabled():
        print(f"\n[{drv.name}] 100,000 repeated entries: {big.seconds:.1f} s, child peak "
              f"{big.child_mib:.0f} MiB (2,000: {small.child_mib:.0f} MiB)")
    assert big.child_mib - small.child_mib < 16
    assert big.caller_mib < 64
    assert names(drv, "big") == {"/d"}


# --- bombs --------------------------------------------------------------------------------------


def _gzip_members(plain_head: bytes, zeros: int) -> Iterator[bytes]:
    yield gzip.compress(plain_head, mtime=0)
    member = gzip.compress(bytes(MiB), mtime=0, compresslevel=9)
    for _ in range(zeros):
        yield member


def _zstd_frames(plain_head: bytes, zeros: int) -> Iterator[bytes]:
    cctx = zstandard.ZstdCompressor(level=19)
    yield cctx.compress(plain_head)
    frame = cctx.compress(bytes(MiB))
    for _ in range(zeros):
        yield frame


BOMBS: dict[str, Callable[[], Iterator[bytes]]] = {
    # 4 GiB of zeros: the tar ends at its first two zero blocks.
    "gzip-zeros": lambda: _gzip_members(b"", 4096),
    "zstd-zeros": lambda: _zstd_frames(b"", 4096),
    # A file of 4 GiB of zeros: with apply.max_size (64M here), refused at its header.
    "gzip-file": lambda: _gzip_members(tb.raw_header("big", size=4 << 30), 4096),
    "zstd-file": lambda: _zstd_frames(tb.raw_header("big", size=4 << 30), 4096),
    # A bomb inside a bomb: one layer of compression is undone, never two.
    "gzip-in-gzip": lambda: iter([gzip.compress(b"".join(_gzip_members(b"", 64)))]),
}


@pytest.mark.usefixtures("isolation")
@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
def test_compression_bombs(stores: Stores, bomb: Callable[[], Iterator[bytes]]) -> None:
    drv = stores.open(options={"apply.max_size": "64M"})
    out = measure(drv, generated(bomb()))
    if out.error is None:
        assert out.size == 0 and names(drv, "l") == set()
        bounded(out)
    else:
        refused(out, "")
