"""Path resolution for the applier: a tar member's name to a directory fd, safely.

Every name is resolved one component at a time from a directory fd of the layer's
root with ``O_NOFOLLOW`` (see :mod:`lamina.archive.apply` for the safety model): a
symlink met in a parent position is followed chroot-style, never out of the layer;
a parent the archive did not name is created, or copied up from the overlay lowers
where they have it.  Open directories are cached by path between entries.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence

from lamina.archive.union import is_whiteout, lower_lookup, opaque
from lamina.errors import UnsafeArchive
from lamina.host import fsutil
from lamina.host.fsutil import DIR_FLAGS
from lamina.host.idmap import IdMapper

MAX_SYMLINKS = 40
MAX_DEPTH = 512
"""Directories a path may go down.  PATH_MAX allows no deeper name but of one-letter
components, and it keeps every tree walk of a layer (copies, removal, os.walk,
export) within Python's recursion limit."""
_CACHE_MAX = 512


class LayerPaths:
    """The directories of the layer at ``root`` being written, found by path."""

    def __init__(
        self,
        root: str,
        *,
        layer: str | None,
        ids: IdMapper,
        overlay_whiteouts: bool,
        lowers: Sequence[str],
        max_path: int | None,
    ) -> None:
        self.root = root
        self.lowers = list(lowers)  # overlay: the lower layers' diff dirs, nearest first
        self.layer = layer
        self.ids = ids
        self.overlay_whiteouts = overlay_whiteouts
        self.max_path = max_path  # bytes a path below the root may have (None: any)
        self._root_fd = -1
        self._root_ino = 0
        # Open directories by path: (fd, inode chain from the root, bytes of the path).
        self._cache: dict[tuple[str, ...], tuple[int, tuple[int, ...], int]] = {}
        self._retired: list[int] = []  # fds dropped from the cache, closed between entries
        self._made: set[tuple[int, str]] = set()  # (parent inode, name) of parents created

    def _resolve(
        self, parts: Iterable[str], *, create: bool, name: str, copy_up_only: bool = False
    ) -> tuple[int, tuple[int, ...]]:
        """The directory ``parts`` names, chroot-style; (fd, inode chain from the root).

        With ``create=False`` a missing directory gives None (typed loosely for brevity
        at the call sites that pass ``create=True``); with ``copy_up_only`` only
        directories that a lower layer has are created.
        """
        key = tuple(parts)
        hit = self._cache.get(key)
        if hit is None:
            found = self._walk(key, create, name, copy_up_only)
            if found is None:
                return None  # type: ignore[return-value]
            if len(self._cache) >= _CACHE_MAX:
                self._drop_cache()
            self._cache[key] = hit = found
        return hit[0], hit[1]

    def _looking_up(self, ino: int, part: str) -> None:
        """Called before the name ``part`` is looked up in the directory of inode ``ino``
        (the applier first waits for a file being created there, see its writers)."""

    def _check_length(self, length: int, part: str, name: str) -> None:
        """Refuse a path that would pass ``max_path`` with ``part`` added below it."""
        if self.max_path is None:
            return
        size = len(part) if part.isascii() else len(os.fsencode(part))
        if length + size + 1 > self.max_path:
            # Docker's extraction fails there too (ENAMETOOLONG); lamina would later,
            # in every tool that names the file by its path.
            raise UnsafeArchive(f"path in the layer is longer than {self.max_path} bytes",
                                layer=self.layer, path=name)

    def _walk(
        self, parts: tuple[str, ...], create: bool, name: str, copy_up_only: bool = False
    ) -> tuple[int, tuple[int, ...], int] | None:
        # (fd, inode, name) of the directories above the current one, root first.
        stack: list[tuple[int, int, str]] = []
        fd, ino = os.dup(self._root_fd), self._root_ino
        todo = list(reversed(parts))
        links = 0
        length = 0  # bytes of the current directory's path below the root
        try:
            while todo:
                part = todo.pop()
                if part in ("", "."):
                    continue
                if part == "..":
                    if stack:  # never above the root
                        os.close(fd)
                        fd, ino, left = stack.pop()
                        length -= len(os.fsencode(left)) + 1
                    continue
                self._check_length(length, part, name)
                target: str | None = None
                self._looking_up(ino, part)
                try:
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    found = self._in_lowers(stack, fd, part)
                    if found is not None and stat.S_ISLNK(found[1].st_mode):
                        target = os.readlink(found[0])
                    elif found is not None and not stat.S_ISDIR(found[1].st_mode):
                        raise UnsafeArchive(f"{part!r} is not a directory", layer=self.layer,
                                            path=name) from None
                    elif not create or (copy_up_only and found is None):
                        os.close(fd)
                        return None
                    else:
                        self._mkdir_parent(fd, part, found)
                        self._made.add((ino, part))
                        nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    target = self._link_target(fd, part, name)
                    if target is None:  # an overlay whiteout: the name is free again
                        if not create or copy_up_only:
                            os.close(fd)
                            return None
                        os.unlink(part, dir_fd=fd)
                        self._mkdir_parent(fd, part, None)
                        self._made.add((ino, part))
                        nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                if target is not None:
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise UnsafeArchive("too many levels of symbolic links",
                                            layer=self.layer, path=name) from None
                    if target.startswith("/"):
                        for above, _, _ in stack:
                            os.close(above)
                        stack.clear()
                        os.close(fd)
                        fd, ino = os.dup(self._root_fd), self._root_ino
                        length = 0
                    todo.extend(reversed(target.split("/")))
                    continue
                stack.append((fd, ino, part))
                fd, ino = nfd, os.fstat(nfd).st_ino
                length += len(os.fsencode(part)) + 1
                if len(stack) > MAX_DEPTH:  # symlinks can lead deeper than the name says
                    raise UnsafeArchive(f"path is more than {MAX_DEPTH} directories deep",
                                        layer=self.layer, path=name)
            chain = (*(i for _, i, _ in stack), ino)
            return fd, chain, length
        except BaseException:
            os.close(fd)
            raise
        finally:
            for above, _, _ in stack:
                os.close(above)

    def _link_target(self, fd: int, part: str, name: str) -> str | None:
        """The target of the symlink ``part``; None for an overlay whiteout."""
        st = os.lstat(part, dir_fd=fd)
        if stat.S_ISLNK(st.st_mode):
            return os.readlink(part, dir_fd=fd)
        if self.overlay_whiteouts and is_whiteout(st):
            return None
        raise UnsafeArchive(f"{part!r} is not a directory", layer=self.layer, path=name)

    def _in_lowers(
        self, stack: list[tuple[int, int, str]], fd: int, part: str
    ) -> tuple[str, os.stat_result] | None:
        """What the lower layers have at the union path of ``part``: (path, lstat).

        Consulted only for a name missing from the layer being written; an opaque
        directory above it in this layer hides the lowers.
        """
        if not self.lowers:
            return None
        if any(opaque(above) for above, _, _ in stack) or opaque(fd):
            return None
        return lower_lookup(self.lowers, [*(n for _, _, n in stack), part])

    def _mkdir_parent(
        self, fd: int, part: str, lower: tuple[str, os.stat_result] | None
    ) -> None:
        """Create a parent directory the archive did not name.

        Where a lower layer has the directory, it is copied up with its metadata
        (the union must not change); elsewhere it is 0755 and owned by the
        (mapped) root, as Docker does.
        """
        if lower is not None:
            path, st = lower
            os.mkdir(part, 0o700, dir_fd=fd)
            dfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            try:
                os.fchown(dfd, st.st_uid, st.st_gid)
                os.fchmod(dfd, stat.S_IMODE(st.st_mode))
                fsutil.copy_xattrs(path, dfd, overlay=False)  # fsetxattr: no /proc needed
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
            return
        os.mkdir(part, 0o755, dir_fd=fd)
        uid, gid = self.ids.to_host(0, 0, self.layer, part)
        os.chown(part, uid, gid, dir_fd=fd, follow_symlinks=False)

    def _drop_cache(self) -> None:
        # The entry being applied may still use a cached fd: close them after it.
        self._retired.extend(hit[0] for hit in self._cache.values())
        self._cache.clear()

    def _close_retired(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

