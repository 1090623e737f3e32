"""What a lamina backend owes, in one place: the :class:`Backend` interface.

A backend is a way of keeping layers in a home (``overlay``: overlayfs diff
directories; ``vfs``: full copies; ``windowsfilter``: Windows layers).  It owes:

1. **The graph driver calls** of :class:`lamina.driver.Driver` (Docker's contract).
   :class:`lamina.backends.base.StoreDriver` implements them once for every backend,
   over a :class:`lamina.store.layers.Store`, with the crash-safe orderings; a backend
   subclasses it and fills in the hooks below.
2. **Capability probes**, asked before any home is opened (by
   :mod:`lamina.registry`): the kind of layers it keeps (:attr:`Backend.layer_format`),
   what its layer directories hold (:attr:`Backend.layout_marker`, how a home that
   lost its ``lamina.json`` tells its backend) and whether it can work at a home
   (:meth:`Backend.supported`, how ``auto`` picks one).
3. **Build hooks** (section "building"): how a new layer's directory is laid out, how
   a tar is applied into it, how a layer's content is copied for an apply into it.
4. **View hooks** ("views"): how a layer's union view is made and released; where a
   read-only layer's own content can be mounted from (:meth:`Backend.lower`: a
   directory today, an image mounted on demand tomorrow).
5. **Reading hooks** ("reading"): diff, changes, sizes and files of a layer, each
   called with a lease held on the layers read.
6. **What ``check`` and ``df`` see** ("checking"): where the layer's own content lies
   inside its directory, where its union is mounted, the backend's links in the home.
7. **What the front ends beyond the Driver calls use** ("layers"): a layer's typed
   record (:class:`lamina.store.meta.LayerMeta`), its holders (the image store and
   containerd's snapshots claim and release layers: :mod:`lamina.store.holds`),
   sealing a writable layer read-only in place, and the mounts containerd mounts.

Vocabulary (beyond :mod:`lamina.driver`'s): a layer's *directory* is
``HOME/layers/ID/``, which holds its *content* (``content_of``) and the backend's
bookkeeping; *staged* is the directory a layer is built in before it is published;
a *lower* is what an overlay mount takes for one read-only layer; a *holder* keeps a
layer from being deleted (:class:`lamina.store.holds.Holder`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, NamedTuple

from lamina import errors
from lamina.archive.digests import Digests
from lamina.driver import Change, DiffGetter, Driver, IdMap, LayerId
from lamina.host.idmapped import IdMapping
from lamina.host.usage import Totals
from lamina.store.holds import Holder
from lamina.store.layers import Store
from lamina.store.meta import LayerFormat, LayerMeta


class SnapshotMount(NamedTuple):
    """One mount of a snapshot, as containerd's ``Mount`` message carries it."""

    type: str
    source: str
    options: tuple[str, ...]


def bind(path: Path | str, *, writable: bool) -> SnapshotMount:
    """A bind mount of one directory (containerd's ``rbind`` and ``rw``/``ro``)."""
    return SnapshotMount("bind", str(path), ("rbind", "rw" if writable else "ro"))


class Backend(Driver, abc.ABC):
    """A lamina backend (see the module docstring for what each section owes)."""

    # -- capability probes ----------------------------------------------------------

    backend_name: ClassVar[str] = ""
    """The name it registers under (``String()``)."""
    layer_format: ClassVar[str] = "linux"
    """The kind of layers it keeps: ``linux``, or ``windows`` (never picked by auto)."""
    layout_marker: ClassVar[str] = ""
    """A name every layer directory of this backend holds."""
    known_options: ClassVar[Mapping[str, str]] = {}
    """The driver options it takes, with their help."""
    content_only: ClassVar[tuple[str, ...] | None] = None
    """The names in ``content_of()`` that are the layer's content (None: all of it)."""
    quota_unsupported: ClassVar[str | None] = None
    """Why this backend never caps a layer (None: it can, where the home allows)."""
    new_format: ClassVar[LayerFormat] = LayerFormat.DIR
    """The format of the layers it makes."""

    @classmethod
    @abc.abstractmethod
    def supported(cls, home: Path) -> str | None:
        """Why this backend cannot work at ``home`` (None: it can)."""

    @abc.abstractmethod
    def __init__(self, home: str | Path, options: Sequence[str] | Mapping[str, str] = (),
                 uid_map: IdMap | None = None, gid_map: IdMap | None = None) -> None:
        """Open (making it if needed) the store at ``home`` and recover it; ``options``
        are driver options (``KEY=VALUE``), the maps Docker's idtools maps.
        ``Unsupported`` where this backend cannot work."""

    store: Store

    # -- building -------------------------------------------------------------------

    @abc.abstractmethod
    def _populate(
        self, staged: Path, id: LayerId, parent: LayerId | None, quota: int | None = None
    ) -> dict[str, Any]:
        """Fill a new layer's staging dir; return backend fields for its metadata
        (``quota``: the bytes a writable layer may take, its ``size`` storage option)."""

    @abc.abstractmethod
    def _apply(self, staged: Path, id: LayerId, parent: LayerId | None, tar: BinaryIO,
               digests: Digests) -> int:
        """Apply an uncompressed tar into a layer being built in ``staged``; put the
        CRC-32s of the files it writes in ``digests``, where it can, for the manifest;
        return the tar's regular-file bytes."""

    def _apply_new(self, staged: Path, id: LayerId, parent: LayerId | None, tar: BinaryIO,
                   digests: Digests) -> tuple[int, LayerFormat]:
        """:meth:`_apply` into a new read-only layer, which a backend may keep in another
        format than its new layers' (overlay's EROFS); the bytes and the format."""
        return self._apply(staged, id, parent, tar, digests), self.new_format

    @abc.abstractmethod
    def _restage(self, staged: Path, id: LayerId) -> dict[str, Any]:
        """Copy live layer ``id``'s content into ``staged`` (for a replacing apply)."""

    @abc.abstractmethod
    def _writable_dirs(self, id: LayerId) -> list[Path]:
        """The directories a writable layer's content is written to (for project ids)."""

    def _check_depth(self, id: LayerId, parent: LayerId | None, rw: bool) -> None:
        """Refuse a layer deeper than the backend can serve (before anything is written)."""

    def _dirs_outside(self, staged: Path) -> list[Path]:
        """The directories outside its staging dir that a new layer's build wrote
        into: synced with the layer's files, for a layer synced file by file."""
        return []

    def _abandon(self, staged: Path, id: LayerId) -> None:
        """Undo what a build that failed made outside its staging dir (nothing, here)."""

    def _recover(self) -> None:
        """Backend recovery on open (stale mounts and the like)."""

    # -- views ----------------------------------------------------------------------

    @abc.abstractmethod
    def _mount(self, id: LayerId, mount_label: str) -> Path:
        """Make ``id``'s union view available (first get; its mount lock held)."""

    @abc.abstractmethod
    def _unmount(self, id: LayerId) -> None:
        """Release ``id``'s union view (last put; its mount lock held)."""

    @abc.abstractmethod
    def _view(self, id: LayerId) -> Path:
        """Where ``id``'s union view is while it is mounted."""

    def lower(self, id: LayerId) -> Path:
        """Where read-only layer ``id``'s own content can be mounted from (an overlay
        lower): by default its content directory."""
        return self.content_of(self.store.layer_dir(id))

    # -- reading (each called with a lease on the layers read) ----------------------------

    @abc.abstractmethod
    def _stream_diff(self, lid: LayerId, parent: str | None) -> BinaryIO:
        """:meth:`diff` of ``lid``."""

    @abc.abstractmethod
    def _find_changes(self, lid: LayerId, parent: str | None) -> list[Change]:
        """:meth:`changes` of ``lid``."""

    @abc.abstractmethod
    def _measure_diff(self, lid: LayerId, parent: str | None) -> int:
        """:meth:`diff_size` of ``lid``."""

    @abc.abstractmethod
    def _open_getter(self, lid: LayerId) -> DiffGetter:
        """:meth:`diff_getter` of ``lid``."""

    # -- checking (what check and df see) -------------------------------------------------

    @abc.abstractmethod
    def content_of(self, layer_dir: Path) -> Path:
        """The layer's own content inside its directory (live or staged)."""

    @abc.abstractmethod
    def record_manifest(self, layer_dir: Path, digests: Digests | None = None) -> Totals:
        """Record what a read-only layer holds (for ``check``); its totals (for ``df``)."""

    def verify_layer(self, id: LayerId, meta: LayerMeta) -> str | None:
        """What is wrong with read-only layer ``id`` beyond its manifest (an EROFS
        layer's tar against its diff id, its image's mount); None: nothing."""
        return None

    def union_point(self, id: LayerId) -> Path | None:
        """Where ``id``'s union view is mounted while in use (None: never a mount)."""
        return None

    def needs_mount(self, id: LayerId) -> bool:
        """Whether ``id``'s view, while counted, is a mount at :meth:`union_point`."""
        return False

    def stray_links(self) -> list[str]:
        """The backend's links in the home that lead to no layer (none by default)."""
        return []

    def sweep_links(self) -> list[str]:
        """Remove the stray links that no builder still needs; the ones removed."""
        return []

    @abc.abstractmethod
    def discard(self, id: LayerId) -> None:
        """Remove a damaged layer whatever its metadata says (a repair, children first)."""

    # -- layers: what the image store and the snapshotter use ------------------------------

    @abc.abstractmethod
    def record(self, id: str) -> LayerMeta:
        """Layer ``id``'s typed record (``NotFound``, ``Corrupt``)."""

    @abc.abstractmethod
    def with_chain(self, chain: str, parent: LayerId | None) -> LayerId | None:
        """A read-only layer of chain id ``chain`` on layer ``parent``, if there is one."""

    @abc.abstractmethod
    def chained(self) -> Iterator[tuple[LayerId, LayerMeta]]:
        """Every layer that has a chain id, with its record."""

    @abc.abstractmethod
    def make(self, id: LayerId, parent: LayerId | None, *, writable: bool,
             holder: Holder) -> None:
        """A new empty layer (as :meth:`create` or :meth:`create_rw`) held by ``holder``
        alone from the start (the snapshotter's layers: no API hold to release)."""

    @abc.abstractmethod
    def held_by(self, holder: Holder) -> list[LayerId]:
        """The layers ``holder`` holds, other than by default (the snapshots': every
        layer a snapshot uses or used, and some that are gone or not yet made)."""

    @abc.abstractmethod
    def claim(self, id: str, holder: Holder) -> None:
        """Hold existing layer ``id`` for ``holder`` too (``NotFound`` if it is gone)."""

    @abc.abstractmethod
    def release(self, id: LayerId, holder: Holder, *, later: bool = False) -> bool:
        """Let ``holder``'s hold on ``id`` go; the layer is removed with its last holder
        (True then, and for a layer that is gone already), its tree deleted before this
        returns or, ``later``, in the background (:mod:`lamina.store.reaper`).  ``Busy``
        when it cannot be removed (a child, a mount in use)."""

    @abc.abstractmethod
    def seal(self, id: LayerId, chain_id: str | None = None) -> None:
        """Turn writable layer ``id`` read-only in place (a snapshot's Commit), naming it
        by ``chain_id`` when containerd gave one."""

    @abc.abstractmethod
    def layer_of_mounts(self, mounts: Sequence[SnapshotMount]) -> LayerId | None:
        """The layer of this store that ``mounts`` write into (a writable bind's source,
        an overlay's ``upperdir``), if they name one; None for any others.  Only a
        candidate: the caller compares ``mounts`` with :meth:`snapshot_mounts` of it."""

    @abc.abstractmethod
    def fill(self, id: LayerId, tar: BinaryIO,
             verify: Callable[[], None]) -> tuple[str, int]:
        """Apply the uncompressed tar ``tar`` into writable layer ``id``, which nothing
        has written yet (containerd's ``Diff.Apply`` onto a snapshot lamina made, which
        containerd commits next): the layer's new content is built beside it, in the
        format a read-only layer applied from a tar gets (overlay's EROFS), and swapped
        in whole.  ``verify`` is called once the tar is read, before the swap: what it
        raises leaves the layer as it was.  The tar's diff id and its size in bytes.
        ``Busy`` for a layer filled already, ``Unsupported`` for one with changes of its
        own (written through its mounts) or a size quota."""

    def snapshot_mounts(self, id: LayerId, *, writable: bool,
                        idmap: IdMapping | None = None) -> list[SnapshotMount]:
        """The mounts that show layer ``id``'s union view (containerd mounts them): the
        layer itself writable, or (``writable`` false) its view read-only.  With
        ``idmap``, shifted by that map as containerd's overlayfs shifts them (``uidmap=``
        and ``gidmap=`` options containerd turns into idmapped mounts, or lowers idmapped
        already), or ``Unsupported`` where the backend cannot."""
        raise errors.Unsupported(f"backend {self.name} serves no snapshots", layer=id)

    def snapshot_own(self, id: LayerId, uid: int, gid: int) -> None:
        """Give writable layer ``id``'s top directory, which nothing has written yet, to
        host ids ``uid``/``gid`` (an id-mapped container's root owns its upper)."""
        raise errors.Unsupported(f"backend {self.name} maps no ids", layer=id)

    def snapshot_sweep(self, in_use: Sequence[tuple[LayerId, bool, IdMapping]]) -> None:
        """Drop what :meth:`snapshot_mounts` made for id maps (idmapped lowers) that no
        snapshot of ``in_use`` (layer, writable, map) needs any more (none made here)."""

    @abc.abstractmethod
    def snapshot_usage(self, id: LayerId) -> Totals:
        """What layer ``id`` adds over its parent (its own content)."""


def backend_of(drv: Driver) -> Backend:
    """``drv`` as a lamina backend, or ``Unsupported`` for a driver that keeps no lamina
    store (one registered from outside)."""
    if not isinstance(drv, Backend):
        raise errors.Unsupported(f"backend {drv.name} keeps no lamina store")
    return drv


BackendFactory = type[Backend]
"""A :class:`Backend` class: called as ``factory(home, options, uid_map, gid_map)``, it
opens a home (``Unsupported`` where it cannot work), and it answers the capability
probes (``layer_format``, ``layout_marker``, ``supported``) before any home is opened."""

registered: dict[str, BackendFactory] = {}
"""The backends by name (:func:`lamina.registry.open_driver` picks among them)."""


def register_backend(name: str, factory: BackendFactory) -> None:
    """Register a backend by name (moby's ``graphdriver.Register``): a backend module
    calls it when it is imported."""
    registered[name] = factory
