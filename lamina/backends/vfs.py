"""The ``vfs`` backend: every layer is a full copy of its tree (Docker's vfs driver).

A new layer starts as a copy of its parent's tree (reflinks where the backing
filesystem has them, else ``copy_file_range``), kept in ``layers/ID/fs``.  Its
union view is that directory, so ``get`` only counts.  Changes are found by
comparing the tree with its parent's (:mod:`lamina.archive.naivediff`).

Crash model: as :mod:`lamina.store.layers` — a layer is built and synced in staging
and published by one rename; an apply into an existing layer builds a new copy
and swaps it in atomically.  Nothing is mounted, so there is nothing to recover
beyond what the store sweeps.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from lamina import errors
from lamina.archive import isolate, naivediff
from lamina.archive.digests import Digests
from lamina.archive.export import change_items, export_changes
from lamina.backends.base import StoreDriver
from lamina.backends.contract import SnapshotMount, bind, register_backend
from lamina.backends.reading import TreeGetter
from lamina.driver import Change, ChangeKind, DiffGetter, LayerId
from lamina.host import fsutil
from lamina.host import quota as quotas
from lamina.host.idmapped import IdMapping
from lamina.host.usage import Tally, Totals, tree_totals
from lamina.options import APPLY_OPTIONS

FS = "fs"


class VfsDriver(StoreDriver):
    """Layers as full directory trees (see the module docstring)."""

    backend_name = "vfs"
    layout_marker: ClassVar[str] = FS
    """What every layer directory of this backend holds (how a home's layers tell it)."""
    known_options: ClassVar[dict[str, str]] = {
        **APPLY_OPTIONS,
        "vfs.copy": "reflink (default: reflink where possible) or copy",
        "vfs.size": "default size quota of writable layers (Docker's units: 50M, 1.5GB)",
    }

    def _recover(self) -> None:
        if self.options.get("vfs.copy", "reflink") not in ("reflink", "copy"):
            raise errors.InvalidArgument(
                f"vfs.copy must be reflink or copy, not {self.options['vfs.copy']!r}"
            )

    @classmethod
    def supported(cls, home: Path) -> str | None:
        """Why vfs cannot work at ``home`` (never: it needs nothing special)."""
        return None

    def _check_depth(self, id: LayerId, parent: LayerId | None, rw: bool) -> None:
        # Called before anything of a new layer is written: refuse here what cannot be.
        self._require_writer(id)

    def _require_writer(self, id: LayerId) -> None:
        """``Unsupported`` when this process cannot write layers (see :func:`writer_problem`)."""
        problem = writer_problem()
        if problem is not None:
            raise errors.Unsupported(problem, layer=id)

    @property
    def _reflink(self) -> bool:
        return self.options.get("vfs.copy", "reflink") != "copy"

    def _tree(self, id: LayerId) -> Path:
        capped = self.quotas.capped_space(id)  # a loop-capped layer's tree is in its image
        return (capped or self.store.layer_dir(id)) / FS

    # -- building ---------------------------------------------------------------

    def _populate(
        self, staged: Path, id: LayerId, parent: LayerId | None, quota: int | None = None
    ) -> dict[str, Any]:
        # A capped layer's quota comes on top of its copy of the parent.
        loop = quota is not None and self.quotas.mechanism == quotas.LOOP
        base = tree_totals(self._tree(parent)).disk if loop and parent is not None else 0
        space, cap = self.quotas.start(staged, quota, base)
        fields: dict[str, Any] = {} if cap is None else {"quota": cap}
        tree = space / FS
        tree.mkdir(mode=0o755)
        project = cap.project if cap is not None else None
        if project is not None:
            quotas.set_project(tree, project)  # before the copy, so that it is charged
        if parent is not None:
            fsutil.copy_tree(self._tree(parent), tree, reflink=self._reflink)
        else:
            uid, gid = self.ids.to_host(0, 0, id, "/")
            os.chown(tree, uid, gid)
        if project is not None and quota is not None:
            used, _ = quotas.usage(tree, project)
            quotas.set_limit(tree, project, used + quota)
            assert cap is not None
            cap.base = used
        # Files touched after this instant may differ from the parent in content only.
        return {"touched_ns": self.store.now_ns(staged), **fields}

    def content_of(self, layer_dir: Path) -> Path:
        if (layer_dir / quotas.IMAGE).is_file():  # a loop-capped layer's tree: in its image
            return layer_dir / quotas.IMAGE_MOUNT / FS
        return layer_dir / FS

    def _writable_dirs(self, id: LayerId) -> list[Path]:
        return [self._tree(id)]

    def _restage(self, staged: Path, id: LayerId) -> dict[str, Any]:
        self._require_writer(id)
        tree = staged / FS
        tree.mkdir(mode=0o755)
        fsutil.copy_tree(self._tree(id), tree, reflink=self._reflink)
        return {"touched_ns": self.store.now_ns(staged)}

    def _apply(self, staged: Path, id: LayerId, parent: LayerId | None, tar: BinaryIO,
               digests: Digests) -> int:
        return isolate.apply_layer(staged / FS, tar, layer=id, ids=self.ids, digests=digests,
                                   **self.apply_limits)

    # -- views --------------------------------------------------------------------

    def _mount(self, id: LayerId, mount_label: str) -> Path:
        return self._tree(id)

    def _view(self, id: LayerId) -> Path:
        return self._tree(id)

    def _unmount(self, id: LayerId) -> None:
        pass

    def metadata(self, id: str) -> dict[str, str]:
        lid = self.store.require(id)
        return {"dir": str(self._tree(lid))}

    # -- changes ------------------------------------------------------------------

    def _find_changes(self, id: str, parent: str | None) -> list[Change]:
        lid = self.store.require(id)
        pid, own = self._diff_parent(lid, parent)
        touched = self.store.meta(lid).backend.get("touched_ns") if own else None
        return naivediff.changes(
            self._tree(pid) if pid is not None else None,
            self._tree(lid),
            touched_ns=touched if isinstance(touched, int) else None,
        )

    def _measure_diff(self, id: str, parent: str | None) -> int:
        lid = self.store.require(id)
        return naivediff.size_of(self._tree(lid), self._find_changes(lid, parent))

    def _stream_diff(self, id: str, parent: str | None) -> BinaryIO:
        lid = self.store.require(id)
        items = change_items(self._find_changes(lid, parent))
        return export_changes(self._tree(lid), items, layer=lid, ids=self.ids)

    def _open_getter(self, id: str) -> DiffGetter:
        lid = self.store.require(id)
        return TreeGetter(self._tree(lid), lid)

    def status(self) -> list[tuple[str, str]]:
        copy = "copy" if self.options.get("vfs.copy") == "copy" else "reflink where possible"
        writes = writer_problem()
        return [*super().status(), ("Copy", copy), ("Native Diff", "false"),
                *([("Writes", f"refused: {writes}")] if writes else [])]

    # -- snapshotter hooks (lamina.frontends.containerd) --------------------------------

    def snapshot_mounts(self, id: LayerId, *, writable: bool,
                        idmap: IdMapping | None = None) -> list[SnapshotMount]:
        """A bind of the layer's tree: a vfs layer holds its whole union view.  Not
        idmapped: containerd 2.1 idmaps a writable bind's target but leaves a read-only
        one as it is (``core/mount/mount_linux.go`` returns after the read-only
        remount), and a vfs container's writes would land in the layer as container ids
        where overlay's land in the mapped range; rather than serve mappings by halves,
        vfs refuses them."""
        if idmap is not None:
            raise errors.Unsupported(
                "vfs cannot serve an id-mapped snapshot (its mounts are binds of whole "
                "trees): use the overlay backend for user-namespaced containers", layer=id)
        return [bind(self._tree(id), writable=writable)]

    def snapshot_usage(self, id: LayerId) -> Totals:
        """What a layer's changes over its parent take (its tree is a whole copy)."""
        kept = self.store.meta(id).usage
        if kept is not None:
            return kept  # kept by layers sealed before sealing stopped counting
        tree = self._tree(id)
        tally = Tally()
        # Not self.changes: its lease would wait for the layer lock that seal (Commit)
        # holds while it calls this.
        for change in self._find_changes(id, None):
            if change.kind is not ChangeKind.DELETE:
                with contextlib.suppress(FileNotFoundError):
                    tally.add(os.lstat(f"{tree}{change.path}"))
        return tally.totals()


CAP_CHOWN = 0


def writer_problem() -> str | None:
    """Why this process cannot write vfs layers (None: it can).  A layer's files keep the
    owners its tar gives them (root's, mostly), which takes ``CAP_CHOWN``: without it
    (not root) every write would fail half-way, so none is begun."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            caps = next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")),
                        None)
    except (OSError, ValueError):
        caps = None
    if (os.geteuid() == 0) if caps is None else bool(caps >> CAP_CHOWN & 1):
        return None
    return ("writing vfs layers needs root (CAP_CHOWN): their files keep the owners the "
            "layer tar gives them")


register_backend("vfs", VfsDriver)
