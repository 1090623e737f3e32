"""What the backends do for containerd's snapshots (``lamina snapshotter``), in one place.

The :class:`~lamina.backends.base.StoreDriver` methods in its "snapshotter hooks"
section call these: recording a layer's diff id and chain id when a tar is applied
(:mod:`lamina.archive.diffid`), and keeping a layer that snapshots use when another
front end removes it (the holds of :mod:`lamina.store.snapshots`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from lamina import errors
from lamina.archive.diffid import DigestingReader, chain_id
from lamina.driver import LayerId
from lamina.host import fsutil
from lamina.store import snapshots
from lamina.store.layers import Store
from lamina.store.meta import LayerMeta


class SnapshotMount(NamedTuple):
    """One mount of a snapshot, as containerd's ``Mount`` message carries it."""

    type: str
    source: str
    options: tuple[str, ...]


def bind(path: Path | str, *, writable: bool) -> SnapshotMount:
    """A bind mount of one directory (containerd's ``rbind`` and ``rw``/``ro``)."""
    return SnapshotMount("bind", str(path), ("rbind", "rw" if writable else "ro"))


def identify(store: Store, meta: LayerMeta, tar: BinaryIO, *, replacing: bool) -> dict[str, Any]:
    """The ``diff_id`` and ``chain_id`` fields of a read-only layer ``tar`` was applied into
    (none for a writable layer, or when the layer had content before: ``replacing``)."""
    if not isinstance(tar, DigestingReader) or meta.rw:
        return {}
    if replacing and _had_content(meta):
        return {}
    diff = tar.diff_id()
    out: dict[str, Any] = {"diff_id": diff}
    parent_chain: str | None = None
    if meta.parent is not None:
        found = store.meta(meta.parent).fields.get("chain_id")
        if not isinstance(found, str):
            return out  # a parent of unknown content: no chain id
        parent_chain = found
    out["chain_id"] = chain_id(parent_chain, diff)
    return out


def _had_content(meta: LayerMeta) -> bool:
    """Whether layer ``meta`` had content of its own before an apply into it.  Docker
    creates a layer, then applies into it: on vfs the created layer is a copy of its
    parent (totals of the whole tree, but a size of 0: nothing applied into it yet),
    which is not content of its own."""
    if "diff_id" in meta.fields:
        return True
    if not meta.totals or not meta.totals.inodes:
        return False
    return not (meta.size == 0 and meta.parent is not None)


def kept_for_snapshots(home: Path, id: LayerId) -> bool:
    """For ``Driver.remove`` (the layer's lock held): True when snapshots keep the layer
    (an adopted one's claim is released: the snapshots remove it with their last use);
    ``Busy`` for a layer the snapshotter made."""
    holds = home / "snapshots" / "holds"
    how = snapshots.read_hold(holds, id)
    if how is None:
        return False
    if how == snapshots.MADE:
        raise errors.Busy("layer is a containerd snapshot's (remove the snapshot)", layer=id)
    if how == snapshots.ADOPTED:
        fsutil.atomic_write(holds / id, snapshots.RELEASED.encode(), mode=0o600)
    return True
