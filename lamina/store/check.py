"""``lamina check`` and ``lamina df``: verify a store, repair it, and account for it.

``check`` looks at every layer directory: its metadata (readable, its own id,
a parent that exists, a chain that agrees), its content against the manifest
recorded when it was made (read-only layers), its mount count against the
mounts that exist, and at the store's leftovers (staging directories of dead
builders, ``-removing`` directories, dangling short links, counts of layers
that are gone).  With ``repair`` it removes what is broken — a damaged layer
and every layer built on it, since their union is wrong too — finishes or drops
leftovers, and fixes counts, saying what it did; a second check then finds
nothing.

``df`` reads the sizes recorded at apply time (bytes, bytes on disk, inodes of
each read-only layer's own content) instead of walking the layers; only
writable layers, whose content changes while containers run, are walked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina import errors
from lamina.backends.base import StoreDriver
from lamina.driver import REMOVING_SUFFIX, Driver, LayerId, check_id
from lamina.host import fsutil, mount
from lamina.store import manifest
from lamina.store.layers import META


@dataclass
class Report:
    """What a check found and, with repair, what it did."""

    problems: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    layers: int = 0

    @property
    def consistent(self) -> bool:
        """Whether the check found nothing wrong."""
        return not self.problems


def _store_driver(drv: Driver) -> StoreDriver:
    if not isinstance(drv, StoreDriver):
        raise errors.Unsupported(f"backend {drv.name} cannot be checked")
    return drv


def check(drv: Driver, *, repair: bool = False, content: bool = True) -> Report:
    """Verify the store behind ``drv``; with ``repair``, fix what is broken."""
    sd = _store_driver(drv)
    store = sd.store
    report = Report()
    broken: dict[LayerId, str] = {}
    metas: dict[LayerId, dict[str, Any]] = {}
    for entry in sorted(os.listdir(store.layers_dir)):
        if entry.endswith(REMOVING_SUFFIX):
            report.problems.append(f"{entry}: an unfinished removal")
            continue
        try:
            lid = check_id(entry)
        except errors.InvalidArgument:
            report.problems.append(f"{entry}: not a layer (a stray entry in {store.layers_dir})")
            continue
        try:
            meta = store.meta(lid)
            if meta.get("id") != lid:
                raise errors.Corrupt(f"metadata names {meta.get('id')!r}", layer=lid)
            metas[lid] = meta
        except errors.LaminaError as e:
            broken[lid] = f"metadata: {e}"
    report.layers = len(metas)
    for lid, meta in metas.items():
        parent = meta.get("parent")
        if parent and parent not in metas:
            broken[lid] = f"its parent {parent} is missing"
            continue
        try:
            store.chain(lid)
        except errors.LaminaError as e:
            broken[lid] = str(e)
            continue
        if content and not meta.get("rw"):
            where = store.layer_dir(lid)
            recorded = where / manifest.NAME
            if not recorded.is_file():
                report.problems.append(f"{lid}: no manifest (made before manifests were kept)")
                if repair:
                    meta["totals"] = sd.record_manifest(where)
                    _write_meta(store.layer_dir(lid), meta)
                    report.repairs.append(f"{lid}: manifest recorded from its present content")
                continue
            found = manifest.verify(sd.content_of(where), recorded, only=sd.content_only)
            if found:
                broken[lid] = "content differs from its manifest: " + "; ".join(found[:5]) + (
                    f" (and {len(found) - 5} more)" if len(found) > 5 else "")
    doomed = _with_descendants(broken, metas)
    for lid in sorted(doomed):
        reason = broken.get(lid) or "built on a damaged layer"
        report.problems.append(f"{lid}: {reason}")
    _check_counts(sd, metas, report, repair)
    _check_leftovers(sd, report)
    if repair:
        for lid in _children_first(doomed, metas):
            _drop(sd, lid)
            why = broken.get(lid) or "built on a damaged layer"
            report.repairs.append(f"{lid}: removed ({why})")
        for path in store.sweep():
            report.repairs.append(f"{path}: leftover removed")
        _sweep_links(sd, report)
    return report


def _write_meta(layer_dir: Path, meta: dict[str, Any]) -> None:
    fsutil.atomic_write(layer_dir / META, json.dumps(meta, sort_keys=True).encode())


def _with_descendants(broken: dict[LayerId, str], metas: dict[LayerId, dict[str, Any]]) -> set[
        LayerId]:
    doomed = set(broken)
    grew = True
    while grew:
        grew = False
        for lid, meta in metas.items():
            if lid not in doomed and meta.get("parent") in doomed:
                doomed.add(lid)
                grew = True
    return doomed


def _children_first(doomed: set[LayerId], metas: dict[LayerId, dict[str, Any]]) -> list[LayerId]:
    def depth(lid: LayerId) -> int:
        chain = metas.get(lid, {}).get("chain")
        return len(chain) if isinstance(chain, list) else 0

    return sorted(doomed, key=depth, reverse=True)


def _drop(sd: StoreDriver, lid: LayerId) -> None:
    store = sd.store
    layer_dir = store.layer_dir(lid)
    mount.unmount_below(layer_dir)
    doomed = store.layers_dir / f"{lid}{REMOVING_SUFFIX}"
    with store.locked():
        store.delete(doomed)
        os.rename(layer_dir, doomed)
        store.set_count(lid, 0)
    store.delete(doomed)


def _check_counts(sd: StoreDriver, metas: dict[LayerId, dict[str, Any]], report: Report,
                  repair: bool) -> None:
    store = sd.store
    for lid, count in store.counted().items():
        if lid not in metas:
            report.problems.append(f"{lid}: a mount count of {count} for a layer that is gone")
            if repair:
                with store.locked():
                    store.set_count(lid, 0)
                report.repairs.append(f"{lid}: its count dropped")
    mounted = set(mount.mounted_below(str(store.layers_dir)))
    for lid in metas:
        merged = str(store.layer_dir(lid) / "merged")
        count = store.count(lid)
        if merged in mounted and count == 0:
            report.problems.append(f"{lid}: mounted with no count")
            if repair:
                mount.unmount(merged)
                report.repairs.append(f"{lid}: unmounted")
        needs_mount = sd.name == "overlay" and metas[lid].get("parent")
        if needs_mount and merged not in mounted and count > 0:
            report.problems.append(f"{lid}: a count of {count} with nothing mounted")
            if repair:
                with store.locked():
                    store.set_count(lid, 0)
                report.repairs.append(f"{lid}: its count reset")


def _check_leftovers(sd: StoreDriver, report: Report) -> None:
    store = sd.store
    for entry in os.listdir(store.staging_dir):
        if not entry.endswith(".lock"):
            report.problems.append(f"staging/{entry}: a layer being built or abandoned")
    links = sd.home / "l"
    if links.is_dir():
        for name in os.listdir(links):
            path = links / name
            if path.is_symlink() and not path.exists():
                report.problems.append(f"l/{name}: a short link to a layer that is gone")


def _sweep_links(sd: StoreDriver, report: Report) -> None:
    links = sd.home / "l"
    if not links.is_dir():
        return
    building = {e.split(".", 1)[0] for e in os.listdir(sd.store.staging_dir)}
    for name in os.listdir(links):
        path = links / name
        if path.is_symlink() and not path.exists():
            target = os.readlink(path).split("/")
            if len(target) >= 2 and target[-2] in building:
                continue
            path.unlink()
            report.repairs.append(f"l/{name}: dangling link removed")


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


def df(drv: Driver) -> tuple[list[Usage], list[str]]:
    """Every layer's own bytes, bytes on disk and inodes; and the store's orphans."""
    sd = _store_driver(drv)
    store = sd.store
    rows = []
    for lid in store.ids():
        meta = store.meta(lid)
        totals = meta.get("totals")
        if isinstance(totals, dict) and not meta.get("rw"):
            rows.append(Usage(lid, meta.get("parent"), False, int(totals["bytes"]),
                              int(totals["disk"]), int(totals["inodes"]), False))
            continue
        content = sd.content_of(store.layer_dir(lid))
        size = disk = inodes = 0
        seen: set[tuple[int, int]] = set()
        for dirpath, dirs, files in os.walk(content):
            for name in dirs + files:
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_nlink > 1 and name in files:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                inodes += 1
                disk += st.st_blocks * 512
                if os.path.isfile(os.path.join(dirpath, name)) and not os.path.islink(
                        os.path.join(dirpath, name)):
                    size += st.st_size
        rows.append(Usage(lid, meta.get("parent"), bool(meta.get("rw")), size, disk, inodes, True))
    orphans = [str(store.staging_dir / e) for e in os.listdir(store.staging_dir)
               if not e.endswith(".lock")]
    orphans += [str(store.layers_dir / e) for e in os.listdir(store.layers_dir)
                if e.endswith(REMOVING_SUFFIX)]
    return rows, orphans
