"""The union of overlay lower layers, as the applier and the backends see it.

A layer is written over its parent's lowers (overlay diff dirs, nearest first).  A
whiteout (a 0/0 character device, spelled ``.wh.NAME`` in a tar) hides a lower's
name; an opaque directory (the ``trusted.overlay.opaque`` xattr, ``user.overlay.opaque``
in a user namespace, ``.wh..wh..opq`` in a tar) hides everything the lowers have below
it.  :func:`lower_lookup` answers what the union shows at a path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from lamina.host.userns import OVERLAY_XATTR_PREFIX

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = OVERLAY_XATTR_PREFIX + "opaque"
"""The opaque xattr of the layers this process writes: ``trusted.overlay.opaque``, or
``user.overlay.opaque`` in a user namespace (overlayfs' ``userxattr``)."""


def is_whiteout(st: os.stat_result) -> bool:
    """Whether ``st`` is an overlay whiteout (a 0/0 character device)."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque(fd: int) -> bool:
    """Whether the directory ``fd`` is marked opaque for overlayfs."""
    try:
        return os.getxattr(fd, OVERLAY_OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def lower_lookup(lowers: Sequence[str], parts: Sequence[str]) -> tuple[str, os.stat_result] | None:
    """What the union of ``lowers`` (overlay diff dirs, nearest first) has at ``parts``.

    Returns the path in the lower that provides it and its lstat, or None where
    no lower has it (missing, whited out, or hidden by an opaque directory).
    The parts are a path already resolved in the union, so no symlink is followed.
    """
    for lower in lowers:
        path = lower
        hidden = False
        for i, part in enumerate(parts):
            path = f"{path}/{part}"
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                break  # this lower lacks it; a deeper one may have it
            if is_whiteout(st):
                return None
            if i == len(parts) - 1:
                return path, st
            if not stat.S_ISDIR(st.st_mode):
                return None  # a non-directory in the way: the union has no such path
            if opaque_path(path):
                hidden = True
        else:
            continue
        if hidden:
            return None
    return None


def opaque_path(path: str) -> bool:
    """:func:`opaque`, for a directory named by a path (not followed if a link)."""
    try:
        return os.getxattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False
