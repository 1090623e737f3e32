"""Pre-parsed tar members: how the caller hands a layer to its isolated child.

The caller reads the tar with :class:`~lamina.archive.reader.TarReader` (every
check of the format, every bound on hostile input) and sends the child each
member as one record: a fixed head, the member's names, xattrs and sparse map,
then its stored data.  The child, which alone touches the filesystem, turns the
records back into :class:`~lamina.archive.entry.Entry` objects for the
:class:`~lamina.archive.apply.Applier` with one ``struct`` unpack per member.
So on two cores the parsing runs beside the apply instead of before it: the tar
engine's Python time per member was about half parsing.

Nothing here is a security boundary: the records come from lamina's own caller.
A record stream that ends without its end record was cut by the caller (the tar
was bad there, and the caller says why): :class:`Aborted`.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable, Iterator

from lamina.archive.buffered import BufferedInput
from lamina.archive.entry import Entry
from lamina.archive.reader import TarReader

# record kind, member type, flags, mode, uid, gid, size, data_size, mtime, atime,
# devmajor, devminor, and the lengths of the name, link name, xattrs and sparse map
# that follow.
_HEAD = struct.Struct("<ccBIqqqqqqqqIIII")
_XATTR = struct.Struct("<HI")
_REGION = struct.Struct("<qq")
_MEMBER, _END = b"M", b"Z"
_HAS_ATIME, _SPARSE = 1, 2
SMALL = 1 << 16
"""Data up to this size travels in the same write as its record; more goes straight
from the reader's buffer to the pipe."""
FLUSH = 1 << 18
READ_SIZE = 1 << 20


_TYPES = {bytes([c]): chr(c) for c in range(128)}


class Aborted(Exception):
    """The record stream ended without its end record."""


def encode_head(entry: Entry) -> bytes:
    """A member's record up to its data."""
    name = entry.name.encode("utf-8", "surrogateescape")
    link = entry.linkname.encode("utf-8", "surrogateescape")
    xattrs = b""
    if entry.xattrs:
        xattrs = b"".join(
            _XATTR.pack(len(k := key.encode("utf-8", "surrogateescape")), len(value)) + k + value
            for key, value in entry.xattrs.items())
    sparse = b"".join(_REGION.pack(*r) for r in entry.sparse) if entry.sparse is not None else b""
    flags = (_HAS_ATIME if entry.atime is not None else 0) | (
        _SPARSE if entry.sparse is not None else 0)
    head = _HEAD.pack(_MEMBER, entry.type.encode(), flags, entry.mode, entry.uid, entry.gid,
                      entry.size, entry.data_size, entry.mtime, entry.atime or 0, entry.devmajor,
                      entry.devminor, len(name), len(link), len(xattrs),
                      len(entry.sparse or ()))
    return b"".join((head, name, link, xattrs, sparse))


END = _HEAD.pack(_END, b"\0", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def send(reader: TarReader, fd: int, between: Callable[[], None] | None = None) -> None:
    """Send every member of ``reader`` to the pipe ``fd`` as records, then the end record.

    Raises what the reader raises for a bad tar (nothing more is sent then), and
    BrokenPipeError once the child has stopped reading.  ``between`` is called after
    each flush (the caller's progress).
    """
    out = bytearray()
    for entry in reader:
        out += encode_head(entry)
        size = entry.data_size
        if size <= SMALL:
            if size:
                out += reader.read_data(entry, SMALL, "file data")  # copy_data's words
        else:
            _write(fd, out)
            out.clear()
            # The stored data as it is (a sparse file's regions back to back).
            reader.copy_data(dataclasses.replace(entry, sparse=None), fd)
            if between is not None:
                between()
        if len(out) >= FLUSH:
            _write(fd, out)
            out.clear()
            if between is not None:
                between()
    out += END
    _write(fd, out)


def _write(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class RecordReader(BufferedInput):
    """The child's side: records from the pipe ``fd`` as entries, with
    :class:`~lamina.archive.reader.TarReader`'s interface for the applier."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def _refill(self, need: int) -> bytes:
        return os.read(self._fd, max(READ_SIZE, need))

    def _ended(self, what: str, name: str | None) -> Exception:
        return Aborted()  # the caller cut the stream, and says why

    def __iter__(self) -> Iterator[Entry]:
        head_size = _HEAD.size
        while True:
            if self._pending:
                self._skip(self._pending, "<previous member>")
                self._pending = 0
            pos = self._pos
            if pos + head_size <= len(self._buf):  # the usual case: no copy of the head
                fields = _HEAD.unpack_from(self._buf, pos)
                self._pos = pos + head_size
                self.consumed += head_size
            else:
                fields = _HEAD.unpack(self._read_exact(head_size, "record", None))
            (kind, type_, flags, mode, uid, gid, size, data_size, mtime, atime, major, minor,
             name_len, link_len, xattr_len, regions) = fields
            if kind == _END:
                return
            rest = self._read_exact(name_len + link_len + xattr_len + regions * _REGION.size,
                                   "record", None)
            name = rest[:name_len].decode("utf-8", "surrogateescape")
            link = rest[name_len : name_len + link_len].decode("utf-8", "surrogateescape") if (
                link_len) else ""
            pos = name_len + link_len
            xattrs: dict[str, bytes] = {}
            while pos < name_len + link_len + xattr_len:
                klen, vlen = _XATTR.unpack_from(rest, pos)
                pos += _XATTR.size
                key = rest[pos : pos + klen].decode("utf-8", "surrogateescape")
                xattrs[key] = rest[pos + klen : pos + klen + vlen]
                pos += klen + vlen
            sparse = [_REGION.unpack_from(rest, pos + i * _REGION.size)
                      for i in range(regions)] if flags & _SPARSE else None
            # Positional: a keyword call costs a third more, once per member.
            entry = Entry(name, _TYPES[type_], mode, uid, gid, size, mtime,
                          atime if flags & _HAS_ATIME else None, link, major, minor, xattrs,
                          sparse, {}, b"", data_size)
            self._pending = data_size
            yield entry

    def copy_data(self, entry: Entry, fd: int, *, checksum: bool = False) -> int | None:
        """Write ``entry``'s data to ``fd`` (expanding a sparse file), as TarReader does."""
        if entry.sparse is None:
            crc = self._write_span(fd, entry.data_size, entry.name, checksum)
        else:
            crc = self._write_sparse(fd, entry.sparse, entry, checksum)
        self._pending = 0
        return crc

    def take_data(self, entry: Entry) -> memoryview | None:
        """``entry``'s data as a view of the buffer, consumed, if it lies whole there (no
        copy: the buffer is ``bytes``, which the view keeps alive); else None, and
        :meth:`copy_data` is to be used."""
        n = entry.data_size
        pos = self._pos
        if entry.sparse is not None or n > len(self._buf) - pos:
            return None
        self._pos = pos + n
        self.consumed += n
        self._pending = 0
        return memoryview(self._buf)[pos : pos + n]
