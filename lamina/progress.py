"""Progress reporting from the tar engine to whoever shows it (the CLI's bar).

The engine calls :func:`advance` as it moves through a layer; a caller that wants
to see it sets a reporter with :func:`reporting`.  With no reporter set it costs
one context-variable read per call.

The engine's bytes are the tar's, after decompression; what a person waits on is the
input file, whose size is known.  :func:`counted` wraps that input so that its reads
are reported as they happen (the CLI's bar shows them against the file's size).
"""

from __future__ import annotations

import contextvars
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, cast

Reporter = Callable[[int, int], None]
"""``reporter(nbytes, nentries)``: that many more bytes and tar entries are done."""

_current: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "lamina_progress", default=None
)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Send the engine's progress to ``reporter`` inside the ``with`` block."""
    token = _current.set(reporter)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Reporter | None:
    """The reporter in force, if any (the engine fetches it once per layer)."""
    return _current.get()


class _Counted(io.RawIOBase):
    """A stream's reads, passed through, each reported to ``on_read(nbytes)``."""

    def __init__(self, stream: BinaryIO, on_read: Callable[[int], None], owned: bool) -> None:
        self._stream = stream
        self._on_read = on_read
        self._owned = owned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        n = len(data)
        memoryview(buffer)[:n] = data
        if n:
            self._on_read(n)
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if data:
            self._on_read(len(data))
        return data

    def close(self) -> None:
        # Unless handed over (``owned``), the caller owns the stream (an open file,
        # standard input): it closes it.
        super().close()
        if self._owned:
            self._stream.close()


def counted(stream: BinaryIO, on_read: Callable[[int], None], *,
            owned: bool = False) -> BinaryIO:
    """``stream`` (read as is: no buffering added), with every read's byte count
    reported to ``on_read`` -- the bytes of the input consumed, compressed or not.
    ``owned``: closing the wrapper closes ``stream`` too."""
    return cast(BinaryIO, _Counted(stream, on_read, owned))
