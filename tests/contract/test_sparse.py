"""Conformance: a layer holding a sparse file of a terabyte (issue 23, D4), on every backend.

A 10 KiB layer tar with one GNU or PAX sparse member of 16 GB apparent size took 22 s
to apply (the manifest's CRC-32 read the holes back) and ``lamina check`` as long
again; one of a terabyte did not finish.  Now no work is proportional to the holes:
the applier folds them into the file's CRC-32 as it writes the data, and ``check``
reads only data extents.  The union view shows the file at its size with zeros in the
holes, and the layer holds only the data.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import lamina
from lamina.backends import check
from tests import tarbuild as tb
from tests.conftest import lacking
from tests.layers import mounted

pytestmark = pytest.mark.root

TERABYTE = 1 << 40
CHUNKS = [(0, b"head" * 1024), (TERABYTE // 2, b"middle!!" * 512),
          (TERABYTE - 8192, b"tail" * 1024)]
"""Data at the start, the middle and 4 KiB before the end (then a hole to the end)."""
LIMIT = 10.0
"""Seconds an apply, and a check, may take: a few, on a shared machine."""
BUILDERS: dict[str, Callable[..., bytes]] = {
    "gnu-S": tb.raw_gnu_sparse,
    "pax-1.0": tb.raw_pax_sparse_1_0,
    "pax-0.1": tb.raw_pax_sparse_0_1,
}


def layer_tar(build: Callable[..., bytes]) -> bytes:
    return b"".join([tb.raw_member("before", b"1"), build("big/disk.img", CHUNKS, TERABYTE),
                     tb.raw_member("after", b"2"), tb.END])


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
def test_a_terabyte_sparse_file_applies_and_checks_in_seconds(
        driver: lamina.Driver, build: Callable[..., bytes]) -> None:
    data = layer_tar(build)
    assert len(data) < 32 << 10
    t0 = time.monotonic()
    driver.apply_diff("sparse", None, io.BytesIO(data))
    applied = time.monotonic() - t0
    t0 = time.monotonic()
    report = check.check(driver)
    checked = time.monotonic() - t0
    print(f"\n{driver.name} {len(data)} bytes of tar, 1 TiB sparse file: apply "
          f"{applied * 1000:.0f} ms, check {checked * 1000:.0f} ms")
    assert report.consistent, report.problems
    assert applied < LIMIT, applied
    assert checked < LIMIT, checked
    with mounted(driver, "sparse") as root:
        path = root / "big/disk.img"
        st = os.stat(path)
        assert st.st_size == TERABYTE
        # The holes stay holes: the layer holds the data, not a terabyte of zeros.
        assert st.st_blocks * 512 < 1 << 20, st.st_blocks
        fd = os.open(path, os.O_RDONLY)
        try:
            for off, chunk in CHUNKS:
                assert os.pread(fd, len(chunk), off) == chunk
                assert os.pread(fd, 4096, off + len(chunk)) == bytes(4096)
            for hole in (1 << 20, 1 << 30, TERABYTE // 2 - 4096, TERABYTE - 4096):
                assert os.pread(fd, 4096, hole) == bytes(4096), hole
            assert os.pread(fd, 10, TERABYTE) == b""
        finally:
            os.close(fd)
        assert (root / "after").read_bytes() == b"2"


def test_gnu_tars_terabyte_sparse_file(driver: lamina.Driver, tmp_path: Path) -> None:
    """The same with the tar GNU tar writes (``--sparse --format=pax``) of a file made
    with ``truncate``: a terabyte, five bytes of data in its middle."""
    if shutil.which("tar") is None:
        lacking("no GNU tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "disk.img", "wb") as f:
        f.truncate(TERABYTE)
        f.seek(TERABYTE // 2)
        f.write(b"hello")
    subprocess.run(["tar", "--sparse", "--format=pax", "-C", str(src), "-cf",
                    str(tmp_path / "layer.tar"), "disk.img"], check=True, timeout=60)
    (src / "disk.img").unlink()
    t0 = time.monotonic()
    with open(tmp_path / "layer.tar", "rb") as f:
        driver.apply_diff("sparse", None, f)
    report = check.check(driver)
    took = time.monotonic() - t0
    assert report.consistent, report.problems
    assert took < LIMIT, took
    with mounted(driver, "sparse") as root:
        path = root / "disk.img"
        assert os.stat(path).st_size == TERABYTE
        assert os.stat(path).st_blocks * 512 < 1 << 20
        with open(path, "rb") as f:
            f.seek(TERABYTE // 2 - 3)
            assert f.read(11) == b"\0\0\0hello\0\0\0"
            f.seek(TERABYTE - 4096)
            assert f.read() == bytes(4096)


def test_a_child_of_a_sparse_layer_copies_no_holes(driver: lamina.Driver) -> None:
    """vfs copies its parent's tree into a child: the data of a sparse file, not its
    holes (it stays sparse, and the copy takes no time proportional to them)."""
    driver.apply_diff("sparse", None, io.BytesIO(layer_tar(tb.raw_pax_sparse_1_0)))
    t0 = time.monotonic()
    driver.create("child", "sparse")
    driver.create_rw("ctr", "child")
    took = time.monotonic() - t0
    assert took < LIMIT, f"children of a 1 TiB sparse file took {took:.1f} s"
    with mounted(driver, "ctr") as root:
        st = os.stat(root / "big/disk.img")
        assert st.st_size == TERABYTE and st.st_blocks * 512 < 1 << 20
        with open(root / "big/disk.img", "rb") as f:
            for offset, data in CHUNKS:
                f.seek(offset)
                assert f.read(len(data)) == data
            f.seek(TERABYTE // 4)
            assert f.read(4096) == bytes(4096)
    assert check.check(driver).consistent
