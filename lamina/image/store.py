"""The image store: names over manifests, manifests over blobs, images over layers.

Layout under the store's home::

    image/blobs/sha256/HEX   the content store (:mod:`lamina.image.content`)
    image/refs/KEY.json      one image name: {"name", "target" (the manifest's
                             descriptor), "created", "pulled"}; KEY is the sha256 of the
                             name (of ``@DIGEST`` for an image loaded without a name)
    image/locks/             a lock a chain id, held while its layer is applied
    image/gc.lock            shared by every load, pull or push; exclusive for a sweep
    image/dirty              written when a load starts; a sweep removes it

An image's layers are the driver's layers **named by their chain id** (its 64 hex
digits), so a layer several images share is applied and stored once, and containerd's
snapshotter finds it (contract §6).

The crash model: a load writes blobs (each atomically), then applies the layers (each
published atomically by the driver), then writes the image's name (an atomic write):
that write is the commit point.  A load killed before it leaves blobs and layers no
name reaches; the next store that opens with ``dirty`` present and no load running
sweeps them (:meth:`ImageStore.collect`): every blob no name reaches, and every layer
named by its chain id that no image uses, that has no child and that no snapshot holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform as host_platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina import crashpoints, errors
from lamina.archive.diffid import chain_id
from lamina.backends.contract import Backend
from lamina.driver import Driver, LayerId
from lamina.host import fsutil
from lamina.image import reference, spec
from lamina.image.content import ContentStore, LayerBlob
from lamina.image.reference import Reference
from lamina.store.holds import Holder

log = logging.getLogger("lamina")

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm",
         "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64"}


def host() -> spec.Platform:
    """This machine's platform, as OCI names it (``linux/amd64``)."""
    machine = host_platform.machine()
    variant = {"armv7l": "v7", "armv6l": "v6", "aarch64": "v8"}.get(machine, "")
    return spec.Platform("linux", _ARCH.get(machine, machine), variant)


def parse_platform(text: str) -> spec.Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise errors.InvalidArgument(f"platform {text!r} is not OS/ARCH[/VARIANT]")
    return spec.Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def platform_matches(want: spec.Platform, got: spec.Platform | None) -> bool:
    if got is None:
        return False
    if (got.os, got.architecture) != (want.os, want.architecture):
        return False
    if not want.variant or not got.variant:
        return True
    return want.variant == got.variant


def layer_id(chain: str) -> LayerId:
    """The driver layer that holds the layer of chain id ``chain``."""
    return LayerId(reference.check_digest(chain, "chain id")[len("sha256:"):])


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    out: list[str] = []
    for d in diff_ids:
        out.append(chain_id(out[-1] if out else None, d))
    return out


@dataclass
class Image:
    """One image: its manifest and config, and the names that lead to it."""

    manifest_desc: spec.Descriptor
    manifest: spec.Manifest
    config: spec.Config
    names: list[str] = field(default_factory=list)
    created: str = ""
    pulled: bool = False

    @property
    def id(self) -> str:
        """Docker's image id: the config's digest."""
        return self.manifest.config.digest

    @property
    def digest(self) -> str:
        return self.manifest_desc.digest

    @property
    def chains(self) -> list[str]:
        return chain_ids(self.config.diff_ids)

    @property
    def top(self) -> LayerId | None:
        chains = self.chains
        return layer_id(chains[-1]) if chains else None


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class ImageStore:
    """The images of one driver's home."""

    def __init__(self, drv: Driver, *, recover: bool = True) -> None:
        if not isinstance(drv, Backend):
            raise errors.Unsupported(f"backend {drv.name} keeps no images")
        self.drv: Backend = drv
        self.root = drv.home / "image"
        self.content = ContentStore(self.root)
        self.refs_dir = self.root / "refs"
        self.locks_dir = self.root / "locks"
        for d in (self.refs_dir, self.locks_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        self._gc_lock = self.root / "gc.lock"
        self._dirty = self.root / "dirty"
        if recover and self._dirty.exists():
            try:
                self.collect(wait=False)
            except (errors.LaminaError, OSError) as e:
                # The sweep is housekeeping: a home it cannot sweep is still read (image
                # ls says what is damaged), and the marker stays for a later sweep.
                log.warning("lamina: the sweep after an interrupted image load failed "
                            "(%s); going on", " ".join(str(e).split()))

    # -- sessions and collection --------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold off collection while blobs and layers no name reaches yet are made (a
        load, a pull); marks the store for a sweep should this process die."""
        lock = fsutil.FileLock(self._gc_lock)
        lock.acquire(shared=True)
        try:
            if not self._dirty.exists():
                fsutil.atomic_write(self._dirty, b"", mode=0o600)
            yield
        finally:
            lock.release()

    def collect(self, *, wait: bool = True) -> tuple[list[str], list[LayerId]]:
        """Remove every blob no image name reaches and every image layer no image uses;
        the blobs and layers removed.  ``wait`` false: do nothing while a load runs."""
        lock = fsutil.FileLock(self._gc_lock)
        if not lock.acquire(blocking=wait):
            return [], []
        try:
            try:
                os.unlink(self._dirty)
            except FileNotFoundError:
                pass
            except IsADirectoryError:  # a marker all the same; a full one is damage
                os.rmdir(self._dirty)
            self.content.sweep()
            live = self._live()
            if live is None:
                return [], []  # a damaged name or image: sweep nothing it might need
            blobs, layers = live
            gone_blobs = [d for d in self.content.digests() if d not in blobs]
            for d in gone_blobs:
                self.content.delete(d)
            gone_layers = self._collect_layers(layers)
            return gone_blobs, gone_layers
        finally:
            lock.release()

    def _live(self) -> tuple[set[str], set[LayerId]] | None:
        """The blobs and layers some image name reaches; None when a name or an image
        cannot be read (damaged, or tampered with: ``image ls`` says which)."""
        blobs: set[str] = set()
        layers: set[LayerId] = set()
        damaged: list[str] = []
        for rec in self._records(damaged):
            desc = rec["target"]
            blobs.add(desc.digest)
            try:
                img = self._image(desc)
            except errors.LaminaError as e:
                damaged.append(f"image {rec['name'] or desc.digest}: {e}")
                continue
            blobs.add(img.manifest.config.digest)
            blobs.update(d.digest for d in img.manifest.layers)
            layers.update(layer_id(c) for c in img.chains)
        for why in damaged:
            log.warning("lamina: %s (nothing is swept while it is so)", why)
        return None if damaged else (blobs, layers)

    def _collect_layers(self, live: set[LayerId]) -> list[LayerId]:
        """Let go of the layers named by their chain id that no image uses, top first (a
        layer containerd's snapshots hold too stays theirs)."""
        candidates = sorted(
            ((len(meta.chain), lid) for lid, meta in self.drv.chained()
             if lid not in live and meta.identity.chain_id == f"sha256:{lid}" and not meta.rw),
            reverse=True)
        gone = []
        for _, lid in candidates:
            try:
                if self.drv.release(lid, Holder.API):
                    gone.append(lid)
            except (errors.Busy, errors.NotFound):
                continue  # a container's parent, mounted, or gone meanwhile
        return gone

    # -- names ----------------------------------------------------------------------

    def _records(self, damaged: list[str]) -> Iterator[dict[str, Any]]:
        """Every name's record; those that cannot be read are said in ``damaged``."""
        for entry in sorted(os.listdir(self.refs_dir)):
            if not entry.endswith(".json"):
                continue
            try:
                rec = self._read_record(self.refs_dir / entry)
            except errors.Corrupt as e:
                damaged.append(str(e))
                continue
            if rec is not None:
                yield rec

    def _read_record(self, path: Path) -> dict[str, Any] | None:
        """The record at ``path``; ``Corrupt`` when it cannot be read, or is not the
        record of its own name (its file is not named by the key of the name in normal
        form: such a record would answer beside the true one, so it answers to none)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise errors.Corrupt(f"image name record unreadable: {e.strerror}",
                                 path=str(path)) from None
        try:
            with open(fd, "rb") as f:
                data = f.read(1 << 16)
        except OSError as e:  # a directory, an I/O error
            raise errors.Corrupt(f"image name record unreadable: {e.strerror}",
                                 path=str(path)) from None
        try:
            doc = json.loads(data)
            name = doc.get("name")
            target = spec.parse_descriptor(doc["target"], f"image name record {path.name}")
            if name is not None and str(reference.parse(name)) != name:
                raise ValueError(f"its name {name!r} is not in normal form")
            if path.name != f"{_key(name or '@' + target.digest)}.json":
                raise ValueError("it is not filed under its name")
            created = doc.get("created", "")
            return {"name": name, "target": target, "created": str(created),
                    "pulled": bool(doc.get("pulled", False))}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError,
                errors.LaminaError) as e:
            why = "nested too deep" if isinstance(e, RecursionError) else e
            raise errors.Corrupt(f"image name record damaged ({why})", path=str(path)) from None

    def set_name(self, name: str | None, target: spec.Descriptor, *,
                 pulled: bool = False) -> None:
        """Point ``name`` (None: an unnamed image) at the manifest ``target``: the commit
        point of a load or pull.  The name is normalised first (``InvalidArgument`` if it
        is no name), and its record filed under the normal form's key: one name, one
        record."""
        if name is not None:
            name = str(reference.parse(name))
        key = _key(name if name is not None else "@" + target.digest)
        doc = {"name": name, "target": target.to_json(), "created": _now(), "pulled": pulled}
        crashpoints.reached("image:before-name")
        fsutil.atomic_write(self.refs_dir / f"{key}.json", spec.dumps(doc), mode=0o600)
        if name is not None:  # a name given to an unnamed image: it is unnamed no more
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.refs_dir / f"{_key('@' + target.digest)}.json")

    def _drop_name(self, name: str | None, digest: str) -> None:
        key = _key(name if name is not None else "@" + digest)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.refs_dir / f"{key}.json")
        fsutil.sync_dir(self.refs_dir)

    # -- reading images -------------------------------------------------------------

    def _image(self, desc: spec.Descriptor) -> Image:
        data = self.content.read(desc.digest, limit=spec.MAX_DOCUMENT)
        what = f"manifest {desc.digest}"
        manifest = spec.parse_manifest(data, what, desc.media_type)
        cfg = spec.parse_config(self.content.read(manifest.config.digest,
                                                  limit=spec.MAX_DOCUMENT),
                                f"config {manifest.config.digest}")
        if len(cfg.diff_ids) != len(manifest.layers):
            raise errors.Corrupt(f"{what}: {len(manifest.layers)} layers, its config "
                                 f"{len(cfg.diff_ids)} diff ids")
        return Image(desc, manifest, cfg)

    def images(self, damaged: list[str] | None = None) -> list[Image]:
        """Every image, with its names (an unnamed one has none); names and images that
        cannot be read are left out and said in ``damaged``."""
        damaged = [] if damaged is None else damaged
        by_digest: dict[str, Image] = {}
        broken: set[str] = set()
        for rec in self._records(damaged):
            desc = rec["target"]
            if desc.digest in broken:
                continue
            img = by_digest.get(desc.digest)
            if img is None:
                try:
                    img = by_digest[desc.digest] = self._image(desc)
                except errors.LaminaError as e:
                    damaged.append(f"image {rec['name'] or desc.digest}: {e}")
                    broken.add(desc.digest)
                    continue
                img.created = rec["created"]
            if rec["name"] is not None:
                img.names.append(rec["name"])
            img.pulled = img.pulled or rec["pulled"]
        return sorted(by_digest.values(), key=lambda i: (i.names[:1], i.digest))

    def resolve(self, ref: str) -> Image:
        """The image ``ref`` names: a name (``debian``, ``corpus/app:1``), a name with a
        digest (``name@sha256:…``: that manifest), a manifest digest, or an image id
        (``sha256:…`` of the config, or 12 or more of its first hex digits)."""
        images = self.images()
        if not isinstance(ref, str) or not ref:
            raise errors.InvalidArgument("an empty image reference")
        hexpart = ref.removeprefix("sha256:")
        if 12 <= len(hexpart) <= 64 and all(c in "0123456789abcdef" for c in hexpart):
            found = [i for i in images if i.id[7:].startswith(hexpart)
                     or i.digest[7:].startswith(hexpart)]
            if len({i.id for i in found}) == 1:
                return found[0]
            if len(found) > 1:
                raise errors.InvalidArgument(f"image reference {ref!r} is ambiguous")
            if len(hexpart) == 64 and ref.startswith("sha256:"):
                raise errors.NotFound(f"no image {ref}")
        parsed = reference.parse(ref)
        for img in images:
            if parsed.digest is not None:
                repos = {reference.parse(n).repository for n in img.names}
                if img.digest == parsed.digest and (not repos or parsed.repository in repos):
                    return img
            elif str(parsed) in img.names:
                return img
        raise errors.NotFound(f"no image {parsed.familiar}")

    # -- layers -----------------------------------------------------------------------

    def ensure_layer(self, chain: str, parent_chain: str | None, diff_id: str,
                     open_blob: Callable[[], LayerBlob]) -> bool:
        """Make the layer of chain id ``chain`` on ``parent_chain`` unless it is held:
        ``open_blob()`` gives the layer's (compressed or not) tar.  True when it was
        applied here, False when it was held already (it is the image store's again
        then, should only containerd's snapshots have held it).  Its diff id must come
        out as ``diff_id``: else ``Corrupt`` and no layer is left."""
        lid = layer_id(chain)
        parent = layer_id(parent_chain) if parent_chain else None
        with fsutil.locked(self.locks_dir / lid):
            if self._held(lid, chain, parent):
                return False
            blob = open_blob()
            try:
                with blob.stream:
                    self.drv.apply_diff(lid, parent, blob.stream)
                    blob.finish()
                got = self.drv.record(lid).identity.diff_id
                if got != diff_id:
                    raise errors.Corrupt(f"layer's diff id is {got}, its image config says "
                                         f"{diff_id}", layer=lid)
            except BaseException:
                with contextlib.suppress(errors.LaminaError, OSError):
                    if self.drv.exists(lid):
                        self.drv.remove(lid)
                raise
            crashpoints.reached("image:layer-applied")
            return True

    def _held(self, lid: LayerId, chain: str, parent: LayerId | None) -> bool:
        """Whether layer ``lid`` is there, claimed for the image store again (False: it
        is not, or went with containerd's last snapshot of it just now)."""
        try:
            meta = self.drv.record(lid)
        except errors.NotFound:
            return False
        if meta.identity.chain_id != chain or meta.parent != parent or meta.rw:
            raise errors.Corrupt("layer named by a chain id is not that layer "
                                 f"(its chain id is {meta.identity.chain_id})", layer=lid)
        try:
            self.drv.claim(lid, Holder.API)
        except errors.NotFound:
            return False
        return True

    def check(self, *, repair: bool = False) -> tuple[list[str], list[str]]:
        """Every image's layers are there (``lamina check``): the problems found, and
        with ``repair`` what was done — a missing layer is applied again from its blob,
        which the content store keeps.  A name or image that cannot be read is a
        problem too (repaired by ``image rm`` of it, not here)."""
        problems: list[str] = []
        repairs: list[str] = []
        damaged: list[str] = []
        for img in self.images(damaged):
            missing = [c for c in img.chains if not self.drv.exists(layer_id(c))]
            if not missing:
                continue
            name = img.names[0] if img.names else img.id
            problems.append(f"image {name}: {len(missing)} of its {len(img.chains)} layers "
                            f"are gone (chain ids {', '.join(missing)})")
            if repair:
                try:
                    self.restore_layers(img)
                except errors.LaminaError as e:
                    repairs.append(f"image {name}: cannot apply its layers again: {e}")
                else:
                    repairs.append(f"image {name}: its layers applied again from its blobs")
        problems += damaged
        return problems, repairs

    def restore_layers(self, img: Image) -> int:
        """Apply ``img``'s layers that are not there from the blobs the content store
        keeps, bottom first; how many were applied."""
        applied = 0
        parent: str | None = None
        with self.session():
            for layer, diff_id, chain in zip(img.manifest.layers, img.config.diff_ids,
                                             img.chains, strict=True):
                def opener(layer: spec.Descriptor = layer) -> LayerBlob:
                    return self.content.open_layer(layer.digest, size=layer.size)

                applied += self.ensure_layer(chain, parent, diff_id, opener)
                parent = chain
        return applied

    def add_image(self, names: list[str | None], manifest_desc: spec.Descriptor,
                  *, pulled: bool = False) -> None:
        """Give the image ``manifest_desc`` every one of ``names`` (None: unnamed); each
        is checked before the first is written."""
        for name in names:
            if name is not None:
                reference.parse(name)
        for name in names:
            self.set_name(name, manifest_desc, pulled=pulled)

    # -- commands ---------------------------------------------------------------------

    def tag(self, source: str, target: str) -> Reference:
        img = self.resolve(source)
        ref = reference.parse(target)
        if ref.digest is not None:
            raise errors.InvalidArgument(f"cannot tag with a digest: {target!r}")
        self.set_name(str(ref), img.manifest_desc, pulled=img.pulled)
        return ref

    def remove(self, ref: str) -> tuple[list[str], str | None]:
        """``image rm``: a name is untagged; an id (or the last name) removes the image and
        then the blobs and layers no other image uses.  The names untagged and the id
        deleted (None if the image stays, named otherwise)."""
        img = self.resolve(ref)
        by_name = False
        with contextlib.suppress(errors.LaminaError):
            parsed = reference.parse(ref)
            by_name = parsed.digest is None and str(parsed) in img.names
        untagged = [str(reference.parse(ref))] if by_name else list(img.names)
        remaining = [n for n in img.names if n not in untagged]
        if not remaining and self.top_mounted(img):
            raise errors.Busy(f"image {img.id} is mounted (image unmount it first)")
        for name in untagged:
            self._drop_name(name, img.digest)
        if remaining:
            return untagged, None
        self._drop_name(None, img.digest)
        self._collect_unless_busy("image rm")
        return untagged, img.id

    def top_mounted(self, img: Image) -> bool:
        top = img.top
        return top is not None and self.drv.exists(top) and self.drv.mount_count(top) > 0

    def mount(self, ref: str) -> Path:
        img = self.resolve(ref)
        if img.top is None:
            raise errors.InvalidArgument(f"image {img.id} has no layers to mount")
        return self.drv.get(img.top)

    def unmount(self, ref: str) -> None:
        img = self.resolve(ref)
        if img.top is not None:
            self.drv.put(img.top)

    def prune(self) -> tuple[list[str], int]:
        """Remove the blobs no image uses; their digests and bytes."""
        sizes = {d: self.content.size(d) for d in self.content.digests()}
        blobs, _ = self._collect_unless_busy("image prune")
        return blobs, sum(sizes.get(d, 0) for d in blobs)

    def _collect_unless_busy(self, command: str) -> tuple[list[str], list[LayerId]]:
        """:meth:`collect`, but not waiting for a load or pull (one from a slow registry
        holds the store for as long as it takes): then nothing is swept now, the store
        stays marked, and the next command that opens it after that pull sweeps."""
        probe = fsutil.FileLock(self._gc_lock)
        if probe.acquire(blocking=False):
            probe.release()
            return self.collect(wait=False)
        log.warning("lamina: %s: a load or pull is running: what no image uses is swept "
                    "after it (image prune)", command)
        return [], []


def _now() -> str:
    from lamina.store.layers import wall_time

    return wall_time()
