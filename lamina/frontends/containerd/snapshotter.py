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
- Several snapshots may use one layer (namespaces importing the same image); a layer
  goes with its last snapshot, unless another front end still has it
  (:mod:`lamina.store.snapshots`: holds).

Every call runs under one lock (the metadata is one process's, in memory, written
through); errors are :mod:`lamina.errors` (``Busy`` is containerd's
FailedPrecondition).
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

from lamina import errors
from lamina.backends.base import StoreDriver
from lamina.backends.snapshot_hooks import SnapshotMount
from lamina.driver import LayerId
from lamina.frontends.containerd import filters
from lamina.frontends.containerd.labels import check_labels
from lamina.host.usage import Totals
from lamina.store import snapshots
from lamina.store.snapshots import ACTIVE, ADOPTED, COMMITTED, MADE, VIEW, Record

log = logging.getLogger("lamina")

REF_LABEL = "containerd.io/snapshot.ref"
LAYER_PREFIX = "ctrd-"
_CHAIN_RE = re.compile(r"sha256:[0-9a-f]{64}")


def _name_chain(name: str) -> str | None:
    """The chain id a name carries in its last segment (``NS/N/sha256:…``), if any."""
    tail = name.rsplit("/", 1)[-1].rsplit(" ", 1)[-1]
    return tail if _CHAIN_RE.fullmatch(tail) else None


class Snapshotter:
    """containerd's Snapshotter interface over one driver's store."""

    def __init__(self, driver: StoreDriver) -> None:
        self.drv = driver
        self.store = driver.store
        self.records = snapshots.SnapshotRecords(driver.home)
        self._lock = threading.RLock()
        self.recover()

    def close(self) -> None:
        """Release the home's snapshots for another process."""
        self.records.close()

    # -- lookups ----------------------------------------------------------------

    def _get(self, key: str) -> Record:
        if not key:
            raise errors.InvalidArgument("a snapshot key is needed")
        rec = self.records.get(key)
        if rec is None:
            raise errors.NotFound(f"snapshot {key!r} does not exist")
        return rec

    def _new(self, key: str) -> None:
        if not key:
            raise errors.InvalidArgument("a snapshot key is needed")
        if self.records.get(key) is not None:
            raise errors.AlreadyExists(f"snapshot {key!r} already exists")

    def _parent(self, parent: str) -> Record | None:
        if not parent:
            return None
        rec = self.records.get(parent)
        if rec is None:
            raise errors.NotFound(f"parent snapshot {parent!r} does not exist")
        if rec.kind != COMMITTED:
            raise errors.InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return rec

    def _layer_with_chain(self, chain: str, parent: LayerId | None) -> LayerId | None:
        """A read-only layer of the store with chain id ``chain`` on layer ``parent``:
        the image store's, named by the chain id itself, first (no walk), else any."""
        named = LayerId(chain.removeprefix("sha256:"))
        if re.fullmatch(r"sha256:[0-9a-f]{64}", chain) and self.store.exists(named):
            try:
                meta = self.store.meta(named)
            except errors.LaminaError:
                meta = None
            if (meta is not None and meta.fields.get("chain_id") == chain and not meta.rw
                    and meta.parent == parent):
                return named
        for lid in self.store.ids():
            try:
                meta = self.store.meta(lid)
            except errors.LaminaError:
                continue
            if (meta.fields.get("chain_id") == chain and not meta.rw
                    and meta.parent == parent):
                return lid
        return None

    # -- creating ---------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[SnapshotMount]:
        """A new active snapshot ``key`` on committed ``parent`` ("" for none)."""
        with self._lock:
            labels = check_labels(labels)
            self._new(key)
            prec = self._parent(parent)
            player = prec.layer if prec is not None else None
            target = labels.get(REF_LABEL)
            if target:
                self._remote(target, parent, player, labels)
            lid = self._make_layer(writable=True, parent=player)
            now = time.time_ns()
            self.records.put(Record(key, ACTIVE, parent, lid, labels, now, now))
            return self.drv.snapshot_mounts(lid, writable=True)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[SnapshotMount]:
        """A new read-only view ``key`` of committed ``parent`` ("" for an empty one)."""
        with self._lock:
            labels = check_labels(labels)
            self._new(key)
            prec = self._parent(parent)
            now = time.time_ns()
            if prec is not None and prec.layer is not None:
                self.records.put(Record(key, VIEW, parent, None, labels, now, now))
                return self.drv.snapshot_mounts(prec.layer, writable=False)
            lid = self._make_layer(writable=False, parent=None)
            self.records.put(Record(key, VIEW, parent, lid, labels, now, now))
            return self.drv.snapshot_mounts(lid, writable=False)

    def _make_layer(self, *, writable: bool, parent: LayerId | None) -> LayerId:
        lid = LayerId(LAYER_PREFIX + secrets.token_hex(16))
        self.records.set_hold(lid, MADE)  # first: a layer made is never one nobody owns
        try:
            if writable:
                self.drv.create_rw(lid, parent)
            else:
                self.drv.create(lid, parent)
        except BaseException:
            self.records.drop_hold(lid)
            raise
        return lid

    def _remote(self, target: str, parent: str, player: LayerId | None,
                labels: dict[str, str]) -> None:
        """The remote-snapshotter protocol: ``AlreadyExists`` once snapshot ``target`` is
        there (committed here from a layer the store holds); None when it cannot be."""
        have = self.records.get(target)
        if have is not None:
            if have.kind == COMMITTED and have.parent == parent:
                raise errors.AlreadyExists(f"target snapshot {target!r} already exists")
            return
        if not _CHAIN_RE.fullmatch(target):
            return
        lid = self._layer_with_chain(target, player)
        if lid is None:
            return
        if not self._adopt(lid):
            return
        now = time.time_ns()
        self.records.put(Record(target, COMMITTED, parent, lid, dict(labels), now, now))
        raise errors.AlreadyExists(f"target snapshot {target!r} already exists")

    def _adopt(self, lid: LayerId) -> bool:
        """Hold layer ``lid`` for a snapshot (it stays another front end's too); False if
        it is gone meanwhile."""
        with self.store.layer_lock(lid):  # against a concurrent Driver.remove
            if not self.store.exists(lid):
                return False
            if self.records.hold(lid) is None:
                self.records.set_hold(lid, ADOPTED)
        return True

    # -- committing and removing ------------------------------------------------------

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """Turn active snapshot ``key`` into committed snapshot ``name`` (no copy)."""
        with self._lock:
            labels = check_labels(labels)
            rec = self._get(key)
            if rec.kind != ACTIVE or rec.layer is None:
                raise errors.Busy(f"snapshot {key!r} is not active")
            if not name:
                raise errors.InvalidArgument("a snapshot name is needed")
            self._new(name)
            now = time.time_ns()
            chain = _name_chain(name)
            if chain is not None and _name_chain(key) not in (None, chain):
                chain = None
            layer = rec.layer
            if chain is not None:
                parent_layer = self.store.parent(rec.layer)
                found = self._layer_with_chain(chain, parent_layer)
                if found is not None and found != rec.layer and self._adopt(found):
                    layer = found  # the store holds this layer already: keep one copy
            done = Record(name, COMMITTED, rec.parent, layer, labels, now, now,
                          committed_from=(key, rec.layer))
            self.records.put(done)  # the commit point
            if layer == rec.layer:
                self.drv.seal(rec.layer, {"chain_id": chain} if chain else None)
            self.records.delete(key)
            if layer != rec.layer:
                self._release(rec.layer)

    def remove(self, key: str) -> None:
        """Remove snapshot ``key`` (not one that others have as parent)."""
        with self._lock:
            rec = self._get(key)
            kids = self.records.children.get(key)
            if kids:
                raise errors.Busy(f"snapshot {key!r} has children ({len(kids)}): "
                                  "remove them first")
            self.records.delete(key)  # the commit point
            if rec.layer is not None:
                self._release(rec.layer)

    def _release(self, lid: LayerId) -> None:
        """Let layer ``lid`` go once no snapshot uses it (unless another front end has it)."""
        if self.records.users.get(lid):
            return
        how = self.records.hold(lid)
        if how != ADOPTED and self.store.exists(lid):
            try:
                self.drv.remove_for_snapshots(lid)
            except errors.LaminaError as e:
                log.warning("lamina: cannot remove layer %s of a snapshot: %s", lid, e)
                return  # the hold stays: recovery tries again
        self.records.drop_hold(lid)

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
                return self.drv.snapshot_mounts(rec.layer, writable=rec.kind == ACTIVE)
            prec = self._get(rec.parent)
            if prec.layer is None:
                raise errors.Corrupt(f"snapshot {rec.parent!r} has no layer")
            return self.drv.snapshot_mounts(prec.layer, writable=False)

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
        with self._lock:
            self.recover()

    def recover(self) -> None:
        """Bring the records, holds and layers together again (the module docstring of
        :mod:`lamina.store.snapshots` says what a kill can leave)."""
        with self._lock:
            recs = self.records
            for rec in list(recs):
                if rec.kind != COMMITTED or rec.committed_from is None:
                    continue
                src_name, src_layer = rec.committed_from
                src = recs.get(src_name)
                if rec.layer is not None and rec.layer == src_layer:
                    self.drv.seal(rec.layer)  # a commit cut short: finish it
                if src is not None and src.kind == ACTIVE and src.layer == src_layer:
                    recs.delete(src_name)
                    if src_layer is not None and src_layer != rec.layer:
                        self._release(src_layer)
            for rec in list(recs):
                if rec.layer is not None and not self.store.exists(rec.layer):
                    log.warning("lamina: snapshot %r lost its layer %s; dropped",
                                rec.name, rec.layer)
                    recs.delete(rec.name)
                elif rec.layer is not None and recs.hold(rec.layer) is None:
                    made = rec.layer.startswith(LAYER_PREFIX)
                    recs.set_hold(rec.layer, MADE if made else ADOPTED)
            for lid in recs.held():
                if not recs.users.get(lid):
                    self._release(lid)
