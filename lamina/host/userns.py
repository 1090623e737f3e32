"""Where this process runs: the initial user namespace, or one of its own (rootless).

lamina as an ordinary user works inside a user namespace in which it is root
(``rootlesskit``, or ``unshare --user --map-root-user --map-auto --mount``): there
the kernel lets it chown to the ids the namespace maps, make overlay whiteouts and
mount overlayfs with ``userxattr``, whose own attributes are then ``user.overlay.*``
(``trusted.*`` needs root of the initial namespace).  EROFS images and project quotas
stay real root's.  Outside any namespace an ordinary user can keep no layers: every
command says so (:func:`why_not_privileged`) before it writes anything.

A process decides once, when this module is imported: it stays in the namespace it
started in (lamina's own jails enter only mount namespaces, as root).
"""

from __future__ import annotations

import functools
import os

RECIPE = ("run it as root, or as an ordinary user inside a user namespace: `rootlesskit "
          "lamina …`, or `unshare --user --map-root-user --map-auto --mount lamina …` "
          "(README, \"Without root\")")
"""How to run lamina where it can keep layers, for the refusals."""


def _ranges(path: str) -> tuple[tuple[int, int, int], ...] | None:
    """The ``(inside, outside, count)`` ranges of ``/proc/self/uid_map`` or ``gid_map``
    (None where it cannot be read: no /proc, taken as the initial namespace)."""
    try:
        with open(path, encoding="ascii") as f:
            return tuple((int(a), int(b), int(c))
                         for a, b, c in (line.split() for line in f if line.strip()))
    except (OSError, ValueError):
        return None


_UIDS = _ranges("/proc/self/uid_map")
_GIDS = _ranges("/proc/self/gid_map")
_WHOLE = ((0, 0, 4294967295),)

IN_USER_NAMESPACE = _UIDS is not None and _UIDS != _WHOLE
"""Whether this process runs in a user namespace other than the initial one."""

OVERLAY_XATTR_PREFIX = "user.overlay." if IN_USER_NAMESPACE else "trusted.overlay."
"""The prefix of overlayfs' own xattrs in the layers this process writes and reads."""

OVERLAY_MOUNT_OPTIONS: tuple[str, ...] = ("userxattr",) if IN_USER_NAMESPACE else ()
"""The overlay mount options the namespace needs (``userxattr``: Linux >= 5.11)."""


def _covers(ranges: tuple[tuple[int, int, int], ...] | None, value: int) -> bool:
    return ranges is None or any(start <= value < start + count for start, _, count in ranges)


def mapped(uid: int, gid: int) -> bool:
    """Whether this namespace maps owner ``uid:gid`` (always, in the initial one)."""
    return not IN_USER_NAMESPACE or (_covers(_UIDS, uid) and _covers(_GIDS, gid))


def squashed(uid: int, gid: int) -> tuple[int, int]:
    """``uid:gid`` with each id this namespace does not map replaced by its root's (0):
    the owner a file can have here (podman's ``ignore_chown_errors``)."""
    return (uid if _covers(_UIDS, uid) else 0), (gid if _covers(_GIDS, gid) else 0)


@functools.cache
def mapped_ids() -> str:
    """The ids this namespace maps, for messages: ``uids 0-65536, gids 0-65536``."""
    def spans(ranges: tuple[tuple[int, int, int], ...] | None) -> str:
        return ", ".join(f"{a}-{a + c - 1}" if c > 1 else str(a) for a, _, c in ranges or ())
    return f"uids {spans(_UIDS)}, gids {spans(_GIDS)}"


def why_not_privileged() -> str | None:
    """Why this process cannot keep layers at all (None: it can): it is neither root
    nor root of a user namespace."""
    if os.geteuid() == 0:
        return None
    where = "in its user namespace" if IN_USER_NAMESPACE else "outside a user namespace"
    return f"cannot keep layers as uid {os.geteuid()} {where}: {RECIPE}"
