"""``lamina check``: verify a store and repair it.

``check`` looks at every layer directory: its metadata (readable, its own id,
a parent that exists, a chain that agrees), its content against the manifest
recorded when it was made (read-only layers; and what the backend verifies
beyond it, :meth:`~lamina.backends.contract.Backend.verify_layer`: an EROFS
layer's tar against its diff id, its image's mount), its mount count against the
mounts that exist, and at the store's leftovers (staging directories of dead
builders, ``-removing`` directories, dangling short links, counts of layers
that are gone).  With ``repair`` it removes what is broken — a damaged layer
and every layer built on it, since their union is wrong too — finishes or drops
leftovers, and fixes counts, saying what it did; a second check then finds
nothing.

It knows no backend: what is a backend's own (its content inside a layer
directory, where it mounts a union, its links in the home) it learns through the
"checking" hooks of :class:`~lamina.backends.contract.Backend`.  It also checks what
the store keeps beside the layers: the chain-id index (every layer with a chain id
indexed, no entry for a layer that is gone or has another; ``--repair`` rebuilds it),
and the holds (none for a layer that is gone).

Crash model: a repair removes a layer as ``remove`` does (renamed to
``ID-removing`` first, then deleted), so a repair killed midway leaves what the
next open or check finishes; counts are rewritten under each layer's mount lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lamina import errors
from lamina.backends.contract import Backend, backend_of
from lamina.driver import REMOVING_SUFFIX, Driver, LayerId, check_id
from lamina.host import mount
from lamina.store import manifest, reaper
from lamina.store.meta import LayerMeta


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


def check(drv: Driver, *, repair: bool = False, content: bool = True) -> Report:
    """Verify the store behind ``drv``; with ``repair``, fix what is broken."""
    sd = backend_of(drv)
    store = sd.store
    report = Report()
    broken: dict[LayerId, str] = {}
    metas: dict[LayerId, LayerMeta] = {}
    for entry in sorted(os.listdir(store.layers_dir)):
        if entry.endswith(REMOVING_SUFFIX):
            if not reaper.being_deleted(store.layers_dir / entry):  # else its remover's
                report.problems.append(f"{entry}: an unfinished removal")
            continue
        try:
            lid = check_id(entry)
        except errors.InvalidArgument:
            report.problems.append(f"{entry}: not a layer (a stray entry in {store.layers_dir})")
            continue
        try:
            meta = store.meta(lid)
            if meta.id != lid:
                raise errors.Corrupt(f"metadata names {meta.id!r}", layer=lid)
            metas[lid] = meta
        except errors.LaminaError as e:
            broken[lid] = f"metadata: {e}"
    report.layers = len(metas)
    for lid, meta in metas.items():
        if meta.parent and meta.parent not in metas:
            broken[lid] = f"its parent {meta.parent} is missing"
            continue
        try:
            store.chain(lid)
        except errors.LaminaError as e:
            broken[lid] = str(e)
            continue
        if content and not meta.rw:
            where = store.layer_dir(lid)
            recorded = where / manifest.NAME
            if not recorded.is_file() and meta.sealed:
                continue  # a committed snapshot: containerd wrote it, nothing to check
            if not recorded.is_file():
                report.problems.append(f"{lid}: no manifest (made before manifests were kept)")
                if repair:
                    meta.totals = sd.record_manifest(where)
                    store.rewrite_meta(meta)
                    report.repairs.append(f"{lid}: manifest recorded from its present content")
                continue
            wrong = sd.verify_layer(lid, meta)
            if wrong is not None:
                broken[lid] = wrong
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
    _check_index(sd, {lid: m for lid, m in metas.items() if lid not in doomed}, report, repair)
    if repair:
        for lid in _children_first(doomed, metas):
            sd.discard(lid)
            why = broken.get(lid) or "built on a damaged layer"
            report.repairs.append(f"{lid}: removed ({why})")
        for path in store.sweep():
            report.repairs.append(f"{path}: leftover removed")
        for name in sd.sweep_links():
            report.repairs.append(f"l/{name}: dangling link removed")
    return report


def _with_descendants(broken: dict[LayerId, str], metas: dict[LayerId, LayerMeta]) -> set[
        LayerId]:
    doomed = set(broken)
    grew = True
    while grew:
        grew = False
        for lid, meta in metas.items():
            if lid not in doomed and meta.parent in doomed:
                doomed.add(lid)
                grew = True
    return doomed


def _children_first(doomed: set[LayerId], metas: dict[LayerId, LayerMeta]) -> list[LayerId]:
    def depth(lid: LayerId) -> int:
        meta = metas.get(lid)
        return len(meta.chain) if meta is not None else 0

    return sorted(doomed, key=depth, reverse=True)


def _check_counts(sd: Backend, metas: dict[LayerId, LayerMeta], report: Report,
                  repair: bool) -> None:
    store = sd.store
    counts = store.counted()
    for lid, count in counts.items():
        if count < 0:
            report.problems.append(f"{lid}: an unreadable mount count")
        elif lid not in metas:
            report.problems.append(f"{lid}: a mount count of {count} for a layer that is gone")
        else:
            continue
        if repair:
            with store.mount_lock(lid):
                store.set_count(lid, 0)
            report.repairs.append(f"{lid}: its count dropped")
            counts[lid] = 0
    mounted = set(mount.mounted_below(str(store.layers_dir)))
    for lid in metas:
        point = sd.union_point(lid)
        if point is None:
            continue
        count = max(counts.get(lid, 0), 0)
        if str(point) in mounted and count == 0:
            report.problems.append(f"{lid}: mounted with no count")
            if repair:
                with store.mount_lock(lid):
                    mount.unmount(str(point))
                report.repairs.append(f"{lid}: unmounted")
        if str(point) not in mounted and count > 0 and sd.needs_mount(lid):
            report.problems.append(f"{lid}: a count of {count} with nothing mounted")
            if repair:
                with store.mount_lock(lid):
                    store.set_count(lid, 0)
                report.repairs.append(f"{lid}: its count reset")


def _check_leftovers(sd: Backend, report: Report) -> None:
    store = sd.store
    for entry in os.listdir(store.staging_dir):
        # A layer being built now (its builder holds its lock) is work, not damage.
        if not entry.endswith(".lock") and not store.in_flight(entry):
            report.problems.append(f"staging/{entry}: an abandoned layer build")
    for name in sd.stray_links():
        report.problems.append(f"l/{name}: a short link to a layer that is gone")


def _check_index(sd: Backend, metas: dict[LayerId, LayerMeta], report: Report,
                 repair: bool) -> None:
    """Every layer with a chain id must be found under it.  Entries for layers that are
    gone or have another chain id are what the crash model allows (believed by no
    lookup); a repair drops them with the rest of the index it rebuilds."""
    chains = sd.store.chains
    want = {(m.identity.chain_id, lid) for lid, m in metas.items()
            if m.identity.chain_id is not None}
    have = set(chains.entries())
    missing = sorted(want - have)
    for chain, lid in missing:
        report.problems.append(f"{lid}: not in the chain-id index (under {chain})")
    if repair and (missing or have - want):
        for chain, lid in sorted(have - want):
            chains.discard(chain, lid)
        for chain, lid in missing:
            chains.add(chain, lid)
        if missing:
            report.repairs.append(f"chain-id index rebuilt ({len(missing)} entries added)")
