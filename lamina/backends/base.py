"""What every lamina backend shares: the store, locks, counts and the life cycle.

A backend subclasses :class:`StoreDriver` and fills in how a layer's content
is built (:meth:`StoreDriver._populate`), how an archive is applied into it,
how its union view is made and released, and how its changes are read.  The
ordering that makes each operation crash-safe lives here, once.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from lamina import crashpoints, errors
from lamina.archive import codecs
from lamina.archive.diffid import DigestingReader
from lamina.archive.digests import Digests
from lamina.backends import snapshot_hooks
from lamina.backends.quotas import LayerQuotas
from lamina.backends.reading import LeasedGetter, leased_stream, release
from lamina.backends.snapshot_hooks import SnapshotMount
from lamina.driver import Change, DiffGetter, Driver, IdMap, LayerId, check_id
from lamina.host import fsutil
from lamina.host.idmap import IdMapper
from lamina.host.quota import IMAGE
from lamina.host.usage import Totals, tree_totals
from lamina.options import apply_limits, parse_options, parse_size, storage_size
from lamina.store import manifest
from lamina.store.layers import Store, wall_time
from lamina.store.meta import LayerMeta

log = logging.getLogger("lamina")

class StoreDriver(Driver, abc.ABC):
    """A :class:`Driver` over a :class:`Store`; backends fill in the abstract hooks."""

    backend_name = ""
    known_options: ClassVar[Mapping[str, str]] = {}
    content_only: ClassVar[tuple[str, ...] | None] = None
    """The names in ``content_of()`` that are the layer's content (None: all of it)."""
    quota_unsupported: ClassVar[str | None] = None
    """Why this backend never caps a layer (None: it can, where the home allows)."""

    def __init__(
        self,
        home: str | Path,
        options: Sequence[str] | Mapping[str, str] = (),
        uid_map: IdMap | None = None,
        gid_map: IdMap | None = None,
    ) -> None:
        self.options = parse_options(options, self.known_options, self.backend_name)
        self.apply_limits = apply_limits(self.options)
        self.ids = IdMapper(uid_map, gid_map)
        self.home = Path(home).absolute()
        self.store = Store(self.home, self.backend_name, shared_root=not self.ids.identity)
        # get() calls made through this driver object, given back by cleanup().
        self._mine: collections.Counter[LayerId] = collections.Counter()
        self._mine_lock = threading.Lock()
        self.quotas = LayerQuotas(self.home, self.store, self.quota_unsupported)
        self.store.sweep()
        self._recover()
        self.quotas.remount_all()

    @property
    def name(self) -> str:
        return self.backend_name

    # -- hooks ----------------------------------------------------------------

    @abc.abstractmethod
    def _populate(
        self, staged: Path, id: LayerId, parent: LayerId | None, quota: int | None = None
    ) -> dict[str, Any]:
        """Fill a new layer's staging dir; return backend fields for its metadata.

        ``quota``: the bytes a writable layer may take (its ``size`` storage option).
        """

    @abc.abstractmethod
    def _apply(self, staged: Path, id: LayerId, parent: LayerId | None, tar: BinaryIO,
               digests: Digests) -> int:
        """Apply an uncompressed tar into a layer being built in ``staged``; put the
        CRC-32s of the files it writes in ``digests``, where it can, for the manifest."""

    @abc.abstractmethod
    def _restage(self, staged: Path, id: LayerId) -> dict[str, Any]:
        """Copy live layer ``id``'s content into ``staged`` (for a replacing apply)."""

    @abc.abstractmethod
    def _mount(self, id: LayerId, mount_label: str) -> Path:
        """Make ``id``'s union view available (first get)."""

    @abc.abstractmethod
    def _unmount(self, id: LayerId) -> None:
        """Release ``id``'s union view (last put)."""

    def _recover(self) -> None:
        """Backend recovery on open (stale mounts and the like)."""

    @abc.abstractmethod
    def content_of(self, layer_dir: Path) -> Path:
        """The layer's own content inside its directory (live or staged)."""

    def record_manifest(self, layer_dir: Path, digests: Digests | None = None) -> Totals:
        """Record what a read-only layer holds (for ``check``) and return its totals (for
        ``df``)."""
        return manifest.record(self.content_of(layer_dir), layer_dir / manifest.NAME,
                               only=self.content_only, digests=digests)

    # -- what check and df see (lamina.store.layers.StoreBacked) --------------------

    def _sync_outside(self, staged: Path) -> bool:
        """Make durable what a new layer's build wrote outside its staging dir, for a
        layer synced file by file; False: only a syncfs will do."""
        return True

    def _abandon(self, staged: Path, id: LayerId) -> None:
        """Undo what a build that failed made outside its staging dir (nothing, here)."""

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

    def discard(self, id: LayerId) -> None:
        """Remove a damaged layer whatever its metadata says (a repair, children first):
        what is mounted in it is unmounted, then it is retired and deleted as by
        :meth:`remove`."""
        with self.store.layer_lock(id):
            doomed = self.store.retire(id, damaged=True)
            with self._mine_lock:
                self._mine.pop(id, None)
            self.store.delete(doomed)  # unmounts what is mounted inside it first
        self.sweep_links()

    # -- quotas ---------------------------------------------------------------

    @abc.abstractmethod
    def _writable_dirs(self, id: LayerId) -> list[Path]:
        """The directories a writable layer's content is written to (for project ids)."""

    def resize(self, id: str, size: str) -> None:
        """Grow (or shrink, not below what is in use) a writable layer's quota."""
        lid = self.store.require(id)
        new = parse_size(size, layer=lid)
        with self.store.layer_lock(lid):
            self.quotas.resize(lid, new, lambda: self._writable_dirs(lid)[0])

    def _check_depth(self, id: LayerId, parent: LayerId | None, rw: bool) -> None:
        """Refuse a layer deeper than the backend can serve (before anything is written)."""

    # -- creation -------------------------------------------------------------

    def _check_storage_opts(
        self, id: LayerId, opts: Mapping[str, str] | None, rw: bool
    ) -> int | None:
        """The layer's quota in bytes (its ``size`` option, else the driver's default)."""
        quota = storage_size(opts, layer=id, rw=rw,
                             default=self.options.get(f"{self.backend_name}.size"))
        if quota is not None:
            self.quotas.require(id)
        return quota

    def create(
        self, id: str, parent: str | None = None, *, storage_opts: Mapping[str, str] | None = None
    ) -> None:
        lid = check_id(id)
        self._check_storage_opts(lid, storage_opts, rw=False)
        self._create(lid, parent, rw=False)

    def create_rw(
        self,
        id: str,
        parent: str | None = None,
        *,
        mount_label: str = "",
        storage_opts: Mapping[str, str] | None = None,
    ) -> None:
        lid = check_id(id)
        quota = self._check_storage_opts(lid, storage_opts, rw=True)
        self._create(lid, parent, rw=True, quota=quota)

    def _create(
        self,
        lid: LayerId,
        parent: str | None,
        *,
        rw: bool,
        tar: BinaryIO | None = None,
        quota: int | None = None,
    ) -> int:
        pid = self.store.require(parent) if parent else None
        if self.store.exists(lid):
            raise errors.AlreadyExists("layer exists already", layer=lid)
        self._check_depth(lid, pid, rw)
        size = 0
        with self.store.layer_lock(lid), self._parent_held(pid):
            if self.store.exists(lid):
                raise errors.AlreadyExists("layer exists already", layer=lid)
            if pid is not None and not self.store.exists(pid):
                raise errors.NotFound("parent layer vanished", layer=lid, path=pid)
            with self.store.staging(lid) as staged:
                try:
                    digests: Digests = {}
                    # The disk writes while a layer's tar is applied (nothing to write early
                    # for an empty layer: its few files go with the syncfs below).
                    with fsutil.writeback(staged) if tar is not None else nullcontext():
                        fields = self._populate(staged, lid, pid, quota)
                        meta = LayerMeta(lid, pid, rw, wall_time(), quota=fields.pop("quota", None),
                                         fields=fields)
                        if tar is not None:
                            size = self._apply(staged, lid, pid, tar, digests)
                            self._identify(meta, tar, replacing=False)
                        if not rw:
                            meta.totals = self.record_manifest(staged, digests)
                            meta.size = size
                    self.store.write_meta(staged, meta)
                    # The whole layer is durable before it becomes visible: one syncfs,
                    # or for an empty layer (a few small files) an fsync of each.
                    if tar is not None or quota is not None or not (
                            fsutil.sync_small_tree(staged) and self._sync_outside(staged)):
                        fsutil.syncfs(staged)
                    self.store.publish(staged, lid, pid)
                except BaseException:
                    self._abandon(staged, lid)
                    raise
        return size

    def _parent_held(self, pid: LayerId | None) -> Any:
        if pid is None:
            return nullcontext()
        return self.store.layer_lock(pid, shared=True)

    def apply_diff(self, id: str, parent: str | None, stream: BinaryIO) -> int:
        lid = check_id(id)
        tar, _ = codecs.decompressed(stream)
        tar = DigestingReader(tar).as_stream()  # the diff id, as the tar passes (_identify)
        while True:
            if not self.store.exists(lid):
                try:
                    return self._create(lid, parent, rw=False, tar=tar)
                except errors.AlreadyExists:
                    pass  # made meanwhile by someone else: apply into it below
            size = self._apply_into(lid, parent, tar)
            if size is not None:
                return size
            # Removed by someone else before we held its lock (nothing of the tar is
            # read yet): make it, as if that removal had come first.

    def _apply_into(self, lid: LayerId, parent: str | None, tar: BinaryIO) -> int | None:
        """Apply ``tar`` into the existing layer ``lid``; None if it is gone meanwhile."""
        try:
            meta = self.store.meta(lid)
        except errors.NotFound:
            return None
        if meta.quota is not None:
            raise errors.Unsupported("cannot apply a tar into a layer with a size quota",
                                     layer=lid)
        pid = meta.parent
        want = self.store.resolve(parent) if parent else None
        if want != pid:
            raise errors.InvalidArgument(
                f"layer's parent is {pid or 'none'}, not {want or 'none'}", layer=lid
            )
        with self.store.layer_lock(lid), self._parent_held(pid):
            if not self.store.exists(lid):
                return None
            if self.store.count(lid) > 0:
                raise errors.Busy("cannot apply into a mounted layer", layer=lid)
            with self.store.staging(lid) as staged:
                digests: Digests = {}
                with fsutil.writeback(staged):
                    fields = self._restage(staged, lid)
                    size = self._apply(staged, lid, pid, tar, digests)
                    meta = self.store.meta(lid)
                    meta.fields.update(fields)
                    self._identify(meta, tar, replacing=True)
                    if not meta.rw:
                        meta.totals = self.record_manifest(staged, digests)
                        # Docker creates a layer empty, then applies into it: the size
                        # is the apply's then; after a second apply it is not known.
                        meta.size = size if meta.size == 0 else None
                self.store.write_meta(staged, meta)
                fsutil.syncfs(staged)
                self.store.swap(staged, lid)
        return size

    # -- removal --------------------------------------------------------------

    def remove(self, id: str) -> None:
        lid = self.store.require(id)
        # A reader's lease (a diff being streamed) is waited for, never cut short.
        with self.store.layer_lock(lid, wait=REMOVE_WAIT):
            if not self.store.exists(lid):
                raise errors.NotFound("no such layer", layer=lid)
            if self._kept_for_snapshots(lid):
                return
            if self.store.children(lid):
                raise errors.Busy(
                    f"layer is the parent of {', '.join(self.store.children(lid))}", layer=lid
                )
            self._unmount(lid)  # a mounted layer is unmounted first (a stale one too)
            doomed = self.store.retire(lid)
            with self._mine_lock:
                self._mine.pop(lid, None)
            self.store.delete(doomed)

    # -- get / put ------------------------------------------------------------

    def get(self, id: str, mount_label: str = "") -> Path:
        lid = self.store.require(id)
        with self.store.locked():
            if not self.store.exists(lid):
                raise errors.NotFound("no such layer", layer=lid)
            count = self.store.count(lid)
            path = self._mount(lid, mount_label) if count == 0 else self._view(lid)
            crashpoints.reached("get:after-mount")
            self.store.set_count(lid, count + 1)
        with self._mine_lock:
            self._mine[lid] += 1
        return path

    def put(self, id: str) -> None:
        lid = self.store.resolve(id)
        with self.store.locked():
            count = self.store.count(lid)
            if count <= 0:
                return
            if count == 1 and self.store.exists(lid):
                self._unmount(lid)
            crashpoints.reached("put:after-unmount")
            self.store.set_count(lid, count - 1)
        with self._mine_lock:
            if self._mine[lid] > 0:
                self._mine[lid] -= 1

    @abc.abstractmethod
    def _view(self, id: LayerId) -> Path:
        """Where ``id``'s union view is while it is mounted."""

    def size(self, id: str) -> int:
        lid = self.store.require(id)
        recorded = self.store.meta(lid).size
        return recorded if recorded is not None else self.diff_size(lid)

    def mount_count(self, id: str) -> int:
        return self.store.count(self.store.require(id))

    # -- queries --------------------------------------------------------------

    def exists(self, id: str) -> bool:
        return self.store.exists(self.store.resolve(id))

    def layers(self) -> Iterator[LayerId]:
        return self.store.ids()

    def parent(self, id: str) -> LayerId | None:
        return self.store.parent(self.store.require(id))

    # -- reading: diff, changes, sizes, under a lease ---------------------------------

    def diff(self, id: str, parent: str | None = None) -> BinaryIO:
        lid, lease = self._leased(id, parent)
        try:
            stream = self._stream_diff(lid, parent)
        except BaseException:
            release(lease)
            raise
        return leased_stream(stream, lease)

    def changes(self, id: str, parent: str | None = None) -> list[Change]:
        lid, lease = self._leased(id, parent)
        try:
            return self._find_changes(lid, parent)
        finally:
            release(lease)

    def diff_size(self, id: str, parent: str | None = None) -> int:
        lid, lease = self._leased(id, parent)
        try:
            return self._measure_diff(lid, parent)
        finally:
            release(lease)

    def diff_getter(self, id: str) -> DiffGetter:
        lid, lease = self._leased(id, None)
        try:
            return LeasedGetter(self._open_getter(lid), lease)
        except BaseException:
            release(lease)
            raise

    def _leased(self, id: str, parent: str | None) -> tuple[LayerId, list[fsutil.FileLock]]:
        """``id`` resolved, and shared leases on it and on the layer it is compared with,
        so that neither is removed or replaced while it is read (a diff stream holds
        them until it is closed: a reader gets the whole stream or an error, never a
        short tar that looks whole)."""
        lid = self.store.require(id)
        other = self.store.require(parent) if parent else self.store.parent(lid)
        return lid, self.store.lease([lid] if other is None else [lid, other])

    @abc.abstractmethod
    def _stream_diff(self, lid: LayerId, parent: str | None) -> BinaryIO:
        """:meth:`diff` of ``lid``, which the caller holds a lease on."""

    @abc.abstractmethod
    def _find_changes(self, lid: LayerId, parent: str | None) -> list[Change]:
        """:meth:`changes` of ``lid``, which the caller holds a lease on."""

    @abc.abstractmethod
    def _measure_diff(self, lid: LayerId, parent: str | None) -> int:
        """:meth:`diff_size` of ``lid``, which the caller holds a lease on."""

    @abc.abstractmethod
    def _open_getter(self, lid: LayerId) -> DiffGetter:
        """:meth:`diff_getter` of ``lid``, which the caller holds a lease on."""

    def _diff_parent(self, lid: LayerId, parent: str | None) -> tuple[LayerId | None, bool]:
        """The parent to diff against, and whether it is the layer's own parent
        (``Corrupt`` when the content of either is gone: a damaged home)."""
        own = self.store.parent(lid)
        pid = own if parent is None else self.store.require(parent)
        for layer in (lid, pid):
            if layer is not None:
                self._require_content(layer)
        return pid, pid == own

    def _require_content(self, lid: LayerId) -> None:
        """``Corrupt`` when layer ``lid``'s content directory is missing (removed behind
        lamina's back), rather than a ``FileNotFoundError`` from deep in a walk."""
        layer_dir = self.store.layer_dir(lid)
        content = self.content_of(layer_dir)
        if not content.is_dir() and not (layer_dir / IMAGE).is_file():  # an image: mounted later
            raise errors.Corrupt(f"its content directory {content.relative_to(layer_dir)}/ "
                                 "is missing (see lamina check)", layer=lid)

    def status(self) -> list[tuple[str, str]]:
        return [
            ("Backing Filesystem", fsutil.fs_type(self.home)),
            ("Home", str(self.home)),
            ("Layers", str(sum(1 for _ in self.store.ids()))),
            ("Quota", self.quotas.status()),
        ]

    def cleanup(self) -> None:
        with self._mine_lock:
            mine = dict(self._mine)
            self._mine.clear()
        for lid, n in mine.items():
            for _ in range(n):
                try:
                    self.put(lid)
                except (errors.LaminaError, OSError) as e:
                    log.warning("lamina: cleanup cannot release %s: %s", lid, e)
                    break
        self.quotas.release_idle()
        for path in self.store.sweep():
            log.info("lamina: swept %s", path)

    # -- snapshotter hooks (lamina.frontends.containerd; lamina.store.snapshots) --------

    def _identify(self, meta: LayerMeta, tar: BinaryIO, *, replacing: bool) -> None:
        """Record a read-only layer's ``diff_id`` and ``chain_id`` in ``meta.fields`` after
        ``tar`` was applied into it; an apply into a layer that had content already
        leaves it with neither (its content is no longer one tar's)."""
        ids = snapshot_hooks.identify(self.store, meta, tar, replacing=replacing)
        meta.fields.pop("diff_id", None)
        meta.fields.pop("chain_id", None)
        meta.fields.update(ids)

    def _kept_for_snapshots(self, id: LayerId) -> bool:
        """In :meth:`remove` (with the layer's lock): whether snapshots keep ``id`` (True:
        the caller's claim is released and the layer stays); ``Busy`` for a layer the
        snapshotter made."""
        if id in getattr(self, "_snapshot_removals", ()):
            return False
        return snapshot_hooks.kept_for_snapshots(self.home, id)

    def remove_for_snapshots(self, id: LayerId) -> None:
        """:meth:`remove` for the snapshotter, whose hold on ``id`` does not keep it."""
        removals: set[LayerId] = self.__dict__.setdefault("_snapshot_removals", set())
        removals.add(id)
        try:
            self.remove(id)
        finally:
            removals.discard(id)

    def seal(self, id: LayerId, fields: Mapping[str, Any] | None = None) -> None:
        """Turn writable layer ``id`` read-only in place (a snapshot's Commit): no copy and
        no walk of its content — made durable, then ``rw`` false and ``sealed`` in its
        metadata (with ``fields`` added: a ``chain_id`` containerd named it by).  Its
        content was written by containerd through the mounts, so it has no manifest to
        check it against; its usage is counted when it is asked for."""
        with self.store.layer_lock(id):
            meta = self.store.meta(id)
            if not meta.rw:
                return
            meta.fields.update(fields or {})
            meta.fields["sealed"] = True
            fsutil.syncfs(self.store.layer_dir(id))  # the content, before the flag
            meta.rw = False
            self.store.rewrite_meta(meta)  # the commit point

    def snapshot_mounts(self, id: LayerId, *, writable: bool) -> list[SnapshotMount]:
        """The mounts that show layer ``id``'s union view (containerd mounts them): the
        layer itself writable, or (``writable`` false) its view read-only."""
        raise errors.Unsupported(f"backend {self.name} serves no snapshots", layer=id)

    def snapshot_usage(self, id: LayerId) -> Totals:
        """What layer ``id`` adds over its parent (its own content)."""
        meta = self.store.meta(id)
        if not meta.rw:
            kept = kept_usage(meta)
            if kept is not None:
                return kept
            if meta.totals is not None and not meta.fields.get("sealed"):
                return meta.totals
        return tree_totals(self.content_of(self.store.layer_dir(id)))


def kept_usage(meta: LayerMeta) -> Totals | None:
    """The usage a layer's metadata keeps (layers sealed before sealing stopped counting)."""
    kept = meta.fields.get("usage")
    if isinstance(kept, dict) and all(isinstance(kept.get(k), int)
                                      for k in ("bytes", "disk", "inodes")):
        return Totals(kept["bytes"], kept["disk"], kept["inodes"])
    return None


REMOVE_WAIT = 60.0
"""Seconds a removal waits for the readers of a layer before it is ``Busy``."""
