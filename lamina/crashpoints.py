"""Named places where a test can kill this process, to prove the crash model.

``LAMINA_CRASH_AT=NAME`` (or ``NAME:N``, the N-th time NAME is reached) makes
:func:`reached` SIGKILL the process there, the harshest way a process can stop
short of a power cut.  Without the variable, :func:`reached` is one comparison.
The crash harness (tests/crash/) walks every name listed in :data:`POINTS`.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "publish:before-rename",  # a new layer is complete and synced, not yet visible
    "publish:after-rename",  # visible; the layers dir not yet fsynced
    "swap:before-exchange",  # an apply into an existing layer, before the swap
    "swap:after-exchange",  # swapped; the old content still in staging
    "retire:before-rename",  # a removal, before its commit point
    "retire:after-rename",  # renamed to ID-removing, not yet deleted
    "remove:deleting",  # part of ID-removing deleted
    "apply:entry",  # in the middle of applying a tar (every entry)
    "index:entry",  # in the middle of indexing a tar as an EROFS layer (every entry)
    "get:after-mount",  # mounted, the count not yet written
    "put:after-unmount",  # unmounted, the count not yet written
    "diff:chunk",  # while a diff is being streamed
    "atomic-write:before-rename",  # a metadata file written, not yet renamed
)

IMAGE_POINTS = (
    "blob:before-rename",  # a blob written and synced, not yet in blobs/ (image load)
    "image:layer-applied",  # one of an image's layers applied, the image not yet named
    "image:before-name",  # every layer there, the name not yet written (its commit point)
)
"""The image store's points (tests/crash/test_image_kills.py walks them)."""

HOLD_POINTS = (
    "holds:before-forget",  # a layer's holders about to be the API alone (the file goes)
)
"""The holds' points (tests/crash/test_holds_kills.py walks them with the others)."""

_TARGET = os.environ.get("LAMINA_CRASH_AT", "")
# Point names hold one colon; a second one adds the count.
_name, _sep, _count = _TARGET.rpartition(":") if _TARGET.count(":") == 2 else (_TARGET, "", "")
_left = int(_count) if _count.isdigit() else 1


_LOG = os.environ.get("LAMINA_CRASH_LOG", "")
"""A file each point reached is appended to, a line each (tests survey an operation)."""


def reached(name: str) -> None:
    """Die here (SIGKILL) if the environment names this point."""
    global _left
    if _LOG:
        try:
            with open(_LOG, "a") as f:
                f.write(name + "\n")
        except OSError:
            pass  # in the isolated child, whose root holds no such file

    if not _TARGET or name != _name:
        return
    _left -= 1
    if _left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
