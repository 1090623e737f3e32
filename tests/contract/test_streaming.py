"""Conformance, part 6: ``diff`` and ``apply_diff`` stream (contract §1), on every backend.

"Streamed, never held whole in memory": a layer with one file much bigger than the
allowance is exported and imported while :mod:`tracemalloc` watches the Python heap.
"""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Callable

import pytest

import lamina
from tests import tarbuild as tb
from tests.layers import mounted

pytestmark = pytest.mark.root

MB = 1 << 20
BIG = 96 * MB
ALLOWANCE = 32 * MB
PATTERN = bytes(range(256)) * 4096  # 1 MiB, not all zeros (no sparse shortcuts)


class Generated(io.RawIOBase):
    """A tar of one ``BIG``-byte file, made as it is read: never whole in memory."""

    def __init__(self) -> None:
        self.parts = iter([tb.raw_header("big", size=BIG), *([PATTERN] * (BIG // MB)), tb.END])
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        while not self.pending:
            part = next(self.parts, None)
            if part is None:
                return 0
            self.pending = part
        n = min(len(buf), len(self.pending))
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def peak_of(action: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_apply_diff_streams(driver: lamina.Driver) -> None:
    size = 0

    def run() -> None:
        nonlocal size
        size = driver.apply_diff("big", None, Generated())  # type: ignore[arg-type]

    peak = peak_of(run)
    assert size == BIG
    assert peak < ALLOWANCE, f"apply_diff held {peak // MB} MiB for a {BIG // MB} MiB layer"
    with mounted(driver, "big") as root:
        assert (root / "big").stat().st_size == BIG


def test_diff_streams(driver: lamina.Driver) -> None:
    driver.create_rw("big")
    with mounted(driver, "big") as root, open(root / "big", "wb") as f:
        for _ in range(BIG // MB):
            f.write(PATTERN)
    total = 0

    def run() -> None:
        nonlocal total
        with driver.diff("big") as stream:
            while chunk := stream.read(MB):
                total += len(chunk)

    peak = peak_of(run)
    assert total > BIG
    assert peak < ALLOWANCE, f"diff held {peak // MB} MiB for a {BIG // MB} MiB layer"
