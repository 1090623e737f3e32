"""Size quotas for writable layers: project quotas where the filesystem has them, else a
per-layer loop-mounted filesystem image.

Project quotas (xfs mounted with ``pquota``, ext4 with the ``project`` feature mounted
with ``prjquota``): each capped layer gets a project id of its own, set with the
inherit flag on its writable directories (``FS_IOC_FSSETXATTR``), so everything
written below them is charged to it; the limit is set with ``quotactl_fd``
(``Q_SETQUOTA``, ``PRJQUOTA``).  A write past it fails with EDQUOT in the container.

Elsewhere (plain ext4 and the like) the layer's writable part lives in a sparse
ext4 image of the quota's size, loop-mounted (:mod:`lamina.host.loop`) at
``layers/ID/q`` for the layer's whole life (mounted again when the store is opened
after a reboot).  A write past it fails with ENOSPC.  This is the Linux analog of
the seed driver's sandbox disk.

Crash model: a project id is recorded in the layer's metadata before the layer is
published; an id whose layer is gone is simply never used again.  An image is made
and mounted inside the staging directory; a sweep unmounts what is mounted below a
leftover before deleting it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import struct
import subprocess
from pathlib import Path
from typing import BinaryIO

from lamina import errors
from lamina.host import fsutil, libc, loop

_libc = libc.load()

SYS_QUOTACTL_FD = 443  # the same on every architecture (the unified syscall table)
PRJQUOTA = 2
Q_GETQUOTA, Q_SETQUOTA = 0x800007, 0x800008
QIF_BLIMITS, QIF_SPACE = 1, 2
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820
FS_XFLAG_PROJINHERIT = 0x200
_DQBLK = struct.Struct("=QQQQQQQQI4x")  # struct if_dqblk
_FSXATTR = struct.Struct("=IIIII8x")  # struct fsxattr
FIRST_PROJECT_ID = 0x4C000000  # lamina's ids start here, away from admins' usual small ids
LOOP_MIN = 2 << 20  # the smallest image worth making
PROJECT, LOOP = "project", "loop"
IMAGE, IMAGE_MOUNT = "quota.img", "q"  # a loop-capped layer's image and its mount point

def _quotactl(fd: int, cmd: int, qid: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    libc.check(_libc.syscall(ctypes.c_long(SYS_QUOTACTL_FD), ctypes.c_uint(fd),
                             ctypes.c_uint((cmd << 8) | PRJQUOTA), ctypes.c_int(qid), buf),
               "quotactl")


def get_project(path: str | os.PathLike[str]) -> int:
    """The project id of a file or directory."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
        return int(_FSXATTR.unpack(bytes(buf))[3])
    finally:
        os.close(fd)


def set_project(path: str | os.PathLike[str], project: int) -> None:
    """Put a directory in a project, inherited by everything created below it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
        flags, extsize, nextents, _, cowextsize = _FSXATTR.unpack(bytes(buf))
        new = _FSXATTR.pack(flags | FS_XFLAG_PROJINHERIT, extsize, nextents, project, cowextsize)
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, bytearray(new))
    finally:
        os.close(fd)


def set_limit(path: str | os.PathLike[str], project: int, size: int) -> None:
    """Cap the bytes a project may use on the filesystem holding ``path``."""
    kib = (size + 1023) // 1024
    buf = ctypes.create_string_buffer(_DQBLK.pack(kib, kib, 0, 0, 0, 0, 0, 0, QIF_BLIMITS),
                                      _DQBLK.size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _quotactl(fd, Q_SETQUOTA, project, buf)
    finally:
        os.close(fd)


def usage(path: str | os.PathLike[str], project: int) -> tuple[int, int]:
    """(bytes used, byte limit) of a project on the filesystem holding ``path``."""
    buf = ctypes.create_string_buffer(_DQBLK.size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _quotactl(fd, Q_GETQUOTA, project, buf)
    finally:
        os.close(fd)
    hard, _soft, used, *_ = _DQBLK.unpack(buf.raw)
    return used, hard * 1024


def project_quota_reason(where: Path) -> str | None:
    """Why project quotas cannot be used at ``where`` (None: they can)."""
    probe = where / f".lamina-quota-probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        try:
            set_project(probe, FIRST_PROJECT_ID - 1)
            set_limit(probe, FIRST_PROJECT_ID - 1, 1 << 20)
            usage(probe, FIRST_PROJECT_ID - 1)
            set_limit(probe, FIRST_PROJECT_ID - 1, 0)
        finally:
            probe.rmdir()
    except OSError as e:
        return f"no project quotas on {fsutil.fs_type(where)} at {where}: {e.strerror or e}"
    return None


def allocate_project(home: Path) -> int:
    """A project id no other layer of this home has (a counter kept in the home)."""
    path = home / "quota-projects.json"
    with fsutil.locked(home / ".quota.lock"):
        try:
            last = int(json.loads(path.read_text())["last"])
        except FileNotFoundError:
            last = FIRST_PROJECT_ID - 1
        except (OSError, ValueError, KeyError) as e:
            raise errors.Corrupt(f"unreadable {path.name}: {e}", path=str(path)) from e
        fsutil.atomic_write(path, json.dumps({"last": last + 1}).encode())
    return last + 1


def _capacity(mount_point: Path) -> int:
    """Bytes a fresh filesystem offers (statvfs of its root)."""
    st = os.statvfs(mount_point)
    return st.f_blocks * st.f_frsize - (st.f_blocks - st.f_bavail) * st.f_frsize


def make_image(image: Path, size: int, mount_point: Path) -> None:
    """Create a sparse ext4 image offering ``size`` bytes, loop-mounted at ``mount_point``.

    ext4's own metadata (journal, inode tables) does not grow in step with the
    image, so the image is sized by measuring what a first one offers and making
    it again corrected (within 1%, at most a few tries).
    """
    mount_point.mkdir(mode=0o755, exist_ok=True)
    guess = max(LOOP_MIN, size + size // 16 + (1 << 20))
    for _ in range(4):
        with open(image, "wb") as f:
            _extend(f, guess, size)
        loop.run_tool("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0", str(image))
        loop.mount(image, mount_point)
        offered = _capacity(mount_point)
        if abs(offered - size) <= max(64 << 10, size // 100):
            return
        loop.unmount(mount_point)
        guess = max(LOOP_MIN, guess + size - offered)
    loop.mount(image, mount_point)  # the last guess stays: close enough


def _extend(f: BinaryIO, length: int, size: int) -> None:
    """Make the image ``length`` bytes long (sparse); ``InvalidArgument`` when the home's
    filesystem cannot hold a file that large for a quota of ``size`` bytes."""
    try:
        f.truncate(length)
    except (OverflowError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EFBIG, errno.EINVAL,
                                                      errno.EOVERFLOW):
            raise
        why = e.strerror if isinstance(e, OSError) else "too large"
        raise errors.InvalidArgument(
            f"a quota of {size} bytes is more than a loop image on {fsutil.fs_type(f.name)} "
            f"can hold ({why})", path="size") from None


def grow_image(image: Path, mount_point: Path, size: int, *, in_use: bool) -> None:
    """Grow a mounted image so that it holds ``size`` bytes.

    Online (``resize2fs`` of the mounted loop device) where the kernel lets us
    (it needs CAP_SYS_RESOURCE); else offline: unmount, check, resize, mount again,
    which is refused with ``Busy`` while the layer is in use.
    """
    if loop.device_of(mount_point) is None:
        loop.mount(image, mount_point)
    device = loop.device_of(mount_point)
    # ext4's overhead is already in the image: grow it by what is missing.
    missing = size - _capacity(mount_point)
    with open(image, "r+b") as f:
        _extend(f, os.fstat(f.fileno()).st_size + max(missing, 0), size)
    if device is not None:  # pragma: no branch - mounted just above
        loop.refresh_size(device)
        try:
            loop.run_tool("resize2fs", device)
            return
        except OSError:
            if in_use:
                raise errors.Busy("the image cannot grow online here (no CAP_SYS_RESOURCE) "
                                  "and the layer is mounted", path=str(image)) from None
        loop.unmount(mount_point)
    _run_ok_codes(("e2fsck", "-f", "-y", str(image)), (0, 1))
    loop.run_tool("resize2fs", str(image))
    loop.mount(image, mount_point)


def _run_ok_codes(argv: tuple[str, ...], ok: tuple[int, ...]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode not in ok:
        raise OSError(errno.EIO, f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")


