"""Tar headers built by hand: ustar where it fits, PAX records where it does not.

Headers are made from ``lstat`` results with integer mtimes (Docker truncates
to the second) and no user or group name lookups.  Long names and links,
large ids, sizes and times, and ``security.capability`` go into a PAX ``x``
header, which GNU tar, Go's archive/tar (Docker) and Python's tarfile read.
"""

from __future__ import annotations

BLOCK = 512
_MAX_OCTAL_7 = 0o7777777
_MAX_OCTAL_11 = 0o77777777777
_PAD = bytes(BLOCK)


def padding(size: int) -> bytes:
    """The zero bytes that round a member's data up to a block."""
    return _PAD[: -size % BLOCK]


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for a ustar header, or None when the name needs PAX."""
    if len(name) <= 100:
        return b"", name
    if len(name) > 256:
        return None
    cut = name.rfind(b"/", 0, 156)
    while cut > 0:
        if len(name) - cut - 1 <= 100:
            return name[:cut], name[cut + 1 :]
        cut = name.rfind(b"/", 0, cut)
    return None


# The fixed parts of a ustar header, and what they add to its checksum: only the
# fields that vary are summed per header (a sum over all 512 bytes costs ~4 µs).
_MAGIC = b"ustar\x0000" + bytes(64)  # magic, version, and no user or group names
_NO_DEVICE = b"%07o\0%07o\0" % (0, 0)
_FIXED_SUM = 8 * ord(" ") + sum(_MAGIC)
_NO_DEVICE_SUM = sum(_NO_DEVICE)
_TAIL = bytes(12)


def _ustar(
    name: bytes,
    prefix: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    kind: bytes,
    link: bytes,
    devmajor: int,
    devminor: int,
) -> bytes:
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime)
    if devmajor or devminor:
        device = b"%07o\0%07o\0" % (devmajor, devminor)
        device_sum = sum(device)
    else:
        device, device_sum = _NO_DEVICE, _NO_DEVICE_SUM
    checksum = (_FIXED_SUM + sum(name) + sum(numbers) + kind[0] + sum(link) + device_sum
                + sum(prefix))
    return b"".join((
        name.ljust(100, b"\0"), numbers, b"%06o\0 " % checksum, kind, link.ljust(100, b"\0"),
        _MAGIC, device, prefix.ljust(155, b"\0"), _TAIL,
    ))


def header(
    name: str,
    kind: str,
    *,
    mode: int = 0,
    uid: int = 0,
    gid: int = 0,
    size: int = 0,
    mtime: int = 0,
    linkname: str = "",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: dict[str, bytes] | None = None,
) -> bytes:
    """The header block(s) of one member; ``kind`` is a tar type flag ('0', '5', …)."""
    raw_name = name.encode("utf-8", "surrogateescape")
    raw_link = linkname.encode("utf-8", "surrogateescape")
    records: list[bytes] = []
    split = _split_ustar(raw_name)
    if split is None:
        records.append(_pax_record("path", raw_name))
        split = (b"", raw_name[:100])
    if len(raw_link) > 100:
        records.append(_pax_record("linkpath", raw_link))
        raw_link = raw_link[:100]
    if uid > _MAX_OCTAL_7:
        records.append(_pax_record("uid", b"%d" % uid))
        uid = 0
    if gid > _MAX_OCTAL_7:
        records.append(_pax_record("gid", b"%d" % gid))
        gid = 0
    if size > _MAX_OCTAL_11:
        records.append(_pax_record("size", b"%d" % size))
    if not 0 <= mtime <= _MAX_OCTAL_11:
        records.append(_pax_record("mtime", b"%d" % mtime))
        mtime = 0
    if xattrs:
        for key in sorted(xattrs):
            records.append(_pax_record("SCHILY.xattr." + key, xattrs[key]))
    block = _ustar(
        split[1], split[0], mode, uid, gid, size if size <= _MAX_OCTAL_11 else 0, mtime,
        kind.encode(), raw_link, devmajor, devminor,
    )
    if not records:
        return block
    pax = b"".join(records)
    base = raw_name.rstrip(b"/").rsplit(b"/", 1)[-1][:80]
    pax_header = _ustar(b"PaxHeaders.0/" + base, b"", 0o644, 0, 0, len(pax), mtime, b"x", b"",
                        0, 0)
    return pax_header + pax + padding(len(pax)) + block


END_OF_ARCHIVE = bytes(2 * BLOCK)
