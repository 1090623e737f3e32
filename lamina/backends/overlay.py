"""The ``overlay`` backend: kernel overlayfs union mounts, laid out like Docker's overlay2.

Per layer, in ``layers/ID/``: ``diff/`` (the layer's own changes, with overlay
whiteouts: 0/0 character devices and the ``trusted.overlay.opaque`` xattr, or
``user.overlay.opaque`` in a user namespace, where the unions mount with ``userxattr``),
``work/`` (overlayfs' work dir), ``merged/`` (the mount point), ``lower`` (the
chain as ``l/SHORT`` names, nearest first) and ``link`` (this layer's short
name; ``HOME/l/SHORT`` is a symlink to its ``diff/``, so that mount options stay
short on kernels without the new mount API).

``get`` mounts the union at ``merged/``: a writable layer with its ``diff/`` as
``upperdir``, a read-only one with lowers only.  A layer without a parent needs
no mount: its view is its ``diff/``.  Mounts are counted across processes by
the store; ``redirect_dir``, ``metacopy`` and ``index`` are off, so that
``diff/`` always holds a layer's full changes and the native diff is exact.

Read-only layers applied from a tar into a new layer are, wherever the kernel mounts
lamina's images (probed on open; ``status`` says which and why), kept as their tar
and an EROFS image over it, mounted read-only at the layer's ``diff/``
(:mod:`lamina.backends.erofslayers`): the same lower to everything that uses one, and
``diff`` against the layer's own parent is the tar itself.  ``overlay.layers=dir``
keeps them as directories, as does a kernel that cannot mount the images (no EROFS
with 512-byte blocks: Linux 6.4, and Debian's 6.1.192 by a backport).  A chain mixes
both kinds; a home's existing layers stay what they are when the option changes.

Native diff: against its own parent a layer's changes are read from ``diff/``
alone (cost proportional to the change, lower layers consulted only for the
paths that changed); against any other parent both union views are mounted and
compared naively.

containerd's id-mapped snapshots (user namespaces, ``remap-ids``) on EROFS layers get
lowers lamina idmaps itself, ``HOME/idmapped/MAP/LAYER`` (:meth:`snapshot_mounts`).

Crash model: as :mod:`lamina.store.layers` for building and removal.  Mounts do not
survive a reboot and may outlive a process that died; on open, a mount with no
count is unmounted, a count with no mount is reset, and an EROFS layer whose image
is not mounted is mounted again.  Idmapped lowers are the snapshotter's to sweep (on
its open and close, and with their last snapshot); a lost one is made again by the
next ``Mounts``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, cast

from lamina import errors
from lamina.archive import isolate, naivediff
from lamina.archive.apply import OVERLAY_OPAQUE_XATTR
from lamina.archive.digests import Digests
from lamina.archive.export import change_items, export_changes, open_stream
from lamina.archive.overlaydiff import native_changes, native_items
from lamina.backends import erofslayers
from lamina.backends.base import StoreDriver
from lamina.backends.contract import SnapshotMount, bind, register_backend
from lamina.backends.reading import TreeGetter
from lamina.driver import Change, DiffGetter, LayerId
from lamina.host import fsutil, idmapped, mount
from lamina.host import quota as quotas
from lamina.host.idmapped import IdMapping
from lamina.host.usage import Totals, tree_totals
from lamina.options import APPLY_OPTIONS
from lamina.store.holds import Holder
from lamina.store.meta import LayerFormat, LayerMeta

log = logging.getLogger("lamina")
DIFF, WORK, MERGED, LOWER, LINK = "diff", "work", "merged", "lower", "link"
MAX_DEPTH = 500  # overlayfs' limit on lower layers (the new mount API takes them all)
LEGACY_MAX_DEPTH = 128
"""Lower layers that fit one page of mount(2) options as ``l/`` links (kernels without
``lowerdir+``)."""


def max_depth() -> int:
    """The most lower layers a union can have on this kernel."""
    return MAX_DEPTH if mount.lowerdir_plus_available() else LEGACY_MAX_DEPTH


def why_unsupported(home: Path) -> str | None:
    """Why overlay cannot work with ``home``, or None when it can."""
    if os.geteuid() != 0:
        return "overlay needs root, or root of a user namespace"
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            if not any(line.split()[-1] == "overlay" for line in f if line.strip()):
                return "the kernel has no overlayfs"
    except OSError:
        return "cannot read /proc/filesystems"
    probe_in = home
    while not probe_in.exists():
        probe_in = probe_in.parent
    kind = fsutil.fs_type(probe_in)
    if kind in ("overlay", "aufs", "nfs", "cifs", "fuse"):
        return f"the home is on {kind}, which overlayfs cannot use as upper layer"
    return _probe_mount(probe_in)


def _probe_mount(where: Path) -> str | None:
    # The only reliable test: mount a small overlay there, whiteout and opaque included.
    base = where / f".lamina-probe-{secrets.token_hex(4)}"
    try:
        for sub in ("lower", "upper", "work", "merged"):
            (base / sub).mkdir(parents=True)
        (base / "lower" / "d").mkdir()
        os.setxattr(base / "upper", OVERLAY_OPAQUE_XATTR, b"y")
        os.mknod(base / "upper" / "w", stat.S_IFCHR | 0o600, 0)
        mount.mount_overlay(str(base / "merged"), [str(base / "lower")], str(base / "upper"),
                            str(base / "work"), options=mount.MOUNT_OPTIONS)
        mount.unmount(str(base / "merged"))
    except OSError as e:
        return f"overlayfs cannot be used on {fsutil.fs_type(where)} at {where}: {e}"
    finally:
        with contextlib.suppress(OSError):
            fsutil.remove_tree(base)
    return None


class OverlayDriver(StoreDriver):
    """Layers as overlayfs diff directories (see the module docstring)."""

    backend_name = "overlay"
    layout_marker: ClassVar[str] = DIFF
    """What every layer directory of this backend holds (how a home's layers tell it)."""
    known_options: ClassVar[dict[str, str]] = {
        **APPLY_OPTIONS,
        "overlay.mount_program": "not supported: lamina mounts kernel overlayfs itself",
        "overlay.layers": "how read-only layers applied from a tar are kept: erofs (the "
                          "default where the kernel mounts the images: the tar and an EROFS "
                          "image over it) or dir (directories)",
        "overlay.size": "default size quota of writable layers (Docker's units: 50M, 1.5GB)",
    }

    @classmethod
    def supported(cls, home: Path) -> str | None:
        """Why overlay cannot work at ``home`` (None: it can)."""
        return why_unsupported(home)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        home = Path(args[0] if args else kwargs["home"])
        reason = why_unsupported(home)
        if reason is not None:
            raise errors.Unsupported(reason, path=str(home))
        self._idmap_lock = threading.Lock()
        """Making and sweeping the idmapped lowers (:meth:`snapshot_mounts`)."""
        super().__init__(*args, **kwargs)

    def _recover(self) -> None:
        if "overlay.mount_program" in self.options:
            raise errors.Unsupported("overlay.mount_program (fuse-overlayfs) is not supported",
                                     path="overlay.mount_program")
        self._erofs_reason = self._choose_layers()
        (self.home / "l").mkdir(mode=0o700, exist_ok=True)
        self._remount_images()
        # A first look without locks, then each layer that looks wrong again under its
        # mount lock (get and put mount and count under it): a running process's get
        # may be between its mount and its count.
        for lid in self._mounts_to_mend(self.store.ids()):
            with self.store.mount_lock(lid):
                for wrong in self._mounts_to_mend([lid]):
                    if self.store.count(wrong) == 0:
                        mount.unmount(str(self._merged(wrong)))  # a process died before its count
                    else:
                        self.store.set_count(wrong, 0)  # the mount is gone (a reboot, a kill)
        for lid, count in self.store.counted().items():
            if count and not self.store.exists(lid):
                with self.store.mount_lock(lid):
                    if not self.store.exists(lid):
                        self.store.set_count(lid, 0)
        self.sweep_links()

    def _choose_layers(self) -> str | None:
        """Why read-only layers are directories (None: they are EROFS): the option, or
        a kernel that cannot mount the images (probed once, here: a millisecond)."""
        choice = self.options.get("overlay.layers", "erofs")
        if choice not in ("dir", "erofs"):
            raise errors.InvalidArgument(f"overlay.layers is {choice!r}, not erofs or dir",
                                         path="overlay.layers")
        if choice == "dir":
            return "overlay.layers=dir"
        return erofslayers.probe(self.store.staging_dir)

    def _remount_images(self) -> None:
        """Mount the EROFS layers whose mounts are gone (a reboot), each under its lock.
        One that will not mount (a damaged image) is left to its readers and ``check``
        to report (an error each), not said on every open."""
        for lid in self.store.ids():
            layer_dir = self.store.layer_dir(lid)
            if erofslayers.is_erofs(layer_dir) and not os.path.ismount(layer_dir / DIFF):
                with self.store.mount_lock(lid):
                    if not (self.store.exists(lid) and erofslayers.is_erofs(layer_dir)):
                        continue
                    try:
                        erofslayers.remount(layer_dir, layer_dir / DIFF)
                    except OSError as e:  # its readers say so (Corrupt), as check does
                        log.info("lamina: layer %s: its EROFS image does not mount (see "
                                 "lamina check): %s", lid, e)

    def _mounts_to_mend(self, ids: Iterable[LayerId]) -> list[LayerId]:
        """The layers among ``ids`` mounted with no count, or counted with no mount."""
        mounted = set(mount.mounted_below(str(self.store.layers_dir)))
        counts = self.store.counted()
        wrong = []
        for lid in ids:
            point = str(self._merged(lid))
            count = counts.get(lid, 0)
            if count < 0:
                continue  # an unreadable count: check reports it, repair resets it
            if (point in mounted and count == 0) or (
                    point not in mounted and count > 0 and self.needs_mount(lid)):
                wrong.append(lid)
        return wrong

    def stray_links(self) -> list[str]:
        """``l/`` links that lead to no layer, or to a layer that names another link (a
        build cut short then made again), leaving out those of layers being built now."""
        links = self.home / "l"
        if not links.is_dir():
            return []
        # The links first, then the builders: a builder makes its staging directory
        # before its link, so a link listed here whose layer is not yet published
        # belongs to a builder still in flight (or one that died: stray).
        names = sorted(os.listdir(links))
        building = self.store.building()
        stray = []
        for name in names:
            path = links / name
            try:
                target = os.readlink(path)
            except OSError:
                continue  # removed meanwhile (by its layer's remove), or not a link
            lid = target.split("/")[-2] if target.count("/") >= 2 else ""
            if lid in building:
                continue  # made before its layer is published
            if not path.exists():
                stray.append(name)
                continue
            try:
                own = (self.store.layers_dir / lid / LINK).read_text().strip()
            except OSError:
                continue
            if own != name:
                stray.append(name)
        return stray

    def sweep_links(self) -> list[str]:
        """Remove the stray ``l/`` links; their names."""
        swept = []
        for name in self.stray_links():
            with contextlib.suppress(FileNotFoundError):
                (self.home / "l" / name).unlink()
                swept.append(name)
        return swept

    def _dirs_outside(self, staged: Path) -> list[Path]:
        return [self.home / "l"]  # the layer's short link

    def _abandon(self, staged: Path, id: LayerId) -> None:
        # A build that failed takes its l/ link with it (made before publishing).
        try:
            short = (staged / LINK).read_text().strip()
        except OSError:
            return
        try:
            live = (self.store.layers_dir / id / LINK).read_text().strip()
        except OSError:
            live = ""
        if short and short != live:  # not if the layer went live after all
            with contextlib.suppress(FileNotFoundError):
                (self.home / "l" / short).unlink()

    # -- paths --------------------------------------------------------------------

    def _diff(self, id: LayerId) -> Path:
        capped = self.quotas.capped_space(id)  # a loop-capped layer's diff is in its image
        return (capped or self.store.layer_dir(id)) / DIFF

    def _merged(self, id: LayerId) -> Path:
        return self.store.layer_dir(id) / MERGED

    def lower(self, id: LayerId) -> Path:
        """A read-only layer's ``diff/``: the one place that says where a lower is (the
        mounts, the ``l/`` links, containerd's mounts and the native diff ask here)."""
        return self.store.layer_dir(id) / DIFF

    def _lowers(self, parent: LayerId | None) -> list[str]:
        if parent is None:
            return []
        return [str(self.lower(p)) for p in [parent, *self.store.chain(parent)]]

    def union_point(self, id: LayerId) -> Path | None:
        return self._merged(id)

    def needs_mount(self, id: LayerId) -> bool:
        return self.store.parent(id) is not None

    # -- building -------------------------------------------------------------------

    def _check_depth(self, id: LayerId, parent: LayerId | None, rw: bool) -> None:
        depth = 0 if parent is None else 1 + len(self.store.chain(parent))
        # A read-only layer mounts its own diff as a lower too; a writable one as upper.
        limit = max_depth()
        if depth + (0 if rw else 1) > limit:
            raise errors.InvalidArgument(
                f"chain too deep: overlayfs takes at most {limit} lower layers here (max depth)",
                layer=id, path=parent,
            )

    def _populate(
        self, staged: Path, id: LayerId, parent: LayerId | None, quota: int | None = None
    ) -> dict[str, Any]:
        space, cap = self.quotas.start(staged, quota)
        fields: dict[str, Any] = {} if cap is None else {"quota": cap}
        diff = space / DIFF
        diff.mkdir(mode=0o755)
        uid, gid = self.ids.to_host(0, 0, id, "/")
        os.chown(diff, uid, gid)
        (space / WORK).mkdir(mode=0o700, exist_ok=True)
        (staged / MERGED).mkdir(mode=0o700)
        if space != staged:
            # In a loop image: the usual names point into it, so mounts and the
            # l/ links need no special case (upper and work share its filesystem).
            for sub in (DIFF, WORK):
                os.symlink(f"{quotas.IMAGE_MOUNT}/{sub}", staged / sub)
        project = cap.project if cap is not None else None
        if project is not None and quota is not None:
            for sub in (DIFF, WORK):
                quotas.set_project(space / sub, project)
            quotas.set_limit(diff, project, quota)
        short = secrets.token_hex(13).upper()
        # Plain writes: the staging dir is synced with the layer before it is published.
        (staged / LINK).write_bytes(short.encode())
        chain = [parent, *self.store.chain(parent)] if parent else []
        lower = ":".join(f"l/{self._short(p)}" for p in chain)
        if lower:
            (staged / LOWER).write_bytes(lower.encode())
        links = self.home / "l"
        os.symlink(os.path.relpath(self.lower(id), links), links / short)
        return fields

    def content_of(self, layer_dir: Path) -> Path:
        return layer_dir / DIFF

    def record_manifest(self, layer_dir: Path, digests: Digests | None = None) -> Totals:
        totals = super().record_manifest(layer_dir, digests)
        if not erofslayers.is_erofs(layer_dir):
            return totals
        # What an EROFS layer takes on the host is its tar and its image, two inodes,
        # whatever the image holds (df's disk and inodes; its bytes are its files').
        disk = sum(os.stat(layer_dir / name).st_blocks * 512
                   for name in (erofslayers.TAR, erofslayers.IMAGE))
        return Totals(totals.bytes, disk, 2)

    def _writable_dirs(self, id: LayerId) -> list[Path]:
        return [self._diff(id)]

    def _short(self, id: LayerId) -> str:
        return (self.store.layer_dir(id) / LINK).read_text().strip()

    def _restage(self, staged: Path, id: LayerId) -> dict[str, Any]:
        live = self.store.layer_dir(id)
        (staged / DIFF).mkdir(mode=0o755)
        fsutil.copy_tree(live / DIFF, staged / DIFF)
        for sub in (WORK, MERGED):
            (staged / sub).mkdir(mode=0o700)
        for name in (LINK, LOWER):
            if (live / name).exists():
                (staged / name).write_bytes((live / name).read_bytes())
        return {}

    def _apply(self, staged: Path, id: LayerId, parent: LayerId | None, tar: BinaryIO,
               digests: Digests) -> int:
        return isolate.apply_layer(staged / DIFF, tar, layer=id, ids=self.ids,
                                   overlay_whiteouts=True, lowers=self._lowers(parent),
                                   digests=digests, **self.apply_limits)

    def _apply_new(self, staged: Path, id: LayerId, parent: LayerId | None, tar: BinaryIO,
                   digests: Digests) -> tuple[int, LayerFormat]:
        """An EROFS layer where the option asks for it and the tar can be one (its
        regular-file bytes as the image counts them), else a directory."""
        if self._erofs_reason is not None or self.apply_limits.get("max_size") is not None:
            # (apply.max_size is the directory applier's: an image is not bounded so)
            return self._apply(staged, id, parent, tar, digests), LayerFormat.DIR
        replay = erofslayers.store_indexed(
            staged, staged / DIFF, tar, layer=id, lowers=self._lowers(parent), ids=self.ids,
            max_entries=self.apply_limits.get("max_entries"), digests=digests)
        if not isinstance(replay, erofslayers.Replay):
            return replay, LayerFormat.EROFS
        try:
            size = self._apply(staged, id, parent, cast(BinaryIO, replay), digests)
        finally:
            erofslayers.drop_replayed(staged, replay)
        return size, LayerFormat.DIR

    def _require_content(self, lid: LayerId) -> None:
        if self.store.meta(lid).format is not LayerFormat.EROFS:
            super()._require_content(lid)
            return
        # An EROFS layer's content is its tar and its image, mounted at diff/ (again,
        # after a reboot or an unmount behind lamina's back): an empty diff/ is no layer.
        layer_dir = self.store.layer_dir(lid)
        for name in (erofslayers.TAR, erofslayers.IMAGE):
            if not (layer_dir / name).is_file():
                raise errors.Corrupt(f"its {name} is missing (see lamina check)", layer=lid)
        with self.store.mount_lock(lid):
            try:
                erofslayers.remount(layer_dir, layer_dir / DIFF)
            except OSError as e:
                raise errors.Corrupt(f"its {erofslayers.IMAGE} does not mount: {e} "
                                     "(see lamina check)", layer=lid) from None

    def _untouched(self, id: LayerId) -> bool:
        """A writable layer's ``diff/`` is its own content: empty until written."""
        with os.scandir(self._diff(id)) as entries:
            return next(entries, None) is None

    def verify_layer(self, id: LayerId, meta: LayerMeta) -> str | None:
        if meta.format is not LayerFormat.EROFS:
            return None
        layer_dir = self.store.layer_dir(id)
        return erofslayers.verify(layer_dir, layer_dir / DIFF, meta.identity.diff_id)

    def release(self, id: LayerId, holder: Holder, *, later: bool = False) -> bool:
        # The layer's l/ link goes with it, as overlay2's does: left behind it would
        # dangle (swept on the next open, reported by check until then).
        try:
            short = self._short(id)
        except OSError:
            short = ""
        gone = super().release(id, holder, later=later)
        if gone and short:
            with contextlib.suppress(FileNotFoundError):
                (self.home / "l" / short).unlink()
        return gone

    # -- views ------------------------------------------------------------------------

    def _mount(self, id: LayerId, mount_label: str) -> Path:
        self.quotas.capped_space(id)  # a loop-capped upper must be there before the union
        meta = self.store.meta(id)
        if meta.parent is None:
            return self._diff(id)
        chain = [meta.parent, *self.store.chain(meta.parent)]
        if not meta.rw:
            chain.insert(0, id)  # a read-only layer's own diff is a lower too
        if mount.lowerdir_plus_available():
            lowers = [str(self.lower(p)) for p in chain]
        else:
            # mount(2) takes one page of options: the lowers as l/ links, relative to
            # the home, so that LEGACY_MAX_DEPTH of them fit.
            lowers = [f"l/{self._short(p)}" for p in chain]
        options = list(mount.MOUNT_OPTIONS)
        if mount_label:
            options.append(f"context={mount_label}")
        layer_dir = self.store.layer_dir(id)
        try:
            if meta.rw:
                mount.mount_overlay(str(layer_dir / MERGED), lowers, str(layer_dir / DIFF),
                                    str(layer_dir / WORK), options=options,
                                    relative_to=str(self.home))
            else:
                mount.mount_overlay(str(layer_dir / MERGED), lowers, options=options,
                                    relative_to=str(self.home))
        except OSError as e:
            raise errors.Unsupported(f"the kernel refused the union mount: {e}", layer=id,
                                     path=str(layer_dir / MERGED)) from e
        return layer_dir / MERGED

    def _view(self, id: LayerId) -> Path:
        return self._merged(id) if self.needs_mount(id) else self._diff(id)

    def _unmount(self, id: LayerId) -> None:
        try:
            mount.unmount(str(self._merged(id)))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise errors.Busy(f"cannot unmount: {e}", layer=id,
                                  path=str(self._merged(id))) from e

    def metadata(self, id: str) -> dict[str, str]:
        lid = self.store.require(id)
        layer_dir = self.store.layer_dir(lid)
        out = {"dir": str(layer_dir), "UpperDir": str(layer_dir / DIFF),
               "WorkDir": str(layer_dir / WORK), "MergedDir": str(layer_dir / MERGED)}
        lowers = self._lowers(self.store.parent(lid))
        if erofslayers.is_erofs(layer_dir):
            out["Image"] = str(layer_dir / erofslayers.IMAGE)
            out["Tar"] = str(layer_dir / erofslayers.TAR)
        if lowers:
            out["LowerDir"] = ":".join(lowers)
        return out

    # -- changes ------------------------------------------------------------------------

    def _find_changes(self, id: str, parent: str | None) -> list[Change]:
        lid = self.store.require(id)
        pid, own = self._diff_parent(lid, parent)
        if own:
            return native_changes(self._diff(lid), self._lowers(pid))
        with self._viewed(lid) as new, self._parent_view(pid) as old:
            return naivediff.changes(old, new)

    def _measure_diff(self, id: str, parent: str | None) -> int:
        lid = self.store.require(id)
        pid, own = self._diff_parent(lid, parent)
        if own:
            return tree_totals(self._diff(lid)).bytes
        with self._viewed(lid) as new, self._parent_view(pid) as old:
            return naivediff.size_of(new, naivediff.changes(old, new))

    def _stream_diff(self, id: str, parent: str | None) -> BinaryIO:
        lid = self.store.require(id)
        pid, own = self._diff_parent(lid, parent)
        if own and self.store.meta(lid).format is LayerFormat.EROFS:
            return erofslayers.stream_tar(self.store.layer_dir(lid))  # what was applied
        if own:
            return export_changes(self._diff(lid), native_items(self._diff(lid)), layer=lid,
                                  ids=self.ids)
        return open_stream(self._naive_export(lid, pid))

    def _naive_export(self, lid: LayerId, pid: LayerId | None) -> Iterator[bytes]:
        # Both views stay mounted until the stream is read to its end or closed.
        with self._viewed(lid) as new, self._parent_view(pid) as old:
            items = change_items(naivediff.changes(old, new))
            with export_changes(new, items, layer=lid, ids=self.ids) as stream:
                while chunk := stream.read(1 << 20):
                    yield chunk

    @contextlib.contextmanager
    def _viewed(self, id: LayerId) -> Iterator[Path]:
        path = self.get(id)
        try:
            yield path
        finally:
            self.put(id)

    @contextlib.contextmanager
    def _parent_view(self, id: LayerId | None) -> Iterator[Path | None]:
        if id is None:
            yield None
        else:
            with self._viewed(id) as path:
                yield path

    def _open_getter(self, id: str) -> DiffGetter:
        lid = self.store.require(id)
        return TreeGetter(self._diff(lid), lid)

    def status(self) -> list[tuple[str, str]]:
        api = "new mount API (lowerdir+)" if mount.lowerdir_plus_available() else "mount(2)"
        layers = "erofs" if self._erofs_reason is None else f"dir ({self._erofs_reason})"
        return [*super().status(), ("Native Overlay Diff", "true"), ("Mount", api),
                ("Layer Format", layers),
                ("Max Depth", str(max_depth()))]

    # -- snapshotter hooks (lamina.frontends.containerd) --------------------------------

    def snapshot_mounts(self, id: LayerId, *, writable: bool,
                        idmap: IdMapping | None = None) -> list[SnapshotMount]:
        """A base layer is a bind of its ``diff/``; a layer with parents an overlay whose
        lowers are the ``l/`` short links (nearest first: 128 of them fit the page of
        options containerd's mount takes, which strips their common directory).

        With ``idmap``, as containerd's overlayfs answers: ``uidmap=``/``gidmap=`` first
        (containerd idmaps a bind's target, and an overlay's lowers), the lowers as their
        real directories.  containerd (``core/mount/mount_linux.go``,
        ``doPrepareIDMappedOverlay``) makes *one* idmapped clone of the lowers' common
        parent directory, not recursive, and points overlay at the lowers through it: an
        ``l/`` link (relative) would lead out of the clone, and a lower that is a mount
        of its own (an EROFS layer's image, a capped layer's loop image) would be the
        empty directory under it.  A chain with such a lower is idmapped here instead
        (:meth:`_idmapped_lowers`), and containerd is given no map to apply again."""
        layer_dir = self.store.layer_dir(id)
        lower_file = layer_dir / LOWER
        lowers = lower_file.read_text().split(":") if lower_file.exists() else []
        if not writable:
            lowers = [f"l/{self._short(id)}", *lowers]
        mapped = idmap.options() if idmap is not None else ()
        if len(lowers) <= (0 if writable else 1):
            b = bind(self._diff(id) if writable else self.lower(id), writable=writable)
            return [b._replace(options=(*mapped, *b.options))]
        options = [*mount.MOUNT_OPTIONS]
        if writable:
            options += [f"workdir={layer_dir / WORK}", f"upperdir={self._diff(id)}"]
        else:
            options.append("ro")
        if idmap is None:
            paths = [f"{self.home}/{low}" for low in lowers]
        else:
            parent = self.store.parent(id)
            chain = ([] if writable else [id]) + ([parent, *self.store.chain(parent)]
                                                 if parent is not None else [])
            if all(self._plain_lower(lid) for lid in chain):
                paths = [str(self.lower(lid)) for lid in chain]
                options = [*mapped, *options]
            else:
                paths = self._idmapped_lowers(chain, idmap)
            _check_page(id, options, paths)
        options.append("lowerdir=" + ":".join(paths))
        return [SnapshotMount("overlay", "overlay", tuple(options))]

    def _plain_lower(self, lid: LayerId) -> bool:
        """Whether read-only layer ``lid``'s lower is a plain directory of the home's
        filesystem (not a link, not a mount of its own)."""
        st = os.lstat(self.lower(lid))
        return stat.S_ISDIR(st.st_mode) and st.st_dev == os.stat(self.store.layers_dir).st_dev

    def _idmapped_lowers(self, chain: list[LayerId], idmap: IdMapping) -> list[str]:
        """Idmapped read-only clones of ``chain``'s lowers, one per layer and map, at
        ``HOME/idmapped/TAG/ID`` (made once, shared by every snapshot with that map;
        :meth:`snapshot_sweep` drops them)."""
        tag_dir = self.home / IDMAPPED / _tag(idmap)
        paths, ns_fd = [], -1
        with self._idmap_lock:
            try:
                for lid in chain:
                    target = tag_dir / lid
                    paths.append(str(target))
                    if os.path.ismount(target):
                        continue
                    self._require_content(lid)  # an EROFS image mounted (after a reboot)
                    target.mkdir(mode=0o700, parents=True, exist_ok=True)
                    if ns_fd < 0:
                        ns_fd = idmapped.userns_fd(idmap)
                    idmapped.idmap_bind(str(self.lower(lid)), str(target), ns_fd)
            except OSError as e:
                raise errors.Unsupported(f"cannot make an idmapped mount of a lower: {e}",
                                         layer=chain[len(paths) - 1]) from e
            finally:
                if ns_fd >= 0:
                    os.close(ns_fd)
        return paths

    def snapshot_sweep(self, in_use: Sequence[tuple[LayerId, bool, IdMapping]]) -> None:
        root = self.home / IDMAPPED
        if not root.is_dir():
            return
        needed: set[tuple[str, str]] = set()
        for lid, writable, idmap in in_use:
            parent = self.store.parent(lid) if self.store.exists(lid) else None
            chain = ([] if writable else [lid]) + ([parent, *self.store.chain(parent)]
                                                  if parent is not None else [])
            needed.update((_tag(idmap), c) for c in chain)
        with self._idmap_lock:
            for tag in os.listdir(root):
                for name in os.listdir(root / tag):
                    if (tag, name) not in needed:
                        mount.unmount(str(root / tag / name))  # detached if in use
                        (root / tag / name).rmdir()
                with contextlib.suppress(OSError):
                    (root / tag).rmdir()  # when empty

    def snapshot_own(self, id: LayerId, uid: int, gid: int) -> None:
        """Its ``diff/`` (the upper) to ``uid``/``gid``, synced before the snapshot is
        recorded: a power cut loses the snapshot or keeps it owned."""
        upper = self._diff(id)
        os.lchown(upper, uid, gid)
        fsutil.sync_dir(upper)


IDMAPPED = "idmapped"
"""The home's directory of idmapped lowers (``TAG/LAYER``: a mount point each)."""


def _tag(idmap: IdMapping) -> str:
    """A short name of a map (a directory of :data:`IDMAPPED`)."""
    return hashlib.sha256(f"{idmap.uid_text}\n{idmap.gid_text}".encode()).hexdigest()[:16]


def _check_page(id: LayerId, options: list[str], paths: list[str]) -> None:
    """``Unsupported`` unless the lowers, stripped of their common directory as
    containerd's mount strips them, fit its page of mount options with the rest."""
    if len(paths) < 2:
        return
    # By characters, then up to a directory: as containerd finds the common directory.
    common = os.path.dirname(os.path.commonprefix(paths))  # noqa: RUF071
    data = ",".join([*(o for o in options if not o.startswith(("uidmap=", "gidmap="))),
                     "lowerdir=" + ":".join(p[len(common) + 1:] for p in paths)])
    if len(data) >= mount.PAGE:
        raise errors.Unsupported(
            f"{len(paths)} lower layers do not fit the page of options of an id-mapped "
            "overlay mount (containerd cannot shorten their paths further)", layer=id)


register_backend("overlay", OverlayDriver)
