"""A tar member as the tar engine hands it around: :class:`Entry` and its types.

:class:`~lamina.archive.reader.TarReader` decodes entries from a tar stream,
:class:`~lamina.archive.records.RecordReader` from the records an isolated apply's
caller sends, and :class:`~lamina.archive.apply.Applier` writes them to a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLOCK = 512  # a tar block: headers, and the padding of each member's data

REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO = "0", "1", "2", "3", "4", "5", "6"


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
