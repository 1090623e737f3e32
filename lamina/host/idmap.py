"""Owner translation through uid/gid maps (Docker's idtools maps).

A map is a list of ``(container_id, host_id, size)`` ranges.  Applying a layer
translates the tar's owners to host owners; exporting translates back.  An owner
that no range covers is refused, as Docker refuses it.

``squash``: in a user namespace, an owner the namespace does not map becomes its root
(:func:`lamina.host.userns.squashed`) instead of failing the apply: the only way a
namespace of one id (``unshare --map-root-user`` without subordinate ids) takes a layer
of several owners, at the cost of those owners (the option ``apply.squash_owners``).
"""

from __future__ import annotations

from collections.abc import Sequence

from lamina.errors import InvalidArgument, UnsafeArchive
from lamina.host import userns

IdRanges = Sequence[tuple[int, int, int]]


def _check(ranges: IdRanges | None, what: str) -> tuple[tuple[int, int, int], ...]:
    if ranges is None:
        return ()
    out = []
    for item in ranges:
        try:
            cid, hid, size = (int(v) for v in item)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"bad {what} entry {item!r}: want (container, host, size)"
            ) from None
        if cid < 0 or hid < 0 or size <= 0:
            raise InvalidArgument(f"bad {what} entry {item!r}")
        out.append((cid, hid, size))
    return tuple(out)


def _translate(ranges: tuple[tuple[int, int, int], ...], value: int, reverse: bool) -> int | None:
    for cid, hid, size in ranges:
        src, dst = (hid, cid) if reverse else (cid, hid)
        if src <= value < src + size:
            return dst + value - src
    return None


class IdMapper:
    """Translates owners between a layer tar and the host."""

    def __init__(self, uid_map: IdRanges | None = None, gid_map: IdRanges | None = None,
                 *, squash: bool = False) -> None:
        self.uids = _check(uid_map, "uid_map")
        self.gids = _check(gid_map, "gid_map")
        self.squash = squash and userns.IN_USER_NAMESPACE  # elsewhere every id is mapped

    @property
    def identity(self) -> bool:
        """Whether no translation happens."""
        return not self.uids and not self.gids and not self.squash

    @property
    def maps_ids(self) -> bool:
        """Whether uid or gid maps translate owners (Docker's remapped root)."""
        return bool(self.uids or self.gids)

    def to_host(self, uid: int, gid: int, layer: str | None, path: str) -> tuple[int, int]:
        """The host owner for a tar owner; refused when a map does not cover it."""
        if self.identity:
            return uid, gid
        hu = _translate(self.uids, uid, False) if self.uids else uid
        hg = _translate(self.gids, gid, False) if self.gids else gid
        if hu is None or hg is None:
            raise UnsafeArchive(f"owner {uid}:{gid} cannot be mapped to a host owner",
                                layer=layer, path=path)
        return userns.squashed(hu, hg) if self.squash else (hu, hg)

    def to_container(self, uid: int, gid: int) -> tuple[int, int]:
        """The tar owner for a host owner; an unmapped one becomes the overflow id 65534, as
        the kernel shows it inside a user namespace."""
        if self.identity:
            return uid, gid
        cu = _translate(self.uids, uid, True) if self.uids else uid
        cg = _translate(self.gids, gid, True) if self.gids else gid
        return (65534 if cu is None else cu), (65534 if cg is None else cg)
