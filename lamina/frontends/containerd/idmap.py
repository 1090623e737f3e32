"""containerd's id-mapping labels: a user-namespaced container's snapshot, mapped.

containerd >= 2.0 passes a snapshotter that declares the ``remap-ids`` capability
(``capabilities = ["remap-ids"]`` in its ``[proxy_plugins.NAME]``) the labels
``containerd.io/snapshot/uidmapping`` and ``containerd.io/snapshot/gidmapping`` on the
``Prepare`` (or ``View``) of a container's root filesystem, instead of making a chowned
copy of every layer (its ``<digest>-remap`` snapshot).  Each is a comma-separated list
of ``CONTAINER:HOST:SIZE`` ranges (``0:100000:65536``), as ``ctr run --uidmap`` and the
CRI's pods with a user namespace give them.  containerd's overlayfs answers with the
new snapshot's upper directory owned by the *mapped root* (the host ids of container
ids 0) and ``uidmap=``/``gidmap=`` options first in its mounts, which containerd's
mount code turns into an idmapped mount of the lower layers (of a bind's target).

This module reads and judges the labels; the snapshotter does the rest.  The labels
come from any client of containerd's API, so they are judged as the kernel will judge
the map of the user namespace containerd makes from them (``user_namespaces(7)``):
ranges of decimal ids below 2**32-1, at most :data:`MAX_RANGES`, none of size 0,
none overlapping another on either side, container id 0 mapped (there must be a mapped
root to own the upper), and both labels or neither (containerd mounts idmapped only
with both).  Anything else is ``InvalidArgument`` naming the snapshot key.  In a user
namespace (rootless) a mapping is ``Unsupported``: idmapped mounts are real root's.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

from lamina import errors
from lamina.host import userns
from lamina.host.idmapped import IdMapping, IdRange

__all__ = ["GID_LABEL", "UID_LABEL", "IdMapping", "mapping_of"]

UID_LABEL = "containerd.io/snapshot/uidmapping"
GID_LABEL = "containerd.io/snapshot/gidmapping"
MAX_RANGES = 340
"""The kernel's bound on the ranges of one user namespace's map (since Linux 4.15)."""
NO_ID = (1 << 32) - 1
"""``(uid_t) -1``: no id, and the bound every mapped id stays below."""
_RANGE = re.compile(r"([0-9]{1,10}):([0-9]{1,10}):([0-9]{1,10})")

def mapping_of(labels: Mapping[str, str], key: str) -> IdMapping | None:
    """The id mapping snapshot ``key``'s ``labels`` ask for (None: none), once judged
    (the module docstring); ``InvalidArgument`` naming ``key`` otherwise."""
    uid_text, gid_text = labels.get(UID_LABEL), labels.get(GID_LABEL)
    if uid_text is None and gid_text is None:
        return None
    if uid_text is None or gid_text is None:
        given, missing = (UID_LABEL, GID_LABEL) if gid_text is None else (GID_LABEL, UID_LABEL)
        raise errors.InvalidArgument(
            f"snapshot {key!r}: label {given} without {missing} (an id mapping needs both)")
    if userns.IN_USER_NAMESPACE:
        raise errors.Unsupported(
            f"snapshot {key!r}: id-mapped snapshots need idmapped mounts, which root of a "
            "user namespace cannot make (lamina declares no remap-ids here)")
    return IdMapping(uid_text, gid_text, _ranges(uid_text, "uid", key),
                     _ranges(gid_text, "gid", key))


def _ranges(text: str, what: str, key: str) -> tuple[IdRange, ...]:
    """The ranges of one label, judged."""
    def bad(why: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"snapshot {key!r}: {what} mapping {text[:80]!r}: {why}")

    parts = text.split(",")
    if len(parts) > MAX_RANGES:
        raise bad(f"{len(parts)} ranges (the kernel maps at most {MAX_RANGES})")
    ranges: list[IdRange] = []
    for part in parts:
        found = _RANGE.fullmatch(part)
        if found is None:
            raise bad(f"range {part[:40]!r} is not CONTAINER:HOST:SIZE (decimal ids)")
        c, h, n = (int(g) for g in found.groups())
        if n == 0:
            raise bad(f"range {part!r} is empty")
        if c + n > NO_ID or h + n > NO_ID:
            raise bad(f"range {part!r} goes past id {NO_ID - 1}")
        ranges.append((c, h, n))
    for side, name in ((0, "container"), (1, "host")):
        spans = sorted((r[side], r[side] + r[2]) for r in ranges)
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise bad(f"{name} ids {start}..{end - 1} are mapped twice (ranges overlap)")
    if not any(c == 0 for c, _, _ in ranges):
        raise bad("container id 0 is not mapped (no root to own the snapshot)")
    return tuple(ranges)
