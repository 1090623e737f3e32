"""Decompression of layer tars, sniffed from their first bytes (contract §1 apply_diff).

gzip goes through ``isal`` (igzip, about twice zlib's speed), zstd through
``zstandard``, xz and bzip2 through the standard library.  Multi-member gzip and
multi-frame zstd streams are read to their end.
"""

from __future__ import annotations

import bz2
import io
import lzma
from typing import BinaryIO

import zstandard
from isal import igzip

_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_XZ = b"\xfd7zXZ\x00"
_BZIP2 = b"BZh"
SNIFF = 6
BUFFER = 1 << 20


class _Sniffed(io.RawIOBase):
    """The stream with its first bytes, already read for sniffing, put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_head(stream: BinaryIO) -> bytes:
    head = b""
    while len(head) < SNIFF:
        chunk = stream.read(SNIFF - len(head))
        if not chunk:
            break
        head += chunk
    return head


def compression_of(head: bytes) -> str:
    """The compression a stream starting with ``head`` uses ('' for none)."""
    if head.startswith(_GZIP):
        return "gzip"
    if head.startswith(_ZSTD):
        return "zstd"
    if head.startswith(_XZ):
        return "xz"
    if head.startswith(_BZIP2):
        return "bzip2"
    return ""


def decompressed(stream: BinaryIO) -> tuple[BinaryIO, str]:
    """A stream of the uncompressed tar, and the compression that was found."""
    head = _read_head(stream)
    kind = compression_of(head)
    raw = io.BufferedReader(_Sniffed(head, stream), BUFFER)
    if kind == "gzip":
        return igzip.IGzipFile(fileobj=raw, mode="rb"), kind  # type: ignore[return-value]
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader, BUFFER), kind  # type: ignore[arg-type, return-value]
    if kind == "xz":
        return lzma.LZMAFile(raw), kind  # type: ignore[return-value]
    if kind == "bzip2":
        return bz2.BZ2File(raw), kind  # type: ignore[return-value]
    return raw, kind  # type: ignore[return-value]
