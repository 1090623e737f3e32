"""CRC-32 of files with holes, in time proportional to their data, not their size.

A layer may hold a sparse file of a terabyte with a few kilobytes of data (a tar's GNU
or PAX sparse member).  Its CRC-32 — the manifest's digest of a file
(:mod:`lamina.store.manifest`) — is that of its whole content, holes read as zeros, so
that a manifest does not depend on where a file system keeps holes; but reading the
zeros costs about a second a gigabyte (issue 23, D4).  Here the zeros are folded in
arithmetically: the CRC-32 of ``n`` zero bytes is built from those of ``2**k`` zero
bytes (each the previous one combined with itself, ``crc32_combine``), so a hole of any
length costs some forty combines of a few microseconds each, and a file's data is read
only where ``SEEK_DATA``/``SEEK_HOLE`` say it lies.
"""

from __future__ import annotations

import errno
import os

from isal import isal_zlib

CHUNK = 1 << 20
"""Bytes read at a time."""

_POWERS = [isal_zlib.crc32(b"\0")]
"""The CRC-32 of ``2**k`` zero bytes, for k = 0, 1, …: grown on demand."""


def _zeros(n: int) -> int:
    """The CRC-32 of ``n`` zero bytes."""
    crc, k = 0, 0
    while n >> k:
        if k == len(_POWERS):
            half = _POWERS[-1]
            _POWERS.append(isal_zlib.crc32_combine(half, half, 1 << (k - 1)))
        if n >> k & 1:
            crc = isal_zlib.crc32_combine(crc, _POWERS[k], 1 << k)
        k += 1
    return crc


def extend_zeros(crc: int, n: int) -> int:
    """The CRC-32 of the data whose CRC-32 is ``crc`` followed by ``n`` zero bytes."""
    if n <= 0:
        return crc
    if n <= CHUNK // 16:  # a short run: crc32 of it is cheaper than forty combines
        return isal_zlib.crc32(bytes(n), crc)
    return isal_zlib.crc32_combine(crc, _zeros(n), n)


def combine(crc: int, more: int, length: int) -> int:
    """The CRC-32 of data of CRC-32 ``crc`` followed by ``length`` bytes of CRC-32 ``more``."""
    return isal_zlib.crc32_combine(crc, more, length) if length else crc


def file_crc32(fd: int) -> int:
    """The CRC-32 of the content of the regular file open at ``fd`` (its holes as the
    zeros they read as), reading only its data extents."""
    size = os.fstat(fd).st_size
    crc = pos = 0
    while pos < size:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), size)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data past pos, a hole to the end
                raise
            data = size
        crc = extend_zeros(crc, data - pos)
        pos = data
        if pos >= size:
            break
        end = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
        while pos < end:
            chunk = os.pread(fd, min(CHUNK, end - pos), pos)
            if not chunk:  # cut short meanwhile: the digest is of what there was
                return crc
            crc = isal_zlib.crc32(chunk, crc)
            pos += len(chunk)
    return crc
