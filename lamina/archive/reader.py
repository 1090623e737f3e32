"""A streaming tar reader: ustar, GNU and PAX, long names, sparse files.

It reads a decompressed byte stream front to back once, in large blocks, and
yields one :class:`Entry` per member.  The caller consumes each member's data
with :meth:`TarReader.copy_data` (or lets the reader skip it) before asking for
the next.  Nothing here touches the filesystem, and every malformed input is
an :class:`~lamina.errors.UnsafeArchive` naming the offset and the entry.

Formats: POSIX ustar (with the ``prefix`` field), GNU (``L``/``K`` long names,
``S`` old sparse with extension blocks), PAX (``x`` records, ``g`` globals are
read and ignored, GNU sparse 0.0, 0.1 and 1.0), base-256 numbers, V7 directories
spelled as a regular file whose name ends in ``/``.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from isal import isal_zlib

from lamina.archive.codecs import DECODE_ERRORS
from lamina.errors import UnsafeArchive

BLOCK = 512
READ_SIZE = 1 << 20
MAX_META = 1 << 20  # a PAX header or GNU long name larger than this is hostile
MAX_META_PER_MEMBER = 4 * MAX_META  # and all of one member's, together
MAX_SPARSE_ENTRIES = 1 << 16

REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO = "0", "1", "2", "3", "4", "5", "6"
_ZERO_BLOCK = bytes(BLOCK)
# A header's fields: name mode uid gid size mtime chksum typeflag linkname magic version
# uname gname devmajor devminor prefix (GNU puts its sparse map where prefix is).
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
# The typeflags the fast path reads (others, and 'x' after the first, take the general
# path): the entry's type, and whether the member stores data (as in _member).
_FAST_TYPES: dict[int, tuple[str, bool]] = {
    0: (REG, True), 0x30: (REG, True), 0x37: (REG, True), 0x31: (LINK, False),
    0x32: (SYMLINK, False), 0x33: (CHR, False), 0x34: (BLK, False), 0x35: (DIR, False),
    0x36: (FIFO, False),
}


@dataclass(slots=True)
class Entry:
    """One tar member, its metadata decoded."""

    name: str
    type: str  # one of REG LINK SYMLINK CHR BLK DIR FIFO
    mode: int
    uid: int
    gid: int
    size: int  # logical size (a sparse file's real size)
    mtime: int  # nanoseconds
    atime: int | None
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None  # (offset, length) data regions
    pax: dict[str, bytes] = field(default_factory=dict)  # every PAX record of the member
    raw: bytes = b""  # the header blocks as read (only with ``keep_raw``)
    data_size: int = 0  # bytes stored in the archive for this member
    offset: int = 0  # where the member's header started in the stream


# The fraction of a PAX time of k digits times _NS_SCALE[k] is in nanoseconds.
_NS_SCALE: tuple[int, ...] = tuple(10 ** (9 - k) for k in range(10))
# The PAX keys lamina meets most, to their names without a decode each (others: decoded).
_PAX_KEYS = {key.encode(): key for key in ("mtime", "atime", "ctime", "path", "linkpath",
                                            "size", "uid", "gid", "uname", "gname")}


def _cstr(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _num(raw: bytes, what: str, offset: int) -> int:
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
    text = _cstr(raw).strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise UnsafeArchive(f"bad number {text!r} in {what} at offset {offset}") from None


def _sum_ok(header: bytes) -> bool:
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


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _fast_time(value: bytes) -> int | None:
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


class TarReader:
    """Iterate the members of a tar stream (see the module docstring)."""

    def __init__(
        self, stream: BinaryIO, *, layer: str | None = None, keep_raw: bool = False
    ) -> None:
        """``keep_raw``: give each entry its header blocks as read (``Entry.raw``), and
        keep the end of the archive for :meth:`trailer` — for exact re-export."""
        self._stream = stream
        self._keep_raw = keep_raw
        self._record: list[bytes] | None = None
        self._layer = layer
        self._buf = b""
        self._pos = 0
        self.consumed = 0  # bytes of the tar stream handed out so far
        self._pending = 0  # data + padding of the current member not yet consumed

    # -- low-level input ----------------------------------------------------

    def _error(self, message: str, name: str | None = None) -> UnsafeArchive:
        return UnsafeArchive(message, layer=self._layer, path=name)

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
            chunk = self._pull(max(READ_SIZE, need))
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

    def _pull(self, n: int) -> bytes:
        try:
            return self._stream.read(n)
        except DECODE_ERRORS as e:
            raise self._error(f"unreadable archive stream at offset {self.consumed}: {e}") from e

    def _read_exact(self, n: int, what: str, name: str | None) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise self._error(f"archive truncated in {what}", name)
        return data

    def _chunks(self, n: int, name: str) -> Iterator[memoryview]:
        """The next ``n`` bytes as buffer-sized views (no copy for big spans)."""
        while n > 0:
            avail = len(self._buf) - self._pos
            if avail == 0:
                self._buf = self._pull(READ_SIZE)
                self._pos = 0
                avail = len(self._buf)
                if avail == 0:
                    raise self._error("archive truncated in file data", name)
            take = min(avail, n)
            view = memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            self.consumed += take
            n -= take
            yield view

    def _skip(self, n: int, name: str) -> None:
        for _ in self._chunks(n, name):
            pass

    # -- members ------------------------------------------------------------

    def __iter__(self) -> Iterator[Entry]:
        while True:
            pending = self._pending
            if pending:
                if pending <= len(self._buf) - self._pos:  # small members: no generator
                    self._pos += pending
                    self.consumed += pending
                else:
                    self._skip(pending, "<previous member>")
                self._pending = 0
            entry = self._fast_next()
            if entry is None:
                entry = self._next()
                if entry is None:
                    return
            self._pending = entry.data_size + (-entry.data_size % BLOCK)
            yield entry

    def trailer(self, limit: int = MAX_META) -> bytes:
        """After the last member (``keep_raw``): the end-of-archive blocks and whatever
        follows them in the stream, exactly (refused past ``limit`` bytes)."""
        ended = b"".join(self._record or [])
        self._record = None
        rest = [self._buf[self._pos :]]
        size = len(rest[0])
        while chunk := self._pull(READ_SIZE):
            rest.append(chunk)
            size += len(chunk)
            if size > limit:
                raise self._error(f"more than {limit} bytes after the end of the archive")
        self._buf, self._pos = b"", 0
        return ended + b"".join(rest)

    def copy_data(self, entry: Entry, fd: int, *, checksum: bool = False) -> int | None:
        """Write ``entry``'s data to ``fd`` (expanding a sparse file), then skip the padding.

        With ``checksum``, return the CRC-32 of the data as written (None for a sparse
        file), computed on the way so that nobody has to read the file again for it.
        """
        crc: int | None = None
        n = entry.data_size
        pos = self._pos
        end = pos + n + (-n % BLOCK)
        if entry.sparse is None and end <= len(self._buf):  # data and padding in the buffer
            view = memoryview(self._buf)[pos : pos + n]
            self._pos = end
            self.consumed += end - pos
            self._pending = 0
            if checksum:
                crc = isal_zlib.crc32(view)
            while view:
                view = view[os.write(fd, view) :]
            return crc
        if entry.sparse is None:
            crc = self._write_span(fd, entry.data_size, entry.name, checksum)
        else:
            for offset, length in entry.sparse:
                os.lseek(fd, offset, os.SEEK_SET)
                self._write_span(fd, length, entry.name, False)
            os.ftruncate(fd, entry.size)
        pad = -entry.data_size % BLOCK
        if pad and pad <= len(self._buf) - self._pos:
            self._pos += pad
            self.consumed += pad
        elif pad:
            self._read_exact(pad, "padding", entry.name)
        self._pending = 0
        return crc

    def finish(self) -> int:
        """After the last member: read the stream to its end (a compressed stream checks
        its trailer only there); the bytes that followed the end of the archive."""
        left = len(self._buf) - self._pos
        self._buf, self._pos = b"", 0
        while chunk := self._pull(READ_SIZE):
            left += len(chunk)
        self.consumed += left
        return left

    def read_data(self, entry: Entry, limit: int = MAX_META, what: str = "member data") -> bytes:
        """The whole data of a small member (refused past ``limit``); ``what`` names it
        in the error of a truncated archive."""
        if entry.data_size > limit:
            raise self._error(f"member data of {entry.data_size} bytes is too large", entry.name)
        data = self._read_exact(entry.data_size, what, entry.name)
        self._read_exact(-entry.data_size % BLOCK, "padding", entry.name)
        self._pending = 0
        return data

    def _write_span(self, fd: int, n: int, name: str, checksum: bool) -> int | None:
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

    def _fast_next(self) -> Entry | None:
        """The next member if it has the common shape and is whole in the buffer, else
        None with nothing consumed: then _next reads it (and reports any fault) as ever.

        The common shape: at most one PAX header of plain records (no sparse map), then
        a ustar or GNU header of a plain type, each with an unsigned checksum and octal
        numbers that int() takes whole.  What it accepts it decodes exactly as _next and
        _member do, with fewer calls (tests/archive/test_reader_fastpath.py checks)."""
        buf = self._buf
        start = self._pos
        end = start + BLOCK
        if end > len(buf):
            if start != len(buf):  # a header across the buffer's end
                return None
            # An empty buffer: fill it as _read would, so that the first member of the
            # stream, and of each refill, takes the fast path too.
            buf = self._buf = self._pull(READ_SIZE)
            start = self._pos = 0
            end = BLOCK
            if end > len(buf):
                return None
        header = buf[start:end]
        pax: dict[str, bytes] = {}
        xattrs: dict[str, bytes] = {}
        has_xattrs = False
        try:
            if header[156] == 0x78:  # one PAX header ('x'), its records in the buffer
                size = int(header[124:136].partition(b"\0")[0], 8)
                if not 0 <= size <= MAX_META or not _sum_ok(header):
                    return None
                data = buf[end : end + size]
                end += size + (-size % BLOCK) + BLOCK
                if end > len(buf):
                    return None
                records = data.split(b"\n")
                if records.pop():  # the records must end with a newline
                    return None
                for record in records:  # "LEN KEY=VALUE": LEN counts the newline too
                    length, _, rest = record.partition(b" ")
                    key, eq, value = rest.partition(b"=")
                    if not eq or int(length) != len(record) + 1:
                        return None
                    name = _PAX_KEYS.get(key)
                    if name is None:
                        if not key or key.startswith(b"GNU.sparse."):  # sparse: general path
                            return None
                        name = key.decode("utf-8", "replace")
                        has_xattrs = has_xattrs or name.startswith("SCHILY.xattr.")
                    pax[name] = value
                header = buf[end - BLOCK : end]
            kind = _FAST_TYPES.get(header[156])
            if kind is None or not _sum_ok(header):
                return None
            (raw_name, raw_mode, raw_uid, raw_gid, raw_size, raw_mtime, _, _, raw_link, magic,
             _, _, _, raw_major, raw_minor, prefix) = _HEADER.unpack(header)
            size = int(raw_size.partition(b"\0")[0], 8)
            mode = int(raw_mode.partition(b"\0")[0], 8) & 0o7777
            mtime = int(raw_mtime.partition(b"\0")[0], 8) * 1_000_000_000
            if size < 0:
                return None
            raw_name = raw_name.partition(b"\0")[0]
            if magic == b"ustar\x00" and prefix[0]:
                raw_name = prefix.partition(b"\0")[0] + b"/" + raw_name
            raw_link = raw_link.partition(b"\0")[0]
            atime: int | None = None
            if not pax:
                uid = int(raw_uid.partition(b"\0")[0], 8)
                gid = int(raw_gid.partition(b"\0")[0], 8)
            else:
                raw_name = pax.get("path", raw_name)
                raw_link = pax.get("linkpath", raw_link)
                if b"\0" in raw_name or b"\0" in raw_link:
                    return None
                if "size" in pax:
                    size = int(pax["size"])
                uid = int(pax["uid"]) if "uid" in pax else int(raw_uid.partition(b"\0")[0], 8)
                gid = int(pax["gid"]) if "gid" in pax else int(raw_gid.partition(b"\0")[0], 8)
                if size < 0 or ("uid" in pax and uid < 0) or ("gid" in pax and gid < 0):
                    return None
                if "mtime" in pax:
                    pax_mtime = _fast_time(pax["mtime"])
                    if pax_mtime is None:
                        return None
                    mtime = pax_mtime
                if "atime" in pax:
                    atime = _fast_time(pax["atime"])
                    if atime is None:
                        return None
                if has_xattrs:
                    xattrs = {key[13:]: value for key, value in pax.items()
                              if key.startswith("SCHILY.xattr.")}
                    if any("\0" in key for key in xattrs):
                        return None
            name = raw_name.decode("utf-8", "surrogateescape")
            type_, stores = kind
            if header[156] in (0, 0x30) and name.endswith("/"):
                type_, stores = DIR, False  # old V7 archives spell directories this way
            devmajor = devminor = 0
            if type_ in (CHR, BLK):
                devmajor = int(raw_major.partition(b"\0")[0], 8)
                devminor = int(raw_minor.partition(b"\0")[0], 8)
        except ValueError:
            return None
        offset = self.consumed + (end - BLOCK - start)
        self._pos = end
        self.consumed += end - start
        return Entry(name, type_, mode, uid, gid, size if type_ == REG else 0, mtime, atime,
                     raw_link.decode("utf-8", "surrogateescape"), devmajor, devminor, xattrs,
                     None, pax, buf[start:end] if self._keep_raw else b"",
                     size if stores else 0, offset)

    def _next(self) -> Entry | None:
        pax: dict[str, bytes] = {}
        pax_sparse: list[int] = []
        long_name: bytes | None = None
        long_link: bytes | None = None
        meta = 0  # bytes of this member's extended headers: their records pile up
        if self._keep_raw:
            self._record = []
        while True:
            offset = self.consumed
            header = self._read(BLOCK)
            if not header:
                if offset == 0:
                    return None  # an empty stream is an empty layer
                # Go's reader takes this; a cut stream is more likely than a writer
                # that omits the end-of-archive blocks, so refuse it.
                raise self._error(f"archive ends at offset {offset} without its end marker")
            if len(header) != BLOCK:
                raise self._error(f"archive truncated in a header at offset {offset}")
            if header == _ZERO_BLOCK:
                second = self._read(BLOCK)
                if second and second != _ZERO_BLOCK:
                    raise self._error(f"data after an end-of-archive block at offset {offset}")
                return None
            self._check_sum(header, offset)
            kind = chr(header[156]) if header[156] else "\0"
            size = _num(header[124:136], "size", offset)
            if size < 0:
                raise self._error(f"negative size at offset {offset}")
            if kind in "xLK":
                meta += size
                if meta > MAX_META_PER_MEMBER:
                    raise self._error(f"extended headers of more than {MAX_META_PER_MEMBER} "
                                      f"bytes for one member at offset {offset}")
            if kind in "xg":
                data = self._meta(size, "PAX header", offset)
                if kind == "x":
                    self._parse_pax(data, pax, pax_sparse, offset)
                continue
            if kind in "LK":
                value = _cstr(self._meta(size, "GNU long name", offset))
                if kind == "L":
                    long_name = value
                else:
                    long_link = value
                continue
            entry = self._member(header, kind, size, offset, pax, pax_sparse, long_name,
                                 long_link)
            if self._record is not None:
                entry.raw = b"".join(self._record)
                self._record = None
            return entry

    def _meta(self, size: int, what: str, offset: int) -> bytes:
        if size > MAX_META:
            raise self._error(f"{what} of {size} bytes at offset {offset} is too large")
        data = self._read_exact(size, what, None)
        self._read_exact(-size % BLOCK, what, None)
        return data

    def _check_sum(self, header: bytes, offset: int) -> None:
        stored = _num(header[148:156], "checksum", offset)
        # The sum of the header's bytes, the checksum field counted as spaces.  Each half
        # sums to at most 256 * 255 < 65521, so adler32's low half is exactly 1 + that
        # sum: two C calls instead of a Python loop over 512 bytes.
        unsigned = ((zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF)
                    - 2 - sum(header[148:156]) + 8 * 0x20)
        if stored == unsigned:
            return
        blanked = header[:148] + b"        " + header[156:]
        signed = unsigned - 256 * sum(1 for b in blanked if b > 127)
        if stored != signed:
            raise self._error(f"bad header checksum at offset {offset}")

    def _parse_pax(
        self, data: bytes, pax: dict[str, bytes], sparse: list[int], offset: int
    ) -> None:
        pos = 0
        while pos < len(data):
            space = data.find(b" ", pos)
            if space < 0:
                raise self._error(f"bad PAX record at offset {offset}")
            try:
                length = int(data[pos:space])
            except ValueError:
                raise self._error(f"bad PAX record length at offset {offset}") from None
            end = pos + length
            if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
                raise self._error(f"bad PAX record at offset {offset}")
            record = data[space + 1 : end - 1]
            eq = record.find(b"=")
            if eq <= 0:
                raise self._error(f"bad PAX record at offset {offset}")
            key = record[:eq].decode("utf-8", "replace")
            value = record[eq + 1 :]
            if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
                sparse.append(self._pax_int(value, key, offset))
            else:
                pax[key] = value
            pos = end

    def _pax_int(self, value: bytes, key: str, offset: int) -> int:
        try:
            number = int(value)
        except ValueError:
            raise self._error(f"bad PAX {key} {value!r} at offset {offset}") from None
        if number < 0:
            raise self._error(f"negative PAX {key} at offset {offset}")
        return number

    def _pax_time(self, value: bytes, key: str, offset: int) -> int:
        text = value.decode("ascii", "replace")
        try:
            whole, _, frac = text.partition(".")
            sign = -1 if whole.startswith("-") else 1
            ns = (frac + "000000000")[:9]
            return int(whole) * 1_000_000_000 + sign * int(ns or "0")
        except ValueError:
            raise self._error(f"bad PAX {key} {text!r} at offset {offset}") from None

    def _member(
        self,
        header: bytes,
        kind: str,
        size: int,
        offset: int,
        pax: dict[str, bytes],
        pax_sparse: list[int],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> Entry:
        (raw_name, raw_mode, raw_uid, raw_gid, _, raw_mtime, _, _, raw_link, magic, _, _, _,
         raw_major, raw_minor, prefix) = _HEADER.unpack(header)
        raw_name = _cstr(raw_name)
        if magic == b"ustar\x00" and prefix[0]:  # POSIX prefix field (not GNU's layout)
            raw_name = _cstr(prefix) + b"/" + raw_name
        if long_name is not None:
            raw_name = long_name
        raw_link = long_link if long_link is not None else _cstr(raw_link)
        if "path" in pax:
            raw_name = pax["path"]
        if "linkpath" in pax:
            raw_link = pax["linkpath"]
        if b"\0" in raw_name or b"\0" in raw_link:
            raise self._error(f"NUL byte in a name at offset {offset}")
        name = _decode(raw_name)
        if "size" in pax:
            size = self._pax_int(pax["size"], "size", offset)
        data_size = size
        if kind in ("0", "\0") and name.endswith("/"):
            kind = DIR  # old V7 archives spell directories this way
        if kind in "7\0":
            kind = REG
        elif kind == "D":
            kind = DIR  # GNU dumpdir: a directory whose data (a listing) is skipped
        elif kind not in "0123456S":
            raise self._error(f"unsupported tar member type {kind!r} at offset {offset}", name)
        else:
            # As Go's reader (and so Docker) does: these types carry no data.
            data_size = 0 if kind in "123456" else size
        mtime = _num(raw_mtime, "mtime", offset) * 1_000_000_000
        xattrs: dict[str, bytes] = {}
        atime = None
        if not pax:  # most members of most layers: no PAX record to consult
            uid = _num(raw_uid, "uid", offset)
            gid = _num(raw_gid, "gid", offset)
        else:
            if "mtime" in pax:
                mtime = self._pax_time(pax["mtime"], "mtime", offset)
            if "atime" in pax:
                atime = self._pax_time(pax["atime"], "atime", offset)
            uid = self._pax_int(pax["uid"], "uid", offset) if "uid" in pax else _num(
                raw_uid, "uid", offset)
            gid = self._pax_int(pax["gid"], "gid", offset) if "gid" in pax else _num(
                raw_gid, "gid", offset)
            xattrs = {
                key[len("SCHILY.xattr.") :]: value
                for key, value in pax.items()
                if key.startswith("SCHILY.xattr.")
            }
            if any("\0" in key for key in xattrs):
                raise self._error(f"NUL byte in an xattr name at offset {offset}", name)
        device = kind in "34"
        entry = Entry(
            name=name,
            type=REG if kind == "S" else kind,
            mode=_num(raw_mode, "mode", offset) & 0o7777,
            uid=uid,
            gid=gid,
            size=size,
            mtime=mtime,
            atime=atime,
            linkname=_decode(raw_link),
            devmajor=_num(raw_major, "devmajor", offset) if device else 0,
            devminor=_num(raw_minor, "devminor", offset) if device else 0,
            xattrs=xattrs,
            pax=pax,
            data_size=data_size,
            offset=offset,
        )
        if entry.type != REG:
            entry.size = 0
        if kind == "S":
            self._gnu_sparse(entry, header, offset)
        elif "GNU.sparse.major" in pax or "GNU.sparse.map" in pax or pax_sparse:
            self._pax_sparse(entry, pax, pax_sparse, offset)
        return entry

    def _gnu_sparse(self, entry: Entry, header: bytes, offset: int) -> None:
        regions = self._sparse_block(header[386:482], 4, offset)
        extended = header[482]
        while extended:
            block = self._read_exact(BLOCK, "sparse header", entry.name)
            regions += self._sparse_block(block[:504], 21, offset)
            extended = block[504]
            if len(regions) > MAX_SPARSE_ENTRIES:
                raise self._error("too many sparse regions", entry.name)
        entry.size = _num(header[483:495], "realsize", offset)
        self._set_sparse(entry, regions)

    def _sparse_block(self, raw: bytes, count: int, offset: int) -> list[tuple[int, int]]:
        regions = []
        for i in range(count):
            field_ = raw[i * 24 : i * 24 + 24]
            if not field_.strip(b"\0"):
                break
            regions.append((_num(field_[:12], "sparse offset", offset),
                            _num(field_[12:], "sparse length", offset)))
        return regions

    def _pax_sparse(
        self, entry: Entry, pax: dict[str, bytes], pax_sparse: list[int], offset: int
    ) -> None:
        if "GNU.sparse.name" in pax:
            entry.name = _decode(pax["GNU.sparse.name"])
        real = pax.get("GNU.sparse.realsize", pax.get("GNU.sparse.size"))
        if real is None:
            raise self._error("sparse file without a real size", entry.name)
        numbers: list[int]
        if pax.get("GNU.sparse.major") == b"1":
            numbers = self._sparse_map_1_0(entry)
        elif "GNU.sparse.map" in pax:
            text = pax["GNU.sparse.map"]
            numbers = [self._pax_int(v, "GNU.sparse.map", offset) for v in text.split(b",")] if (
                text) else []
        else:
            numbers = pax_sparse
        if len(numbers) % 2 or len(numbers) > 2 * MAX_SPARSE_ENTRIES:
            raise self._error("bad sparse map", entry.name)
        entry.size = self._pax_int(real, "GNU.sparse.realsize", offset)
        self._set_sparse(entry, list(zip(numbers[::2], numbers[1::2], strict=True)))

    def _sparse_map_1_0(self, entry: Entry) -> list[int]:
        # The map leads the member's data: decimal numbers, one per line, padded to a block.
        text = b""
        numbers: list[int] = []
        count: int | None = None
        used = 0
        while count is None or len(numbers) < 2 * count:
            if b"\n" not in text:
                if used >= entry.data_size or used > MAX_META:
                    raise self._error("bad sparse map", entry.name)
                text += self._read_exact(BLOCK, "sparse map", entry.name)
                used += BLOCK
                continue
            line, _, text = text.partition(b"\n")
            try:
                number = int(line)
            except ValueError:
                raise self._error("bad sparse map", entry.name) from None
            if count is None:
                if number < 0 or number > MAX_SPARSE_ENTRIES:
                    raise self._error("bad sparse map", entry.name)
                count = number
            else:
                numbers.append(number)
        entry.data_size -= used
        return numbers

    def _set_sparse(self, entry: Entry, regions: list[tuple[int, int]]) -> None:
        end = 0
        stored = 0
        for off, length in regions:
            if off < end or length < 0 or off + length > entry.size:
                raise self._error("bad sparse map", entry.name)
            end = off + length
            stored += length
        if stored != entry.data_size:
            raise self._error("sparse map does not match the stored data", entry.name)
        entry.sparse = regions
