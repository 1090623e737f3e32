"""Export a layer's changes as a tar stream, the way Docker writes it.

The stream is produced lazily: :func:`export_changes` returns a file-like
object whose ``read`` walks the change list one member at a time, so a layer
of any size never sits in memory.  Paths are opened from a directory fd of the
layer root one component at a time with ``O_NOFOLLOW``: a container that swaps a
directory for a symlink while we export cannot make us read the host.

Deletions become ``.wh.NAME`` entries, directories whose lower content is
hidden get a ``.wh..wh..opq`` entry, files with several links inside the export
become hard link entries, and ``security.capability`` is written as the PAX
record ``SCHILY.xattr.security.capability``.
"""

from __future__ import annotations

import enum
import errno
import io
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

from lamina import crashpoints, progress
from lamina.archive.apply import OPAQUE_MARKER, WHITEOUT_PREFIX
from lamina.archive.writer import END_OF_ARCHIVE, header, padding
from lamina.errors import NotFound
from lamina.idmap import IdMapper

READ_CHUNK = 1 << 20
CAPABILITY = "security.capability"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Action(enum.Enum):
    """What an export item writes."""

    ENTRY = "entry"  # the path as it is in the layer
    WHITEOUT = "whiteout"  # a deletion of the path
    OPAQUE = "opaque"  # the directory hides its lower content


@dataclass(frozen=True, slots=True)
class Item:
    """One path to export, relative to the layer root (no leading slash)."""

    path: str
    action: Action


class IterStream(io.RawIOBase):
    """A readable binary stream fed by an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = memoryview(chunk)
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        super().close()


def open_stream(chunks: Iterator[bytes]) -> BinaryIO:
    """Wrap a chunk iterator as a buffered, closable binary stream (a context manager)."""
    return cast(BinaryIO, io.BufferedReader(IterStream(chunks), READ_CHUNK))


class _Dirs:
    """Directory fds of the layer, opened without following links, cached by path."""

    def __init__(self, root_fd: int, layer: str | None) -> None:
        self.root_fd = root_fd
        self.layer = layer
        self._cache: dict[str, int] = {}

    def open(self, rel: str) -> int:
        fd = self._cache.get(rel)
        if fd is not None:
            return fd
        if not rel:
            return self.root_fd
        parent, _, base = rel.rpartition("/")
        fd = os.open(base, _DIR_FLAGS, dir_fd=self.open(parent))
        if len(self._cache) > 256:
            self.close()
        self._cache[rel] = fd
        return fd

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()


def export_changes(
    root: str | os.PathLike[str],
    items: Iterable[Item],
    *,
    layer: str | None = None,
    ids: IdMapper | None = None,
) -> BinaryIO:
    """A tar stream of ``items`` (in order: parents before children) from ``root``."""
    return open_stream(_generate(os.fspath(root), items, layer, ids or IdMapper()))


def _generate(
    root: str, items: Iterable[Item], layer: str | None, ids: IdMapper
) -> Iterator[bytes]:
    root_fd = os.open(root, _DIR_FLAGS)
    dirs = _Dirs(root_fd, layer)
    seen: dict[tuple[int, int], str] = {}
    report = progress.current()
    try:
        for item in items:
            parent, _, base = item.path.rpartition("/")
            if item.action is not Action.ENTRY:
                marker = OPAQUE_MARKER if item.action is Action.OPAQUE else WHITEOUT_PREFIX + base
                if item.action is Action.OPAQUE:
                    parent = item.path
                name = f"{parent}/{marker}" if parent else marker
                chunk = header(name, "0")
                if report is not None:
                    report(len(chunk), 1)
                yield chunk
                continue
            written = 0
            crashpoints.reached("diff:chunk")
            for chunk in _member(dirs, parent, base, item.path, seen, ids):
                written += len(chunk)
                yield chunk
            if report is not None:
                report(written, 1)
        yield END_OF_ARCHIVE
    finally:
        dirs.close()
        os.close(root_fd)


def _member(
    dirs: _Dirs,
    parent: str,
    base: str,
    path: str,
    seen: dict[tuple[int, int], str],
    ids: IdMapper,
) -> Iterator[bytes]:
    try:
        pfd = dirs.open(parent)
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return  # gone since the change list was made (a running container)
        raise
    mode = st.st_mode
    uid, gid = ids.to_container(st.st_uid, st.st_gid)
    perm, mtime = stat.S_IMODE(mode), int(st.st_mtime)
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        first = seen.get(key)
        if first is not None:
            yield header(path, "1", linkname=first, mode=perm, uid=uid, gid=gid, mtime=mtime)
            return
        seen[key] = path
    if stat.S_ISREG(mode):
        yield from _regular(pfd, base, path, st, (perm, uid, gid, mtime))
    elif stat.S_ISDIR(mode):
        yield header(path + "/", "5", xattrs=_capability(pfd, base), mode=perm, uid=uid,
                     gid=gid, mtime=mtime)
    elif stat.S_ISLNK(mode):
        yield header(path, "2", linkname=os.readlink(base, dir_fd=pfd), mode=perm, uid=uid,
                     gid=gid, mtime=mtime)
    else:
        kind = "3" if stat.S_ISCHR(mode) else "4" if stat.S_ISBLK(mode) else "6"
        yield header(path, kind, devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev),
                     mode=perm, uid=uid, gid=gid, mtime=mtime)


def _regular(
    pfd: int, base: str, path: str, st: os.stat_result, owner: tuple[int, int, int, int]
) -> Iterator[bytes]:
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    except FileNotFoundError:
        return
    try:
        size = st.st_size
        perm, uid, gid, mtime = owner
        yield header(path, "0", size=size, xattrs=_capability(fd), mode=perm, uid=uid, gid=gid,
                     mtime=mtime)
        left = size
        while left > 0:
            chunk = os.read(fd, min(READ_CHUNK, left))
            if not chunk:
                # The file shrank while we read it: keep the archive well formed.
                yield bytes(left)
                break
            left -= len(chunk)
            yield chunk
        yield padding(size)
    finally:
        os.close(fd)


def _capability(target: int, base: str | None = None) -> dict[str, bytes] | None:
    try:
        if base is None:
            value = os.getxattr(target, CAPABILITY)
        else:
            value = os.getxattr(f"/proc/self/fd/{target}/{base}", CAPABILITY,
                                follow_symlinks=False)
    except OSError:
        return None
    return {CAPABILITY: value}


def check_root(root: str | os.PathLike[str], layer: str) -> None:
    """Refuse to export from a layer directory that is not there."""
    if not os.path.isdir(root):
        raise NotFound("layer directory missing", layer=layer, path=os.fspath(root))
