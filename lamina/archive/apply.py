"""Apply a layer tar to a directory, safely (contract §2).

Safety model.  Every name in the archive is cleaned lexically (``..`` may not
climb above the root: that is :class:`~lamina.errors.UnsafeArchive`), then
resolved one component at a time from a directory fd of the layer's root with
``O_NOFOLLOW``.  A symlink met in a *parent* position is followed the way a
chroot at the layer root would follow it: an absolute target restarts at the
layer root and ``..`` stops at it, so nothing can leave the layer, while
``lib -> usr/lib`` in merged-/usr images still works.  The last component of a
name is never followed: it is replaced.  Metadata calls go through fds or
``*at(..., AT_SYMLINK_NOFOLLOW)``, never through a path that could be a link.

Whiteouts (``.wh.NAME``) and opaque markers (``.wh..wh..opq``) apply to the
lower layers only: an entry this archive wrote is never removed by them,
wherever the marker sits in the archive.  With ``overlay_whiteouts`` they are
recorded the way overlayfs wants them (a 0/0 character device, the
``trusted.overlay.opaque`` xattr) instead of deleting lower content.

The path resolution is :mod:`lamina.archive.resolve` (the :class:`Applier` is a
:class:`~lamina.archive.resolve.LayerPaths`), the overlay union it consults
:mod:`lamina.archive.union`; this module writes the entries.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Protocol

from isal import isal_zlib

from lamina import crashpoints, progress
from lamina.archive.digests import MAX_DIGESTS, Digests
from lamina.archive.reader import BLK, CHR, DIR, FIFO, LINK, REG, SYMLINK, Entry, TarReader
from lamina.archive.resolve import MAX_DEPTH, MAX_SYMLINKS, LayerPaths
from lamina.archive.union import (
    OPAQUE_MARKER,
    OVERLAY_OPAQUE_XATTR,
    WHITEOUT_PREFIX,
    is_whiteout,
    lower_lookup,
    opaque,
)
from lamina.archive.writers import Name, Writers
from lamina.errors import LaminaError, QuotaExceeded, UnsafeArchive, Unsupported
from lamina.host import fsutil, userns
from lamina.host.fsutil import DIR_FLAGS
from lamina.host.idmap import IdMapper

__all__ = [
    "MAX_DEPTH", "MAX_SYMLINKS", "OPAQUE_MARKER", "OVERLAY_OPAQUE_XATTR", "WHITEOUT_PREFIX",
    "Applier", "EntrySource", "lower_lookup", "split_name", "xattr_allowed",
]

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DEVICE_TYPES = {CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}


class EntrySource(Protocol):
    """What the applier reads members from: a :class:`TarReader`, or the isolated
    child's reader of pre-parsed records (:mod:`lamina.archive.records`)."""

    consumed: int

    def __iter__(self) -> Iterator[Entry]: ...

    def copy_data(self, entry: Entry, fd: int, *, checksum: bool = False) -> int | None: ...


def split_name(name: str, *, layer: str | None = None) -> list[str]:
    """Clean an archive name into components; refuse one that climbs above the root."""
    parts = [part for part in name.split("/") if part and part != "."]
    if ".." not in parts:  # nearly every name: nothing more to clean
        if len(parts) > MAX_DEPTH + 1:
            raise UnsafeArchive(f"name is more than {MAX_DEPTH} directories deep", layer=layer,
                                path=name)
        return parts
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafeArchive("name climbs out of the layer", layer=layer, path=name)
            parts.pop()
        else:
            parts.append(part)
    if len(parts) > MAX_DEPTH + 1:
        raise UnsafeArchive(f"name is more than {MAX_DEPTH} directories deep", layer=layer,
                            path=name)
    return parts


def xattr_allowed(key: str) -> bool:
    """Whether an xattr from an archive may be set (never overlayfs' own)."""
    return not key.startswith(("trusted.overlay.", "user.overlay."))


class Applier(LayerPaths):
    """Applies one layer tar into the directory ``root`` (see the module docstring)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        layer: str | None = None,
        ids: IdMapper | None = None,
        overlay_whiteouts: bool = False,
        max_entries: int | None = None,
        max_size: int | None = None,
        lowers: Sequence[str] = (),
        max_path: int | None = None,
        digests: Digests | None = None,
        writers: int = 0,
        umask_zero: bool = False,
    ) -> None:
        super().__init__(os.fspath(root), layer=layer, ids=ids or IdMapper(),
                         overlay_whiteouts=overlay_whiteouts, lowers=lowers,
                         max_path=max_path)
        self.max_entries = max_entries
        self.max_size = max_size
        self._identity = self.ids.identity  # owners need no translation
        self._written: set[tuple[int, str]] = set()  # (parent inode, name) this archive wrote
        self._holds: set[int] = set()  # directory inodes with written entries below them
        # Deferred directory times: inode -> (path, mtime, atime).  By inode, so that an
        # entry repeated a million times is remembered once.
        self._dirs: dict[int, tuple[tuple[str, ...], int, int]] = {}
        # The CRC-32 of each file written from the stream, for the layer's manifest.
        self.digests: Digests = {} if digests is None else digests
        # Writer threads that finish regular files (lamina.archive.writers), when the
        # source can hand out a file's data by itself (the isolated child's records).
        self.writers = writers
        self._pool: Writers | None = None
        self._take: Callable[[Entry], memoryview | None] | None = None
        self._seq = 0  # the entry being applied, counted from 1 in tar order
        self._creating: set[Name] = set()  # files a writer is to create (the pool's set)
        # Whether a writer may create a file itself: in a layer that started empty, while
        # every name made in it is known (entries, parents; not overlay whiteouts or
        # copy-ups), so that a name neither holds is certainly free.
        self._fresh = False
        # The process's umask is 0 (the isolated child's is): a file a writer finishes
        # is created with its permission bits, and needs no fchmod unless it has
        # setuid, setgid or sticky, which the chown after the create would clear.
        self._umask_zero = umask_zero

    # -- entry point --------------------------------------------------------

    def apply(self, stream: BinaryIO) -> int:
        """Apply the (decompressed) tar ``stream``; return the bytes of regular-file data."""
        return self.apply_entries(TarReader(stream, layer=self.layer))

    def apply_entries(self, reader: EntrySource) -> int:
        """Apply the members ``reader`` gives (a tar's, or records of one); as :meth:`apply`."""
        self._root_fd = os.open(self.root, DIR_FLAGS)
        self._take = getattr(reader, "take_data", None) if self.writers else None
        if self._take is not None:
            self._pool = Writers(self.writers, self._finish_file)
            self._creating = self._pool.creating
        try:
            self._root_ino = os.fstat(self._root_fd).st_ino
            self._fresh = self._pool is not None and not os.listdir(self._root_fd)
            size = self._apply_all(reader)
            self._join_writers(None)  # directory times come after every file's
            self._set_dir_times()
            return size
        finally:
            if self._pool is not None:  # not started, or a bug: stop them before any close
                self._pool.close(failed_at=0)
                self._pool = None
            self._drop_cache()
            self._close_retired()
            os.close(self._root_fd)

    def _apply_all(self, reader: EntrySource) -> int:
        try:
            return self._apply_each(reader)
        except BaseException:
            # Failed on entry _seq (or on reading the next): the earliest failure wins.
            self._join_writers(self._seq + 1)
            raise

    def _apply_each(self, reader: EntrySource) -> int:
        report = progress.current()
        total = 0
        seen = 0
        for count, entry in enumerate(reader, 1):
            self._seq = count
            if self._pool is not None and self._pool.failure is not None:
                self._join_writers(None)  # a writer failed on an earlier entry: stop
            if self.max_entries is not None and count > self.max_entries:
                raise UnsafeArchive(f"more than {self.max_entries} entries", layer=self.layer)
            if entry.type == REG:
                total += entry.size
                if self.max_size is not None and total > self.max_size:
                    raise UnsafeArchive(f"more than {self.max_size} bytes", layer=self.layer)
            crashpoints.reached("apply:entry")
            try:
                self._apply_entry(reader, entry)
            except LaminaError:
                raise
            except OSError as e:
                raise _os_error(e, self.layer, entry) from e
            finally:
                if self._retired:
                    self._close_retired()
            if report is not None:
                report(reader.consumed - seen, 1)
                seen = reader.consumed
        return total

    def _join_writers(self, failed_at: int | None) -> None:
        """Wait for the writers and stop them; raise the failure of the earliest entry
        if it was a writer's (``failed_at``: the entry this thread failed on)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        failure = pool.close(failed_at)
        if failure is not None:
            raise failure[1]

    # -- one entry ------------------------------------------------------------

    def _apply_entry(self, reader: EntrySource, entry: Entry) -> None:
        parts = split_name(entry.name, layer=self.layer)
        if not parts:
            if entry.type != DIR:
                raise UnsafeArchive("root entry is not a directory", layer=self.layer,
                                    path=entry.name)
            self._dir_metadata(self._root_fd, entry)
            self._dirs[self._root_ino] = ((), entry.mtime, _atime(entry))
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout_entry(entry.name, parts[:-1], base)
            return
        key = tuple(parts[:-1])
        hit = self._cache.get(key)
        if hit is None:
            self._resolve(key, create=True, name=entry.name)
            hit = self._cache[key]
        pfd, chain, length = hit
        if self.max_path is not None and length + 4 * len(base) >= self.max_path:
            self._check_length(length, base, entry.name)  # may be too long (UTF-8: <= 4x)
        name = (chain[-1], base)
        if self._creating and name in self._creating:
            self._settle()  # an earlier entry of this name is still being created
        # Each kind is created first and the name cleared only when it is taken
        # (EEXIST): in a fresh layer no name is, and a lookup per entry is saved.
        kind = entry.type
        if kind == REG:
            self._regular(reader, pfd, base, entry, name)
        elif kind == DIR:
            self._directory(pfd, base, entry, (*key, base))
        elif kind == LINK:
            self._hardlink(pfd, base, entry)
        elif kind == SYMLINK:
            try:
                os.symlink(entry.linkname, base, dir_fd=pfd)
            except FileExistsError:
                self._clear(pfd, base, False)
                os.symlink(entry.linkname, base, dir_fd=pfd)
            self._chown_at(pfd, base, entry)
            self._xattrs_at(pfd, base, entry)
            os.utime(base, ns=(_atime(entry), entry.mtime), dir_fd=pfd, follow_symlinks=False)
        else:
            self._device(pfd, base, entry)
        self._written.add(name)
        if name[0] not in self._holds:
            self._holds.update(chain)

    def _regular(self, reader: EntrySource, pfd: int, base: str, entry: Entry,
                 name: Name) -> None:
        pool = self._pool
        if (pool is not None and self._take is not None and self._fresh
                and name not in self._written and name not in self._made):
            # A name certainly free: a writer creates the file too (lamina.archive.writers).
            data = self._take(entry)
            if data is not None:
                pool.submit(self._seq, -1, data, entry, len(self.digests) < MAX_DIGESTS,
                            pfd=pfd, name=name)
                return
        perm = self._create_mode(entry) if pool is not None else 0o600
        try:
            fd = os.open(base, _FILE_FLAGS, perm, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base, False)
            fd = os.open(base, _FILE_FLAGS, perm, dir_fd=pfd)
        # Created here, in tar order; the rest is on the fd alone, which a writer can
        # finish beside this thread (see lamina.archive.writers for why that is safe).
        if pool is not None and self._take is not None:
            data = self._take(entry)
            if data is not None:
                pool.submit(self._seq, fd, data, entry, len(self.digests) < MAX_DIGESTS)
                return
        try:
            crc = reader.copy_data(entry, fd, checksum=len(self.digests) < MAX_DIGESTS)
            self._file_metadata(fd, entry, crc, perm)
        finally:
            os.close(fd)

    def _create_mode(self, entry: Entry) -> int:
        """The mode to create a file with: its own where no fchmod need follow."""
        mode = entry.mode
        return mode if self._umask_zero and not mode & ~0o777 else 0o600

    def _finish_file(self, fd: int, pfd: int, name: Name | None, data: memoryview,
                     entry: Entry, checksum: bool) -> None:
        """A writer's part of a regular file: its create when ``name`` is given, its data
        and metadata, then the close."""
        perm = self._create_mode(entry)
        if name is not None:
            try:
                fd = os.open(name[1], _FILE_FLAGS, perm, dir_fd=pfd)
            except OSError as e:
                raise _os_error(e, self.layer, entry) from e
            finally:
                self._creating.discard(name)
        try:
            crc = isal_zlib.crc32(data) if checksum else None
            if data:
                done = os.write(fd, data)
                while done < len(data):
                    done += os.write(fd, data[done:])
            self._file_metadata(fd, entry, crc, perm)
        except OSError as e:
            raise _os_error(e, self.layer, entry) from e
        finally:
            os.close(fd)

    def _file_metadata(self, fd: int, entry: Entry, crc: int | None, perm: int) -> None:
        if self._identity:
            os.fchown(fd, entry.uid, entry.gid)
        else:
            os.fchown(fd, *self.ids.to_host(entry.uid, entry.gid, self.layer, entry.name))
        if perm != entry.mode or not self._umask_zero:  # see _create_mode
            os.fchmod(fd, entry.mode)
        # chown drops security.capability, so xattrs come after it.
        for key, value in entry.xattrs.items():
            _setxattr(fd, key, value)
        os.utime(fd, ns=(_atime(entry), entry.mtime))
        if crc is not None:
            st = os.fstat(fd)
            self.digests[st.st_ino] = (st.st_size, st.st_mtime_ns, crc)
        elif self.digests:  # sparse, or past MAX_DIGESTS: forget the inode's old one
            self.digests.pop(os.fstat(fd).st_ino, None)

    def _directory(self, pfd: int, base: str, entry: Entry, parts: tuple[str, ...]) -> None:
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            if not self._clear(pfd, base, True):  # not a directory to merge into
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
        try:
            self._dir_metadata(fd, entry)
            self._dirs[os.fstat(fd).st_ino] = (parts, entry.mtime, _atime(entry))
        finally:
            os.close(fd)

    def _dir_metadata(self, fd: int, entry: Entry) -> None:
        if self._identity:
            os.fchown(fd, entry.uid, entry.gid)
        else:
            os.fchown(fd, *self.ids.to_host(entry.uid, entry.gid, self.layer, entry.name))
        os.fchmod(fd, entry.mode)
        for key, value in entry.xattrs.items():
            _setxattr(fd, key, value)

    def _device(self, pfd: int, base: str, entry: Entry) -> None:
        kind = _DEVICE_TYPES[entry.type]
        if kind != stat.S_IFIFO and userns.IN_USER_NAMESPACE:
            return  # the kernel makes no device in a user namespace: left out, as containerd does
        zero = entry.devmajor == entry.devminor == 0
        if self.overlay_whiteouts and kind == stat.S_IFCHR and zero:
            # overlayfs reads a 0/0 character device as a whiteout: storing one would
            # delete a lower file instead of adding a device (Docker's overlay2 does so).
            raise Unsupported("a 0/0 character device cannot be stored on overlay: it is "
                              "overlayfs' whiteout", layer=self.layer, path=entry.name)
        device = os.makedev(entry.devmajor, entry.devminor)
        try:
            os.mknod(base, kind | 0o600, device, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base, False)
            os.mknod(base, kind | 0o600, device, dir_fd=pfd)
        self._chown_at(pfd, base, entry)
        os.chmod(base, entry.mode, dir_fd=pfd, follow_symlinks=False)
        self._xattrs_at(pfd, base, entry)
        os.utime(base, ns=(_atime(entry), entry.mtime), dir_fd=pfd, follow_symlinks=False)

    def _chown_at(self, pfd: int, base: str, entry: Entry) -> None:
        uid, gid = entry.uid, entry.gid
        if not self._identity:
            uid, gid = self.ids.to_host(uid, gid, self.layer, entry.name)
        os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)

    def _xattrs_at(self, pfd: int, base: str, entry: Entry) -> None:
        if not entry.xattrs:
            return
        for key, value in entry.xattrs.items():
            _setxattr(f"/proc/self/fd/{pfd}/{base}", key, value, follow=False)

    def _hardlink(self, pfd: int, base: str, entry: Entry) -> None:
        self._settle()  # the target must be made
        target = split_name(entry.linkname, layer=self.layer)
        if not target:
            raise UnsafeArchive("hard link to the layer root", layer=self.layer, path=entry.name)
        found = self._resolve(target[:-1], create=bool(self.lowers), name=entry.linkname)
        if found is None:
            raise UnsafeArchive(f"hard link target {entry.linkname!r} not found",
                                layer=self.layer, path=entry.name)
        tfd, _ = found
        try:
            tst = os.lstat(target[-1], dir_fd=tfd)
        except FileNotFoundError:
            tst = self._copy_up(tfd, target[-1], entry)
        if self.overlay_whiteouts and is_whiteout(tst):
            raise UnsafeArchive(f"hard link target {entry.linkname!r} is deleted",
                                layer=self.layer, path=entry.name)
        if stat.S_ISDIR(tst.st_mode):
            raise UnsafeArchive("hard link to a directory", layer=self.layer, path=entry.name)
        try:
            if os.path.samestat(tst, os.lstat(base, dir_fd=pfd)):
                return  # already that file (a link entry repeated)
        except FileNotFoundError:
            pass
        self._clear(pfd, base, False)
        os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _copy_up(self, tfd: int, base: str, entry: Entry) -> os.stat_result:
        """Bring a hard link's target up from a lower layer (overlay), or refuse."""
        lower = None
        if self.lowers and not opaque(tfd):
            where = os.path.relpath(os.readlink(f"/proc/self/fd/{tfd}"), self.root)
            parts = [] if where == "." else where.split("/")
            lower = lower_lookup(self.lowers, [*parts, base])
        if lower is None or stat.S_ISDIR(lower[1].st_mode):
            raise UnsafeArchive(f"hard link target {entry.linkname!r} not found",
                                layer=self.layer, path=entry.name)
        path, st = lower
        src = os.open(os.path.dirname(path), DIR_FLAGS)
        try:
            fsutil.copy_node(src, tfd, base, st, overlay_xattrs=False)
        finally:
            os.close(src)
        copied = os.lstat(base, dir_fd=tfd)
        self._fresh = False  # a name no entry made
        # Its inode may be one a file of this archive had, before that was replaced.
        self.digests.pop(copied.st_ino, None)
        return copied

    # -- whiteouts ------------------------------------------------------------

    def _whiteout_entry(self, name: str, parent: list[str], base: str) -> None:
        self._settle()  # it lists and removes: every name before it made
        if self.overlay_whiteouts:
            self._fresh = False  # its whiteouts are names no entry made
        if base == OPAQUE_MARKER:
            dfd, chain = self._resolve(parent, create=True, name=name)
            for child in os.listdir(dfd):
                self._remove_lower(dfd, chain[-1], child)
            if not self.overlay_whiteouts:
                return
            if len(chain) > 1:
                os.setxattr(dfd, OVERLAY_OPAQUE_XATTR, b"y")
                return
            # overlayfs ignores the opaque xattr on a layer's root directory:
            # hide the lowers' top-level entries one whiteout each instead.
            for child in sorted({c for lower in self.lowers for c in os.listdir(lower)}):
                if (chain[-1], child) in self._written:
                    continue
                if self._union_has(dfd, child):
                    with contextlib.suppress(FileExistsError):
                        os.mknod(child, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dfd)
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other whiteout meta files are ignored, as Docker does
        target = base[len(WHITEOUT_PREFIX):]
        if target in ("", ".", ".."):
            raise UnsafeArchive("invalid whiteout name", layer=self.layer, path=name)
        if self.overlay_whiteouts:
            found = self._resolve(parent, create=True, name=name, copy_up_only=True)
            if found is None:
                return  # no such directory in the union: nothing to delete
            pfd, chain = found
            if (chain[-1], target) in self._written:
                return
            self._remove_lower(pfd, chain[-1], target)
            if self._union_has(pfd, target):
                os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
            return
        found = self._resolve(parent, create=False, name=name)
        if found is not None:
            pfd, chain = found
            self._remove_lower(pfd, chain[-1], target)

    def _union_has(self, pfd: int, base: str) -> bool:
        """Whether a lower layer shows ``base`` in the directory ``pfd`` (overlay)."""
        if not self.lowers or opaque(pfd):
            return False
        where = os.path.relpath(os.readlink(f"/proc/self/fd/{pfd}"), self.root)
        parts = [] if where == "." else where.split("/")
        return lower_lookup(self.lowers, [*parts, base]) is not None

    def _remove_lower(self, pfd: int, parent_ino: int, name: str) -> None:
        """Remove ``name`` unless this archive wrote it; keep what it wrote below it."""
        if (parent_ino, name) in self._written:
            return
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=pfd)
            if stat.S_ISLNK(st.st_mode):
                self._drop_cache()
            return
        if st.st_ino not in self._holds:
            self._drop_cache()
            shutil.rmtree(name, dir_fd=pfd)
            return
        fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
        try:
            for child in os.listdir(fd):
                self._remove_lower(fd, st.st_ino, child)
        finally:
            os.close(fd)

    def _clear(self, pfd: int, base: str, new_is_dir: bool) -> bool:
        """Make room for a new entry; True when an existing directory is to be merged."""
        self._settle()  # a directory removed must have nothing left to create in it
        try:
            st = os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if new_is_dir:
                return True
            self._drop_cache()
            shutil.rmtree(base, dir_fd=pfd)
            return False
        if stat.S_ISLNK(st.st_mode):
            self._drop_cache()
        os.unlink(base, dir_fd=pfd)
        return False

    # -- what waits for the writers --------------------------------------------

    def _settle(self) -> None:
        """Wait until every file handed to a writer to create is made."""
        if self._creating and self._pool is not None:
            self._pool.drain()

    def _looking_up(self, ino: int, part: str) -> None:
        if self._creating and (ino, part) in self._creating:
            self._settle()  # the walk must find the file there, as it would serially

    def _close_retired(self) -> None:
        self._settle()  # a writer may yet create a file in a directory of these fds
        super()._close_retired()

    # -- directory times ------------------------------------------------------

    def _set_dir_times(self) -> None:
        # Children change their parent's mtime, so directories get theirs last.
        self._drop_cache()
        for ino, (parts, mtime, atime) in reversed(self._dirs.items()):
            if not parts:
                os.utime(self._root_fd, ns=(atime, mtime))
                continue
            found = self._resolve(parts[:-1], create=False, name="/".join(parts))
            if found is None:
                continue
            pfd, _ = found
            try:
                fd = os.open(parts[-1], DIR_FLAGS, dir_fd=pfd)
            except OSError:
                continue  # replaced or removed by a later entry
            try:
                if os.fstat(fd).st_ino == ino:
                    os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)




def _atime(entry: Entry) -> int:
    return entry.atime if entry.atime is not None and entry.atime >= entry.mtime else entry.mtime


def _setxattr(target: int | str, key: str, value: bytes, *, follow: bool = True) -> None:
    if not xattr_allowed(key):
        return
    try:
        os.setxattr(target, key, value, follow_symlinks=follow)
    except OSError as e:
        # As Docker does: a filesystem or link type without xattrs is not an error.
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            raise


def _os_error(e: OSError, layer: str | None, entry: Entry) -> LaminaError:
    name = entry.name
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return QuotaExceeded(f"no space left: {e.strerror}", layer=layer, path=name)
    if e.errno == errno.EINVAL and not userns.mapped(entry.uid, entry.gid):
        return Unsupported(f"owner {entry.uid}:{entry.gid} is not mapped in this user namespace "
                           f"({userns.mapped_ids()}): give the user more subordinate ids "
                           "(/etc/subuid, /etc/subgid), or set apply.squash_owners=true",
                           layer=layer, path=name)
    return UnsafeArchive(f"cannot apply entry: {e.strerror or e}", layer=layer, path=name)
