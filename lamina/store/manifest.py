"""Per-layer manifests: what a read-only layer held when it was made, to check it later.

A manifest is written into the layer's directory (beside its metadata, outside
its content) when the layer is built, before the syncfs that makes it durable.
It lists every path of the layer's own content with its type, mode, owner,
size, device number, link target or the CRC-32 of its data, and the
``security.capability`` and overlayfs' opaque xattr (``trusted.``, or ``user.`` in a
user namespace).  A sparse file's
holes count as the zeros they read as but are never read (:mod:`lamina.archive.crc`):
the digest is the one reading them gives, so the manifests of older homes check as
they are, and a file of a terabyte of holes costs only its data.  ``lamina check``
compares the content with it, so a flipped byte or a lost file is found — which
no other graph driver does.  The same walk counts the layer's bytes and inodes
for ``lamina df``, so that ``df`` never walks a layer again.

Format: one JSON document per line, the first a header
(``{"format": 1, "bytes": …, "disk": …, "inodes": …}``), then
``[path, kind, mode, uid, gid, size, digest-or-target-or-rdev, xattrs]`` sorted by path.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from lamina.archive.crc import file_crc32
from lamina.archive.digests import Digests
from lamina.archive.union import OVERLAY_OPAQUE_XATTR
from lamina.host.fsutil import DIR_FLAGS
from lamina.host.usage import Tally, Totals

NAME = "manifest.jsonl"
FORMAT = 1
_XATTRS = ("security.capability", OVERLAY_OPAQUE_XATTR)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps's, built once

Row = list[object]
def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISCHR(mode):
        return "c"
    if stat.S_ISBLK(mode):
        return "b"
    return "p"


def _xattrs(target: int | str) -> dict[str, str]:
    # One listxattr first: most files have none, and a failed getxattr is costly.
    try:
        names = os.listxattr(target, follow_symlinks=isinstance(target, int))
    except OSError:
        return {}
    out = {}
    for key in _XATTRS:
        if key in names:
            try:
                value = os.getxattr(target, key, follow_symlinks=isinstance(target, int))
            except OSError:
                continue
            out[key] = value.hex()
    return out


def _file(dir_fd: int, name: str) -> tuple[str, dict[str, str]]:
    """The CRC-32 of a regular file's data, and its xattrs, through one fd."""
    # CRC-32 through isal (~10 GB/s here, against ~1 GB/s for SHA-256): this guards
    # against damage (it catches every flipped byte and burst), not against an
    # adversary, and keeps the manifest cheap on the apply path.  Holes are not read
    # (file_crc32 folds them in as zeros): a sparse file of a terabyte costs its data.
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return f"{file_crc32(fd):08x}", _xattrs(fd)
    finally:
        os.close(fd)


def rows(
    root: str | os.PathLike[str], only: Sequence[str] | None = None,
    digests: Digests | None = None,
) -> Iterator[tuple[Row, os.stat_result]]:
    """Every path below ``root`` as a manifest row (with its lstat), sorted by path;
    with ``only``, just those top-level names and what is below them; ``digests``
    spare reading the files they still match."""
    fd = os.open(root, DIR_FLAGS)
    try:
        yield from _walk(fd, "", only, digests or {})
    finally:
        os.close(fd)


def _walk(
    fd: int, rel: str, only: Sequence[str] | None, digests: Digests
) -> Iterator[tuple[Row, os.stat_result]]:
    for name in sorted(os.listdir(fd)):
        if only is not None and name not in only:
            continue
        path = f"{rel}/{name}" if rel else name
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        mode = st.st_mode
        kind = _kind(mode)
        sub = -1
        if kind == "f":
            known = digests.get(st.st_ino)
            if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
                detail, xattrs = f"{known[2]:08x}", _xattrs(f"/proc/self/fd/{fd}/{name}")
            elif st.st_size == 0:  # nothing to read: the CRC-32 of no data
                detail, xattrs = "00000000", _xattrs(f"/proc/self/fd/{fd}/{name}")
            else:
                detail, xattrs = _file(fd, name)
        elif kind == "d":
            sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            detail, xattrs = "", _xattrs(sub)
        else:
            if kind == "l":
                detail = os.readlink(name, dir_fd=fd)
            elif kind in "cb":
                detail = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                detail = ""
            xattrs = _xattrs(f"/proc/self/fd/{fd}/{name}")
        size = st.st_size if kind in "fl" else 0
        row: Row = [path, kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, size, detail, xattrs]
        yield row, st
        if sub >= 0:
            try:
                yield from _walk(sub, path, None, digests)
            finally:
                os.close(sub)


_HEADER_WIDTH = 160
"""The first line's width: the header of any totals fits it (four 20-digit numbers)."""


def record(
    root: str | os.PathLike[str], into: Path, *, only: Sequence[str] | None = None,
    digests: Digests | None = None,
) -> Totals:
    """Write the manifest of the tree ``root`` to ``into``; return its totals.

    ``digests``: the apply's CRC-32s (:data:`Digests`), so that the files it has just
    written are not read again."""
    tally = Tally()
    # The rows go to the file as they come (a million-file layer's would be some 100 MB
    # in memory), after a blank first line that the header, known last, overwrites: it
    # is JSON padded with spaces to the line's width.  No fsync: the layer's syncfs (or
    # the caller's) makes it durable with the content.
    with open(into, "w", encoding="utf-8") as f:
        f.write(" " * _HEADER_WIDTH + "\n")
        for row, st in rows(root, only, digests):
            f.write(_ENCODE(row))
            f.write("\n")
            tally.add(st)
        totals = tally.totals()
        header = json.dumps({"format": FORMAT, "bytes": totals.bytes, "disk": totals.disk,
                             "inodes": totals.inodes})
        assert len(header) <= _HEADER_WIDTH
        f.seek(0)
        f.write(header.ljust(_HEADER_WIDTH))
    return totals


def totals(path: Path) -> Totals | None:
    """The totals recorded in a manifest (its first line only)."""
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
        return Totals(int(header["bytes"]), int(header["disk"]), int(header["inodes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify(
    root: str | os.PathLike[str], path: Path, *, only: Sequence[str] | None = None
) -> list[str]:
    """How the tree ``root`` differs from the manifest at ``path`` (empty: it matches)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        header = json.loads(lines[0])
        if header.get("format") != FORMAT:
            return [f"manifest format {header.get('format')!r} unknown"]
        want = {row[0]: row for row in (json.loads(line) for line in lines[1:])}
    except (OSError, ValueError, IndexError, TypeError) as e:
        return [f"manifest unreadable: {e}"]
    problems = []
    got: dict[str, Row] = {}
    try:
        for row, _ in rows(root, only):
            got[str(row[0])] = row
    except OSError as e:
        return [f"content unreadable: {e}"]
    for name in sorted(set(want) | set(got)):
        a, b = want.get(name), got.get(name)
        if a is None:
            problems.append(f"/{name}: not in the manifest")
        elif b is None:
            problems.append(f"/{name}: missing")
        elif a != b:
            fields = ("kind", "mode", "uid", "gid", "size", "content", "xattrs")
            what = [f for f, x, y in zip(fields, a[1:], b[1:], strict=True) if x != y]
            problems.append(f"/{name}: {', '.join(what)} differ")
    return problems
