"""A raw tar stream, framed: how the caller hands a Windows layer to its isolated child.

The Windows importer (:mod:`lamina.archive.wclayer`) keeps every member's header
blocks as read, and the archive's end, for an export byte for byte; so its child
parses the tar itself, from the very bytes the caller read (decompressed: the
decompressors run in the caller).  The caller reads the stream in
:data:`~lamina.archive.reader.READ_SIZE` blocks, as the importer's reader does inline,
and sends each as a frame: a 4-byte big-endian length, then the bytes.  Three frames
say more:

- length 0: the stream's end;
- :data:`FAILED`, then a length and a UTF-8 message: reading the stream failed with one
  of :data:`~lamina.archive.codecs.DECODE_ERRORS` (a damaged compressed stream); the
  child's read raises a ``ValueError`` with that message where the stream failed, so
  that the importer's reader turns it into the same error, at the same offset, as it
  does inline;
- :data:`ABORTED`: reading failed otherwise; the child's read raises
  :class:`~lamina.archive.records.Aborted`, and the caller raises what it caught.

Nothing here is a security boundary: the frames come from lamina's own caller.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import BinaryIO

from lamina.archive.codecs import DECODE_ERRORS
from lamina.archive.reader import READ_SIZE
from lamina.archive.records import Aborted

_LENGTH = struct.Struct(">I")
FAILED = 0xFFFFFFFF
ABORTED = 0xFFFFFFFE
MAX_MESSAGE = 1 << 16


def send(stream: BinaryIO, fd: int, between: Callable[[int], None] | None = None) -> (
        Exception | None):
    """Send ``stream`` to the pipe ``fd`` as frames, to its end; what reading it raised,
    besides a damaged stream's error (which the child raises), or None.

    Raises BrokenPipeError once the child has stopped reading.  ``between`` gets the bytes
    of each block sent (the caller's progress).
    """
    while True:
        try:
            chunk = stream.read(READ_SIZE)
        except DECODE_ERRORS as e:
            message = str(e).encode("utf-8", "surrogateescape")[:MAX_MESSAGE]
            _write(fd, _LENGTH.pack(FAILED) + _LENGTH.pack(len(message)) + message)
            return None
        except Exception as e:  # the caller raises it once the child has stopped
            _write(fd, _LENGTH.pack(ABORTED))
            return e
        if not chunk:
            _write(fd, _LENGTH.pack(0))
            return None
        _write(fd, _LENGTH.pack(len(chunk)))
        _write(fd, chunk)
        if between is not None:
            between(len(chunk))


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FrameInput:
    """The child's side: the frames of the pipe ``fd`` as a readable stream (``read``
    only, which is all :class:`~lamina.archive.reader.TarReader` asks of one)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._left = 0  # bytes of the current frame not read yet
        self._ended = False

    def read(self, n: int = -1) -> bytes:
        while self._left == 0:
            if self._ended:
                return b""
            size = _LENGTH.unpack(self._exact(_LENGTH.size))[0]
            if size == 0:
                self._ended = True
            elif size == FAILED:
                length = _LENGTH.unpack(self._exact(_LENGTH.size))[0]
                raise ValueError(self._exact(length).decode("utf-8", "surrogateescape"))
            elif size == ABORTED:
                raise Aborted()
            else:
                self._left = size
        want = self._left if n < 0 else min(n, self._left)
        data = os.read(self._fd, want)
        if not data:
            raise Aborted()  # the caller went away inside a frame
        self._left -= len(data)
        return data

    def readable(self) -> bool:
        return True

    def _exact(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = os.read(self._fd, left)
            if not chunk:
                raise Aborted()
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)
