"""Layer tars for tests, built in memory from a compact spec.

Well-formed tars go through :mod:`tarfile` (PAX by default, GNU on request)::

    data = build([
        directory("etc", mode=0o755),
        file("etc/motd", b"hi\\n", mode=0o644, uid=0, gid=0),
        symlink("lib", "usr/lib"),
        hardlink("etc/motd2", "etc/motd"),
        whiteout("etc/old"),            # etc/.wh.old
        opaque("var/cache"),            # var/cache/.wh..wh..opq
        file("bin/ping", b"", xattrs={"security.capability": CAP_NET_RAW}),
    ])

Malformed and unusual ones (bad checksums, truncated streams, GNU long names and
sparse files, PAX sparse files) are put together block by block with the ``raw_*``
functions, which write exactly the bytes they are told to.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

BLOCK = 512
MTIME = 1_600_000_000
"""The mtime every entry gets unless told otherwise (2020-09-13, a whole second)."""

CAP_NET_BIND_SERVICE = bytes.fromhex("0100000200040000000000000000000000000000")
"""A VFS_CAP_REVISION_2 ``security.capability`` value: cap_net_bind_service+ep."""
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")
"""cap_net_raw+ep, the value the corpus's app layer carries."""

WHITEOUT_PREFIX = ".wh."
OPAQUE_NAME = ".wh..wh..opq"


@dataclass
class Entry:
    """One tar member to write: a :class:`tarfile.TarInfo` plus its data."""

    name: str
    type: bytes
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int | float = MTIME
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[str, str] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        """The header of this entry (PAX records for xattrs and extra ``pax``)."""
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.size = len(self.data) if self.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.uname = info.gname = ""
        info.mtime = self.mtime
        info.linkname = self.linkname
        info.devmajor, info.devminor = self.devmajor, self.devminor
        headers = {f"SCHILY.xattr.{key}": _pax_str(value) for key, value in self.xattrs.items()}
        headers.update(self.pax)
        info.pax_headers = headers
        return info


def _pax_str(value: bytes) -> str:
    # tarfile writes a str PAX value back as the bytes it came from.
    return value.decode("utf-8", "surrogateescape")


def file(name: str, data: bytes | str = b"", *, mode: int = 0o644, **kw: Any) -> Entry:
    """A regular file."""
    if isinstance(data, str):
        data = data.encode()
    return Entry(name, tarfile.REGTYPE, data=data, mode=mode, **kw)


def directory(name: str, *, mode: int = 0o755, **kw: Any) -> Entry:
    """A directory."""
    return Entry(name, tarfile.DIRTYPE, mode=mode, **kw)


def symlink(name: str, target: str, *, mode: int = 0o777, **kw: Any) -> Entry:
    """A symbolic link to ``target``."""
    return Entry(name, tarfile.SYMTYPE, linkname=target, mode=mode, **kw)


def hardlink(name: str, target: str, *, mode: int = 0o644, **kw: Any) -> Entry:
    """A hard link to the earlier member (or lower file) ``target``."""
    return Entry(name, tarfile.LNKTYPE, linkname=target, mode=mode, **kw)


def fifo(name: str, *, mode: int = 0o644, **kw: Any) -> Entry:
    """A named pipe."""
    return Entry(name, tarfile.FIFOTYPE, mode=mode, **kw)


def chardev(name: str, major: int, minor: int, *, mode: int = 0o666, **kw: Any) -> Entry:
    """A character device."""
    return Entry(name, tarfile.CHRTYPE, devmajor=major, devminor=minor, mode=mode, **kw)


def blockdev(name: str, major: int, minor: int, *, mode: int = 0o660, **kw: Any) -> Entry:
    """A block device."""
    return Entry(name, tarfile.BLKTYPE, devmajor=major, devminor=minor, mode=mode, **kw)


def whiteout(path: str, **kw: Any) -> Entry:
    """The whiteout that deletes ``path`` of the lower layers: ``dir/.wh.name``."""
    parent, _, base = path.rpartition("/")
    name = f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else f"{WHITEOUT_PREFIX}{base}"
    return Entry(name, tarfile.REGTYPE, **kw)


def opaque(dirpath: str, **kw: Any) -> Entry:
    """The marker that makes ``dirpath`` opaque: ``dirpath/.wh..wh..opq``."""
    name = f"{dirpath}/{OPAQUE_NAME}" if dirpath else OPAQUE_NAME
    return Entry(name, tarfile.REGTYPE, **kw)


def build(entries: Iterable[Entry], *, format: int = tarfile.PAX_FORMAT) -> bytes:
    """The tar (uncompressed, with its end-of-archive blocks) of ``entries``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=format) as tar:
        for entry in entries:
            info = entry.tarinfo()
            tar.addfile(info, io.BytesIO(entry.data) if info.size else None)
    return out.getvalue()


def stream(entries: Iterable[Entry], **kw: int) -> io.BytesIO:
    """:func:`build` as a readable stream, what ``apply_diff`` takes."""
    return io.BytesIO(build(entries, **kw))


def write(path: Path, entries: Iterable[Entry], **kw: int) -> Path:
    """:func:`build` into the file ``path``."""
    path.write_bytes(build(entries, **kw))
    return path


def gzipped(data: bytes, *, members: int = 1) -> bytes:
    """``data`` gzip-compressed, cut into ``members`` concatenated gzip members."""
    return b"".join(gzip.compress(part, mtime=0) for part in _split(data, members))


def zstd_compressed(data: bytes, *, frames: int = 1) -> bytes:
    """``data`` zstd-compressed, cut into ``frames`` concatenated zstd frames."""
    cctx = zstandard.ZstdCompressor(level=3)
    return b"".join(cctx.compress(part) for part in _split(data, frames))


def _split(data: bytes, parts: int) -> list[bytes]:
    # Cut at odd offsets, so that no part ends on a tar block boundary.
    step = max(1, len(data) // parts + 7)
    return [data[i : i + step] for i in range(0, len(data), step)] or [b""]


# --- raw blocks -----------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    if value >= 8 ** (width - 1):  # too large for octal: GNU base-256, as GNU tar writes
        return b"\x80" + value.to_bytes(width - 1, "big")
    return b"%0*o\0" % (width - 1, value)


def _field(value: bytes, width: int) -> bytes:
    if len(value) > width:
        raise ValueError(f"{value!r} does not fit in {width} bytes")
    return value.ljust(width, b"\0")


def checksum(header: bytes) -> int:
    """The tar checksum of a 512-byte header (its checksum field counted as spaces)."""
    return sum(header[:148]) + 8 * 0x20 + sum(header[156:])


def raw_header(
    name: bytes | str,
    *,
    size: int = 0,
    type: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = MTIME,
    linkname: bytes | str = b"",
    devmajor: int = 0,
    devminor: int = 0,
    magic: bytes = b"ustar\x0000",
    gnu_tail: bytes = b"",
    chksum: int | None = None,
) -> bytes:
    """One 512-byte header block, exactly as given.

    ``magic`` is ``b"ustar\\x0000"`` (POSIX) or ``b"ustar  \\x00"`` (GNU); ``gnu_tail`` is
    written from offset 345 on (the old GNU header's atime, ctime, …, sparse map, realsize)
    instead of the ustar prefix field.  ``chksum`` overrides the computed checksum.
    """
    if isinstance(name, str):
        name = name.encode()
    if isinstance(linkname, str):
        linkname = linkname.encode()
    head = b"".join(
        [
            _field(name, 100),
            _octal(mode, 8),
            _octal(uid, 8),
            _octal(gid, 8),
            _octal(size, 12),
            _octal(mtime, 12),
            b" " * 8,
            type,
            _field(linkname, 100),
            magic,
            _field(b"", 32),
            _field(b"", 32),
            _octal(devmajor, 8),
            _octal(devminor, 8),
        ]
    )
    assert len(head) == 345
    header = head + _field(gnu_tail, BLOCK - 345)
    value = checksum(header) if chksum is None else chksum
    return header[:148] + b"%06o\0 " % value + header[156:]


def pad(data: bytes) -> bytes:
    """``data`` padded with NULs to a whole number of blocks."""
    return data + b"\0" * (-len(data) % BLOCK)


def raw_member(name: bytes | str, data: bytes = b"", **kw: Any) -> bytes:
    """A header (``size`` from ``data`` unless given) and the padded data."""
    kw.setdefault("size", len(data))
    return raw_header(name, **kw) + pad(data)


END = b"\0" * (2 * BLOCK)
"""The end-of-archive marker: two zero blocks."""


def pax_records(records: dict[str, bytes | str]) -> bytes:
    """The body of a PAX extended header: ``"%d %s=%s\\n"`` records."""
    out = []
    for key, value in records.items():
        if isinstance(value, str):
            value = value.encode()
        body = b" " + key.encode() + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length).encode()) + len(body) != length:
            length += 1
        out.append(str(length).encode() + body)
    return b"".join(out)


def raw_pax(records: dict[str, bytes | str], *, type: bytes = tarfile.XHDTYPE) -> bytes:
    """A PAX extended header member (``x``, or ``g`` for a global one)."""
    return raw_member("PaxHeaders/entry", pax_records(records), type=type)


def raw_gnu_long(value: bytes | str, *, type: bytes = tarfile.GNUTYPE_LONGNAME) -> bytes:
    """A GNU ``././@LongLink`` member (``L`` for the next name, ``K`` for its link)."""
    if isinstance(value, str):
        value = value.encode()
    return raw_member("././@LongLink", value + b"\0", type=type, magic=b"ustar  \x00")


def _sparse_map(chunks: Sequence[tuple[int, bytes]], realsize: int) -> list[tuple[int, bytes]]:
    # GNU tar reads each chunk from a block boundary, tarfile and Go's archive/tar read
    # them back to back: the two agree only when all chunks but the last fill whole blocks.
    filled = [data for _, data in chunks if data]
    if any(len(data) % BLOCK for data in filled[:-1]):
        raise ValueError("every sparse chunk but the last must be a whole number of blocks")
    # A file that ends in a hole ends its map with an empty chunk at its size, as GNU tar
    # writes it (GNU tar takes the size from the map's end).
    last_off, last_data = chunks[-1] if chunks else (0, b"")
    if last_off + len(last_data) < realsize:
        return [*chunks, (realsize, b"")]
    return list(chunks)


def raw_gnu_sparse(name: str, chunks: Sequence[tuple[int, bytes]], realsize: int) -> bytes:
    """An old-GNU sparse member (type ``S``) with at most four data chunks.

    ``chunks`` are ``(offset, data)`` pairs; everything else up to ``realsize`` is a hole.
    """
    chunks = _sparse_map(chunks, realsize)
    if len(chunks) > 4:
        raise ValueError("the header holds four sparse entries")
    sparse = b"".join(_octal(off, 12) + _octal(len(data), 12) for off, data in chunks)
    tail = b"".join(
        [
            b"\0" * 12,  # atime
            b"\0" * 12,  # ctime
            b"\0" * 12,  # offset
            b"\0" * 4,  # longnames
            b"\0",  # unused
            _field(sparse, 4 * 24),
            b"\0",  # isextended
            _octal(realsize, 12),
        ]
    )
    body = b"".join(data for _, data in chunks)
    return raw_header(
        name, size=len(body), type=tarfile.GNUTYPE_SPARSE, magic=b"ustar  \x00", gnu_tail=tail
    ) + pad(body)


def raw_pax_sparse_1_0(name: str, chunks: Sequence[tuple[int, bytes]], realsize: int) -> bytes:
    """A PAX sparse member, format 1.0 (what GNU tar writes with ``--sparse --format=pax``)."""
    chunks = _sparse_map(chunks, realsize)
    sparse_map = [str(len(chunks))]
    for off, data in chunks:
        sparse_map += [str(off), str(len(data))]
    body = pad(("\n".join(sparse_map) + "\n").encode()) + b"".join(d for _, d in chunks)
    records = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize),
    }
    return raw_pax(records) + raw_member(f"GNUSparseFile.0/{name}"[:99], body)


def raw_pax_sparse_0_1(name: str, chunks: Sequence[tuple[int, bytes]], realsize: int) -> bytes:
    """A PAX sparse member, format 0.1 (the map in a ``GNU.sparse.map`` record)."""
    chunks = _sparse_map(chunks, realsize)
    sparse_map = ",".join(f"{off},{len(data)}" for off, data in chunks)
    records = {
        "GNU.sparse.numblocks": str(len(chunks)),
        "GNU.sparse.map": sparse_map,
        "GNU.sparse.name": name,
        "GNU.sparse.size": str(realsize),
    }
    body = b"".join(d for _, d in chunks)
    return raw_pax(records) + raw_member(f"GNUSparseFile.0/{name}"[:99], body)


def expand_sparse(chunks: Sequence[tuple[int, bytes]], realsize: int) -> bytes:
    """The file content a sparse member stands for (holes read as zeros)."""
    out = bytearray(realsize)
    for off, data in chunks:
        out[off : off + len(data)] = data
    return bytes(out)
