"""Conformance, part 6: ``diff`` and ``apply_diff`` stream (contract §1), on every backend.

"Streamed, never held whole in memory": a layer with one file much bigger than the
allowance is exported and imported while :mod:`tracemalloc` watches the Python heap.
"""

from __future__ import annotations

import io
import tarfile
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


def _diff_bytes(driver: lamina.Driver, id: str, sizes: list[int]) -> bytes:
    """``diff(id)`` read with ``read`` calls of the given sizes, in turn, to its end."""
    out = bytearray()
    with driver.diff(id) as stream:
        turn = 0
        while chunk := stream.read(sizes[turn % len(sizes)]):
            out += chunk
            turn += 1
    return bytes(out)


def test_diff_bytes_do_not_depend_on_read_sizes(driver: lamina.Driver) -> None:
    # The export fills the reader's buffer across member boundaries: headers, data,
    # padding and the end blocks must come out the same whatever the reads' sizes.
    members = [tb.directory("d")]
    members += [tb.file(f"d/f{i}", PATTERN[: i * 37]) for i in range(40)]
    members += [tb.file("d/big", PATTERN * 3), tb.symlink("d/l", "f1")]
    driver.apply_diff("l", None, tb.stream(members))
    whole = _diff_bytes(driver, "l", [1 << 30])
    assert _diff_bytes(driver, "l", [1, 511, 512, 513, 7, 65536]) == whole
    assert _diff_bytes(driver, "l", [MB]) == whole
    with driver.diff("l") as stream:  # readinto with a small buffer, too
        got = bytearray()
        buf = bytearray(333)
        while n := stream.readinto(buf):
            got += buf[:n]
    assert bytes(got) == whole


@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_diff_of_a_file_changing_size_meanwhile_stays_a_tar(driver: lamina.Driver,
                                                            change: str) -> None:
    # A running container may write a file while its layer is exported: the member
    # keeps the size its header said (zeros for what went missing, the rest cut).
    driver.create_rw("rw")
    with mounted(driver, "rw") as root:
        (root / "a").write_bytes(PATTERN * 4)
        (root / "b").write_bytes(b"after")
        with driver.diff("rw") as stream:
            head = stream.read(4096)  # the header of "a" and the start of its data
            with open(root / "a", "r+b") as f:
                if change == "shrink":
                    f.truncate(MB)
                else:
                    f.seek(0, io.SEEK_END)
                    f.write(PATTERN)
            data = head + stream.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        a = tar.getmember("a")
        assert a.size == 4 * MB
        content = tar.extractfile(a).read()  # type: ignore[union-attr]
        if change == "shrink":
            assert content[:MB] == PATTERN
            assert content[MB:] == bytes(3 * MB)
        else:
            assert content == PATTERN * 4
        assert tar.extractfile("b").read() == b"after"  # type: ignore[union-attr]
