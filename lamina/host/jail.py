"""A process's jail: a root of its own holding only one directory (with read-only
ones beside it), fewer capabilities, and no imports (:mod:`lamina.archive.isolate` says
what an isolated apply's child sees and why; :mod:`lamina.archive.forkserver` is the
child that enters this jail).

:func:`enter_jail` unshares the mount namespace (as another user than root, inside a
user namespace mapping only its own ids), builds a small read-only tmpfs root beside
the directory with bind mounts of it (nosuid, nodev, noexec), of the read-only lowers
and of ``/proc/self/fd``, and switches to it (``pivot_root``, else ``chroot``).
:func:`drop_capabilities` keeps :data:`KEPT_CAPABILITIES`, for good; :func:`seal`
refuses every import from then on; :func:`die_with_parent` ties the process's life
to its parent's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import sys

from lamina.host import libc

_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC = 32, 4096, 8192, 16384
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MS_PRIVATE = 1 << 18
_LOCKDOWN = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
_ST_NOATIME, _ST_NODIRATIME, _ST_RELATIME = 1024, 2048, 4096
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 24, 38
_CAP_VERSION_3 = 0x20080522
KEPT_CAPABILITIES = frozenset({
    0, 1, 2, 3, 4,  # chown, dac_override, dac_read_search, fowner, fsetid
    21,  # sys_admin: trusted.* xattrs (overlay's opaque marker)
    24,  # sys_resource: the root-reserved blocks and quotas, as for an inline apply
    27, 31,  # mknod, setfcap (security.capability)
    32, 33,  # mac_override, mac_admin: security.* xattrs under an LSM
})
"""What a child keeps of root's capabilities once its root is switched: what writing a
layer needs, as root writes it inline.  Gone: kill, ptrace, setuid, module loading, raw
I/O, the network, time, BPF… ; and no exec could give any back (no_new_privs)."""
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41,
               "ppc64le": 203, "ppc64": 203, "s390x": 217, "i686": 217, "i386": 217,
               "armv7l": 218, "armv6l": 218}.get(platform.machine())

_libc = libc.load()


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


try:
    with open("/proc/sys/kernel/cap_last_cap") as _f:
        _LAST_CAP = int(_f.read())
except (OSError, ValueError):  # pragma: no cover - no such file before Linux 3.2
    _LAST_CAP = 40


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    libc.check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def _bind(fd: int, target: str, flags: int) -> None:
    """Bind the directory open as ``fd`` at ``target``, with ``flags`` (nosuid, rdonly…)."""
    _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND)
    # A remount in a user namespace must keep the locked atime flags of the source.
    have = os.fstatvfs(fd).f_flag
    atime = ((_MS_NOATIME if have & _ST_NOATIME else 0)
             | (_MS_NODIRATIME if have & _ST_NODIRATIME else 0)
             | (_MS_RELATIME if have & _ST_RELATIME else 0))
    _mount(None, target, None, _MS_BIND | _MS_REMOUNT | flags | atime)


def _unshare() -> None:
    if os.geteuid() == 0:
        libc.check(_libc.unshare(_CLONE_NEWNS), "unshare")
        return
    uid, gid = os.geteuid(), os.getegid()
    libc.check(_libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS), "unshare (user namespace)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def enter_jail(root: str, lowers: list[str]) -> tuple[str, list[str]]:
    """Make this process's root a fresh one holding only the layer (see the docstring)."""
    base = os.path.dirname(root)
    if base in ("", "/"):
        raise OSError(errno.EINVAL, f"no place to build a root beside {root}")
    _unshare()
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates to the host
    held = [os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            for p in [root, *lowers, "/proc/self/fd"]]
    try:
        # The new root hides the layer's own parent; the fds above still reach everything.
        _mount("lamina", base, "tmpfs", _LOCKDOWN, "size=64k,nr_inodes=4096,mode=0755")
        names = ["layer", *(f"lower/{i}" for i in range(len(lowers))), "proc/self/fd"]
        for name in names:
            os.makedirs(f"{base}/{name}")
        _bind(held[0], f"{base}/layer", _LOCKDOWN)
        for i, fd in enumerate(held[1:-1]):
            _bind(fd, f"{base}/lower/{i}", _LOCKDOWN | _MS_RDONLY)
        _bind(held[-1], f"{base}/proc/self/fd", _LOCKDOWN | _MS_RDONLY)
        _mount(None, base, None, _MS_REMOUNT | _MS_BIND | _LOCKDOWN | _MS_RDONLY)
    finally:
        for fd in held:
            os.close(fd)
    os.chdir(base)
    _switch_root()
    os.chdir("/")
    return "/layer", [f"/lower/{i}" for i in range(len(lowers))]


def _switch_root() -> None:
    """Make the current directory the root and drop the old one (pivot_root, else chroot)."""
    if _PIVOT_ROOT is not None:
        if _libc.syscall(ctypes.c_long(_PIVOT_ROOT), b".", b".") == 0:
            libc.check(_libc.umount2(b".", _MNT_DETACH), "umount the old root")
            return
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: the root is rootfs (an initramfs)
            libc.check(-1, "pivot_root")
    _mount(".", "/", None, _MS_MOVE)
    os.chroot(".")


def drop_capabilities() -> None:
    """Keep only :data:`KEPT_CAPABILITIES` (of those this process has), for good: the
    bounding set too, and no_new_privs."""
    keep = sum(1 << cap for cap in KEPT_CAPABILITIES) & capabilities(permitted=True)
    for cap in range(_LAST_CAP + 1):
        if not keep >> cap & 1:
            libc.check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "drop a capability")
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = keep & 0xFFFFFFFF
    data[1].effective = data[1].permitted = keep >> 32
    libc.check(_libc.capset(ctypes.byref(header), data), "capset")
    libc.check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def capabilities(*, permitted: bool = False) -> int:
    """This process's effective (or permitted) capabilities, as a bit mask."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    libc.check(_libc.capget(ctypes.byref(header), data), "capget")
    field = "permitted" if permitted else "effective"
    return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32


class _NoImports:
    """An import hook that refuses every import (installed once the root is switched)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        raise ImportError(f"lamina: no import after the switch to the layer's root ({name})")


def seal() -> None:
    """Refuse imports from here on: whatever they found would come from the new root."""
    sys.meta_path.insert(0, _NoImports())
    sys.path[:] = []
    sys.path_importer_cache.clear()
