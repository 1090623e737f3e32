"""Buffered input for the tar engine's two readers.

:class:`~lamina.archive.reader.TarReader` (a tar stream) and
:class:`~lamina.archive.records.RecordReader` (the records an isolated apply's child
receives) both read their input in large blocks and hand out exact reads, views of
the buffer, and spans of member data written straight to a file.  This is that
shared part; each reader says where its bytes come from (:meth:`BufferedInput._refill`)
and what a stream that ends too early raises (:meth:`BufferedInput._ended`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from isal import isal_zlib

from lamina.archive.crc import combine, extend_zeros
from lamina.archive.entry import Entry


class BufferedInput:
    """A buffer over a byte stream, read front to back once."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self.consumed = 0  # bytes of the stream handed out so far
        self._pending = 0  # data (and padding) of the current member not yet consumed
        self._record: list[bytes] | None = None  # when set, every exact read is kept here

    def _refill(self, need: int) -> bytes:
        """The stream's next bytes, at least ``need`` of them unless it ends (``b""``)."""
        raise NotImplementedError

    def _ended(self, what: str, name: str | None) -> Exception:
        """The error for a stream that ends inside ``what`` (of member ``name``)."""
        raise NotImplementedError

    def _read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only at the end of the stream."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            self.consumed += n
            if self._record is not None:
                self._record.append(out)
            return out
        parts = [self._buf[self._pos :]]
        need = n - avail
        self._buf, self._pos = b"", 0
        while need > 0:
            chunk = self._refill(need)
            if not chunk:
                break
            if len(chunk) > need:
                parts.append(chunk[:need])
                self._buf, self._pos = chunk, need
                need = 0
            else:
                parts.append(chunk)
                need -= len(chunk)
        out = b"".join(parts)
        self.consumed += len(out)
        if self._record is not None:
            self._record.append(out)
        return out

    def _read_exact(self, n: int, what: str, name: str | None) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise self._ended(what, name)
        return data

    def _chunks(self, n: int, name: str) -> Iterator[memoryview]:
        """The next ``n`` bytes as buffer-sized views (no copy for big spans)."""
        while n > 0:
            avail = len(self._buf) - self._pos
            if avail == 0:
                self._buf = self._refill(0)
                self._pos = 0
                avail = len(self._buf)
                if avail == 0:
                    raise self._ended("file data", name)
            take = min(avail, n)
            view = memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            self.consumed += take
            n -= take
            yield view

    def _skip(self, n: int, name: str) -> None:
        for _ in self._chunks(n, name):
            pass

    def _write_span(self, fd: int, n: int, name: str, checksum: bool) -> int | None:
        """Write the next ``n`` bytes to ``fd``; with ``checksum``, return their CRC-32."""
        crc = 0
        pos = self._pos
        if n <= len(self._buf) - pos:  # all of it in the buffer: most files of most layers
            view = memoryview(self._buf)[pos : pos + n]
            self._pos = pos + n
            self.consumed += n
            if checksum:
                crc = isal_zlib.crc32(view)
            while view:
                view = view[os.write(fd, view) :]
            return crc if checksum else None
        for view in self._chunks(n, name):
            if checksum:
                crc = isal_zlib.crc32(view, crc)
            while view:
                view = view[os.write(fd, view) :]
        return crc if checksum else None

    def _write_sparse(self, fd: int, regions: list[tuple[int, int]], entry: Entry,
                      checksum: bool = False) -> int | None:
        """Write a sparse file's stored ``regions`` to their offsets in ``fd``, holes
        between, and give it the entry's real size; with ``checksum``, return the CRC-32
        of the whole file, its holes folded in as zeros without being read or made."""
        crc = pos = 0
        for offset, length in regions:
            os.lseek(fd, offset, os.SEEK_SET)
            part = self._write_span(fd, length, entry.name, checksum)
            if part is not None:
                crc = combine(extend_zeros(crc, offset - pos), part, length)
            pos = offset + length
        os.ftruncate(fd, entry.size)
        return extend_zeros(crc, entry.size - pos) if checksum else None
