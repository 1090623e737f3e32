"""Who holds a layer: the one record of it, read and written here only.

A layer stays while someone holds it.  The holders:

- :data:`Holder.API` — the callers of the :class:`~lamina.driver.Driver` API: the CLI,
  the Docker plugin, the image store (an image name reaches the layer).  ``remove``
  drops this hold.
- :data:`Holder.SNAPSHOTS` — containerd's snapshots (``lamina snapshotter``): a record
  of it uses the layer.  The last snapshot that goes drops it.

A layer is deleted when its last holder lets go, never before: a layer the snapshots
adopted from an image stays when the image is removed, and is the image's again when
it is loaded again (the image store claims it), so the snapshots' going does not take
it from the image.  Most layers are held by the API alone, and have no file here:

    HOME/holds/LAYER    a JSON list of holders, for a layer held otherwise than by
                        the API alone (absent: the API's alone)

Crash model.  Each file is replaced with :func:`lamina.host.fsutil.atomic_write` (a
kill or power cut leaves the old list or the new one).  A holder is written before
the layer it holds is made (the snapshotter's layers) and dropped after the layer is
retired, so a crash leaves at worst a list for a layer that is gone, which the
snapshotter's recovery and ``check --repair`` drop; never a layer whose holder is lost.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from lamina import crashpoints, errors
from lamina.driver import LayerId, check_id
from lamina.host import fsutil

DIR = "holds"


class Holder(enum.StrEnum):
    """Who holds a layer (see the module docstring)."""

    API = "api"
    SNAPSHOTS = "snapshots"


Holders = frozenset[Holder]
ONLY_API: Holders = frozenset({Holder.API})


class Holds:
    """The holds of one home's layers (files in ``HOME/holds/``)."""

    def __init__(self, home: Path) -> None:
        self.dir = home / DIR
        self.dir.mkdir(mode=0o700, exist_ok=True)

    def of(self, id: LayerId) -> Holders:
        """Who holds layer ``id`` (the API alone when nothing else is recorded).  An
        unreadable list holds the layer for everyone: the safe answer."""
        try:
            data = (self.dir / id).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return ONLY_API
        try:
            doc = json.loads(data)
            return frozenset(Holder(h) for h in doc)
        except (ValueError, TypeError, RecursionError):
            return frozenset(Holder)

    def set(self, id: LayerId, holders: Iterable[Holder]) -> None:
        """Record ``holders`` as layer ``id``'s, durably (the API alone: no file)."""
        who = frozenset(holders)
        if who == ONLY_API:
            self.forget(id)
            return
        fsutil.atomic_write(self.dir / id, json.dumps(sorted(who)).encode(), mode=0o600)

    def forget(self, id: LayerId) -> None:
        """Drop layer ``id``'s record (it is gone, or the API's alone), durably."""
        crashpoints.reached("holds:before-forget")
        fsutil.unlink_durably(self.dir / id)

    def recorded(self) -> Iterator[tuple[LayerId, Holders]]:
        """Every layer with a record, and its holders."""
        for entry in sorted(os.listdir(self.dir)):
            if entry.startswith("."):
                continue  # an atomic_write's temp file
            try:
                lid = check_id(entry)
            except errors.InvalidArgument:
                continue  # not lamina's: check reports the layer ids it knows
            yield lid, self.of(lid)

    def migrate(self, old_dir: Path) -> None:
        """Take over the holds an older lamina kept in ``snapshots/holds`` (``made``: the
        snapshots' alone; ``adopted``: the API's and the snapshots'; ``released``: the
        snapshots' alone), then drop them: idempotent, so a crash midway is finished by
        the next open."""
        if not old_dir.is_dir():
            return
        for entry in os.listdir(old_dir):
            path = old_dir / entry
            if not entry.startswith("."):
                try:
                    lid = check_id(entry)
                    how = path.read_text().strip()
                except (errors.InvalidArgument, OSError, UnicodeDecodeError):
                    how, lid = "", None
                if lid is not None:
                    both = {Holder.SNAPSHOTS, Holder.API} if how == "adopted" else {
                        Holder.SNAPSHOTS}
                    self.set(lid, both)
            fsutil.unlink_durably(path)
        fsutil.remove_tree(old_dir)
