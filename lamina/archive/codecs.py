"""Decompression of layer tars, sniffed from their first bytes (contract §1 apply_diff).

gzip goes through ``isal`` (igzip, about twice zlib's speed), zstd through
``zstandard``, xz and bzip2 through the standard library.  Multi-member gzip and
multi-frame zstd streams are read to their end.
"""

from __future__ import annotations

import bz2
import io
import lzma
from typing import BinaryIO, cast

import zstandard
from isal import igzip, isal_zlib

_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_XZ = b"\xfd7zXZ\x00"
_BZIP2 = b"BZh"
SNIFF = 6

DECODE_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, ValueError,
                 cast(type[BaseException], isal_zlib.error), zstandard.ZstdError,
                 lzma.LZMAError)
"""What a damaged compressed stream raises while it is read (gzip's errors are OSErrors)."""
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


class _ZstdFrames(io.RawIOBase):
    """Passes a zstd stream through while following its frame structure.

    ``zstandard``'s stream reader ends quietly when its input stops inside a
    frame; this tap knows where every frame and block ends, so a cut stream is
    an error rather than a shorter layer.  It reads only the block headers.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._pending = b""  # header bytes gathered but not yet parsed
        self._skip = 0  # bytes of block content (or skippable frame) to pass over
        self._state = "magic"
        self._want = 4
        self._checksum = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._raw.read(len(buffer))
        if not data:
            if self._state != "magic" or self._pending or self._skip:
                raise EOFError("zstd stream ends inside a frame")
            return 0
        self._follow(memoryview(data))
        buffer[: len(data)] = data
        return len(data)

    def _follow(self, view: memoryview) -> None:
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            take = self._want - len(self._pending)
            self._pending += bytes(view[:take])
            view = view[take:]
            if len(self._pending) == self._want:
                self._step()

    def _step(self) -> None:
        head, self._pending = self._pending, b""
        state = self._state
        if state == "magic":
            magic = int.from_bytes(head, "little")
            if magic == 0xFD2FB528:
                self._state, self._want = "descriptor", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._want = "skippable", 4
            else:
                raise ValueError("not a zstd frame")
        elif state == "skippable":
            self._skip = int.from_bytes(head, "little")
            self._state, self._want = "magic", 4
        elif state == "descriptor":
            d = head[0]
            single = bool(d & 0x20)
            self._checksum = bool(d & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[d >> 6]
            rest = (0 if single else 1) + (0, 1, 2, 4)[d & 3] + fcs
            self._state, self._want = "block", 3
            if rest:
                self._skip = rest
        elif state == "block":
            header = int.from_bytes(head, "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise ValueError("reserved zstd block type")
            self._skip = 1 if kind == 1 else size
            if last:
                self._state, self._want = "magic", 4
                if self._checksum:
                    self._skip += 4


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
    return _decoder(io.BufferedReader(_Sniffed(head, stream), BUFFER), kind), kind


def decoded(stream: BinaryIO, kind: str) -> BinaryIO:
    """``stream`` decompressed as ``kind`` says (``gzip``, ``zstd``, ``xz``, ``bzip2``,
    '' for none), not sniffed: what a media type names (a tar whose first member's name
    starts as a compressed stream's magic is still a tar)."""
    return _decoder(io.BufferedReader(_Sniffed(b"", stream), BUFFER), kind)


def _decoder(raw: io.BufferedReader, kind: str) -> BinaryIO:
    if kind == "gzip":
        return cast(BinaryIO, igzip.IGzipFile(fileobj=raw, mode="rb"))  # type: ignore[no-untyped-call]
    if kind == "zstd":
        tap = io.BufferedReader(_ZstdFrames(cast(BinaryIO, raw)), BUFFER)
        reader = zstandard.ZstdDecompressor().stream_reader(tap, read_across_frames=True)
        return cast(BinaryIO, io.BufferedReader(reader, BUFFER))
    if kind == "xz":
        return cast(BinaryIO, lzma.LZMAFile(raw))
    if kind == "bzip2":
        return cast(BinaryIO, bz2.BZ2File(raw))
    if kind:
        raise ValueError(f"no decoder for {kind!r}")
    return cast(BinaryIO, raw)
