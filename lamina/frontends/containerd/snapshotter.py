"""containerd's snapshot calls on lamina's store: the mapping the gRPC server serves.

Vocabulary (containerd's): an *active* snapshot (a key) is writable; a *committed* one
(a name) is read-only and may be a parent; a *view* is a read-only active snapshot.

- An active snapshot is a writable layer of the store on its parent's layer
  (``create_rw``); ``Commit`` seals that layer read-only in place (no copy) and names
  it; a view with a parent has no layer (its mounts are the parent's, read-only); a view
  without one is an empty read-only layer.
- Mounts are specs containerd mounts (the backend's ``snapshot_mounts``); nothing is
  mounted here.
- The remote-snapshotter protocol: a ``Prepare`` labelled
  ``containerd.io/snapshot.ref=CHAIN`` for which the store holds a read-only layer of
  that chain id (any front end's: the Docker plugin, the CLI) on the same parent layer
  commits that layer as snapshot ``CHAIN`` and answers ``AlreadyExists``; containerd then
  neither fetches nor applies the layer.  containerd 1.6's ``ctr image import`` (and
  ``Image.Unpack``) sends no such label; its keys (``NS/N/extract-… CHAIN``) and commit
  names (``NS/N/CHAIN``) carry the chain id, so a ``Commit`` of a layer the store holds
  already adopts that layer and drops the copy containerd just extracted: one layer on
  disk, though containerd did the extraction.
- The differ (:mod:`lamina.frontends.containerd.differ`): mounts are recognised as an
  active snapshot's when the backend names the layer they write into and they are
  exactly the mounts lamina gives for that snapshot (:meth:`Snapshotter.active_for`);
  :meth:`Snapshotter.fill` writes a tar into that layer, the snapshot marked busy
  meanwhile (a Commit or Remove of it is ``Busy`` until the fill is done).
- User namespaces (containerd's ``remap-ids``): a ``Prepare`` or ``View`` labelled
  with an id mapping (:mod:`lamina.frontends.containerd.idmap`) gets the mounts
  containerd's overlayfs gives then: the backend's mounts made for idmapping
  (``snapshot_mounts(idmap=…)``: ``uidmap=``/``gidmap=`` first in their options, or
  lowers the backend idmapped itself where containerd's way cannot see them), and a
  new active snapshot's upper owned by the mapped root; nothing is chowned, the
  read-only layers are shared by every mapping.  What the backend made for a mapping
  is swept with the last snapshot that needs it (and on open and close).  A backend
  that cannot serve the mapping refuses it (``Unsupported``) rather than ignore it.
- Several snapshots may use one layer (namespaces importing the same image); a layer
  goes with its last snapshot, unless another front end still holds it
  (:mod:`lamina.store.holds`).

Locks.  The records are one process's, in memory, written through, and change under
one lock; nothing slow runs under it.  Building a layer (Prepare), sealing one (its
syncfs, Commit) and deleting one (Remove) run outside it, with the names they are
about to create reserved (:attr:`Snapshotter._pending`), the snapshot being committed
marked busy, and the layers being deleted marked dying (never adopted again), so that a
Stat, a List or a Prepare of another snapshot never waits for them.  Errors are
:mod:`lamina.errors` (``Busy`` is containerd's FailedPrecondition).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import BinaryIO

from lamina import errors
from lamina.backends.contract import Backend, SnapshotMount
from lamina.driver import LayerId
from lamina.frontends.containerd import filters, records
from lamina.frontends.containerd.idmap import GID_LABEL, UID_LABEL, IdMapping, mapping_of
from lamina.frontends.containerd.labels import check_labels
from lamina.frontends.containerd.records import ACTIVE, COMMITTED, VIEW, Record
from lamina.host.usage import Totals
from lamina.store.holds import Holder
from lamina.store.meta import is_digest

log = logging.getLogger("lamina")

REF_LABEL = "containerd.io/snapshot.ref"
LAYER_PREFIX = "ctrd-"
SNAPSHOTS = Holder.SNAPSHOTS
CLOSE_WAIT = 10.0
"""Seconds :meth:`Snapshotter.close` waits for removed snapshots' trees to be deleted
(what is left, the store's next open sweeps)."""


def _name_chain(name: str) -> str | None:
    """The chain id a name carries in its last segment (``NS/N/sha256:…``), if any."""
    tail = name.rsplit("/", 1)[-1].rsplit(" ", 1)[-1]
    return tail if is_digest(tail) else None


class Snapshotter:
    """containerd's Snapshotter interface over one backend's store."""

    def __init__(self, driver: Backend) -> None:
        self.drv = driver
        self.records = records.SnapshotRecords(driver.home)
        self._lock = threading.RLock()
        self._pending: dict[str, str] = {}
        """Names being created (Prepare, View, Commit), with their parent's name."""
        self._busy: set[str] = set()
        """Active snapshots being committed."""
        self._making: set[LayerId] = set()
        """Layers being made for a snapshot (held, not yet recorded)."""
        self._dying: set[LayerId] = set()
        """Layers being deleted (no record uses them any more)."""
        self.recover()

    def close(self) -> None:
        """Release the home's snapshots for another process, detaching what the backend
        made for mapped snapshots (made again by their next ``Mounts``)."""
        with self._lock:
            self.drv.snapshot_sweep([])
        self.records.close()
        if not self.drv.store.wait_deleted(CLOSE_WAIT):
            log.warning("lamina: removed snapshots' trees still being deleted after %.0f s;"
                        " the next start finishes them", CLOSE_WAIT)

    # -- lookups (under the lock) ---------------------------------------------------

    def _get(self, key: str) -> Record:
        if not key:
            raise errors.InvalidArgument("a snapshot key is needed")
        rec = self.records.get(key)
        if rec is None:
            raise errors.NotFound(f"snapshot {key!r} does not exist")
        return rec

    def _reserve(self, key: str, parent: str) -> None:
        """Claim name ``key`` for a snapshot about to be made on ``parent``."""
        if not key:
            raise errors.InvalidArgument("a snapshot key is needed")
        if self.records.get(key) is not None or key in self._pending:
            raise errors.AlreadyExists(f"snapshot {key!r} already exists")
        self._pending[key] = parent

    def _parent(self, parent: str) -> Record | None:
        if not parent:
            return None
        rec = self.records.get(parent)
        if rec is None:
            raise errors.NotFound(f"parent snapshot {parent!r} does not exist")
        if rec.kind != COMMITTED:
            raise errors.InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return rec

    def _with_chain(self, chain: str, parent: LayerId | None) -> LayerId | None:
        """A read-only layer of chain id ``chain`` on layer ``parent`` (any front end's),
        held for the snapshots; None if there is none (or it is being deleted)."""
        lid = self.drv.with_chain(chain, parent)
        if lid is None or lid in self._dying:
            return None
        try:
            self.drv.claim(lid, SNAPSHOTS)
        except errors.NotFound:
            return None  # gone meanwhile
        return lid

    # -- creating ---------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[SnapshotMount]:
        """A new active snapshot ``key`` on committed ``parent`` ("" for none)."""
        with self._lock:
            labels = check_labels(labels)
            mapping = mapping_of(labels, key)
            self._reserve(key, parent)
            try:
                prec = self._parent(parent)
                target = labels.get(REF_LABEL)
                if target:
                    self._remote(target, parent, prec, labels)
            except BaseException:
                del self._pending[key]
                raise
        return self._make(key, ACTIVE, parent, prec.layer if prec else None, labels, mapping)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[SnapshotMount]:
        """A new read-only view ``key`` of committed ``parent`` ("" for an empty one)."""
        with self._lock:
            labels = check_labels(labels)
            mapping = mapping_of(labels, key)
            self._reserve(key, parent)
            try:
                prec = self._parent(parent)
                layer = prec.layer if prec is not None else None
                if layer is not None:
                    mounts = self._mounts(layer, False, mapping)  # before it is recorded
                    now = time.time_ns()
                    self.records.put(Record(key, VIEW, parent, None, labels, now, now))
            except BaseException:
                del self._pending[key]
                raise
            if layer is not None:
                del self._pending[key]
        if layer is not None:
            return mounts
        return self._make(key, VIEW, parent, None, labels, mapping)

    def _mounts(self, layer: LayerId, writable: bool,
                mapping: IdMapping | None) -> list[SnapshotMount]:
        """The mounts of ``layer`` for a snapshot with ``mapping`` (None: none); with
        one, under the lock (what the backend makes for it is swept under it)."""
        if mapping is None:
            return self.drv.snapshot_mounts(layer, writable=writable)
        return self.drv.snapshot_mounts(layer, writable=writable, idmap=mapping)

    def _sweep(self) -> None:
        """Let the backend drop what no mapped snapshot needs (under the lock)."""
        in_use = []
        for rec in self.records:
            try:
                mapping = mapping_of(rec.labels, rec.name)
            except errors.InvalidArgument:
                continue  # labels changed by Update: its Mounts says so
            if mapping is None:
                continue
            if rec.layer is not None:
                in_use.append((rec.layer, rec.kind == ACTIVE, mapping))
            elif (prec := self.records.get(rec.parent)) is not None and prec.layer is not None:
                in_use.append((prec.layer, False, mapping))
        self.drv.snapshot_sweep(in_use)

    def _make(self, key: str, kind: str, parent: str, player: LayerId | None,
              labels: dict[str, str], mapping: IdMapping | None) -> list[SnapshotMount]:
        """Make snapshot ``key``'s layer (outside the lock), then its record."""
        lid = LayerId(LAYER_PREFIX + secrets.token_hex(16))
        with self._lock:
            self._making.add(lid)
        try:
            self.drv.make(lid, player, writable=kind == ACTIVE, holder=SNAPSHOTS)
            with self._lock:
                mounts = self._mounts(lid, kind == ACTIVE, mapping)  # Unsupported: none made
                if mapping is not None and kind == ACTIVE:
                    self.drv.snapshot_own(lid, *mapping.root())  # a chown and a sync
                now = time.time_ns()
                self.records.put(Record(key, kind, parent, lid, labels, now, now))
        except BaseException:
            with self._lock:
                self._pending.pop(key, None)
                self._making.discard(lid)
            self._let_go(lid)
            raise
        with self._lock:
            self._pending.pop(key, None)
            self._making.discard(lid)
        return mounts

    def _remote(self, target: str, parent: str, prec: Record | None,
                labels: dict[str, str]) -> None:
        """The remote-snapshotter protocol: ``AlreadyExists`` once snapshot ``target`` is
        there (committed here from a layer the store holds); None when it cannot be."""
        have = self.records.get(target)
        if have is not None:
            if have.kind == COMMITTED and have.parent == parent:
                raise errors.AlreadyExists(f"target snapshot {target!r} already exists")
            return
        if not is_digest(target) or target in self._pending:
            return
        lid = self._with_chain(target, prec.layer if prec else None)
        if lid is None:
            return
        now = time.time_ns()
        self.records.put(Record(target, COMMITTED, parent, lid, dict(labels), now, now))
        raise errors.AlreadyExists(f"target snapshot {target!r} already exists")

    # -- the differ's ------------------------------------------------------------------

    def active_for(self, mounts: Sequence[SnapshotMount]) -> str | None:
        """The key of the active snapshot whose mounts are exactly ``mounts`` (None: they
        are not an active snapshot of lamina's)."""
        lid = self.drv.layer_of_mounts(mounts)
        if lid is None:
            return None
        with self._lock:
            found = [r for r in (self.records.get(n) for n in self.records.users.get(lid, ()))
                     if r is not None and r.kind == ACTIVE]
        if len(found) != 1:
            return None
        try:
            with self._lock:
                ours = self._mounts(lid, True, mapping_of(found[0].labels, found[0].name))
        except (errors.LaminaError, OSError):
            return None  # removed meanwhile
        return found[0].name if _identity(ours) == _identity(mounts) else None

    def fill(self, key: str, tar: BinaryIO, verify: Callable[[], None]) -> tuple[str, int]:
        """Apply the uncompressed tar ``tar`` into active snapshot ``key``'s empty layer
        (:meth:`lamina.backends.contract.Backend.fill`); its diff id and size."""
        with self._lock:
            rec = self._get(key)
            if rec.kind != ACTIVE or rec.layer is None or key in self._busy:
                raise errors.Busy(f"snapshot {key!r} is not active (or busy)")
            self._busy.add(key)
        try:
            return self.drv.fill(rec.layer, tar, verify)
        finally:
            with self._lock:
                self._busy.discard(key)

    # -- committing and removing ------------------------------------------------------

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """Turn active snapshot ``key`` into committed snapshot ``name`` (no copy)."""
        with self._lock:
            labels = check_labels(labels)
            rec = self._get(key)
            if rec.kind != ACTIVE or rec.layer is None or key in self._busy:
                raise errors.Busy(f"snapshot {key!r} is not active")
            if not name:
                raise errors.InvalidArgument("a snapshot name is needed")
            self._reserve(name, rec.parent)
            try:
                layer = self._commit_layer(name, key, rec.layer)
                now = time.time_ns()
                self.records.put(Record(name, COMMITTED, rec.parent, layer, labels, now, now,
                                        committed_from=(key, rec.layer)))  # the commit point
            finally:
                del self._pending[name]
            self._busy.add(key)
        try:
            if layer == rec.layer:
                chain = _name_chain(name)
                self.drv.seal(rec.layer, chain if _name_chain(key) in (None, chain) else None)
        except BaseException:
            with self._lock:  # committed all the same: recovery seals it again
                self._busy.discard(key)
            raise
        with self._lock:
            self._busy.discard(key)
            self.records.delete(key)
            doomed = self._unused(rec.layer) if layer != rec.layer else None
        if doomed is not None:
            self._let_go(doomed)

    def _commit_layer(self, name: str, key: str, own: LayerId) -> LayerId:
        """The layer committed snapshot ``name`` is to use: one the store holds already
        under the chain id the names carry (one copy on disk), else ``key``'s own."""
        chain = _name_chain(name)
        if chain is None or _name_chain(key) not in (None, chain):
            return own
        found = self._with_chain(chain, self.drv.parent(own))
        return own if found is None else found

    def remove(self, key: str) -> None:
        """Remove snapshot ``key`` (not one that others have as parent)."""
        with self._lock:
            rec = self._get(key)
            if key in self._busy:
                raise errors.Busy(f"snapshot {key!r} is being committed")
            kids = len(self.records.children.get(key, ())) + sum(
                1 for p in self._pending.values() if p == key)
            if kids:
                raise errors.Busy(f"snapshot {key!r} has children ({kids}): "
                                  "remove them first")
            self.records.delete(key)  # the commit point
            if UID_LABEL in rec.labels or GID_LABEL in rec.labels:
                self._sweep()  # before its layers may go: their idmapped clones first
            doomed = self._unused(rec.layer)
        if doomed is not None:
            self._let_go(doomed)

    def _unused(self, lid: LayerId | None) -> LayerId | None:
        """``lid`` marked dying if no snapshot uses it any more (under the lock)."""
        if lid is None or self.records.users.get(lid) or lid in self._dying:
            return None
        self._dying.add(lid)
        return lid

    def _let_go(self, lid: LayerId) -> None:
        """The snapshots' hold on ``lid`` goes (outside the lock); the layer stays while
        another front end holds it.  Its tree is deleted in the background: containerd's
        garbage collection removes snapshots in passes, and one that waits for trees
        leaves the removals asked for meanwhile to a later pass
        (:mod:`lamina.store.reaper`)."""
        try:
            self.drv.release(lid, SNAPSHOTS, later=True)
        except errors.LaminaError as e:
            log.warning("lamina: cannot remove layer %s of a snapshot: %s", lid, e)
        finally:
            with self._lock:
                self._dying.discard(lid)

    # -- queries ------------------------------------------------------------------

    def stat(self, key: str) -> Record:
        """Snapshot ``key``."""
        with self._lock:
            return self._get(key)

    def mounts(self, key: str) -> list[SnapshotMount]:
        """The mounts of snapshot ``key``."""
        with self._lock:
            rec = self._get(key)
            if rec.layer is not None:
                layer, writable = rec.layer, rec.kind == ACTIVE
            else:
                prec = self._get(rec.parent)
                if prec.layer is None:
                    raise errors.Corrupt(f"snapshot {rec.parent!r} has no layer")
                layer, writable = prec.layer, False
            mapping = mapping_of(rec.labels, key)
            if mapping is not None:
                return self._mounts(layer, writable, mapping)
        return self._mounts(layer, writable, None)

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Record:
        """Change snapshot ``name``'s labels (``paths``: ``labels`` or ``labels.KEY``; none:
        all of them); any other field is ``InvalidArgument``."""
        with self._lock:
            rec = self._get(name)
            new = dict(rec.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    k = path[len("labels."):]
                    if labels.get(k):
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise errors.InvalidArgument(
                        f"cannot update {path!r} of snapshot {name!r}: only labels change")
            done = replace(rec, labels=check_labels(new), updated=time.time_ns())
            self.records.put(done)
            return done

    def list(self, filter_strings: Sequence[str]) -> list[Record]:
        """The snapshots that match any of ``filter_strings`` (none: all)."""
        match = filters.parse_all(filter_strings)
        with self._lock:
            found = list(self.records)
        return [r for r in found
                if match.matches(filters.snapshot_fields(r.name, r.parent, r.kind, r.labels))]

    def usage(self, key: str) -> Totals:
        """What snapshot ``key`` adds over its parent (bytes on disk, inodes)."""
        with self._lock:
            rec = self._get(key)
            if rec.layer is None:
                return Totals(0, 0, 0)
            layer = rec.layer
        return self.drv.snapshot_usage(layer)

    # -- recovery -------------------------------------------------------------------

    def cleanup(self) -> None:
        """containerd's Cleanup: finish what was cut short, drop what nothing uses."""
        self.recover()

    def recover(self) -> None:
        """Bring the records, holds and layers together again (the module docstring of
        :mod:`lamina.frontends.containerd.records` says what a kill can leave)."""
        doomed: list[LayerId] = []
        with self._lock:
            recs = self.records
            for rec in list(recs):
                if rec.kind != COMMITTED or rec.committed_from is None:
                    continue
                src_name, src_layer = rec.committed_from
                src = recs.get(src_name)
                if src_name in self._busy or src_name in self._pending:
                    continue  # a commit in progress here, not one cut short
                if rec.layer is not None and rec.layer == src_layer:
                    self.drv.seal(rec.layer)  # a commit cut short: finish it
                if src is not None and src.kind == ACTIVE and src.layer == src_layer:
                    recs.delete(src_name)
                    if src_layer is not None and src_layer != rec.layer:
                        doomed += [d for d in [self._unused(src_layer)] if d]
            for rec in list(recs):
                if rec.layer is None:
                    continue
                if not self.drv.exists(rec.layer):
                    log.warning("lamina: snapshot %r lost its layer %s; dropped",
                                rec.name, rec.layer)
                    recs.delete(rec.name)
                else:
                    try:
                        self.drv.claim(rec.layer, SNAPSHOTS)
                    except errors.NotFound:
                        recs.delete(rec.name)
            for lid in self.drv.held_by(SNAPSHOTS):
                if lid not in self._making and lid not in self._dying:
                    doomed += [d for d in [self._unused(lid)] if d]
            if not self._pending:
                self._sweep()  # what a process that died left mounted
        for lid in doomed:
            self._let_go(lid)


def _identity(mounts: Sequence[SnapshotMount]) -> list[SnapshotMount]:
    """``mounts`` as the differ compares them: without overlay's ``redirect_dir=``
    options.  BuildKit (its snapshotter wrapper's ``setRedirectDir``) drops that option
    from, or re-appends it at the end of, the mounts it is given before passing them on
    to the differ (Docker 28's builds do: their final stage's layers are applied onto
    them).  It says how overlayfs records renames, not which directories the mount
    reads and writes, which is what names the snapshot; lamina's differ writes the layer
    itself, never through the mounts.  Every other option must still match, in order."""
    return [m._replace(options=tuple(o for o in m.options if not o.startswith("redirect_dir=")))
            if m.type == "overlay" else m for m in mounts]
