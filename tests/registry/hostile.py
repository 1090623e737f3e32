"""What a hostile registry sends, and how a pull that meets one is measured.

- :func:`gzip_bomb`: gigabytes of zeros in a few MiB of gzip (or KiB, gzipped twice).
- :func:`run_measured`: a command's exit status, standard error, time and peak RSS
  (from ``wait4``: that child's own, not the most of every child the tests ran).
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import subprocess
import sys
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


_LAUNCH = """
import os, resource, sys
nofile = int(sys.argv[1])
if nofile:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""
"""Runs the command as its own child and prints its exit status and peak RSS: measured
from a small process, since a child forked from this big test process would count the
test process's pages in its peak (Linux keeps the peak across ``exec``)."""


def run_measured(argv: list[str], env: dict[str, str], *, timeout: float = 120,
                 nofile: int | None = None) -> Measured:
    """Run ``argv`` (with at most ``nofile`` open files), and take its own peak RSS from
    ``wait4`` (the rusage of that child alone, not of every child the tests ran)."""
    with tempfile.TemporaryFile() as err:
        began = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(nofile or 0), *argv],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{argv}: still running after {timeout} s") from None
        status, maxrss = (int(x) for x in out.split())
        err.seek(0)
        return Measured(status, err.read().decode(errors="replace"), maxrss * 1024,
                        time.monotonic() - began)
