"""containerd's snapshots over the layer store: keys and names mapped to layers, crash-safe.

containerd's vocabulary stays here, in its front end: the store knows layers and who
holds them (:mod:`lamina.store.holds`), not snapshots.  containerd names a snapshot by
any string (``default/12/extract-123 sha256:…``: slashes, spaces, any length), so a
name is never a file name here: each snapshot is one record file named by the SHA-256
of its name.  Layout::

    HOME/snapshots/.lock            held by the one process serving the snapshots
    HOME/snapshots/records/H.json   one snapshot, H = sha256(name): {"name", "kind"
                                    (active, view, committed), "parent" (a committed
                                    snapshot's name, "" for none), "layer" (the layer
                                    id, or null for a view, whose mounts are its
                                    parent's), "labels", "created", "updated" (ns since
                                    the epoch), and for a committed one "committed_from"
                                    ({"name", "layer"} of the active snapshot it was)}

Every layer a record uses is held by :data:`~lamina.store.holds.Holder.SNAPSHOTS`; the
layer goes when its last record goes, unless another holder (the Driver API: the
Docker plugin, the CLI, the image store) still has it.

Crash model (every write is :func:`lamina.host.fsutil.atomic_write`: temp, fsync,
rename, fsync of the directory; a kill or power cut leaves a file whole or absent):

- Prepare holds the new layer for the snapshots, then makes it, then writes the record
  (the commit point).  Killed before the record: a held layer no record uses, which
  recovery lets go.  Before, as if never called.
- Commit writes the committed record (the commit point: it names the active snapshot
  it comes from), seals the layer read-only in place, then deletes the active record.
  Killed after the commit point: recovery finds the active record that a committed one
  names with the same layer, seals the layer again (idempotent) and deletes the active
  record — the commit has happened; before it, it has not.  A commit that adopts a
  layer lamina already holds (by chain id) releases the active snapshot's layer the
  same way.
- Remove deletes the record (the commit point), then lets the layer go.  Killed
  after: recovery finds the layer held with no record and finishes.
- Labels and timestamps change by rewriting the one record: old or new, whole.

Recovery runs when the serving process opens the home
(:meth:`lamina.frontends.containerd.snapshotter.Snapshotter.recover`): records naming
a missing layer are dropped (the layer was lost: ``lamina check --repair`` removed it),
layers the snapshots hold that no record uses are let go.  What remains is a set of
records whose layers exist and are held.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina import errors
from lamina.driver import LayerId, check_id
from lamina.host import fsutil

log = logging.getLogger("lamina")

ACTIVE, VIEW, COMMITTED = "active", "view", "committed"
KINDS = (ACTIVE, VIEW, COMMITTED)


@dataclass
class Record:
    """One snapshot."""

    name: str
    kind: str
    parent: str
    layer: LayerId | None
    labels: dict[str, str] = field(default_factory=dict)
    created: int = 0
    updated: int = 0
    committed_from: tuple[str, LayerId | None] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "parent": self.parent,
                               "layer": self.layer, "labels": self.labels,
                               "created": self.created, "updated": self.updated}
        if self.committed_from is not None:
            out["committed_from"] = {"name": self.committed_from[0],
                                     "layer": self.committed_from[1]}
        return out

    @classmethod
    def from_json(cls, data: object, where: Path) -> Record:
        bad = errors.Corrupt("bad snapshot record", path=str(where))
        if not isinstance(data, dict):
            raise bad
        try:
            name, kind, parent = data["name"], data["kind"], data["parent"]
            layer, labels = data["layer"], data["labels"]
            created, updated = data["created"], data["updated"]
            cf = data.get("committed_from")
        except KeyError:
            raise bad from None
        if not (isinstance(name, str) and kind in KINDS and isinstance(parent, str)
                and (layer is None or isinstance(layer, str)) and isinstance(labels, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
                and isinstance(created, int) and isinstance(updated, int)):
            raise bad
        committed_from = None
        if isinstance(cf, dict) and isinstance(cf.get("name"), str):
            cl = cf.get("layer")
            committed_from = (cf["name"], check_id(cl) if isinstance(cl, str) else None)
        return cls(name, kind, parent, check_id(layer) if layer else None, dict(labels),
                   created, updated, committed_from)


def record_file(name: str) -> str:
    """The file name of snapshot ``name``'s record (any string is safe)."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest() + ".json"


class SnapshotRecords:
    """The records of one home, and an index of them in memory.

    The serving process holds ``.lock`` for its lifetime, so the in-memory index is the
    truth while it runs; other processes (``lamina ls``, ``Driver.remove``) read the
    files.  Not thread-safe: the snapshotter calls it under its lock.
    """

    def __init__(self, home: Path, *, serve: bool = True) -> None:
        self.dir = home / "snapshots"
        self.records_dir = self.dir / "records"
        for d in (self.dir, self.records_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        self._lock: fsutil.FileLock | None = None
        if serve:
            lock = fsutil.FileLock(self.dir / ".lock")
            if not lock.acquire(blocking=False):
                raise errors.Busy("another process serves this home's snapshots",
                                  path=str(self.dir))
            self._lock = lock
        self.by_name: dict[str, Record] = {}
        self.children: dict[str, set[str]] = {}
        self.users: dict[LayerId, set[str]] = {}
        self._load()

    def close(self) -> None:
        """Let another process serve the snapshots."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- reading ----------------------------------------------------------------

    def _load(self) -> None:
        for entry in os.listdir(self.records_dir):
            path = self.records_dir / entry
            # Only the serving process (it holds .lock) cleans up: a reader such as
            # `lamina ls` must not take a live server's temp file for a leftover.
            owner = self._lock is not None
            if not entry.endswith(".json"):
                if owner:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()  # an atomic_write cut short
                continue
            try:
                rec = Record.from_json(json.loads(path.read_bytes()), path)
            except FileNotFoundError:
                continue  # removed since the listing (by the server)
            except (OSError, ValueError, errors.LaminaError) as e:
                if owner:
                    log.warning("lamina: dropping unreadable snapshot record %s: %s", path, e)
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                continue
            if record_file(rec.name) != entry:
                if owner:
                    log.warning("lamina: dropping misnamed snapshot record %s", path)
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                continue
            self._index(rec)

    def _index(self, rec: Record) -> None:
        self.by_name[rec.name] = rec
        if rec.parent:
            self.children.setdefault(rec.parent, set()).add(rec.name)
        if rec.layer is not None:
            self.users.setdefault(rec.layer, set()).add(rec.name)

    def _unindex(self, rec: Record) -> None:
        self.by_name.pop(rec.name, None)
        if rec.parent:
            kids = self.children.get(rec.parent)
            if kids is not None:
                kids.discard(rec.name)
                if not kids:
                    del self.children[rec.parent]
        if rec.layer is not None:
            users = self.users.get(rec.layer)
            if users is not None:
                users.discard(rec.name)
                if not users:
                    del self.users[rec.layer]

    def get(self, name: str) -> Record | None:
        """Snapshot ``name``'s record, if there is one."""
        return self.by_name.get(name)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self.by_name.values()))

    # -- writing ------------------------------------------------------------------

    def put(self, rec: Record) -> None:
        """Write ``rec`` (new or replacing the record of the same name), durably."""
        fsutil.atomic_write(self.records_dir / record_file(rec.name),
                            json.dumps(rec.to_json(), sort_keys=True).encode(), mode=0o600)
        old = self.by_name.get(rec.name)
        if old is not None:
            self._unindex(old)
        self._index(rec)

    def delete(self, name: str) -> None:
        """Delete snapshot ``name``'s record, durably."""
        rec = self.by_name.get(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.records_dir / record_file(name))
        fsutil.sync_dir(self.records_dir)
        if rec is not None:
            self._unindex(rec)
