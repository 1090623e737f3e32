"""The one place that renames, fsyncs, syncfs-es, locks and copies trees.

Crash model of the helpers here:
- :func:`atomic_write` leaves either the old file or the complete new one, never
  a torn file, across a kill or a power cut (temp in the same dir, fsync, rename,
  fsync of the directory).  :func:`atomic_write_nosync` does the same without the
  fsyncs, for state that a reboot voids: a kill leaves the old or the new file, a
  power cut may leave either, or an empty one.
- :func:`rename` is atomic across a kill (one name or the other); its new name
  survives a power cut once :func:`sync_dir` of its directory returns, which its
  callers do right after (with their crash points between).  :func:`sync_file` makes
  one open file's data durable, not its name.
- :func:`syncfs` makes everything written on a filesystem durable at once; a
  layer is synced with it once, just before the rename that makes it visible.
- :class:`FileLock` and :func:`lock_fd` are ``flock``-s: the kernel drops them when
  their holder dies, so a lock never outlives a crashed process.
- :func:`copy_tree` writes into a directory nobody can see yet (a staging dir);
  an interrupted copy is swept with the staging dir.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

from lamina import crashpoints, errors
from lamina.host import libc

_libc = libc.load()

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FICLONE = 0x40049409
COPY_CHUNK = 1 << 24
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""How every walk below a layer root opens a directory: never through a symlink."""


WRITEBACK_PERIOD = 0.25
"""Seconds between the syncfs calls of :func:`writeback`."""


@contextmanager
def writeback(path: str | os.PathLike[str], period: float = WRITEBACK_PERIOD) -> Iterator[None]:
    """While the block runs, write the filesystem's dirty data out every ``period`` seconds.

    A layer is durable once a ``syncfs`` returns; one at the end would wait for all
    of the layer's data at once.  A thread calls ``syncfs`` now and then while the
    layer is written, so the disk works while the tar engine does (the thread waits
    in the kernel, without the GIL), and the final ``syncfs`` finds little left: it
    took 0.4-0.6 s of a 200 MB layer's ~3 s apply here, and ~0.01-0.1 s with this.
    (Per-file ``sync_file_range`` was tried first: it puts the block allocation and
    the I/O submission on the writing thread, and the apply got slower.)  A block
    shorter than ``period`` costs no syncfs.  Best effort: errors are the final
    ``syncfs``'s to report.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(period):
            _libc.syncfs(fd)

    thread = threading.Thread(target=run, name="lamina-writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        os.close(fd)


def syncfs(path: str | os.PathLike[str]) -> None:
    """Flush every dirty page and inode of the filesystem holding ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc.check(_libc.syncfs(fd), "syncfs", path)
    finally:
        os.close(fd)


SMALL_TREE = 64
"""Entries up to which :func:`sync_small_tree` fsyncs one by one."""
SYNC_THREADS = 8
"""Threads :func:`sync_small_tree` fsyncs on at once."""

_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_lock = threading.Lock()


def _forget_sync_pool() -> None:
    """In a forked child: the parent's pool threads are not there, so the child makes
    a pool of its own rather than rely on how the executor copes with dead threads."""
    global _sync_pool, _sync_pool_lock
    _sync_pool, _sync_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_sync_pool)


def _fsync_path(name: str) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_all(names: Sequence[str]) -> None:
    """fsync each of ``names`` (directories, regular files), several at once.

    Concurrent fsyncs share the filesystem's journal commits (ext4's and xfs's group
    commit): nine of them cost about what two in a row do, where one after the other
    each waits for a commit of its own.  Each name is still fsynced: nothing here
    relies on one fsync making another inode durable."""
    global _sync_pool
    if len(names) < 2:
        for name in names:
            _fsync_path(name)
        return
    with _sync_pool_lock:
        if _sync_pool is None:
            _sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="lamina-fsync")
        pool = _sync_pool
    for done in [pool.submit(_fsync_path, name) for name in names]:
        done.result()  # every one waited for; the first error raised


def sync_small_tree(path: str | os.PathLike[str],
                    also: Sequence[str | os.PathLike[str]] = ()) -> bool:
    """fsync every directory and regular file below ``path`` (and ``path``), and the
    directories ``also``, if there are at most :data:`SMALL_TREE` entries and nothing
    but directories, regular files and symlinks; False (nothing synced) otherwise.

    For a layer of a few small files, a handful of fsyncs make only those durable,
    where a syncfs would wait for every dirty page of the filesystem (other writers'
    too: 10 ms and more on a busy disk, against ~0.3 ms an fsync here); they run side
    by side (:func:`_fsync_all`).  A symlink's inode is made with its directory entry
    (the directory's fsync); a device, fifo or socket (an overlay whiteout) cannot be
    opened to be synced, so a tree with one is left to a syncfs."""
    found: list[str] = []
    for dirpath, dirs, files in os.walk(path):
        found.append(dirpath)
        if len(found) + len(dirs) + len(files) > SMALL_TREE:
            return False
        for name in files:
            full = os.path.join(dirpath, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISREG(mode):
                found.append(full)
            elif not stat.S_ISLNK(mode):
                return False
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(dirpath, d))]
    _fsync_all(found + [os.fspath(d) for d in also])
    return True


QUIET_DIRTY = 8 << 20
"""Bytes of dirty and in-flight pages (the whole machine's) under which a syncfs costs
what one fsync does."""


def _dirty_bytes() -> int:
    """The machine's dirty page cache and pages under writeback, in bytes (``Dirty`` and
    ``Writeback`` of /proc/meminfo); unknown counts as a lot."""
    total = 0
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith((b"Dirty:", b"Writeback:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 1 << 62
    return total


def sync_tree(path: str | os.PathLike[str],
              also: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Make ``path``'s tree and the directories ``also`` durable, the cheaper way.

    One syncfs when the machine has little dirty data (it is then one journal commit,
    cheaper than a dozen fsyncs even side by side); while other writers have much in
    flight (an image being pulled), a syncfs would wait for all of it, so a small tree
    is fsynced entry by entry (:func:`sync_small_tree`) and only a large one gets the
    syncfs all the same."""
    if _dirty_bytes() < QUIET_DIRTY or not sync_small_tree(path, also):
        syncfs(path)


def sync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that the names created or renamed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(fd: int) -> None:
    """fsync the open file ``fd``: its data and inode survive a power cut (its name
    does once its directory is synced, :func:`sync_dir`)."""
    os.fsync(fd)


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst`` (replacing a file, or an empty directory, there) in one
    step: a kill leaves one name or the other.  Not durable yet: the caller syncs the
    directory after it (:func:`sync_dir`), its own crash point between."""
    os.rename(src, dst)


def atomic_write_nosync(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step, with no fsync: readers and a kill see
    the old file or the new one, never a torn one; a power cut may leave either, or an
    empty file.  For what a reboot voids anyway (mount counts).  The temp file is
    ``.NAME.PID`` beside it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` all at once: temp → write → fsync → rename → fsync dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    # The rename is the commit point; the directory fsync makes the new name durable.
    crashpoints.reached("atomic-write:before-rename")
    os.replace(tmp, path)
    sync_dir(path.parent)


def unlink_durably(path: str | os.PathLike[str]) -> None:
    """Remove the name ``path`` (a missing one is fine) so that its going survives a
    power cut: unlink, then fsync the directory."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    sync_dir(os.path.dirname(os.fspath(path)) or ".")


def rename_exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``)."""
    libc.check(_libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), RENAME_EXCHANGE),
               "renameat2", a)


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst``, failing with EEXIST rather than replacing ``dst``."""
    libc.check(_libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst),
                               RENAME_NOREPLACE), "renameat2", dst)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete ``path`` and everything below it; a missing path is fine.

    Several processes may sweep the same leftover at once, so vanished entries
    are not errors.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with suppress(FileNotFoundError):
            os.unlink(path)
        return

    def onerror(func: object, p: str, exc_info: tuple[type, BaseException, object]) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=onerror)


class FileLock:
    """An ``flock`` on a lock file; exclusive or shared, blocking or not."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, *, shared: bool = False, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False when another holder has it."""
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking:
            op |= fcntl.LOCK_NB
        while True:
            if self._fd is None:
                self._fd = self._open()
            try:
                fcntl.flock(self._fd, op)
            except BlockingIOError:
                return False
            # Whoever held a lock file last may have unlinked it (staging locks are
            # dropped so): a lock on a file no longer at the path guards nothing, and
            # the next one to come would make a new file and take it too.  Take the
            # file that is at the path.
            st = os.fstat(self._fd)
            try:
                same = os.stat(self.path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if same:
                return True
            self.release()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            # The store's directory refuses us (permissions, read-only, full): one
            # error naming it, not a traceback.
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                               errno.EDQUOT):
                raise
            raise errors.InvalidArgument(
                f"cannot make a lock file: {e.strerror} (the home must be writable by "
                f"lamina)", path=str(self.path)) from None

    def release(self) -> None:
        """Drop the lock and close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_fd(fd: int, *, blocking: bool = True) -> bool:
    """Take an exclusive ``flock`` on the open file ``fd`` itself, held until it is closed;
    with ``blocking=False`` return False when another holder has it.

    For a file whose lock says a live process still writes it (an ingest file); a lock
    that guards something else is a :class:`FileLock`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def locked(path: str | os.PathLike[str], *, shared: bool = False) -> Iterator[FileLock]:
    """Hold the lock at ``path`` for the ``with`` block."""
    lock = FileLock(path)
    lock.acquire(shared=shared)
    try:
        yield lock
    finally:
        lock.release()


def copy_file_data(src_fd: int, dst_fd: int, size: int, *, reflink: bool = True) -> None:
    """Copy ``size`` bytes: a reflink where the filesystem has them, else copy_file_range."""
    if size == 0:
        return
    if reflink:
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                               errno.EBADF):
                raise
    if os.fstat(src_fd).st_blocks * 512 < size and _copy_extents(src_fd, dst_fd, size):
        return  # a sparse file: its data, not its holes (no work proportional to them)
    copied = 0
    try:
        while copied < size:
            n = os.copy_file_range(src_fd, dst_fd, min(COPY_CHUNK, size - copied))
            if n == 0:
                break
            copied += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(src_fd, copied, os.SEEK_SET)
    os.lseek(dst_fd, copied, os.SEEK_SET)
    while True:
        chunk = os.read(src_fd, 1 << 20)
        if not chunk:
            break
        os.write(dst_fd, chunk)


def _copy_extents(src_fd: int, dst_fd: int, size: int) -> bool:
    """Copy a sparse file's data extents (``SEEK_DATA``/``SEEK_HOLE``) to the same
    offsets and leave its holes holes; False where the filesystem cannot tell them."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # only a hole from here to the end
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP) and pos == 0:
                return False
            raise
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        _copy_range(src_fd, dst_fd, start, end)
        pos = end
    os.ftruncate(dst_fd, size)
    return True


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    """Bytes ``start`` to ``end`` of one file to the same offsets of another."""
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(COPY_CHUNK, end - pos), pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src_fd, min(1 << 20, end - pos), pos)
            n = os.pwrite(dst_fd, data, pos) if data else 0
        if n == 0:
            break  # the file shrank meanwhile
        pos += n


def copy_xattrs(
    src: str | int, dst: str | int, *, follow: bool = False, overlay: bool = True
) -> None:
    """Copy every extended attribute (trusted.* and security.* included) from src to dst.

    ``overlay=False`` leaves out overlayfs' own attributes (``trusted.overlay.*``, and
    ``user.overlay.*`` as overlayfs reads them in a user namespace).
    """
    if isinstance(src, int) or isinstance(dst, int):
        follow = True  # an fd names its inode; there is no link to follow
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if not overlay and name.startswith(("trusted.overlay.", "user.overlay.")):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=follow),
                        follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


def open_dir_beneath(root_fd: int, parts: Sequence[str]) -> int:
    """A new fd of the directory ``parts`` below ``root_fd``, never through a symlink."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            nfd = os.open(part, DIR_FLAGS,
                          dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file_beneath(root_fd: int, path: str) -> int:
    """A read-only fd of the file ``path`` below ``root_fd``, never through a symlink."""
    parts = path.split("/")
    fd = open_dir_beneath(root_fd, parts[:-1])
    try:
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _fdpath(dir_fd: int, name: str) -> str:
    # A path that reaches ``name`` in ``dir_fd`` without following ``name`` itself,
    # for the l*xattr calls, which have no *at form.
    return f"/proc/self/fd/{dir_fd}/{name}"


def copy_tree(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, reflink: bool = True
) -> None:
    """Copy the tree ``src`` into the existing directory ``dst``, keeping everything.

    Owners, modes (setuid/setgid/sticky), mtimes, every xattr, hard links, symlinks,
    fifos and devices (overlay whiteouts included) are kept; file data is reflinked
    where the filesystem can, else copied in the kernel.
    """
    src_fd = os.open(src, DIR_FLAGS)
    dst_fd = os.open(dst, DIR_FLAGS)
    try:
        links: dict[tuple[int, int], str] = {}
        _copy_dir(src_fd, dst_fd, dst_fd, "", links, reflink)
        st = os.fstat(src_fd)
        os.chown(dst_fd, st.st_uid, st.st_gid)
        os.chmod(dst_fd, stat.S_IMODE(st.st_mode))
        copy_xattrs(_fdpath(src_fd, "."), _fdpath(dst_fd, "."))
        os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def _copy_dir(
    src_fd: int,
    dst_fd: int,
    dst_root: int,
    rel: str,
    links: dict[tuple[int, int], str],
    reflink: bool,
) -> None:
    # ``rel`` is this directory's path below the copy's root, so that a later hard
    # link can name its first copy from ``dst_root``.
    with os.scandir(src_fd) as it:
        entries = list(it)
    for entry in entries:
        name = entry.name
        st = entry.stat(follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            sub_src = os.open(name, DIR_FLAGS,
                              dir_fd=src_fd)
            sub_dst = os.open(name, DIR_FLAGS,
                              dir_fd=dst_fd)
            try:
                _copy_dir(sub_src, sub_dst, dst_root, f"{rel}{name}/", links, reflink)
                os.chown(sub_dst, st.st_uid, st.st_gid)
                os.chmod(sub_dst, stat.S_IMODE(mode))
                copy_xattrs(_fdpath(sub_src, "."), _fdpath(sub_dst, "."))
                os.utime(sub_dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(sub_src)
                os.close(sub_dst)
            continue
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = links.get(key)
            if first is not None:
                os.link(first, name, src_dir_fd=dst_root, dst_dir_fd=dst_fd,
                        follow_symlinks=False)
                continue
            links[key] = rel + name
        copy_node(src_fd, dst_fd, name, st, reflink=reflink)


def copy_node(
    src_fd: int, dst_fd: int, name: str, st: os.stat_result, *, reflink: bool = True,
    overlay_xattrs: bool = True,
) -> None:
    """Copy the non-directory ``name`` from one directory fd to another, keeping everything.

    With ``overlay_xattrs=False`` overlayfs' own ``trusted.overlay.*`` xattrs are not
    copied (a copy-up out of a lower layer must not carry them).
    """
    mode = st.st_mode
    if stat.S_ISREG(mode):
        _copy_file(src_fd, dst_fd, name, st, reflink, overlay_xattrs)
        return
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(name, 0o600, dir_fd=dst_fd)
    else:
        os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst_fd)
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
    if not stat.S_ISLNK(mode):
        os.chmod(name, stat.S_IMODE(mode), dir_fd=dst_fd, follow_symlinks=False)
    copy_xattrs(_fdpath(src_fd, name), _fdpath(dst_fd, name), overlay=overlay_xattrs)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)


def _copy_file(
    src_dir: int, dst_dir: int, name: str, st: os.stat_result, reflink: bool, overlay: bool
) -> None:
    sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        dfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dst_dir)
        try:
            copy_file_data(sfd, dfd, st.st_size, reflink=reflink)
            os.fchown(dfd, st.st_uid, st.st_gid)
            os.fchmod(dfd, stat.S_IMODE(st.st_mode))
            # chown drops security.capability, so xattrs go after it.
            copy_xattrs(sfd, dfd, overlay=overlay)
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def fs_type(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mount_point = fields[4].replace("\\040", " ")
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, fields[sep + 1]
    return kind
