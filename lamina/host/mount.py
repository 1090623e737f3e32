"""Mounting and unmounting overlayfs, through ctypes syscalls.

On kernels with the new mount API and ``lowerdir+`` (6.8 and later) each lower
directory is handed to the kernel on its own (``fsopen("overlay")``, one
``fsconfig(FSCONFIG_SET_STRING, "lowerdir+", dir)`` per layer, then
``FSCONFIG_CMD_CREATE``, ``fsmount``, ``move_mount``), so a chain as deep as
overlayfs allows (500 lower layers) mounts with no limit on the option string.
Older kernels get one ``mount(2)`` whose data must fit in a page; the caller
passes short relative paths and the directory they are relative to, and the
mount happens in a forked child that ``chdir``-s there (the parent's working
directory is left alone, which threads would share).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Sequence
from pathlib import Path

from lamina.host import libc, loop
from lamina.host.userns import IN_USER_NAMESPACE, OVERLAY_MOUNT_OPTIONS

_libc = libc.load()
# syscall(2) typed once for fsconfig's shape (int, uint, str, str, int): a mount of
# 500 lower layers makes 500 of these calls.
_syscall5 = ctypes.CFUNCTYPE(
    ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.c_char_p,
    ctypes.c_int, use_errno=True,
)(("syscall", _libc))

# These numbers are the same on every architecture (the unified syscall table).
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 1
MOVE_MOUNT_F_EMPTY_PATH = 4
AT_FDCWD = -100
MS_RDONLY = 1
MNT_DETACH = 2
PAGE = os.sysconf("SC_PAGE_SIZE")
MOUNT_OPTIONS = ("index=off", "redirect_dir=nofollow" if IN_USER_NAMESPACE else "redirect_dir=off",
                 "metacopy=off", *OVERLAY_MOUNT_OPTIONS)
"""The overlayfs features lamina's unions keep off, so that an upper directory always
holds a layer's full changes (and its native diff is exact); and in a user namespace
``userxattr`` (overlayfs' own attributes as ``user.overlay.*``), with which the kernel
takes ``redirect_dir=nofollow`` only (``off`` means follow, where redirects are
followed by default)."""


def mount_error(err: int, what: str, detail: str = "") -> OSError:
    """An ``OSError`` for a failed mount call, with what the kernel logged about it."""
    return OSError(err, f"{what}: {os.strerror(err)}{': ' + detail if detail else ''}")


def _check(result: int, what: str, fs_fd: int = -1) -> int:
    if result < 0 and fs_fd >= 0:  # the error with what the kernel logged about it
        raise mount_error(ctypes.get_errno(), what, _kernel_log(fs_fd))
    return libc.check(result, what)


def _kernel_log(fs_fd: int) -> str:
    """What the kernel said about a failed fsconfig (read from the fs context fd)."""
    if fs_fd < 0:
        return ""
    lines = []
    while True:
        try:
            msg = os.read(fs_fd, 1024)
        except OSError:
            break
        if not msg:
            break
        lines.append(msg.decode(errors="replace").strip())
    return "; ".join(lines)


def _fsconfig(fs_fd: int, cmd: int, key: str | None, value: str | None) -> None:
    res = _syscall5(SYS_FSCONFIG, fs_fd, cmd, key.encode() if key is not None else None,
                    os.fsencode(value) if value is not None else None, 0)
    if res < 0:
        _check(res, f"fsconfig {key or 'create'}", fs_fd)


@functools.cache
def lowerdir_plus_available() -> bool:
    """Whether overlayfs takes lowers one by one here (new mount API, kernel ≥ 6.8)."""
    fd = _libc.syscall(SYS_FSOPEN, ctypes.c_char_p(b"overlay"), ctypes.c_uint(FSOPEN_CLOEXEC))
    if fd < 0:
        return False
    try:
        _fsconfig(fd, FSCONFIG_SET_STRING, "lowerdir+", "/")
    except OSError:
        return False
    else:
        # Before 6.5 overlayfs sits behind the legacy mount context, which takes any key
        # here and refuses it only when the mount is made: a key no kernel knows tells.
        try:
            _fsconfig(fd, FSCONFIG_SET_STRING, "lamina-no-such-option", "1")
        except OSError:
            return True
        return False
    finally:
        os.close(fd)


def mount_overlay(
    target: str,
    lowers: Sequence[str],
    upper: str | None = None,
    work: str | None = None,
    *,
    options: Sequence[str] = (),
    relative_to: str | None = None,
) -> None:
    """Mount overlayfs at ``target``; lowers nearest first; read-only without ``upper``.

    ``options`` are extra ``key=value`` or flag options (``index=off`` …).  With the
    new API the lowers may be any length; otherwise, when the option string would
    not fit a page, ``lowers`` should be relative to ``relative_to``.
    """
    if lowerdir_plus_available():
        _mount_new(target, lowers, upper, work, options)
    else:
        _mount_legacy(target, lowers, upper, work, options, relative_to)


def _mount_new(
    target: str, lowers: Sequence[str], upper: str | None, work: str | None,
    options: Sequence[str],
) -> None:
    fs_fd = _check(
        _libc.syscall(SYS_FSOPEN, ctypes.c_char_p(b"overlay"), ctypes.c_uint(FSOPEN_CLOEXEC)),
        "fsopen overlay",
    )
    try:
        for lower in lowers:
            _fsconfig(fs_fd, FSCONFIG_SET_STRING, "lowerdir+", lower)
        if upper is not None:
            _fsconfig(fs_fd, FSCONFIG_SET_STRING, "upperdir", upper)
            _fsconfig(fs_fd, FSCONFIG_SET_STRING, "workdir", work)
        for option in options:
            key, sep, value = option.partition("=")
            if sep:
                _fsconfig(fs_fd, FSCONFIG_SET_STRING, key, value)
            else:
                _fsconfig(fs_fd, FSCONFIG_SET_FLAG, key, None)
        _fsconfig(fs_fd, FSCONFIG_CMD_CREATE, None, None)
        attrs = MOUNT_ATTR_RDONLY if upper is None else 0
        mnt_fd = _check(
            _libc.syscall(SYS_FSMOUNT, ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                          ctypes.c_uint(attrs)),
            "fsmount", fs_fd,
        )
    finally:
        os.close(fs_fd)
    try:
        _check(
            _libc.syscall(SYS_MOVE_MOUNT, ctypes.c_int(mnt_fd), ctypes.c_char_p(b""),
                          ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(target)),
                          ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
            "move_mount",
        )
    finally:
        os.close(mnt_fd)


def _mount_legacy(
    target: str, lowers: Sequence[str], upper: str | None, work: str | None,
    options: Sequence[str], relative_to: str | None,
) -> None:
    data = ["lowerdir=" + ":".join(lowers)]
    if upper is not None:
        data += [f"upperdir={upper}", f"workdir={work}"]
    data += list(options)
    text = ",".join(data).encode()
    if len(text) >= PAGE:
        raise mount_error(errno.EINVAL, "overlay mount options exceed a page")
    flags = MS_RDONLY if upper is None else 0
    if relative_to is None:
        _check(_libc.mount(b"overlay", os.fsencode(target), b"overlay", flags, text), "mount")
        return
    # Relative paths need a working directory: set it in a child so that the
    # parent's (shared by its threads) never changes.
    target_abs = os.fsencode(os.path.abspath(target))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        code = 0
        try:
            os.chdir(relative_to)
            if _libc.mount(b"overlay", target_abs, b"overlay", flags, text) != 0:
                code = ctypes.get_errno()
        except OSError as e:
            code = e.errno or errno.EIO
        os.write(write_fd, str(code).encode())
        os._exit(0)
    os.close(write_fd)
    try:
        answer = os.read(read_fd, 16)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    code = int(answer or b"5")
    if code:
        raise mount_error(code, "mount")


def unmount(target: str, *, lazy: bool = True) -> None:
    """Unmount ``target``; a busy mount is detached lazily (unless ``lazy=False``, which
    raises EBUSY instead); not mounted is fine."""
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return  # not a mount point (any more)
    if err == errno.EBUSY and lazy:
        _check(_libc.umount2(os.fsencode(target), MNT_DETACH), "umount")
        return
    raise mount_error(err, "umount")


def mounted_below(prefix: str) -> list[str]:
    """Mount points at or below ``prefix`` (from /proc/self/mountinfo)."""
    prefix = prefix.rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point.startswith(prefix):
                out.append(point)
    return out


def _unescape(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def unmount_below(path: str | os.PathLike[str]) -> None:
    """Unmount everything mounted at or below ``path``, deepest first."""
    path = os.fspath(path)
    points = mounted_below(path)
    if os.path.ismount(path):
        points.append(path)
    for point in sorted(points, key=len, reverse=True):
        unmount(point)


def mount_erofs(image: str | os.PathLike[str], device: str | os.PathLike[str],
                target: str | os.PathLike[str], *, loops: bool = False) -> None:
    """Mount the EROFS metadata ``image`` read-only at ``target`` with ``device`` (the
    layer's tar) as its extra device 1: file-backed on Linux >= 6.12, else through two
    read-only loop devices (:mod:`lamina.host.loop`), detached lazily once mounted so
    that the kernel frees them with the mount (``loops``: those, whatever the kernel).
    ``OSError`` when the kernel refuses (ENODEV: no EROFS; EINVAL: no 512-byte blocks
    before Linux 6.4)."""
    src, dst = os.fsencode(image), os.fsencode(target)
    if loops:
        err = errno.ENOTBLK
    elif _libc.mount(src, dst, b"erofs", MS_RDONLY, b"device=" + os.fsencode(device)) == 0:
        return
    else:
        err = ctypes.get_errno()
    if err != errno.ENOTBLK:  # ENOTBLK: no file-backed mounts here (before 6.12)
        raise mount_error(err, "mount erofs", os.fsdecode(image))
    devices = [loop.attach(Path(os.fsdecode(device)), read_only=True),
               loop.attach(Path(os.fsdecode(image)), read_only=True)]
    try:
        if _libc.mount(devices[1].encode(), dst, b"erofs", MS_RDONLY,
                       f"device={devices[0]}".encode()) != 0:
            err = ctypes.get_errno()
            raise mount_error(err, "mount erofs on loop devices", os.fsdecode(image))
    finally:
        for dev in devices:  # busy (mounted): the kernel frees it with the mount
            loop.detach(dev)
