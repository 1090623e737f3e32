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

Each member takes the fast path (:meth:`TarReader._fast_next`) if it has the common
shape and lies whole in the buffer, else the general path (``_next``/``_member``),
which reads every format and reports every fault.  The pieces live beside it: the
entry (:mod:`lamina.archive.entry`), the buffered input it shares with the isolated
child's record reader (:mod:`lamina.archive.buffered`), the header fields
(:mod:`lamina.archive.fields`) and the sparse formats (:mod:`lamina.archive.sparse`).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from isal import isal_zlib

from lamina.archive.buffered import BufferedInput
from lamina.archive.codecs import DECODE_ERRORS
from lamina.archive.entry import BLK, BLOCK, CHR, DIR, FIFO, LINK, REG, SYMLINK, Entry
from lamina.archive.fields import HEADER, MAX_META, cstr, decode, fast_time, num, sum_ok
from lamina.archive.sparse import MAX_SPARSE_ENTRIES, read_gnu_sparse, read_pax_sparse
from lamina.errors import UnsafeArchive

__all__ = [
    "BLK", "BLOCK", "CHR", "DIR", "FIFO", "LINK", "MAX_META", "MAX_META_PER_MEMBER",
    "MAX_SPARSE_ENTRIES", "READ_SIZE", "REG", "SYMLINK", "Entry", "TarReader",
]

READ_SIZE = 1 << 20
MAX_META_PER_MEMBER = 4 * MAX_META  # all of one member's extended headers, together
MAX_ID = 0xFFFF_FFFE
"""The largest owner id: uid_t is 32 bits, and -1 means "unchanged" to chown."""
MAX_NS = 1 << 63
"""Times (in ns) and sizes must fit 64 signed bits: time_t, off_t, and the records."""

_ZERO_BLOCK = bytes(BLOCK)
# The typeflags the fast path reads (others, and 'x' after the first, take the general
# path): the entry's type, and whether the member stores data (as in _member).
_FAST_TYPES: dict[int, tuple[str, bool]] = {
    0: (REG, True), 0x30: (REG, True), 0x37: (REG, True), 0x31: (LINK, False),
    0x32: (SYMLINK, False), 0x33: (CHR, False), 0x34: (BLK, False), 0x35: (DIR, False),
    0x36: (FIFO, False),
}


# The PAX keys lamina meets most, to their names without a decode each (others: decoded).
_PAX_KEYS = {key.encode(): key for key in ("mtime", "atime", "ctime", "path", "linkpath",
                                            "size", "uid", "gid", "uname", "gname")}


def _fast_pax_records(data: bytes) -> tuple[dict[str, bytes], bool] | None:
    """A PAX header's records and whether any is an xattr, if all are plain (no sparse
    map); else None.  A bad length raises ValueError, as the fast path's int() calls do."""
    pax: dict[str, bytes] = {}
    has_xattrs = False
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
    return pax, has_xattrs


_PaxFields = tuple[bytes, bytes, int, int, int, int, "int | None", dict[str, bytes]]


def _fast_pax_fields(
    pax: dict[str, bytes], has_xattrs: bool, raw_name: bytes, raw_link: bytes, size: int,
    raw_uid: bytes, raw_gid: bytes, mtime: int,
) -> _PaxFields | None:
    """The header's fields as the PAX records override them: name, link name, size, uid,
    gid, mtime, atime and xattrs, or None for what the general path must judge."""
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
        pax_mtime = fast_time(pax["mtime"])
        if pax_mtime is None:
            return None
        mtime = pax_mtime
    atime = None
    if "atime" in pax:
        atime = fast_time(pax["atime"])
        if atime is None:
            return None
    xattrs: dict[str, bytes] = {}
    if has_xattrs:
        xattrs = {key[13:]: value for key, value in pax.items()
                  if key.startswith("SCHILY.xattr.")}
        if any("\0" in key for key in xattrs):
            return None
    return raw_name, raw_link, size, uid, gid, mtime, atime, xattrs


class TarReader(BufferedInput):
    """Iterate the members of a tar stream (see the module docstring)."""

    def __init__(
        self, stream: BinaryIO, *, layer: str | None = None, keep_raw: bool = False
    ) -> None:
        """``keep_raw``: give each entry its header blocks as read (``Entry.raw``), and
        keep the end of the archive for :meth:`trailer` — for exact re-export."""
        super().__init__()
        self._stream = stream
        self._keep_raw = keep_raw
        self._layer = layer

    # -- input (the buffer itself: BufferedInput) -----------------------------

    def _error(self, message: str, name: str | None = None) -> UnsafeArchive:
        return UnsafeArchive(message, layer=self._layer, path=name)

    def _named(self, e: UnsafeArchive) -> UnsafeArchive:
        """``e`` naming this reader's layer (the header field decoders know of none)."""
        if e.layer is not None or e.path is not None or self._layer is None:
            return e
        return self._error(str(e))

    def _ended(self, what: str, name: str | None) -> Exception:
        return self._error(f"archive truncated in {what}", name)

    def _refill(self, need: int) -> bytes:
        return self._pull(max(READ_SIZE, need))

    def _pull(self, n: int) -> bytes:
        try:
            return self._stream.read(n)
        except DECODE_ERRORS as e:
            raise self._error(f"unreadable archive stream at offset {self.consumed}: {e}") from e

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
            try:
                entry = self._fast_next()
                if entry is None:
                    entry = self._next()
            except UnsafeArchive as e:
                raise self._named(e) from None
            if entry is None:
                return
            self._pending = entry.data_size + (-entry.data_size % BLOCK)
            if not (0 <= entry.uid <= MAX_ID and 0 <= entry.gid <= MAX_ID
                    and -MAX_NS <= entry.mtime < MAX_NS and entry.size < MAX_NS
                    and (entry.atime is None or -MAX_NS <= entry.atime < MAX_NS)):
                raise self._error(self._out_of_range(entry), entry.name)
            yield entry

    @staticmethod
    def _out_of_range(entry: Entry) -> str:
        if not (0 <= entry.uid <= MAX_ID and 0 <= entry.gid <= MAX_ID):
            return f"owner {entry.uid}:{entry.gid} out of range"
        if entry.size >= MAX_NS:
            return f"size {entry.size} out of range"
        return "time out of range"

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

        With ``checksum``, return the CRC-32 of the data as written (a sparse file's
        holes as zeros), computed on the way so that nobody has to read the file again
        for it.
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
            crc = self._write_sparse(fd, entry.sparse, entry, checksum)
        pad = -entry.data_size % BLOCK
        if pad and pad <= len(self._buf) - self._pos:
            self._pos += pad
            self.consumed += pad
        elif pad:
            self._read_exact(pad, "padding", entry.name)
        self._pending = 0
        return crc

    def data_chunks(self, entry: Entry) -> Iterator[memoryview]:
        """``entry``'s data as buffer-sized views (each valid until the next one), then
        its padding skipped: for a member copied elsewhere whole (an image archive's
        blob).  A sparse member is refused."""
        if entry.sparse is not None:
            raise self._error("a sparse member where a plain file was expected", entry.name)
        yield from self._chunks(entry.data_size, entry.name)
        self._read_exact(-entry.data_size % BLOCK, "padding", entry.name)
        self._pending = 0

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
                if not 0 <= size <= MAX_META or not sum_ok(header):
                    return None
                data = buf[end : end + size]
                end += size + (-size % BLOCK) + BLOCK
                if end > len(buf):
                    return None
                parsed = _fast_pax_records(data)
                if parsed is None:
                    return None
                pax, has_xattrs = parsed
                header = buf[end - BLOCK : end]
            kind = _FAST_TYPES.get(header[156])
            if kind is None or not sum_ok(header):
                return None
            (raw_name, raw_mode, raw_uid, raw_gid, raw_size, raw_mtime, _, _, raw_link, magic,
             _, _, _, raw_major, raw_minor, prefix) = HEADER.unpack(header)
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
                fields = _fast_pax_fields(pax, has_xattrs, raw_name, raw_link, size, raw_uid,
                                          raw_gid, mtime)
                if fields is None:
                    return None
                raw_name, raw_link, size, uid, gid, mtime, atime, xattrs = fields
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
            size = num(header[124:136], "size", offset)
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
                value = cstr(self._meta(size, "GNU long name", offset))
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
        stored = num(header[148:156], "checksum", offset)
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
         raw_major, raw_minor, prefix) = HEADER.unpack(header)
        raw_name = cstr(raw_name)
        if magic == b"ustar\x00" and prefix[0]:  # POSIX prefix field (not GNU's layout)
            raw_name = cstr(prefix) + b"/" + raw_name
        if long_name is not None:
            raw_name = long_name
        raw_link = long_link if long_link is not None else cstr(raw_link)
        if "path" in pax:
            raw_name = pax["path"]
        if "linkpath" in pax:
            raw_link = pax["linkpath"]
        if b"\0" in raw_name or b"\0" in raw_link:
            raise self._error(f"NUL byte in a name at offset {offset}")
        name = decode(raw_name)
        if "size" in pax:
            size = self._pax_int(pax["size"], "size", offset)
        kind, data_size = self._member_type(kind, name, size, offset)
        mtime = num(raw_mtime, "mtime", offset) * 1_000_000_000
        xattrs: dict[str, bytes] = {}
        atime = None
        if not pax:  # most members of most layers: no PAX record to consult
            uid = num(raw_uid, "uid", offset)
            gid = num(raw_gid, "gid", offset)
        else:
            mtime, atime, uid, gid, xattrs = self._pax_overrides(pax, raw_uid, raw_gid, mtime,
                                                                 offset, name)
        device = kind in "34"
        entry = Entry(
            name=name,
            type=REG if kind == "S" else kind,
            mode=num(raw_mode, "mode", offset) & 0o7777,
            uid=uid,
            gid=gid,
            size=size,
            mtime=mtime,
            atime=atime,
            linkname=decode(raw_link),
            devmajor=num(raw_major, "devmajor", offset) if device else 0,
            devminor=num(raw_minor, "devminor", offset) if device else 0,
            xattrs=xattrs,
            pax=pax,
            data_size=data_size,
            offset=offset,
        )
        if entry.type != REG:
            entry.size = 0
        if kind == "S":
            read_gnu_sparse(self, entry, header, offset)
        elif "GNU.sparse.major" in pax or "GNU.sparse.map" in pax or pax_sparse:
            read_pax_sparse(self, entry, pax, pax_sparse, offset)
        return entry

    def _member_type(self, kind: str, name: str, size: int, offset: int) -> tuple[str, int]:
        """A member's typeflag as an entry's type (``S`` stays: sparse), and the bytes of
        data it stores."""
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
        return kind, data_size

    def _pax_overrides(
        self, pax: dict[str, bytes], raw_uid: bytes, raw_gid: bytes, mtime: int, offset: int,
        name: str,
    ) -> tuple[int, int | None, int, int, dict[str, bytes]]:
        """mtime, atime, uid, gid and xattrs as the member's PAX records give them."""
        atime = None
        if "mtime" in pax:
            mtime = self._pax_time(pax["mtime"], "mtime", offset)
        if "atime" in pax:
            atime = self._pax_time(pax["atime"], "atime", offset)
        uid = self._pax_int(pax["uid"], "uid", offset) if "uid" in pax else num(
            raw_uid, "uid", offset)
        gid = self._pax_int(pax["gid"], "gid", offset) if "gid" in pax else num(
            raw_gid, "gid", offset)
        xattrs = {
            key[len("SCHILY.xattr.") :]: value
            for key, value in pax.items()
            if key.startswith("SCHILY.xattr.")
        }
        if any("\0" in key for key in xattrs):
            raise self._error(f"NUL byte in an xattr name at offset {offset}", name)
        return mtime, atime, uid, gid, xattrs
