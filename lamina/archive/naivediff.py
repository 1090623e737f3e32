"""Docker's "naive diff": the changes between two full trees, found by comparing them.

Used by backends that keep whole trees (vfs) and as the fallback of those that
can read their own changes natively (overlay) when asked about another parent.

A path is changed when its mode, owner, device number, or (for non-directories)
mtime, size or link count differ, or its ``security.capability`` differs — Docker's rules
(plus the link count, so that a hard link made or broken is not lost)
(directories' sizes and mtimes are not a measure of change).  Where metadata
cannot tell, the content decides: symlink targets are always compared, and a
regular file whose metadata is equal but that was touched after the layer's
tree was copied from its parent (its ctime is not older than ``touched_ns``)
has its bytes compared.  A directory with changes below it is itself reported
as modified; a deleted directory is one deletion; everything below an added
directory is added.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lamina.driver import Change, ChangeKind
from lamina.host.fsutil import DIR_FLAGS
from lamina.host.usage import Tally

CAPABILITY = "security.capability"
_CMP_CHUNK = 1 << 20


@dataclass(slots=True)
class _Walk:
    touched_ns: int | None
    out: list[Change]


def changes(
    old_root: str | os.PathLike[str] | None,
    new_root: str | os.PathLike[str],
    *,
    touched_ns: int | None = None,
) -> list[Change]:
    """The changes that turn ``old_root`` (None: an empty tree) into ``new_root``, sorted."""
    walk = _Walk(touched_ns, [])
    with _opendir(new_root) as nfd:
        if old_root is None:
            _walk(walk, None, nfd, "")
        else:
            with _opendir(old_root) as ofd:
                _walk(walk, ofd, nfd, "")
    walk.out.sort()
    return walk.out


def size_of(root: str | os.PathLike[str], found: list[Change]) -> int:
    """Bytes of the added and modified regular files (a hard-linked file counted once).

    Only regular files count, so that the size of a diff equals what
    ``apply_diff`` of it returns (the regular-file data of the tar).
    """
    tally = Tally()
    with _opendir(root) as rfd:
        for change in found:
            if change.kind is ChangeKind.DELETE:
                continue
            try:
                st = os.stat(change.path.lstrip("/"), dir_fd=rfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                tally.add(st)
    return tally.bytes


@contextmanager
def _opendir(path: str | os.PathLike[str], dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _entries(fd: int) -> dict[str, os.stat_result]:
    with os.scandir(fd) as it:
        return {e.name: e.stat(follow_symlinks=False) for e in it}


def _walk(walk: _Walk, ofd: int | None, nfd: int, prefix: str) -> None:
    new = _entries(nfd)
    old = _entries(ofd) if ofd is not None else {}
    out = walk.out
    for name, nst in new.items():
        path = f"{prefix}/{name}"
        ost = old.pop(name, None)
        is_dir = stat.S_ISDIR(nst.st_mode)
        if ost is None or ofd is None:
            out.append(Change(path, ChangeKind.ADD))
            if is_dir:
                with _opendir(name, nfd) as sub:
                    _walk(walk, None, sub, path)
            continue
        changed = _differs(walk, ofd, nfd, name, ost, nst)
        mark = len(out)
        if changed:
            out.append(Change(path, ChangeKind.MODIFY))
        if is_dir:
            with _opendir(name, nfd) as sub:
                if stat.S_ISDIR(ost.st_mode):
                    with _opendir(name, ofd) as osub:
                        _walk(walk, osub, sub, path)
                else:
                    _walk(walk, None, sub, path)
            if len(out) > mark and not changed:
                # Changes inside a directory report the directory too, so that
                # its permissions are saved and restored with them (Docker's rule).
                out.insert(mark, Change(path, ChangeKind.MODIFY))
    for name in old:
        out.append(Change(f"{prefix}/{name}", ChangeKind.DELETE))


def _same_time(a: int, b: int) -> bool:
    # Docker's sameFsTime: equal seconds, and equal nanoseconds unless one side has none.
    sa, na = divmod(a, 1_000_000_000)
    sb, nb = divmod(b, 1_000_000_000)
    return sa == sb and (na == nb or na == 0 or nb == 0)


def _differs(
    walk: _Walk, ofd: int, nfd: int, name: str, ost: os.stat_result, nst: os.stat_result
) -> bool:
    touched = walk.touched_ns is not None and nst.st_ctime_ns >= walk.touched_ns
    return differs(ofd, nfd, name, ost, nst, compare_content=touched)


def differs(
    ofd: int,
    nfd: int,
    name: str,
    ost: os.stat_result,
    nst: os.stat_result,
    *,
    compare_content: bool = True,
) -> bool:
    """Whether ``name`` in directory ``nfd`` changed from ``name`` in ``ofd`` (the rules above).

    ``compare_content`` decides whether a regular file with equal metadata has its
    bytes compared.
    """
    mode = nst.st_mode
    if (
        ost.st_mode != mode
        or ost.st_uid != nst.st_uid
        or ost.st_gid != nst.st_gid
        or ost.st_rdev != nst.st_rdev
    ):
        return True
    if not stat.S_ISDIR(mode) and (
        ost.st_size != nst.st_size or not _same_time(ost.st_mtime_ns, nst.st_mtime_ns)
    ):
        return True
    if not stat.S_ISDIR(mode) and ost.st_nlink != nst.st_nlink:
        # A hard link made or broken: the file goes out in full with its links, so
        # that diff then apply gives the same links (Docker's rules miss this).
        return True
    if stat.S_ISLNK(mode):
        return os.readlink(name, dir_fd=ofd) != os.readlink(name, dir_fd=nfd)
    if _capability(ofd, name) != _capability(nfd, name):
        return True
    if (
        stat.S_ISREG(mode)
        and compare_content
        and (ost.st_dev, ost.st_ino) != (nst.st_dev, nst.st_ino)
    ):
        return not _same_content(ofd, nfd, name, nst.st_size)
    return False


def _capability(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(f"/proc/self/fd/{fd}/{name}", CAPABILITY, follow_symlinks=False)
    except OSError:
        return None


def _same_content(ofd: int, nfd: int, name: str, size: int) -> bool:
    a = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ofd)
    try:
        b = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=nfd)
        try:
            while True:
                x = os.read(a, _CMP_CHUNK)
                if x != os.read(b, _CMP_CHUNK):
                    return False
                if not x:
                    return True
        finally:
            os.close(b)
    finally:
        os.close(a)
