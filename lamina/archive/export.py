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
from lamina.driver import Change, ChangeKind
from lamina.errors import NotFound
from lamina.host.fsutil import DIR_FLAGS
from lamina.host.idmap import IdMapper

READ_CHUNK = 1 << 20
CAPABILITY = "security.capability"
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


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
    stat: os.stat_result | None = None  # its lstat, when the walk that found it had it


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


def change_items(changes: Iterable[Change]) -> list[Item]:
    """What to export for a list of changes (a naive diff's): each added or modified path
    as it is now, each deleted one as a whiteout."""
    return [Item(c.path[1:], Action.WHITEOUT if c.kind is ChangeKind.DELETE else Action.ENTRY)
            for c in changes]


def open_stream(chunks: Iterator[bytes]) -> BinaryIO:
    """Wrap a chunk iterator as a buffered, closable binary stream (a context manager)."""
    return cast(BinaryIO, io.BufferedReader(IterStream(chunks), READ_CHUNK))


class Dirs:
    """Directory fds of the layer, opened without following links, cached by path."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._cache: dict[str, int] = {}

    def open(self, rel: str) -> int:
        fd = self._cache.get(rel)
        if fd is not None:
            return fd
        if not rel:
            return self.root_fd
        parent, _, base = rel.rpartition("/")
        fd = os.open(base, DIR_FLAGS, dir_fd=self.open(parent))
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
    return cast(BinaryIO, io.BufferedReader(_TarStream(os.fspath(root), items, ids or IdMapper()),
                                            READ_CHUNK))


class _TarStream(io.RawIOBase):
    """The tar of a list of items, made as it is read.

    ``readinto`` fills the caller's whole buffer: headers are copied in and file
    data is read straight into it (``readv``), so a byte of data is copied once on
    its way out of the page cache, and a ``read`` of the buffered stream that wraps
    this costs one call here, however many small members it spans.
    """

    def __init__(self, root: str, items: Iterable[Item], ids: IdMapper) -> None:
        self._root_fd = os.open(root, DIR_FLAGS)
        self._dirs = Dirs(self._root_fd)
        self._items = iter(items)
        self._ids = ids
        self._seen: dict[tuple[int, int], str] = {}  # (dev, ino) -> first path, for links
        self._report = progress.current()
        self._out = memoryview(b"")  # header (or padding) bytes not yet handed out
        self._fd = -1  # the regular file whose data is being handed out
        self._left = 0  # its bytes still to hand out
        self._pad = b""  # the padding that follows them
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        size = len(view)
        pos = 0
        while pos < size:
            if self._out:
                n = min(len(self._out), size - pos)
                view[pos : pos + n] = self._out[:n]
                self._out = self._out[n:]
                pos += n
            elif self._left:
                pos += self._data(view[pos : pos + min(self._left, size - pos)])
            elif not self._next():
                break
        return pos

    def _data(self, into: memoryview) -> int:
        n = os.readv(self._fd, [into])
        if n == 0:  # the file shrank while we read it: keep the archive well formed
            n = len(into)
            into[:] = bytes(n)
        self._left -= n
        if not self._left:
            os.close(self._fd)
            self._fd = -1
            self._out = memoryview(self._pad)
        return n

    def _next(self) -> bool:
        """Queue the next member's header (and open its data); False at the end."""
        if self._ended:
            return False
        for item in self._items:
            chunk = self._member(item)
            if chunk:
                self._out = memoryview(chunk)
                if self._report is not None:
                    self._report(len(chunk) + self._left + len(self._pad), 1)
                return True
        self._ended = True
        self._out = memoryview(END_OF_ARCHIVE)
        return True

    def _member(self, item: Item) -> bytes:
        """``item``'s header blocks; a regular file's fd, size and padding are set aside."""
        parent, _, base = item.path.rpartition("/")
        if item.action is not Action.ENTRY:
            if item.action is Action.OPAQUE:
                return header(f"{item.path}/{OPAQUE_MARKER}", "0")
            return header(f"{parent}/{WHITEOUT_PREFIX}{base}" if parent
                          else WHITEOUT_PREFIX + base, "0")
        crashpoints.reached("diff:chunk")
        path = item.path
        try:
            pfd = self._dirs.open(parent)
            st = item.stat or os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return b""  # gone since the change list was made (a running container)
            raise
        mode = st.st_mode
        uid, gid = self._ids.to_container(st.st_uid, st.st_gid)
        perm, mtime = mode & 0o7777, int(st.st_mtime)
        if st.st_nlink > 1 and not stat.S_ISDIR(mode):
            key = (st.st_dev, st.st_ino)
            first = self._seen.get(key)
            if first is not None:
                return header(path, "1", linkname=first, mode=perm, uid=uid, gid=gid,
                              mtime=mtime)
            self._seen[key] = path
        if stat.S_ISREG(mode):
            try:
                fd = os.open(base, _FILE_FLAGS, dir_fd=pfd)
            except FileNotFoundError:
                return b""
            size = st.st_size
            try:
                chunk = header(path, "0", size=size, xattrs=_capability(fd), mode=perm, uid=uid,
                               gid=gid, mtime=mtime)
            except BaseException:
                os.close(fd)
                raise
            if size:
                self._fd, self._left, self._pad = fd, size, padding(size)
            else:
                os.close(fd)
            return chunk
        if stat.S_ISDIR(mode):
            try:
                xattrs = _capability(self._dirs.open(path))
            except OSError:
                return b""  # replaced since it was listed
            return header(path + "/", "5", xattrs=xattrs, mode=perm, uid=uid, gid=gid,
                          mtime=mtime)
        if stat.S_ISLNK(mode):
            return header(path, "2", linkname=os.readlink(base, dir_fd=pfd), mode=perm,
                          uid=uid, gid=gid, mtime=mtime)
        kind = "3" if stat.S_ISCHR(mode) else "4" if stat.S_ISBLK(mode) else "6"
        return header(path, kind, devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev),
                      mode=perm, uid=uid, gid=gid, mtime=mtime)

    def close(self) -> None:
        if not self.closed:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._dirs.close()
            os.close(self._root_fd)
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
        super().close()


def _capability(fd: int) -> dict[str, bytes] | None:
    # listxattr first: most files have none, and a getxattr that fails costs ~4x more.
    try:
        if CAPABILITY not in os.listxattr(fd):
            return None
        return {CAPABILITY: os.getxattr(fd, CAPABILITY)}
    except OSError:
        return None


def check_root(root: str | os.PathLike[str], layer: str) -> None:
    """Refuse to export from a layer directory that is not there."""
    if not os.path.isdir(root):
        raise NotFound("layer directory missing", layer=layer, path=os.fspath(root))
