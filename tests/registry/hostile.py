"""What a hostile registry sends, and how a pull that meets one is measured.

- :func:`gzip_bomb`: gigabytes of zeros in a few MiB of gzip (or KiB, gzipped twice).
- :func:`run_measured`: a command's exit status, standard error, time and peak RSS
  (from ``wait4``: that child's own, not the most of every child the tests ran).
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass


@functools.lru_cache
def gzip_bomb(inflated: int, *, layers: int = 1) -> bytes:
    """A gzip member that inflates to ``inflated`` zero bytes (whole MiBs), about a
    thousandth of that on the wire (one compressed MiB of zeros, repeated; a full flush
    between copies, so none looks back into another); ``layers`` > 1: gzipped again
    (sent as ``Content-Encoding: gzip, gzip``)."""
    piece = bytes(1 << 20)
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    copy = block.compress(piece) + block.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(inflated >> 20):
        crc = zlib.crc32(piece, crc)
    last = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    bomb = (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + copy * (inflated >> 20) + last
            + struct.pack("<II", crc, inflated & 0xFFFFFFFF))
    for _ in range(layers - 1):
        wrap = zlib.compressobj(9, zlib.DEFLATED, 31)
        bomb = wrap.compress(bomb) + wrap.flush()
    return bomb


@dataclass
class Measured:
    """How a command ended: its exit status, standard error and peak RSS (bytes)."""

    status: int
    stderr: str
    peak_rss: int
    seconds: float


def run_measured(argv: list[str], env: dict[str, str], *, timeout: float = 120,
                 nofile: int | None = None) -> Measured:
    """Run ``argv`` (with at most ``nofile`` open files), and take its own peak RSS from
    ``wait4`` (the rusage of that child alone, not of every child the tests ran)."""
    import resource

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with tempfile.TemporaryFile() as err:
        began = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - began > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise AssertionError(f"{argv}: still running after {timeout} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
        err.seek(0)
        return Measured(proc.returncode, err.read().decode(errors="replace"),
                        usage.ru_maxrss * 1024, time.monotonic() - began)
