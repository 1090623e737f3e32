"""``image pull``: an image from a registry into the store, applied as it downloads.

The order of a pull, and why:

1. The manifest (an index resolved to the platform asked for, then its manifest; at
   most :data:`~lamina.image.spec.MAX_LAYERS` layers), and the config: small
   documents, fetched one after the other and verified.
2. The layers' blobs, :data:`JOBS` at once, bottom layer first, each into a
   :class:`~lamina.image.content.BlobWriter` (hashed as it is written, committed only
   when its size and digest are right) opened when its download begins: the files a
   pull holds open grow with ``jobs``, not with the layers.
3. Meanwhile, in this thread, each layer is applied in order, **from its blob as it
   grows**: the applier reads the ingest file behind the writer (:class:`_Growing`),
   waiting when it catches up, so decompressing and applying overlap the download.  The
   applier's stream ends only once the whole blob is verified: a layer whose bytes turn
   out wrong fails its apply and
   :meth:`~lamina.image.store.ImageStore.ensure_layer` removes it.  A layer the store
   holds already (by chain id) is not applied again; its blob is still fetched unless
   the store has it, so ``image push`` and ``image save`` have the exact bytes.
4. The name, written last (:meth:`~lamina.image.store.ImageStore.set_name`): the
   commit point.

The crash model is the image store's: everything before the name is reachable from no
name, so a pull that fails sweeps what it made (:meth:`ImageStore.collect`), and one
that is killed leaves the store marked for the next open to sweep.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, cast

from lamina import errors
from lamina.image import reference, spec
from lamina.image.content import CHUNK, BlobWriter, LayerBlob
from lamina.image.registry import Options, Registry
from lamina.image.store import Image, ImageStore, host, layer_id, platform_matches
from lamina.progress import counted

JOBS = 3
"""Layers downloaded at once (Docker's ``max-concurrent-downloads``)."""
MAX_INDEX_DEPTH = 2
SHOWN_PLATFORMS = 10
"""How many of an index's platforms an error names."""


class Progress(Protocol):
    """What a pull reports as it goes (called from several threads)."""

    def begin(self, layers: list[spec.Descriptor], fetch: list[bool],
              apply: list[bool]) -> None:
        """The layers, and which of them are downloaded and which applied."""

    def downloaded(self, index: int, nbytes: int) -> None: ...

    def applied(self, index: int, nbytes: int) -> None: ...


@dataclass
class Pulled:
    """What a pull did: the image, under ``name``, and its layers' fates."""

    name: str
    image: Image
    downloaded: int
    """Bytes of blobs downloaded."""
    applied: int
    reused: int


class _Growing:
    """A blob being downloaded, readable behind its writer while it grows.

    Nothing is opened before its download starts (:meth:`start`, in the download's
    thread): a pull holds files for the blobs downloading (``jobs`` of them) and the
    one being applied, never one per layer.  The download thread writes through
    :meth:`write` (the registry's sink) and ends with :meth:`commit` or :meth:`fail`;
    the applier follows with :meth:`follow`, whose stream waits for bytes, raises the
    download's error, and ends only once the blob is verified (its size and digest: the
    fsync and the rename into the store follow, and the pull's name waits for them).
    The read side's file is closed by whichever comes last of the download's end and
    its reader's close."""

    def __init__(self, digest: str, size: int, index: int, progress: Progress | None) -> None:
        self.digest = digest
        self.size = size
        self.index = index
        self._progress = progress
        self._cond = threading.Condition()
        self.writer: BlobWriter | None = None
        self._fd = -1
        self._readers = 0
        self._written = 0
        self._verified = False
        self._done = False
        self.error: BaseException | None = None

    def start(self, writer: BlobWriter) -> None:
        """The download begins: its writer, and the file the applier reads behind it."""
        fd = os.open(writer.tmp, os.O_RDONLY | os.O_CLOEXEC)
        with self._cond:
            self.writer, self._fd = writer, fd
            self._cond.notify_all()

    @property
    def offset(self) -> int:
        assert self.writer is not None
        return self.writer.offset

    def write(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        with self._cond:
            self._written = self.writer.offset
            self._cond.notify_all()
        if self._progress is not None:
            self._progress.downloaded(self.index, len(data))

    def commit(self) -> None:
        """Check the blob, let the applier finish, then make the blob durable: the
        applier need not wait for the fsync."""
        w = self.writer
        assert w is not None
        if w.offset != w.expected_size or w.digest != w.expected:
            w.commit()  # raises the writer's own Corrupt (and aborts)
        with self._cond:
            self._verified = True
            self._cond.notify_all()
        w.commit()
        with self._cond:
            self._done = True
            self._cond.notify_all()
            self._close_unfollowed()

    def fail(self, error: BaseException) -> None:
        if self.writer is not None:
            self.writer.abort()
        with self._cond:
            self.error = error
            self._cond.notify_all()
            self._close_unfollowed()

    def _close_unfollowed(self) -> None:
        if self._readers == 0:
            self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def wait(self, *, durable: bool = True) -> None:
        """Until the blob is committed (or only verified: not ``durable``); the
        download's error if it failed."""
        with self._cond:
            while not (self._done or (self._verified and not durable)) and self.error is None:
                self._cond.wait()
            error = self.error
        if error is None:
            return
        # Raised afresh in the applier's thread, the download's own error as its cause.
        if isinstance(error, errors.LaminaError):
            raise type(error)(str(error)) from error
        raise errors.LaminaError(f"blob {self.digest}: download failed: {error!r}") from error

    def read_at(self, pos: int, n: int) -> bytes:
        with self._cond:
            while ((self._fd < 0 or pos >= self._written) and not self._verified
                   and self.error is None):
                self._cond.wait()
            if self.error is not None:
                self.wait(durable=False)
            avail = self._written - pos
            fd = self._fd
        return os.pread(fd, min(n, avail), pos) if avail > 0 else b""

    def follow(self, on_read: Callable[[int], None] | None) -> LayerBlob | None:
        """The applier's stream behind the download, with what waits for its end; None
        once the blob is in the store (read it from there)."""
        with self._cond:
            if self.error is None and self._done and self._fd < 0:
                return None
            self._readers += 1
        follower = _Follower(self, on_read)
        return LayerBlob(cast(BinaryIO, follower), follower.finish)

    def unfollow(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._done or self.error is not None:
                self._close_unfollowed()


class _Follower:
    """The applier's stream over a :class:`_Growing` blob."""

    def __init__(self, blob: _Growing, on_read: Callable[[int], None] | None) -> None:
        self._blob: _Growing | None = blob
        self._pos = 0
        self._on_read = on_read

    def _following(self) -> _Growing:
        if self._blob is None:
            raise ValueError("read of a closed blob stream")
        return self._blob

    def read(self, n: int = -1) -> bytes:
        data = self._following().read_at(self._pos, CHUNK if n is None or n < 0 else n)
        self._pos += len(data)
        if data and self._on_read is not None:
            self._on_read(len(data))
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def finish(self) -> None:
        """Wait for the download's end: the blob is whole and verified (else its error)."""
        self._following().wait(durable=False)

    def close(self) -> None:
        blob, self._blob = self._blob, None
        if blob is not None:
            blob.unfollow()

    def __enter__(self) -> _Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve_platform(reg: Registry, path: str, data: bytes, media: str, digest: str,
                      want: spec.Platform, what: str) -> tuple[bytes, spec.Descriptor]:
    """The manifest of ``want``'s platform (following an index), and its descriptor."""
    for _ in range(MAX_INDEX_DEPTH + 1):
        if media in spec.MANIFESTS:
            return data, spec.Descriptor(media, digest, len(data))
        if media not in spec.INDEXES:
            raise errors.InvalidArgument(f"{what}: media type {media!r} is not an image "
                                         "manifest or index")
        index = spec.parse_index(data, what, media)
        exact = [d for d in index.manifests
                 if platform_matches(want, d.platform) and d.platform is not None
                 and (not want.variant or d.platform.variant == want.variant)]
        found = exact or [d for d in index.manifests if platform_matches(want, d.platform)]
        if not found:
            raise errors.NotFound(f"{what}: no manifest for {want} (the index has "
                                  f"{_platforms(index)})")
        data, media, digest = reg.get_manifest(path, found[0].digest)
    raise errors.Corrupt(f"{what}: indexes nested too deep")


def _platforms(index: spec.Index) -> str:
    """The platforms an index offers, as an error says them: the first
    :data:`SHOWN_PLATFORMS` (an index may list thousands)."""
    offered = sorted({str(d.platform)[:100] for d in index.manifests if d.platform})
    if not offered:
        return "no platforms"
    more = len(offered) - SHOWN_PLATFORMS
    return ", ".join(offered[:SHOWN_PLATFORMS]) + (f" and {more} more" if more > 0 else "")


def pull(store: ImageStore, ref_text: str, *, platform: spec.Platform | None = None,
         jobs: int = JOBS, options: Options | None = None,
         progress: Progress | None = None) -> Pulled:
    """Pull ``ref_text`` (``host/repo:tag``, ``repo@sha256:…``) into ``store``."""
    if jobs < 1:
        raise errors.InvalidArgument(f"--jobs {jobs}: at least 1")
    ref = reference.parse(ref_text)
    want = platform or host()
    with Registry(ref.domain, options, pool_size=jobs + 1) as reg:
        failed = True
        try:
            with store.session():
                pulled = _pull(store, reg, ref, want, jobs, progress)
            failed = False
            return pulled
        finally:
            if failed:  # nothing names what this pull made: sweep it now
                with contextlib.suppress(errors.LaminaError, OSError):
                    store.collect(wait=False)


def _pull(store: ImageStore, reg: Registry, ref: reference.Reference, want: spec.Platform,
          jobs: int, progress: Progress | None) -> Pulled:
    what = f"image {ref.familiar}"
    data, media, digest = reg.get_manifest(ref.path, ref.digest or ref.tag or "latest")
    data, desc = _resolve_platform(reg, ref.path, data, media, digest, want, what)
    manifest = spec.parse_manifest(data, f"{what}: manifest", desc.media_type)
    config_bytes = reg.blob_bytes(ref.path, manifest.config, spec.MAX_DOCUMENT)
    cfg = spec.parse_config(config_bytes, f"{what}: config")
    if len(cfg.diff_ids) != len(manifest.layers):
        raise errors.Corrupt(f"{what}: {len(manifest.layers)} layers, its config names "
                             f"{len(cfg.diff_ids)} diff ids")
    for layer in manifest.layers:
        if layer.urls and layer.media_type in (spec.DOCKER_FOREIGN, spec.OCI_NONDIST):
            raise errors.Unsupported(f"{what}: layer {layer.digest} is foreign "
                                     "(non-distributable); lamina does not fetch those")
    store.content.put(config_bytes, manifest.config.digest)
    store.content.put(data, desc.digest)
    img = Image(desc, manifest, cfg)
    downloaded, applied, reused = _layers(store, reg, ref.path, img, jobs, progress)
    name = str(ref)
    store.set_name(name, desc, pulled=True)
    img.names = [name]
    img.pulled = True
    return Pulled(name, img, downloaded, applied, reused)


def _download(store: ImageStore, reg: Registry, path: str, layer: spec.Descriptor,
              blob: _Growing, stop: threading.Event) -> None:
    try:
        if stop.is_set():
            raise errors.LaminaError(f"blob {layer.digest}: download cancelled")
        writer = store.content.writer(layer.digest, layer.size)
        try:
            blob.start(writer)
        except BaseException:
            writer.abort()
            raise
        reg.fetch_blob(path, layer, blob, stop.is_set)
        blob.commit()
    except BaseException as e:  # handed to the applier, which raises it
        blob.fail(e)


def _layers(store: ImageStore, reg: Registry, path: str, img: Image, jobs: int,
            progress: Progress | None) -> tuple[int, int, int]:
    """Download the layers ``jobs`` at a time and apply each in order as it streams in;
    (bytes downloaded, layers applied, layers reused)."""
    layers = list(img.manifest.layers)
    chains = img.chains
    apply = [not store.drv.exists(layer_id(c)) for c in chains]
    fetch = [not store.content.has(d.digest) for d in layers]
    if progress is not None:
        progress.begin(layers, fetch, apply)
    stop = threading.Event()
    growing: dict[int, _Growing] = {}
    applied = reused = 0
    with contextlib.ExitStack() as stack:
        # Unwound in reverse: stop the downloads and drop those not begun, wait for the
        # running ones (each aborts its own writer), then close what readers are left.
        stack.callback(_close_all, growing)
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="lamina-pull")
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        stack.callback(stop.set)
        seen: dict[str, _Growing] = {}
        for i, layer in enumerate(layers):
            if not fetch[i]:
                continue
            if layer.digest in seen:  # the same blob twice in one image: fetched once
                growing[i] = seen[layer.digest]
                continue
            growing[i] = seen[layer.digest] = _Growing(layer.digest, layer.size, i, progress)
            pool.submit(_download, store, reg, path, layer, growing[i], stop)
        parent: str | None = None
        for i, (layer, diff_id, chain) in enumerate(zip(layers, img.config.diff_ids, chains,
                                                        strict=True)):
            on_read = None if progress is None else functools.partial(progress.applied, i)

            def opener(i: int = i, layer: spec.Descriptor = layer,
                       on_read: Callable[[int], None] | None = on_read) -> LayerBlob:
                followed = growing[i].follow(on_read) if i in growing else None
                if followed is not None:
                    return followed
                blob = store.content.open_layer(layer.digest, size=layer.size)
                return blob._replace(stream=_counted(blob.stream, on_read))

            if store.ensure_layer(chain, parent, diff_id, opener):
                applied += 1
            else:
                reused += 1
            parent = chain
        for g in set(growing.values()):
            g.wait()
    return sum({layers[i].digest: layers[i].size for i in growing}.values()), applied, reused


def _close_all(growing: dict[int, _Growing]) -> None:
    for g in growing.values():
        g.close()


def _counted(stream: BinaryIO, on_read: Callable[[int], None] | None) -> BinaryIO:
    return stream if on_read is None else counted(stream, on_read, owned=True)
