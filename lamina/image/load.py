"""``image load``: images from a ``docker save`` archive or an OCI image layout.

Three layouts, as a tar (plain or compressed, from a file or a pipe) or a directory:

- Docker's classic ``docker save``: ``manifest.json`` (``Config``, ``RepoTags``,
  ``Layers`` as paths in the archive), ``<id>/layer.tar``, ``<config>.json``;
- the layout Docker ≥ 25 writes: an OCI layout with ``manifest.json`` beside it (its
  ``<id>/layer.tar`` entries are links to ``blobs/sha256/…``);
- an OCI image layout: ``oci-layout``, ``index.json``, ``blobs/sha256/…``.

A tar is read front to back (:mod:`lamina.image.sources`): first for its layout — the
documents and small members kept, the larger members noted and read past — then, once
the images are resolved, again for the members they need, each stored in the content
store as it streams (hashed on the way: a member at ``blobs/sha256/HEX`` must hash to
that digest, and be its descriptor's size).  A member nothing names is never stored.
Links are followed by name within the archive only.  Then each image's layers are
applied bottom first, from the content store (verified again as they are read), unless
the store holds them already; each layer's diff id must be the one its config names.
Names are written last: the commit point.  Anything wrong is an error, and the load
leaves no image: its blobs and layers are swept
(:meth:`~lamina.image.store.ImageStore.collect`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lamina import errors
from lamina.archive import codecs
from lamina.image import reference, spec
from lamina.image.content import LayerBlob
from lamina.image.sources import DirSource, Needed, Source, TarSource
from lamina.image.store import Image, ImageStore, host, platform_matches
from lamina.progress import counted

MAX_READINGS = 8
"""The most times an archive is read for one load: once for its layout, then once for
each level of documents (index, manifest, config) the first reading only noted."""

Progress = Callable[[str, int], None]
"""Called with ("read", bytes) as the archive is read, ("plan", bytes) once the layers
to apply are known (their blobs' total), ("layer", bytes) as they are applied and
("layer-done", 1) after each."""


@dataclass
class Loaded:
    """One image a load made or found: its names (none: unnamed) and ids."""

    names: list[str]
    image: Image
    applied: int
    reused: int


# -- the layouts ---------------------------------------------------------------------


@dataclass
class _Found:
    names: list[str | None]
    manifest: spec.Descriptor
    manifest_bytes: bytes | None  # a manifest made here (classic layout), to store


def _json_doc(data: bytes, what: str) -> Any:
    if len(data) > spec.MAX_DOCUMENT:
        raise errors.Corrupt(f"{what}: over {spec.MAX_DOCUMENT >> 20} MiB")
    try:
        return json.loads(data)
    except RecursionError:  # nested deeper than the parser goes: no image document is
        raise errors.Corrupt(f"{what}: not JSON (nested too deep)") from None
    except ValueError as e:
        raise errors.Corrupt(f"{what}: not JSON ({e})") from None


def _names(tags: Any, what: str) -> list[str | None]:
    if tags is None:
        return [None]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise errors.Corrupt(f"{what}: RepoTags is not a list of names")
    return [str(reference.parse(t)) for t in tags] or [None]


def _classic(src: Source, doc: Any) -> list[_Found]:
    """The images of Docker's ``manifest.json``; for each, an OCI manifest made over the
    archive's files (Docker ≥ 25 writes that manifest itself: it is found by digest)."""
    if not isinstance(doc, list):
        raise errors.Corrupt("manifest.json: not a list of images")
    for i, item in enumerate(doc):
        if not isinstance(item, dict) or not isinstance(item.get("Config"), str) \
                or not isinstance(item.get("Layers"), list) \
                or not all(isinstance(x, str) for x in item["Layers"]):
            raise errors.Corrupt(f"manifest.json: image {i}: needs Config and Layers paths")
    # Every file named here is hashed below: those still to be read, in one reading.
    src.need((p for item in doc for p in [item["Config"], *item["Layers"]]), "manifest.json")
    out = []
    for i, item in enumerate(doc):
        what = f"manifest.json: image {i}"
        names = _names(item.get("RepoTags"), what)
        cdigest, csize = src.blob(item["Config"], f"{what}: config")
        layers = []
        for j, path in enumerate(item["Layers"]):
            digest, size = src.blob(path, f"{what}: layer {j}")
            layers.append(spec.Descriptor(_layer_media(src, digest), digest, size))
        manifest = {"schemaVersion": 2, "mediaType": spec.OCI_MANIFEST,
                    "config": {"mediaType": spec.OCI_CONFIG, "digest": cdigest, "size": csize},
                    "layers": [d.to_json() for d in layers]}
        data = spec.dumps(manifest)
        desc = spec.Descriptor(spec.OCI_MANIFEST, _sha(data), len(data))
        out.append(_Found(names, desc, data))
    return out


def _layer_media(src: Source, digest: str) -> str:
    """A layer blob's media type, from its first bytes."""
    with src.content.open(digest) as f:
        head = f.read(codecs.SNIFF)
    if head.startswith(b"\x1f\x8b"):
        return spec.OCI_LAYER_GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return spec.OCI_LAYER_ZSTD
    return spec.OCI_LAYER


def _sha(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def _oci(src: Source, index_bytes: bytes) -> list[_Found]:
    """The images of an OCI layout's ``index.json`` (an index in it resolved to this
    host's platform), named by their annotations or by Docker's ``manifest.json``."""
    index = spec.parse_index(index_bytes, "index.json")
    out = []
    for i, desc in enumerate(index.manifests):
        what = f"index.json: manifest {i}"
        desc = _platform_manifest(src, desc, what)
        name = desc.annotations.get(spec.ANNOTATION_IMAGE_NAME)
        if name:
            name = _image_name(name, f"{what}: annotation {spec.ANNOTATION_IMAGE_NAME}")
        out.append(_Found([name or _ref_name(desc)], desc, None))
    return out


def _image_name(text: str, what: str) -> str:
    """An image name from the archive, in normal form (what the store files it under);
    ``InvalidArgument`` naming ``what`` when it is no image name."""
    try:
        return str(reference.parse(text))
    except errors.InvalidArgument as e:
        raise errors.InvalidArgument(f"{what}: {e}") from None


def _ref_name(desc: spec.Descriptor) -> str | None:
    """``org.opencontainers.image.ref.name`` when it is a whole image name (not a tag)."""
    ref = desc.annotations.get(spec.ANNOTATION_REF_NAME)
    if not ref or ("/" not in ref and ":" not in ref):
        return None
    try:
        return str(reference.parse(ref))
    except errors.InvalidArgument:
        return None


def _platform_manifest(src: Source, desc: spec.Descriptor, what: str) -> spec.Descriptor:
    for _ in range(4):
        if desc.media_type in spec.MANIFESTS:
            return desc
        if desc.media_type not in spec.INDEXES:
            raise errors.InvalidArgument(f"{what}: media type {desc.media_type!r} is not an "
                                         "image manifest or index")
        digest = src.blob_by_digest(desc, what)
        index = spec.parse_index(src.content.read(digest, limit=spec.MAX_DOCUMENT), what)
        want = host()
        for d in index.manifests:
            if platform_matches(want, d.platform):
                desc = spec.Descriptor(d.media_type, d.digest, d.size,
                                       {**desc.annotations, **d.annotations}, d.platform)
                break
        else:
            raise errors.NotFound(f"{what}: no manifest for {want}")
    raise errors.Corrupt(f"{what}: indexes nested too deep")


def _image_of(store: ImageStore, src: Source, found: _Found, what: str) -> Image:
    """Check that the archive holds every blob of ``found``'s image; its :class:`Image`."""
    if found.manifest_bytes is not None:
        store.content.put(found.manifest_bytes, found.manifest.digest)
    else:
        src.blob_by_digest(found.manifest, what)
    data = store.content.read(found.manifest.digest, limit=spec.MAX_DOCUMENT)
    manifest = spec.parse_manifest(data, f"{what}: manifest", found.manifest.media_type)
    if found.manifest_bytes is None:
        src.blob_by_digest(manifest.config, f"{what}: config")
        for j, layer in enumerate(manifest.layers):  # read when the images are known
            src.blob_by_digest(layer, f"{what}: layer {j}", stored=False)
    cfg = spec.parse_config(store.content.read(manifest.config.digest,
                                               limit=spec.MAX_DOCUMENT), f"{what}: config")
    if len(cfg.diff_ids) != len(manifest.layers):
        raise errors.Corrupt(f"{what}: {len(manifest.layers)} layers, its config names "
                             f"{len(cfg.diff_ids)} diff ids")
    return Image(spec.Descriptor(manifest.media_type, found.manifest.digest,
                                 found.manifest.size), manifest, cfg)


def apply_layers(store: ImageStore, img: Image,
                 progress: Progress | None = None) -> tuple[int, int]:
    """Apply ``img``'s layers that the store does not hold, bottom first; (applied, reused)."""
    applied = reused = 0
    parent: str | None = None
    for layer, diff_id, chain in zip(img.manifest.layers, img.config.diff_ids, img.chains,
                                     strict=True):
        def opener(layer: spec.Descriptor = layer, diff_id: str = diff_id) -> LayerBlob:
            # An uncompressed layer's digest is its diff id, which the apply computes and
            # ensure_layer checks: its blob need not be hashed a second time.
            blob = store.content.open_layer(layer.digest, size=layer.size,
                                            verify=layer.digest != diff_id)
            if progress is None:
                return blob
            return blob._replace(stream=counted(blob.stream, functools.partial(
                progress, "layer"), owned=True))

        if store.ensure_layer(chain, parent, diff_id, opener):
            applied += 1
        else:
            reused += 1
            if progress is not None:
                progress("layer", layer.size)
        if progress is not None:
            progress("layer-done", 1)
        parent = chain
    return applied, reused


@contextlib.contextmanager
def _source(store: ImageStore, path: str | None, stream: BinaryIO | None,
            progress: Progress | None) -> Iterator[Source]:
    if path is not None and os.path.isdir(path):
        yield DirSource(store.content, Path(path))
        return
    src = TarSource(store.content)
    with contextlib.ExitStack() as stack:
        stack.callback(src.close)
        if stream is None:
            assert path is not None
            try:
                stream = stack.enter_context(open(path, "rb"))
            except OSError as e:
                raise errors.InvalidArgument(f"cannot read it: {e.strerror or e}",
                                             path=path) from None
        src.read(stream, None if progress is None else functools.partial(progress, "read"))
        yield src


def _resolve(store: ImageStore, src: Source,
             path: str | None) -> tuple[list[_Found], list[Image]]:
    """The archive's images, every blob they need stored.  Resolving may find that it
    needs members the first reading only noted: they are read, and it starts again."""
    for _ in range(MAX_READINGS):
        try:
            index = src.document("index.json", "index.json")
            classic_doc = src.document("manifest.json", "manifest.json")
            if index is None and classic_doc is None:
                raise errors.InvalidArgument("neither an OCI image layout (index.json) nor "
                                             "a docker save archive (manifest.json)",
                                             path=path)
            found = _layouts(src, index, classic_doc)
            images = [_image_of(store, src, f, f"image {i}") for i, f in enumerate(found)]
        except Needed as e:
            src.fetch(e.paths)
            continue
        src.fetch(src.wanted)
        return found, images
    raise errors.Corrupt(f"image archive: documents nested deeper than {MAX_READINGS} "
                         "readings reach")


def load(store: ImageStore, path: str | None = None, stream: BinaryIO | None = None,
         progress: Progress | None = None) -> list[Loaded]:
    """Load the images of the archive at ``path`` (a tar or a directory) or in
    ``stream``; what was loaded.  Nothing is named until every image is complete; a
    load that fails leaves nothing (what it made is swept before the error is raised,
    unless another load runs: then the next store to open sweeps it)."""
    try:
        loaded, unasked = _load(store, path, stream, progress)
    except BaseException:
        with contextlib.suppress(errors.LaminaError, OSError):
            store.collect(wait=False)
        raise
    if unasked:  # members a pipe gave before anything named them: those unnamed go
        with contextlib.suppress(errors.LaminaError, OSError):
            store.collect(wait=False)
    return loaded


def _load(store: ImageStore, path: str | None, stream: BinaryIO | None,
          progress: Progress | None) -> tuple[list[Loaded], bool]:
    with store.session():
        with _source(store, path, stream, progress) as src:
            found, images = _resolve(store, src, path)
        if progress is not None:
            progress("plan", sum(d.size for img in images for d in img.manifest.layers))
        results = []
        for f, img in zip(found, images, strict=True):
            applied, reused = apply_layers(store, img, progress)
            results.append(Loaded([n for n in _unique(f.names) if n], img, applied, reused))
        for f, img in zip(found, images, strict=True):
            store.add_image(_unique(f.names), img.manifest_desc)
    return results, src.unasked


def _unique(names: list[str | None]) -> list[str | None]:
    named = list(dict.fromkeys(n for n in names if n))
    return list(named) if named else [None]


def _layouts(src: Source, index: bytes | None, classic_doc: bytes | None) -> list[_Found]:
    classic = _classic(src, _json_doc(classic_doc, "manifest.json")) \
        if classic_doc is not None else None
    if index is None:
        assert classic is not None
        return classic
    oci = _oci(src, index)
    if classic is None:
        return oci
    # Docker ≥ 25: both.  The OCI manifests are the images (their digests are what
    # Docker wrote); manifest.json names them: match each by config and layers.
    for f in oci:
        data = src.content.read(src.blob_by_digest(f.manifest, "index.json"),
                                limit=spec.MAX_DOCUMENT)
        m = spec.parse_manifest(data, "index.json manifest", f.manifest.media_type)
        for c in classic:
            cm = spec.parse_manifest(c.manifest_bytes or b"", "manifest.json")
            if cm.config.digest == m.config.digest and \
                    [d.digest for d in cm.layers] == [d.digest for d in m.layers]:
                f.names = [*f.names, *c.names]
    return oci
