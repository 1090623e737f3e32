"""Idmapped mounts (Linux >= 5.12; overlay lowers on them >= 5.19), through ctypes syscalls.

An idmapped mount shows a directory with its owners shifted by a user namespace's map:
a file of uid 0 on disk is seen as the mapped root's (``0:100000:65536``: uid 100000),
so a user-namespaced container sees its image's files as its root's without a byte of
the layer being chowned.  containerd makes them itself for its overlayfs' lowers; lamina
makes them where containerd's way cannot see a layer (an EROFS layer's image, a mount
of its own: :meth:`lamina.backends.overlay.OverlayDriver.snapshot_mounts`).

- :class:`IdMapping`: a uid and a gid map (``CONTAINER:HOST:SIZE`` ranges).
- :func:`userns_fd`: a user namespace with that map, as a file descriptor (the kernel
  takes the map from a namespace, not from a list): a short-lived ``unshare --user``
  child's, its map written by this (root) process, the child gone once it is open.
- :func:`idmap_bind`: a read-only idmapped clone of a directory (or of a mount's root)
  attached at a mount point (``open_tree`` + ``mount_setattr`` + ``move_mount``).

Crash model: mounts do not survive a reboot; one left by a process that died is found
and detached by its owner's sweep (the snapshotter's, on open and on close).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from dataclasses import dataclass

from lamina.host import libc
from lamina.host.mount import AT_FDCWD, MOUNT_ATTR_RDONLY, MOVE_MOUNT_F_EMPTY_PATH

_libc = libc.load()
# The unified syscall table: the same numbers on every architecture.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, 0o2000000
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_IDMAP = 0x00100000
MS_PRIVATE = 1 << 18

IdRange = tuple[int, int, int]
"""One range of a map: container id, host id, size."""


@dataclass(frozen=True)
class IdMapping:
    """A uid and a gid map, with the text they came as (containerd's labels)."""

    uid_text: str
    gid_text: str
    uids: tuple[IdRange, ...]
    gids: tuple[IdRange, ...]

    def root(self) -> tuple[int, int]:
        """The host uid and gid of the container's root (who owns the upper)."""
        return _to_host(0, self.uids), _to_host(0, self.gids)

    def options(self) -> tuple[str, str]:
        """The mount options containerd turns into idmapped mounts (its overlayfs puts
        the labels' text there as it came)."""
        return f"uidmap={self.uid_text}", f"gidmap={self.gid_text}"


def _to_host(cid: int, ranges: tuple[IdRange, ...]) -> int:
    return next(h + cid - c for c, h, n in ranges if c <= cid < c + n)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def userns_fd(mapping: IdMapping, timeout: float = 10.0) -> int:
    """A file descriptor of a new user namespace mapped by ``mapping`` (close it)."""
    child = subprocess.Popen(["unshare", "--user", "--", "sleep", "60"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + timeout
        while True:  # until the child has its namespace (unshare runs before its exec)
            try:
                if os.readlink(f"/proc/{child.pid}/ns/user") != own:
                    break
            except FileNotFoundError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                err = child.stderr.read().decode(errors="replace") if child.stderr else ""
                raise OSError(f"unshare --user did not make a user namespace: {err.strip()}")
            time.sleep(0.001)
        for name, ranges in (("uid_map", mapping.uids), ("gid_map", mapping.gids)):
            with open(f"/proc/{child.pid}/{name}", "w", encoding="ascii") as f:
                f.write("".join(f"{c} {h} {n}\n" for c, h, n in ranges))
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()
        if child.stderr:
            child.stderr.close()


def idmap_bind(source: str, target: str, ns_fd: int) -> None:
    """Attach at ``target`` (a directory) a read-only clone of ``source`` (not of the
    mounts below it) whose owners are shifted by user namespace ``ns_fd``'s map."""
    tree = libc.check(_libc.syscall(SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD),
                                    ctypes.c_char_p(os.fsencode(source)),
                                    ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)),
                      f"open_tree {source}")
    try:
        # Private before it is attached: a clone keeps its source's peer group, and a
        # clone of a shared mount (a home under one, as the engines' work directories
        # are, or an EROFS layer's mount there) would then take mounts and give them
        # back through it: the idmapped clone showed up on the layer's own diff/.
        attr = _MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, 0, MS_PRIVATE, ns_fd)
        libc.check(_libc.syscall(SYS_MOUNT_SETATTR, ctypes.c_int(tree), ctypes.c_char_p(b""),
                                 ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr),
                                 ctypes.c_size_t(ctypes.sizeof(attr))),
                   f"mount_setattr (idmap) {source}")
        libc.check(_libc.syscall(SYS_MOVE_MOUNT, ctypes.c_int(tree), ctypes.c_char_p(b""),
                                 ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(target)),
                                 ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
                   f"move_mount {target}")
    finally:
        os.close(tree)
