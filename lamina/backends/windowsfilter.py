"""The ``windowsfilter`` backend: Windows container layers stored on Linux.

The seed driver's layout, per layer: ``Files/``, ``Hives/``, ``UtilityVM/``,
``layerchain.json`` (the parent layers' directories, nearest first) and the id
redirect file (the seed writes ``layerId`` and reads ``layerID``, which only a
case-insensitive NTFS forgives; lamina spells it ``layerID`` both ways), plus the
tar-split record that lets ``diff`` give back the imported tar byte for byte
(:mod:`lamina.archive.wclayer`) and the BCD backups ``diff_getter`` serves.

For registries, scanners and cross-builds on Linux: ``get`` mounts a read-only
overlay of the chain's ``Files/`` (tombstones are overlay whiteouts), ``changes``
lists adds, modifications and deletions.  Windows containers themselves need
Windows: writable (sandbox) layers are ``Unsupported`` here.

Crash model: as :mod:`lamina.store.layers` — a layer is imported in staging, synced and
published by one rename.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from lamina import errors
from lamina.archive import isolate, wclayer
from lamina.archive.apply import lower_lookup
from lamina.archive.digests import Digests
from lamina.archive.export import open_stream
from lamina.backends.base import StoreDriver
from lamina.backends.contract import register_backend
from lamina.backends.reading import TreeGetter
from lamina.driver import Change, ChangeKind, DiffGetter, LayerId
from lamina.host import mount
from lamina.store.meta import LayerFormat

FILES, MERGED = "Files", "merged"


class WindowsFilterDriver(StoreDriver):
    """Windows container layers (see the module docstring)."""

    backend_name = "windowsfilter"
    layer_format = "windows"
    layout_marker: ClassVar[str] = FILES
    """What every layer directory of this backend holds (how a home's layers tell it)."""
    known_options: ClassVar[dict[str, str]] = {}
    content_only: ClassVar[tuple[str, ...] | None] = wclayer.ROOTS
    quota_unsupported: ClassVar[str | None] = "Windows sandboxes need Windows"
    new_format: ClassVar[LayerFormat] = LayerFormat.WINDOWS

    @classmethod
    def supported(cls, home: Path) -> str | None:
        """Why windowsfilter cannot work at ``home`` (it needs root for tombstones)."""
        return None if os.geteuid() == 0 else "windowsfilter needs root"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        home = Path(args[0] if args else kwargs["home"])
        reason = self.supported(home)
        if reason is not None:
            raise errors.Unsupported(reason, path=str(home))
        super().__init__(*args, **kwargs)


    # -- building -------------------------------------------------------------------

    def create_rw(self, id: str, parent: str | None = None, *, mount_label: str = "",
                  storage_opts: Any = None) -> None:
        raise errors.Unsupported("Windows container sandboxes need Windows", layer=id)

    def _populate(self, staged: Path, id: LayerId, parent: LayerId | None,
                  quota: int | None = None) -> dict[str, Any]:
        for root in wclayer.ROOTS:
            (staged / root).mkdir(mode=0o755)
        (staged / MERGED).mkdir(mode=0o700)
        # An empty record: an empty layer exports as an empty tar.
        (staged / wclayer.RECORD).write_text(_EMPTY_RECORD)
        return {}

    def _apply(self, staged: Path, id: LayerId, parent: LayerId | None, tar: BinaryIO,
               digests: Digests) -> int:
        parents = [self.store.layer_dir(p) for p in self._chain_of(parent)]
        # In the isolated child, as the Linux backends' applies (isolate's docstring).
        return isolate.import_windows_layer(staged, tar, parents=parents, layer=id)

    def _restage(self, staged: Path, id: LayerId) -> dict[str, Any]:
        raise errors.Unsupported("a Windows layer is imported once, not applied into",
                                 layer=id)

    def _chain_of(self, parent: LayerId | None) -> list[LayerId]:
        return [] if parent is None else [parent, *self.store.chain(parent)]

    def content_of(self, layer_dir: Path) -> Path:
        return layer_dir

    def _writable_dirs(self, id: LayerId) -> list[Path]:
        return []

    # -- views ------------------------------------------------------------------------

    def _files(self, id: LayerId) -> list[str]:
        return [str(self.store.layer_dir(p) / FILES)
                for p in [id, *self.store.chain(id)]]

    def _mount(self, id: LayerId, mount_label: str) -> Path:
        lowers = self._files(id)
        if len(lowers) == 1:
            return Path(lowers[0])
        target = self.store.layer_dir(id) / MERGED
        try:
            mount.mount_overlay(str(target), lowers, options=mount.MOUNT_OPTIONS)
        except OSError as e:
            raise errors.Unsupported(f"the kernel refused the union mount: {e}", layer=id,
                                     path=str(target)) from e
        return target

    def union_point(self, id: LayerId) -> Path | None:
        return self.store.layer_dir(id) / MERGED

    def needs_mount(self, id: LayerId) -> bool:
        return self.store.parent(id) is not None

    def _view(self, id: LayerId) -> Path:
        lowers = self._files(id)
        return Path(lowers[0]) if len(lowers) == 1 else self.store.layer_dir(id) / MERGED

    def _unmount(self, id: LayerId) -> None:
        try:
            mount.unmount(str(self.store.layer_dir(id) / MERGED))
        except OSError as e:
            raise errors.Busy(f"cannot unmount: {e}", layer=id) from e

    def metadata(self, id: str) -> dict[str, str]:
        lid = self.store.require(id)
        return {"dir": str(self.store.layer_dir(lid))}

    # -- changes ------------------------------------------------------------------------

    def _own(self, id: str, parent: str | None) -> LayerId:
        lid = self.store.require(id)
        _, own = self._diff_parent(lid, parent)
        if not own:
            raise errors.Unsupported("a Windows layer's diff is against its own parent only",
                                     layer=lid, path=parent)
        return lid

    def _stream_diff(self, id: str, parent: str | None) -> BinaryIO:
        lid = self._own(id, parent)
        return open_stream(wclayer.export(self.store.layer_dir(lid)))

    def _measure_diff(self, id: str, parent: str | None) -> int:
        return wclayer.data_size(self.store.layer_dir(self._own(id, parent)))

    def _find_changes(self, id: str, parent: str | None) -> list[Change]:
        lid = self._own(id, parent)
        lowers = [str(self.store.layer_dir(p) / FILES)
                  for p in self._chain_of(self.store.parent(lid))]
        out: list[Change] = []
        top = self.store.layer_dir(lid) / FILES
        for dirpath, dirs, files in os.walk(top):
            rel = os.path.relpath(dirpath, top)
            parts = [] if rel == "." else rel.split("/")
            for name in sorted(dirs + files):
                st = os.lstat(os.path.join(dirpath, name))
                path = "/" + "/".join([*parts, name])
                below = lower_lookup(lowers, [*parts, name]) if lowers else None
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    out.append(Change(path, ChangeKind.DELETE))
                elif below is None:
                    out.append(Change(path, ChangeKind.ADD))
                else:
                    out.append(Change(path, ChangeKind.MODIFY))
        out.sort()
        return out

    def _open_getter(self, id: str) -> DiffGetter:
        lid = self.store.require(id)
        return MutatedFilesGetter(self.store.layer_dir(lid), lid)

    def status(self) -> list[tuple[str, str]]:
        return [*super().status(), ("Layer Format", "Windows (Files/, Hives/, UtilityVM/)")]


_EMPTY_RECORD = json.dumps({"end": base64.b64encode(bytes(1024)).decode()}) + "\n"


class MutatedFilesGetter(TreeGetter):
    """The layer's files by path; the BCD files from the backups made at import."""

    def get(self, path: str) -> BinaryIO:
        backup = wclayer.MUTATED.get(path.strip("/").replace("\\", "/"))
        if backup is not None and (self.root / backup).is_file():
            return open(self.root / backup, "rb")
        return super().get(path)


register_backend("windowsfilter", WindowsFilterDriver)
