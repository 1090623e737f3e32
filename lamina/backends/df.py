"""``lamina df``: what each layer takes, from the counters kept when it was made.

A read-only layer's bytes, bytes on disk and inodes were counted when its manifest
was written (:mod:`lamina.store.manifest`), so ``df`` reads them instead of walking
the layer; only writable layers, whose content changes while containers run, are
walked (:func:`lamina.host.usage.tree_totals`, the one size walk).  Read-only; no
crash model to state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lamina import errors
from lamina.backends.contract import backend_of
from lamina.driver import REMOVING_SUFFIX, Driver
from lamina.host.usage import tree_totals


@dataclass
class Usage:
    """One layer's line of ``lamina df``."""

    id: str
    parent: str | None
    rw: bool
    bytes: int
    disk: int
    inodes: int
    live: bool  # walked now (a writable layer), not read from the counters
    broken: str | None = None
    """Why the layer's numbers cannot be had (a damaged layer: its numbers are 0);
    ``lamina check`` says more."""


def df(drv: Driver) -> tuple[list[Usage], list[str]]:
    """Every layer's own bytes, bytes on disk and inodes; and the store's orphans.  A
    damaged layer is a row of its own (``broken``), not the end of the listing."""
    sd = backend_of(drv)
    store = sd.store
    rows = []
    for lid in store.ids():
        try:
            meta = store.meta(lid)
            if meta.totals is not None and not meta.rw:
                t = meta.totals
                rows.append(Usage(lid, meta.parent, False, t.bytes, t.disk, t.inodes, False))
                continue
            t = tree_totals(sd.content_of(store.layer_dir(lid)))
        except errors.NotFound:
            continue  # removed since it was listed
        except errors.LaminaError as e:
            rows.append(Usage(lid, None, False, 0, 0, 0, False, broken=str(e)))
            continue
        except OSError as e:
            why = f"layer {lid}: cannot read its content: {e.strerror or e}"
            rows.append(Usage(lid, None, False, 0, 0, 0, False, broken=why))
            continue
        rows.append(Usage(lid, meta.parent, meta.rw, t.bytes, t.disk, t.inodes, True))
    orphans = [str(store.staging_dir / e) for e in os.listdir(store.staging_dir)
               if not e.endswith(".lock")]
    orphans += [str(store.layers_dir / e) for e in os.listdir(store.layers_dir)
                if e.endswith(REMOVING_SUFFIX)]
    return rows, orphans
