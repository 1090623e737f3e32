"""Decoding the fields of a tar header: names, numbers, the checksum, PAX times.

Pure functions over bytes, shared by :class:`~lamina.archive.reader.TarReader`'s
general and fast paths and by the sparse formats (:mod:`lamina.archive.sparse`).
"""

from __future__ import annotations

import struct
import zlib

from lamina.errors import UnsafeArchive

MAX_META = 1 << 20  # a PAX header or GNU long name larger than this is hostile

# A header's fields: name mode uid gid size mtime chksum typeflag linkname magic version
# uname gname devmajor devminor prefix (GNU puts its sparse map where prefix is).
HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")

# The fraction of a PAX time of k digits times _NS_SCALE[k] is in nanoseconds.
_NS_SCALE: tuple[int, ...] = tuple(10 ** (9 - k) for k in range(10))


def cstr(raw: bytes) -> bytes:
    """A NUL-terminated field's bytes up to the NUL."""
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def num(raw: bytes, what: str, offset: int) -> int:
    """Decode a numeric header field: octal text or GNU base-256."""
    try:
        # The common case in one C call: octal digits up to a NUL (int() strips the
        # spaces); an empty field, base-256 (a byte > 127 is never a digit) or garbage
        # fails here and takes the full path below.
        return int(raw.partition(b"\0")[0], 8)
    except ValueError:
        pass
    if raw and raw[0] & 0x80:
        value = int.from_bytes(raw[1:], "big")
        if raw[0] == 0xFF:
            value -= 1 << (8 * (len(raw) - 1))
        elif raw[0] != 0x80:
            raise UnsafeArchive(f"bad base-256 number in {what} at offset {offset}")
        return value
    text = cstr(raw).strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise UnsafeArchive(f"bad number {text!r} in {what} at offset {offset}") from None


def sum_ok(header: bytes) -> bool:
    """Whether the checksum field is octal and equals the header's unsigned sum (if not,
    the general path decides: a signed sum, another spelling, or an error)."""
    try:
        stored = int(header[148:156].partition(b"\0")[0], 8)
    except ValueError:
        return False
    if header.isascii():  # the whole sum is below 512 * 127 < 65521: one adler32 call
        return stored == (zlib.adler32(header) & 0xFFFF) + 255 - sum(header[148:156])
    return stored == ((zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF)
                      + 254 - sum(header[148:156]))


def decode(raw: bytes) -> str:
    """A name as lamina keeps it: UTF-8, any other byte kept by surrogateescape."""
    return raw.decode("utf-8", "surrogateescape")


def fast_time(value: bytes) -> int | None:
    """A PAX time of plain digits (``1700000000.123456789``) in nanoseconds, else None.

    Digits only, so that joining the two halves is exactly what _pax_time computes (int()
    also takes signs, spaces and underscores, which would not join the same way)."""
    whole, _, frac = value.partition(b".")
    digits = whole + frac
    if not whole or len(frac) > 9 or not digits.isdigit():
        return None
    try:
        return int(digits) * _NS_SCALE[len(frac)]
    except ValueError:  # past int()'s digit limit, where _pax_time's halves may not be
        return None
