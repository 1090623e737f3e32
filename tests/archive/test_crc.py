"""The CRC-32 of files with holes (:mod:`lamina.archive.crc`): what reading the whole
content gives, whatever the holes, in time independent of their length (issue 23, D4)."""

from __future__ import annotations

import os
import time
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamina.archive import crc


@given(st.binary(max_size=64), st.integers(0, 3 << 20))
@settings(max_examples=200, deadline=None)
def test_zeros_fold_in_as_read(head: bytes, n: int) -> None:
    assert crc.extend_zeros(zlib.crc32(head), n) == zlib.crc32(head + bytes(n))


def test_a_terabyte_of_zeros_costs_microseconds() -> None:
    t0 = time.monotonic()
    for n in range(1 << 40, (1 << 40) + 100):
        crc.extend_zeros(0x12345678, n)
    assert time.monotonic() - t0 < 1.0
    # n zeros after n zeros is 2n zeros: the folding agrees with itself at any length
    half = crc.extend_zeros(0, 1 << 39)
    assert crc.extend_zeros(half, 1 << 39) == crc.extend_zeros(0, 1 << 40)


@given(st.lists(st.tuples(st.integers(0, 8 << 20), st.binary(min_size=1, max_size=9000)),
                max_size=5),
       st.integers(0, 9 << 20))
@settings(max_examples=60, deadline=None)
def test_a_sparse_file_digests_as_read(tmp_path_factory: pytest.TempPathFactory,
                                      writes: list[tuple[int, bytes]], size: int) -> None:
    path = tmp_path_factory.mktemp("crc") / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, size)
        for off, data in writes:
            os.pwrite(fd, data, off)
        whole = os.pread(fd, os.fstat(fd).st_size, 0)
        assert crc.file_crc32(fd) == zlib.crc32(whole)
    finally:
        os.close(fd)
