"""A home directory of layers: layout, visibility, locks, removal and recovery.

Layout (every backend keeps its layer content inside the layer's directory)::

    HOME/lamina.json          the backend the home was made with (and whether in a
                              user namespace: :mod:`lamina.host.userns`)
    HOME/.lock                the store lock: held briefly to publish, swap, retire
    HOME/layers/ID/           one complete layer: layer.json, layerchain.json,
                              layerID (the seed driver's id redirect file), content
    HOME/layers/ID-removing/  a layer being deleted
    HOME/staging/NAME/        a layer being built, with NAME.lock held by its builder
    HOME/mounts/ID            how many get() calls of ID are outstanding
    HOME/locks/ID             serializes mutations of one layer; shared while it
                              is being used as a parent
    HOME/mountlocks/ID        serializes one layer's mount, unmount and count
    HOME/holds/ID             who holds the layer, when not the API alone
                              (:mod:`lamina.store.holds`)
    HOME/chains/HEX/ID        the index from chain id to layer
                              (:mod:`lamina.store.chains`)

Locks.  Nothing slow runs under the home-wide ``.lock``: it orders the renames that
publish, swap and retire layers (and the ``l/`` links a backend makes with them).
Mounting, unmounting and counting one layer take that layer's mount lock; building on
a layer takes its layer lock shared, mutating or removing it exclusive, so two calls
on different layers never wait for each other.

Crash model.  A layer is built in ``staging/`` where nobody looks, made durable
with one ``syncfs`` (an empty layer: an fsync of each of its few files and
directories, which spares waiting for other writers' dirty pages), and published
with one ``rename`` into ``layers/`` (then the ``layers/`` directory is fsynced): a
kill or power cut before the rename leaves only a staging directory, after it a
complete layer.  Replacing a
layer's content (an apply into an existing layer) builds the new content in
staging and swaps it in with ``renameat2(RENAME_EXCHANGE)``.  Removal renames
``ID`` to ``ID-removing`` first (the commit point) and deletes after, at once or in
the background (:mod:`lamina.store.reaper`), holding a lock on the directory until it
is gone.  Opening the store sweeps the ``*-removing`` directories nobody holds and
staging directories whose builder's lock is free (the builder died): what remains is
exactly the set of complete layers.  Metadata files are written with
:func:`fsutil.atomic_write`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from lamina import crashpoints, errors
from lamina.driver import REMOVING_SUFFIX, LayerId, check_id
from lamina.host import fsutil, mount, userns
from lamina.store import meta as meta_file
from lamina.store import reaper
from lamina.store.chains import ChainIndex
from lamina.store.holds import Holds
from lamina.store.meta import ID_FILE, META, LayerMeta

log = logging.getLogger("lamina")

FORMAT = 1


def _record(home: Path) -> dict[str, object] | None:
    """``lamina.json``, if ``home`` is a lamina home already."""
    try:
        data = json.loads((home / "lamina.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise errors.Corrupt(f"unreadable lamina.json: {e}", path=str(home)) from e
    if not isinstance(data, dict):
        raise errors.Corrupt(f"bad lamina.json: {type(data).__name__}, not an object",
                             path=str(home))
    return data


def recorded_backend(home: Path) -> str | None:
    """The backend recorded in ``home``, if it is a lamina home already."""
    data = _record(home)
    if data is None:
        return None
    backend = data.get("backend")
    if not isinstance(backend, str):
        raise errors.Corrupt(f"lamina.json names no backend ({backend!r})", path=str(home))
    return backend


def _namespace_problem(home: Path, data: dict[str, object] | None) -> str | None:
    """Why this process may not open ``home`` (None: it may).  A home made in a user
    namespace (``"userns": true``) holds that namespace's owners and overlayfs'
    ``user.overlay.*`` xattrs; one made outside holds the host's and ``trusted.*``: each
    is opened only where it was made, or its whiteouts and owners would be misread."""
    made_inside = bool(data and data.get("userns") is True)
    if data is None or made_inside == userns.IN_USER_NAMESPACE:
        return None
    if made_inside:
        return ("this home was made in a user namespace (its owners and overlay xattrs are "
                "that namespace's): open it from one, as its user (rootlesskit, unshare)")
    return ("this home was made outside a user namespace (its owners and overlay xattrs "
            "are the host's): open it as root of the initial namespace")


def namespace_problem(home: Path) -> str | None:
    """Why this process may not open ``home`` for where the home was made (None: it
    may, or there is no home yet)."""
    return _namespace_problem(home, _record(home))


class Store:
    """The backend-neutral half of a driver (see the module docstring)."""

    def __init__(self, home: Path, backend: str, *, shared_root: bool = False) -> None:
        self.home = home
        self.backend = backend
        self.layers_dir = home / "layers"
        self.staging_dir = home / "staging"
        self.mounts_dir = home / "mounts"
        self.locks_dir = home / "locks"
        self.mount_locks_dir = home / "mountlocks"
        # Refused before anything is written: who may keep layers, and where this home
        # was made (:mod:`lamina.host.userns`).
        problem = userns.why_not_privileged()
        record = _record(home) if problem is None else None
        problem = problem or _namespace_problem(home, record)
        if problem is not None:
            raise errors.Unsupported(problem, path=str(home))
        try:
            home.mkdir(mode=0o710 if shared_root else 0o700, parents=True, exist_ok=True)
            for sub in (self.layers_dir, self.staging_dir, self.mounts_dir, self.locks_dir,
                        self.mount_locks_dir):
                sub.mkdir(mode=0o700, exist_ok=True)
            self.holds = Holds(home)
            self.chains = ChainIndex(home)
            self._reaper = reaper.Reaper(lambda path: self._delete(path))
        except OSError as e:
            raise errors.InvalidArgument(f"cannot create home: {e.strerror}", path=str(home)) from e
        self.holds.migrate(home / "snapshots" / "holds")
        if record is None:
            made: dict[str, object] = {"backend": backend, "format": FORMAT}
            if userns.IN_USER_NAMESPACE:
                made["userns"] = True
            fsutil.atomic_write(home / "lamina.json", json.dumps(made).encode() + b"\n")
        self._store_lock = home / ".lock"

    # -- locks ----------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store lock (brief sections only)."""
        with fsutil.locked(self._store_lock):
            yield

    @contextlib.contextmanager
    def mount_lock(self, id: LayerId) -> Iterator[None]:
        """Hold ``id``'s mount lock: its mount, unmount and count change together."""
        with fsutil.locked(self.mount_locks_dir / id):
            yield

    @contextlib.contextmanager
    def layer_lock(self, id: LayerId, *, shared: bool = False,
                   wait: float | None = None) -> Iterator[None]:
        """Hold ``id``'s layer lock: exclusive to mutate it, shared to build on it or read
        it.  ``wait``: give up after so many seconds with ``Busy`` (default: wait)."""
        lock = fsutil.FileLock(self.locks_dir / id)
        if wait is None:
            lock.acquire(shared=shared)
        else:
            deadline = time.monotonic() + wait
            pause = 0.005
            while not lock.acquire(shared=shared, blocking=False):
                if time.monotonic() >= deadline:
                    raise errors.Busy(f"layer is in use (being read or changed) for more than "
                                      f"{wait:g} s", layer=id)
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
        try:
            yield
        finally:
            lock.release()

    def lease(self, ids: list[LayerId]) -> list[fsutil.FileLock]:
        """Shared locks on ``ids``, held by a reader (a diff stream) until it is done, so
        that no removal or apply changes them under it; ``NotFound`` if one is gone."""
        held: list[fsutil.FileLock] = []
        try:
            for lid in ids:
                lock = fsutil.FileLock(self.locks_dir / lid)
                lock.acquire(shared=True)
                held.append(lock)
                if not self.exists(lid):  # removed before the lease was had
                    raise errors.NotFound("no such layer", layer=lid)
        except BaseException:
            for lock in held:
                lock.release()
            raise
        return held

    # -- layers -----------------------------------------------------------------

    def layer_dir(self, id: LayerId) -> Path:
        """Where layer ``id`` lives once complete."""
        return self.layers_dir / id

    def resolve(self, id: str) -> LayerId:
        """Validate ``id`` and follow the seed driver's ``layerID`` redirect file."""
        lid = check_id(id)
        try:
            target = (self.layers_dir / lid / ID_FILE).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return lid
        if target and target != lid:
            return check_id(target)
        return lid

    def exists(self, id: LayerId) -> bool:
        """Whether ``id`` is a complete layer."""
        return (self.layers_dir / id / META).is_file()

    def require(self, id: str) -> LayerId:
        """``id`` resolved, or ``NotFound``."""
        lid = self.resolve(id)
        if not self.exists(lid):
            raise errors.NotFound("no such layer", layer=lid)
        return lid

    def meta(self, id: LayerId) -> LayerMeta:
        """The layer's metadata (:mod:`lamina.store.meta`)."""
        return meta_file.read(self.layers_dir / id, id)

    def parent(self, id: LayerId) -> LayerId | None:
        """The layer's parent id."""
        return self.meta(id).parent

    def chain(self, id: LayerId) -> list[LayerId]:
        """The layer's ancestors, nearest first (recorded in its metadata at creation)."""
        meta = self.meta(id)
        if meta.chain[:1] != ([meta.parent] if meta.parent else []):
            raise errors.Corrupt("bad parent chain in metadata", layer=id)
        return meta.chain

    def with_chain(self, chain: str, parent: LayerId | None) -> LayerId | None:
        """A complete read-only layer of chain id ``chain`` on layer ``parent`` (the one
        named by the chain id's digits first: the image store's), or None."""
        named = self.chains.named(chain)
        own = chain.removeprefix("sha256:")
        for lid in sorted(named, key=lambda n: n != own):
            try:
                meta = self.meta(lid)
            except errors.LaminaError:
                continue  # gone since it was indexed, or damaged: check says which
            if meta.identity.chain_id == chain and not meta.rw and meta.parent == parent:
                return lid
        return None

    def chained(self) -> Iterator[tuple[LayerId, LayerMeta]]:
        """Every complete layer that has a chain id, with its metadata."""
        for chain, lid in self.chains.entries():
            try:
                meta = self.meta(lid)
            except errors.LaminaError:
                continue
            if meta.identity.chain_id == chain:
                yield lid, meta

    def ids(self) -> Iterator[LayerId]:
        """Every complete layer."""
        for entry in sorted(os.listdir(self.layers_dir)):
            if entry.endswith(REMOVING_SUFFIX):
                continue
            if (self.layers_dir / entry / META).is_file():
                yield LayerId(entry)

    def children(self, id: LayerId) -> list[LayerId]:
        """Layers whose parent is ``id``."""
        out = []
        for c in self.ids():
            try:
                if self.meta(c).parent == id:
                    out.append(c)
            except errors.NotFound:
                continue  # removed by someone else since it was listed
            except errors.Corrupt:
                continue  # not a child anyone can use; check reports it
        return out

    def write_meta(self, staged: Path, meta: LayerMeta) -> None:
        """Write a new layer's metadata files into its staging dir, its chain from its
        parent's (no fsync: the syncfs that precedes publishing covers them)."""
        ancestors = [meta.parent, *self.chain(meta.parent)] if meta.parent else []
        meta.chain = ancestors
        meta_file.write_seed_files(staged, meta.id, [self.layer_dir(a) for a in ancestors])
        meta_file.write(staged, meta, staged=True)
        if meta.identity.chain_id is not None:  # made durable by the build's syncfs
            self.chains.add(meta.identity.chain_id, meta.id)

    def rewrite_meta(self, meta: LayerMeta) -> None:
        """Replace live layer ``meta.id``'s metadata, atomically and durably (the caller
        holds the layer's lock); a chain id it gains is indexed first."""
        if meta.identity.chain_id is not None:
            self.chains.add(meta.identity.chain_id, meta.id)
            fsutil.sync_dir(self.chains.dir / meta.identity.chain_id.removeprefix("sha256:"))
        meta_file.write(self.layer_dir(meta.id), meta, staged=False)

    # -- building -------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, id: LayerId) -> Iterator[Path]:
        """A fresh directory to build ``id`` in; removed afterwards unless published."""
        name = f"{id}.{secrets.token_hex(4)}"
        lock = fsutil.FileLock(self.staging_dir / f"{name}.lock")
        lock.acquire()  # held while we build: a sweeper that can take it knows we died
        path = self.staging_dir / name
        try:
            path.mkdir(mode=0o700)
            yield path
        finally:
            self._delete(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock.path)
            lock.release()

    def in_flight(self, name: str) -> bool:
        """Whether staging entry ``name`` has a live builder (its lock is held)."""
        lock = fsutil.FileLock(self.staging_dir / f"{name}.lock")
        if not lock.path.exists():
            return False
        try:
            return not lock.acquire(blocking=False)
        finally:
            lock.release()

    def publish(self, staged: Path, id: LayerId, parent: LayerId | None) -> None:
        """Make a fully built, synced staging directory the live layer ``id``."""
        with self.locked():
            if parent is not None and not self.exists(parent):
                raise errors.NotFound("parent layer vanished", layer=id, path=parent)
            crashpoints.reached("publish:before-rename")
            try:
                # The commit point of a new layer.
                fsutil.rename_noreplace(staged, self.layer_dir(id))
            except FileExistsError:
                raise errors.AlreadyExists("layer exists already", layer=id) from None
            crashpoints.reached("publish:after-rename")
            fsutil.sync_dir(self.layers_dir)

    def swap(self, staged: Path, id: LayerId) -> None:
        """Replace live layer ``id``'s directory with ``staged`` in one step."""
        with self.locked():
            crashpoints.reached("swap:before-exchange")
            fsutil.rename_exchange(staged, self.layer_dir(id))
            crashpoints.reached("swap:after-exchange")
            fsutil.sync_dir(self.layers_dir)
            fsutil.sync_dir(self.staging_dir)

    # -- removal --------------------------------------------------------------

    def retire(self, id: LayerId, *, damaged: bool = False) -> reaper.Retired:
        """Take ``id`` out of the store (the commit point of a removal); delete it after,
        with :meth:`delete` or :meth:`delete_later`.
        The caller holds the layer's lock (exclusive) and has seen it has no children:
        nobody can build on it meanwhile.

        ``damaged``: a layer whose metadata may be unreadable, removed by a repair after
        its children; it is retired without looking at what it says."""
        chain = None
        if not damaged:
            # Damaged metadata (``rm`` removes such a layer): its index entry is swept.
            with contextlib.suppress(errors.Corrupt):
                chain = self.meta(id).identity.chain_id  # NotFound: removed meanwhile
        doomed = self.layers_dir / f"{id}{REMOVING_SUFFIX}"
        with reaper.waiting_for(doomed):  # an older removal of the same id: its end
            fsutil.remove_tree(doomed)
        retired = reaper.Retired.hold(self.layer_dir(id), doomed)
        try:
            self._retire(id, doomed)
        except BaseException:
            retired.release()
            raise
        if chain is not None:
            self.chains.discard(chain, id)
        self.holds.forget(id)
        return retired

    def _retire(self, id: LayerId, doomed: Path) -> None:
        with self.mount_lock(id), self.locked():
            crashpoints.reached("retire:before-rename")
            fsutil.rename(self.layer_dir(id), doomed)
            crashpoints.reached("retire:after-rename")
            fsutil.sync_dir(self.layers_dir)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.mounts_dir / id)

    # -- mount counts ---------------------------------------------------------

    def count(self, id: LayerId) -> int:
        """Outstanding get() calls of ``id`` (shared by every process)."""
        path = self.mounts_dir / id
        try:
            text = path.read_text()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as e:
            raise errors.Corrupt(f"unreadable mount count: {e}", layer=id, path=str(path)) from e
        if not text.isdigit() and text != "":
            raise errors.Corrupt(f"bad mount count {text[:20]!r}", layer=id, path=str(path))
        return int(text or 0)

    def set_count(self, id: LayerId, value: int) -> None:
        """Record ``id``'s count; call with its mount lock held."""
        path = self.mounts_dir / id
        if value <= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        # Counts describe mounts, which do not survive a reboot: no fsync needed.
        fsutil.atomic_write_nosync(path, str(value).encode())

    def counted(self) -> dict[LayerId, int]:
        """Every layer with an outstanding count (-1: its count file is unreadable)."""
        out = {}
        for name in os.listdir(self.mounts_dir):
            if not name.startswith("."):
                try:
                    out[LayerId(name)] = self.count(LayerId(name))
                except errors.Corrupt:
                    out[LayerId(name)] = -1
        return out

    # -- recovery ---------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Finish interrupted removals and drop abandoned staging dirs; say what went."""
        swept: list[str] = []
        for entry in os.listdir(self.layers_dir):
            if entry.endswith(REMOVING_SUFFIX) or entry.startswith("."):
                swept.append(self._sweep_one(self.layers_dir / entry))
        for entry in os.listdir(self.staging_dir):
            path = self.staging_dir / entry
            if entry.endswith(".lock"):
                if not path.with_suffix("").exists():
                    self._drop_lock_if_free(path)
                continue
            lock = fsutil.FileLock(self.staging_dir / f"{entry}.lock")
            if lock.acquire(blocking=False):  # its builder is gone
                try:
                    swept.append(self._sweep_one(path))
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock.path)
                    lock.release()
        self._sweep_chains()
        # Each under the layer's mount lock: live processes write counts (and their
        # temp files) and retire layers under it.
        for entry in os.listdir(self.mounts_dir):
            temp = entry.startswith(".")
            name = entry[1:].rsplit(".", 1)[0] if temp else entry
            if temp and not entry.rsplit(".", 1)[-1].isdigit():
                continue
            try:
                lid = check_id(name)
            except errors.InvalidArgument:
                continue
            if not temp and self.exists(lid):
                continue
            with self.mount_lock(lid):
                # A count write cut short, or a removal killed between its rename and
                # dropping the count.
                if temp or not self.exists(lid):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.mounts_dir / entry)
        return [s for s in swept if s]

    def _sweep_chains(self) -> None:
        """Drop the chain-id index's entries of layers that are gone (a build that died,
        a removal cut short), but not those of layers being built now: an entry is made
        in a build, after its staging directory (so listed first, then the builders)."""
        entries = list(self.chains.entries())
        if not entries:
            return
        building = self.building()
        for chain, lid in entries:
            if lid not in building and not self.exists(lid):
                self.chains.discard(chain, lid)

    def building(self) -> set[str]:
        """The ids of the layers being built now (their builders hold their locks)."""
        # Staging entries are ID.TOKEN and ID.TOKEN.lock (ids may hold dots, tokens not).
        return {e.rsplit(".", 1)[0] for e in os.listdir(self.staging_dir)
                if not e.endswith(".lock") and self.in_flight(e)}

    def delete(self, retired: reaper.Retired) -> None:
        """Delete a retired layer directory now."""
        try:
            self._delete(retired.path)
        finally:
            retired.release()

    def delete_later(self, retired: reaper.Retired) -> None:
        """Delete a retired layer directory in the background (:mod:`lamina.store.reaper`);
        what is mounted inside it (an EROFS image, a quota's) is unmounted now.  A tree
        that holds no lock, or finds the reaper's queue full, is deleted now."""
        try:
            mount.unmount_below(retired.path)
        except BaseException:
            retired.release()
            raise
        if not (retired.held and self._reaper.put(retired)):
            self.delete(retired)

    def wait_deleted(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for what :meth:`delete_later` was given; whether
        it is all gone (what is left, the next open sweeps)."""
        return self._reaper.wait(timeout)

    def _delete(self, path: Path) -> None:
        """Delete a retired or abandoned layer directory, and what is mounted inside it."""
        if path.exists():
            mount.unmount_below(path)  # a quota image, a stale union mount
        crashpoints.reached("remove:deleting")
        fsutil.remove_tree(path)

    def _sweep_one(self, path: Path) -> str:
        if reaper.being_deleted(path):
            return ""  # its remover (this process's reaper, or another's) deletes it
        try:
            self._delete(path)
        except OSError as e:
            log.warning("lamina: cannot remove leftover %s: %s", path, e)
            return ""
        return str(path)

    def _drop_lock_if_free(self, path: Path) -> None:
        lock = fsutil.FileLock(path)
        try:
            if lock.acquire(blocking=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        finally:
            lock.release()

    def now_ns(self, where: Path) -> int:
        """The filesystem's idea of now (ctime of a fresh marker) under ``where``."""
        marker = where / f".clock-{os.getpid()}"
        marker.touch()
        try:
            return marker.stat().st_ctime_ns
        finally:
            marker.unlink()


def wall_time() -> str:
    """A timestamp for metadata (RFC 3339, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
