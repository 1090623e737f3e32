"""Exact, comparable pictures of file trees and of the tars that describe them.

:func:`snapshot` walks a directory with ``lstat`` (never following a symlink) and
:func:`snapshot_tar` reads a full (non-diff) tar into the same shape, so a layer's union
view can be compared with the tar it came from, or with another layer::

    assert_same_tree(snapshot(drv.get("a")), snapshot_tar("rootfs.tar"))

Paths are absolute inside the tree (``"/"`` is its root, ``"/etc/passwd"``).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

CAPABILITY = "security.capability"
_CHUNK = 1 << 20


class Node(NamedTuple):
    """What a tree says about one path, every field comparable with ``==``."""

    type: str
    """``file``, ``dir``, ``symlink``, ``fifo``, ``char``, ``block`` or ``socket``."""
    mode: int
    """Permission bits with setuid, setgid and sticky (``stat.S_IMODE``)."""
    uid: int
    gid: int
    size: int | None
    """Regular files only."""
    sha256: str | None
    """Of a regular file's content."""
    link: str | None
    """A symlink's target."""
    rdev: tuple[int, int] | None
    """A device's (major, minor)."""
    cap: bytes | None
    """The ``security.capability`` xattr, if any."""
    mtime: int | None
    """Whole seconds (floored), for everything but directories."""


_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFSOCK: "socket",
}

_TAR_TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.GNUTYPE_SPARSE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.FIFOTYPE: "fifo",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
}


def sha256_of(f: IO[bytes]) -> str:
    """The hex sha256 of what ``f`` reads."""
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _capability(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, CAPABILITY, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def node_of(path: Path, st: os.stat_result | None = None) -> Node:
    """The :class:`Node` of the file at ``path`` (``lstat``, content hashed)."""
    st = os.lstat(path) if st is None else st
    kind = _TYPES[stat.S_IFMT(st.st_mode)]
    size = digest = link = rdev = None
    if kind == "file":
        size = st.st_size
        with open(path, "rb") as f:
            digest = sha256_of(f)
    elif kind == "symlink":
        link = os.readlink(path)
    elif kind in ("char", "block"):
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return Node(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=size,
        sha256=digest,
        link=link,
        rdev=rdev,
        cap=_capability(path) if kind != "symlink" else None,
        mtime=None if kind == "dir" else st.st_mtime_ns // 1_000_000_000,
    )


def snapshot(root: str | os.PathLike[str]) -> dict[str, Node]:
    """Every path under ``root`` (and ``"/"`` for root itself) with its :class:`Node`."""
    root = Path(root)
    out = {"/": node_of(root)}
    stack = [(root, "")]
    while stack:
        here, rel = stack.pop()
        with os.scandir(here) as it:
            for entry in it:
                path = f"{rel}/{entry.name}"
                st = entry.stat(follow_symlinks=False)
                out[path] = node_of(Path(entry.path), st)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((Path(entry.path), path))
    return out


def hardlink_groups(root: str | os.PathLike[str]) -> set[frozenset[str]]:
    """The sets of paths under ``root`` that are one inode (non-directories, 2+ names)."""
    root = Path(root)
    by_inode: dict[tuple[int, int], set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root) if dirpath != str(root) else ""
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                by_inode.setdefault((st.st_dev, st.st_ino), set()).add(f"{rel}/{name}")
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def tar_path(name: str) -> str:
    """A tar member's name as an absolute path inside the tree (``./a/b/`` → ``/a/b``)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/" + "/".join(parts)


def snapshot_tar(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    keep: Callable[[str], bool] = lambda path: True,
) -> dict[str, Node]:
    """The tree a full tar describes, as :func:`snapshot` would see it once extracted.

    Later members replace earlier ones; a hard link takes its target's node (content
    and owner are the inode's).  ``keep(path)`` chooses which paths to hash and return.
    """
    out: dict[str, Node] = {}
    if isinstance(source, (str, os.PathLike)):
        kw: dict[str, Any] = {"name": source}
    else:
        kw = {"fileobj": source}
    with tarfile.open(mode="r|", **kw) as tar:
        for member in tar:
            path = tar_path(member.name)
            if not keep(path):
                continue
            if member.islnk():
                out[path] = out[tar_path(member.linkname)]
            else:
                out[path] = _tar_node(tar, member)
    return out


def _tar_node(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Node:
    kind = _TAR_TYPES[member.type]
    size = digest = link = rdev = None
    if kind == "file":
        size = member.size
        f = tar.extractfile(member)
        assert f is not None
        digest = sha256_of(f)
    elif kind == "symlink":
        link = member.linkname
    elif kind in ("char", "block"):
        rdev = (member.devmajor, member.devminor)
    cap = member.pax_headers.get(f"SCHILY.xattr.{CAPABILITY}")
    return Node(
        type=kind,
        mode=member.mode & 0o7777,
        uid=member.uid,
        gid=member.gid,
        size=size,
        sha256=digest,
        link=link,
        rdev=rdev,
        cap=cap.encode("utf-8", "surrogateescape") if cap is not None else None,
        mtime=None if kind == "dir" else math.floor(member.mtime),
    )


def without(tree: Mapping[str, Node], prefixes: Iterable[str]) -> dict[str, Node]:
    """``tree`` less each path in ``prefixes`` and everything below it."""
    prefixes = tuple(prefixes)
    return {
        path: node
        for path, node in tree.items()
        if not any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)
    }


def tree_differences(
    got: Mapping[str, Node], want: Mapping[str, Node], *, limit: int = 25
) -> list[str]:
    """Readable lines saying how ``got`` differs from ``want`` (empty when equal)."""
    lines = []
    for path in sorted(set(got) | set(want)):
        if path not in got:
            lines.append(f"missing {path}: want {want[path]}")
        elif path not in want:
            lines.append(f"extra   {path}: got {got[path]}")
        elif got[path] != want[path]:
            fields = [
                f"{name}={g!r} (want {w!r})"
                for name, g, w in zip(Node._fields, got[path], want[path], strict=True)
                if g != w
            ]
            lines.append(f"differs {path}: " + ", ".join(fields))
        if len(lines) >= limit:
            lines.append("…")
            break
    return lines


def assert_same_tree(got: Mapping[str, Node], want: Mapping[str, Node]) -> None:
    """Fail with a readable list of differences unless the two trees are equal."""
    differences = tree_differences(got, want)
    assert not differences, "trees differ:\n  " + "\n  ".join(differences)
