"""What every lamina backend shares: the store, locks, counts, holds and the life cycle.

:class:`StoreDriver` implements the :class:`~lamina.backends.contract.Backend`
interface once, over a :class:`~lamina.store.layers.Store`; a backend subclasses it
and fills in the hooks the contract names (how a layer's content is built, how an
archive is applied into it, how its union view is made and released, how its changes
are read).  The ordering that makes each operation crash-safe lives here, once.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, BinaryIO

from lamina import crashpoints, errors
from lamina.archive import codecs
from lamina.archive.diffid import DigestingReader, chain_id
from lamina.archive.digests import Digests
from lamina.backends.contract import Backend, SnapshotMount
from lamina.backends.quotas import LayerQuotas
from lamina.backends.reading import LeasedGetter, leased_stream, release
from lamina.driver import Change, DiffGetter, IdMap, LayerId, check_id
from lamina.host import fsutil
from lamina.host.idmap import IdMapper
from lamina.host.quota import IMAGE
from lamina.host.usage import Totals, tree_totals
from lamina.options import (
    apply_limits,
    parse_options,
    parse_size,
    squash_owners,
    storage_size,
)
from lamina.store import manifest
from lamina.store.holds import Holder
from lamina.store.layers import Store, wall_time
from lamina.store.meta import Identity, LayerMeta

log = logging.getLogger("lamina")

class StoreDriver(Backend, abc.ABC):
    """A :class:`Backend` over a :class:`Store`; backends fill in the abstract hooks."""

    def __init__(
        self,
        home: str | Path,
        options: Sequence[str] | Mapping[str, str] = (),
        uid_map: IdMap | None = None,
        gid_map: IdMap | None = None,
    ) -> None:
        self.options = parse_options(options, self.known_options, self.backend_name)
        self.apply_limits = apply_limits(self.options)
        self.ids = IdMapper(uid_map, gid_map, squash=squash_owners(self.options))
        self.home = Path(home).absolute()
        self.store = Store(self.home, self.backend_name, shared_root=self.ids.maps_ids)
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

    def record_manifest(self, layer_dir: Path, digests: Digests | None = None) -> Totals:
        return manifest.record(self.content_of(layer_dir), layer_dir / manifest.NAME,
                               only=self.content_only, digests=digests)

    def discard(self, id: LayerId) -> None:
        """What is mounted in the layer is unmounted, then it is retired and deleted as
        by :meth:`remove`."""
        with self.store.layer_lock(id):
            doomed = self.store.retire(id, damaged=True)
            with self._mine_lock:
                self._mine.pop(id, None)
            self.store.delete(doomed)  # unmounts what is mounted inside it first
        self.sweep_links()

    # -- quotas ---------------------------------------------------------------

    def resize(self, id: str, size: str) -> None:
        """Grow (or shrink, not below what is in use) a writable layer's quota."""
        lid = self.store.require(id)
        new = parse_size(size, layer=lid)
        with self.store.layer_lock(lid):
            self.quotas.resize(lid, new, lambda: self._writable_dirs(lid)[0])

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
        tar: DigestingReader | None = None,
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
                                         format=self.new_format, backend=fields)
                        if tar is not None and not rw:
                            size, meta.format = self._apply_new(staged, lid, pid,
                                                                tar.as_stream(), digests)
                            meta.identity = self._identity(meta, tar)
                        elif tar is not None:
                            size = self._apply(staged, lid, pid, tar.as_stream(), digests)
                            meta.identity = self._identity(meta, tar)
                        if not rw:
                            meta.totals = self.record_manifest(staged, digests)
                            meta.size = size
                    self.store.write_meta(staged, meta)
                    # The whole layer is durable before it becomes visible: one syncfs,
                    # or for an empty layer (a few small files) maybe an fsync of each.
                    if tar is not None or quota is not None:
                        fsutil.syncfs(staged)
                    else:
                        fsutil.sync_tree(staged, self._dirs_outside(staged))
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
        plain, _ = codecs.decompressed(stream)
        tar = DigestingReader(plain)  # the diff id, as the tar passes (_identity)
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

    def _apply_into(self, lid: LayerId, parent: str | None,
                    tar: DigestingReader) -> int | None:
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
                    size = self._apply(staged, lid, pid, tar.as_stream(), digests)
                    meta = self.store.meta(lid)
                    meta.format = self.new_format  # restaged: an EROFS layer's is a copy now
                    meta.backend.update(fields)
                    # A layer that had content of its own is no single tar's any more.
                    meta.identity = (Identity() if _had_content(meta)
                                     else self._identity(meta, tar))
                    if not meta.rw:
                        meta.totals = self.record_manifest(staged, digests)
                        # Docker creates a layer empty, then applies into it: the size
                        # is the apply's then; after a second apply it is not known.
                        meta.size = size if meta.size == 0 else None
                self.store.write_meta(staged, meta)
                fsutil.syncfs(staged)
                self.store.swap(staged, lid)
        return size

    # -- removal and holds ----------------------------------------------------------

    def remove(self, id: str) -> None:
        """The API's hold on the layer goes; the layer with it, unless containerd's
        snapshots hold it too (then it is theirs alone from now on).  ``Busy`` for a
        layer the snapshots made and the API never held."""
        lid = self.store.require(id)
        if Holder.API not in self.store.holds.of(lid):
            raise errors.Busy("layer is a containerd snapshot's (remove the snapshot)",
                              layer=lid)
        self.release(lid, Holder.API)

    def release(self, id: LayerId, holder: Holder, *, later: bool = False) -> bool:
        # A reader's lease (a diff being streamed) is waited for, never cut short.
        with self.store.layer_lock(id, wait=REMOVE_WAIT):
            if not self.store.exists(id):
                self.store.holds.forget(id)  # a removal cut short after its retire
                return True
            holders = self.store.holds.of(id)
            if holder not in holders:
                return False
            if holders - {holder}:
                self.store.holds.set(id, holders - {holder})
                return False
            kids = self.store.children(id)  # none can be made: we hold its lock
            if kids:
                raise errors.Busy(f"layer is the parent of {', '.join(kids)}", layer=id)
            with self.store.mount_lock(id):
                self._unmount(id)  # a mounted layer is unmounted first (a stale one too)
            doomed = self.store.retire(id)
            with self._mine_lock:
                self._mine.pop(id, None)
            if later:
                self.store.delete_later(doomed)
            else:
                self.store.delete(doomed)
        return True

    def make(self, id: LayerId, parent: LayerId | None, *, writable: bool,
             holder: Holder) -> None:
        self.store.holds.set(id, {holder})  # first: a layer made is never one nobody holds
        try:
            if writable:
                self.create_rw(id, parent)
            else:
                self.create(id, parent)
        except BaseException:
            self.store.holds.forget(id)
            raise

    def held_by(self, holder: Holder) -> list[LayerId]:
        return [lid for lid, who in self.store.holds.recorded() if holder in who]

    def claim(self, id: str, holder: Holder) -> None:
        lid = self.store.require(id)
        with self.store.layer_lock(lid):  # against a release deleting it meanwhile
            if not self.store.exists(lid):
                raise errors.NotFound("no such layer", layer=lid)
            holders = self.store.holds.of(lid)
            if holder not in holders:
                self.store.holds.set(lid, holders | {holder})

    def record(self, id: str) -> LayerMeta:
        return self.store.meta(self.store.require(id))

    def with_chain(self, chain: str, parent: LayerId | None) -> LayerId | None:
        return self.store.with_chain(chain, parent)

    def chained(self) -> Iterator[tuple[LayerId, LayerMeta]]:
        return self.store.chained()

    # -- get / put ------------------------------------------------------------

    def get(self, id: str, mount_label: str = "") -> Path:
        lid = self.store.require(id)
        with self.store.mount_lock(lid):
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
        with self.store.mount_lock(lid):
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

    # -- identity and snapshots -----------------------------------------------------

    def _identity(self, meta: LayerMeta, tar: DigestingReader) -> Identity:
        """A read-only layer's identity once ``tar`` was applied into it: its diff id,
        and its chain id when its parent's is known (none for a writable layer)."""
        if meta.rw:
            return Identity()
        return self._identified(meta.parent, tar.diff_id())

    def _identified(self, parent: LayerId | None, diff: str) -> Identity:
        """The identity of a layer of diff id ``diff`` on ``parent``: with its chain id
        when its parent's is known."""
        parent_chain = None
        if parent is not None:
            parent_chain = self.store.meta(parent).identity.chain_id
            if parent_chain is None:
                return Identity(diff)  # a parent of unknown content: no chain id
        return Identity(diff, chain_id(parent_chain, diff))

    def layer_of_mounts(self, mounts: Sequence[SnapshotMount]) -> LayerId | None:
        if len(mounts) != 1:
            return None
        m = mounts[0]
        if m.type == "bind":
            path = m.source
        elif m.type == "overlay":
            uppers = [o[len("upperdir="):] for o in m.options if o.startswith("upperdir=")]
            if len(uppers) != 1:
                return None
            path = uppers[0]
        else:
            return None
        try:
            parts = Path(path).relative_to(self.store.layers_dir).parts
            lid = check_id(parts[0]) if parts else None
        except (ValueError, errors.LaminaError):
            return None  # not below layers/, or not a layer id there
        return lid if lid is not None and self.store.exists(lid) else None

    def fill(self, id: LayerId, tar: BinaryIO,
             verify: Callable[[], None]) -> tuple[str, int]:
        """As :meth:`_apply_into`, for a writable layer: staged, applied, verified,
        recorded (diff id, format, manifest), synced, then swapped in (the commit point).
        A failure or a kill before the swap leaves the layer as it was (empty) and a
        staging directory that is deleted (or swept on the next open)."""
        digesting = DigestingReader(tar)
        with self.store.layer_lock(id):
            meta = self.store.meta(id)
            if not meta.rw:
                raise errors.Busy("layer is not writable (committed already)", layer=id)
            if meta.quota is not None:
                raise errors.Unsupported("cannot fill a layer with a size quota", layer=id)
            if meta.identity.diff_id is not None:
                raise errors.Busy("layer was filled already", layer=id)
            if not self._untouched(id):
                # Written through its mounts: whoever wrote there applies onto it.
                raise errors.Unsupported("layer has changes of its own: only an untouched "
                                         "snapshot is filled", layer=id)
            if self.store.count(id) > 0:
                raise errors.Busy("cannot fill a mounted layer", layer=id)
            pid = meta.parent
            with self._parent_held(pid), self.store.staging(id) as staged:
                digests: Digests = {}
                with fsutil.writeback(staged):
                    fields = self._restage(staged, id)
                    size, meta.format = self._apply_new(staged, id, pid,
                                                        digesting.as_stream(), digests)
                    diff_id = digesting.diff_id()
                    verify()  # the blob's digest: nothing is published before it holds
                    meta.backend.update(fields)
                    meta.identity = Identity(diff_id)  # the chain id comes with the seal
                    meta.totals = self.record_manifest(staged, digests)
                    meta.size = size
                self.store.write_meta(staged, meta)
                fsutil.syncfs(staged)
                self.store.swap(staged, id)
        return diff_id, digesting.size

    def _untouched(self, id: LayerId) -> bool:
        """Whether writable layer ``id`` has no changes of its own over its parent (by
        default its changes, as ``changes`` finds them, are none)."""
        return not self._find_changes(id, None)

    def seal(self, id: LayerId, chain_id: str | None = None) -> None:
        """No copy and no walk of its content: made durable, then ``rw`` false in its
        metadata.  Content containerd wrote through the mounts has no manifest to check
        it against (``sealed``; its usage is counted when it is asked for); a layer that
        :meth:`fill` wrote keeps its diff id and manifest, and gets its chain id."""
        with self.store.layer_lock(id):
            meta = self.store.meta(id)
            if not meta.rw:
                return
            if meta.identity.diff_id is not None:
                # Its own chain id, from its content (containerd's name says the same of
                # an image's layer); containerd's where the parent's is not known.
                own = self._identified(meta.parent, meta.identity.diff_id)
                meta.identity = Identity(own.diff_id, own.chain_id or chain_id)
            else:
                if chain_id is not None:
                    meta.identity = Identity(None, chain_id)
                meta.sealed = True
            fsutil.sync_tree(self.store.layer_dir(id))  # the content, before the flag
            meta.rw = False
            self.store.rewrite_meta(meta)  # the commit point

    def snapshot_usage(self, id: LayerId) -> Totals:
        meta = self.store.meta(id)
        if not meta.rw:
            if meta.usage is not None:
                return meta.usage  # kept by layers sealed before sealing stopped counting
            if meta.totals is not None and not meta.sealed:
                return meta.totals
        return tree_totals(self.content_of(self.store.layer_dir(id)))


def _had_content(meta: LayerMeta) -> bool:
    """Whether layer ``meta`` had content of its own before an apply into it.  Docker
    creates a layer, then applies into it: on vfs the created layer is a copy of its
    parent (totals of the whole tree, but a size of 0: nothing applied into it yet),
    which is not content of its own."""
    if meta.identity.diff_id is not None:
        return True
    if not meta.totals or not meta.totals.inodes:
        return False
    return not (meta.size == 0 and meta.parent is not None)


REMOVE_WAIT = 60.0
"""Seconds a removal waits for the readers of a layer before it is ``Busy``."""
