"""OCI image-spec and Docker schema 2 documents, typed and validated.

Descriptors, manifests, indexes (Docker's manifest lists) and image configs are parsed
from their bytes with :func:`parse_manifest`, :func:`parse_index` and
:func:`parse_config`.  Whatever does not fit is ``Corrupt`` (``InvalidArgument`` for a
media type lamina does not take, ``Unsupported`` for a manifest of over
:data:`MAX_LAYERS` layers), naming the document: a document over :data:`MAX_DOCUMENT`
or nested too deep for the parser, a field of the wrong type, an unknown media type, a
digest that is not ``sha256:``, a negative size, a schema 1 manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lamina import errors
from lamina.image.reference import DIGEST

MAX_DOCUMENT = 4 << 20
"""The largest manifest, index or config taken (4 MiB, as containerd's limit)."""
MAX_LAYERS = 1000
"""The most layers a manifest may have.  Docker builds at most 127, overlayfs stacks at
most 500 (lamina's overlay backend, with the new mount API; 128 without); a manifest of
thousands is an attack on the puller (a request, a file and a layer each), not an
image."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_LIST})
CONFIGS = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYERS = frozenset({OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_NONDIST,
                    OCI_NONDIST + "+gzip", OCI_NONDIST + "+zstd",
                    DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_FOREIGN})

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"


def _fail(what: str, why: str) -> errors.Corrupt:
    return errors.Corrupt(f"{what}: {why}")


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(what, "not a JSON object")
    return value


def _str(doc: dict[str, Any], key: str, what: str, *, required: bool = True) -> str:
    value = doc.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _fail(what, f"{key!r} is {'missing' if value is None else 'not a string'}")
    return value


def _strmap(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _fail(what, "not a map of strings")
    return dict(value)


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """``data`` as a JSON object (at most :data:`MAX_DOCUMENT` bytes), else ``Corrupt``."""
    if len(data) > MAX_DOCUMENT:
        raise _fail(what, f"{len(data)} bytes, over the {MAX_DOCUMENT >> 20} MiB a document "
                    "may have")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise _fail(what, "not JSON (nested too deep)") from None
    except ValueError as e:
        raise _fail(what, f"not JSON ({e})") from None
    return _obj(doc, what)


def dumps(doc: Any) -> bytes:
    """The canonical bytes lamina writes for a document it makes (compact, as Docker)."""
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """What a document says of a blob: its media type, digest and size."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    platform: Platform | None = field(default=None, compare=False, hash=False)
    urls: tuple[str, ...] = field(default=(), compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            p: dict[str, str] = {"architecture": self.platform.architecture,
                                 "os": self.platform.os}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            out["platform"] = p
        return out


def parse_descriptor(value: Any, what: str) -> Descriptor:
    doc = _obj(value, what)
    digest = _str(doc, "digest", what)
    if not DIGEST.fullmatch(digest):
        raise _fail(what, f"digest {digest!r} is not a sha256 digest")
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _fail(what, f"size {size!r} is not a size")
    platform = None
    if doc.get("platform") is not None:
        p = _obj(doc["platform"], f"{what}: platform")
        platform = Platform(_str(p, "os", what), _str(p, "architecture", what),
                            _str(p, "variant", what, required=False))
    urls = doc.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise _fail(what, "urls is not a list of strings")
    return Descriptor(_str(doc, "mediaType", what, required=False), digest, size,
                      _strmap(doc.get("annotations"), f"{what}: annotations"), platform,
                      tuple(urls))


@dataclass(frozen=True)
class Manifest:
    """An image manifest: a config and layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict, compare=False)


def _media_type(doc: dict[str, Any], what: str, default: str) -> str:
    media = _str(doc, "mediaType", what, required=False) or default
    if media in DOCKER_SCHEMA1:
        raise errors.InvalidArgument(f"{what}: Docker schema 1 manifests are not supported")
    return media


def parse_manifest(data: bytes, what: str = "manifest", media_type: str = "") -> Manifest:
    """An image manifest's bytes as a :class:`Manifest`."""
    doc = load_json(data, what)
    if doc.get("schemaVersion") != 2:
        if doc.get("schemaVersion") == 1:
            raise errors.InvalidArgument(f"{what}: Docker schema 1 manifests are not supported")
        raise _fail(what, f"schemaVersion {doc.get('schemaVersion')!r} is not 2")
    media = _media_type(doc, what, media_type or OCI_MANIFEST)
    if media not in MANIFESTS:
        raise errors.InvalidArgument(f"{what}: media type {media!r} is not an image manifest")
    if "manifests" in doc and "layers" not in doc:
        raise _fail(what, "an index where a manifest was expected")
    config = parse_descriptor(doc.get("config"), f"{what}: config")
    if config.media_type and config.media_type not in CONFIGS:
        raise errors.InvalidArgument(
            f"{what}: config media type {config.media_type!r} is not an image config")
    raw = doc.get("layers")
    if not isinstance(raw, list):
        raise _fail(what, "layers is not a list")
    if len(raw) > MAX_LAYERS:
        raise errors.Unsupported(f"{what}: {len(raw)} layers, over the {MAX_LAYERS} lamina "
                                 "takes")
    layers = tuple(parse_descriptor(d, f"{what}: layer {i}") for i, d in enumerate(raw))
    for i, d in enumerate(layers):
        if d.media_type not in LAYERS:
            raise errors.InvalidArgument(
                f"{what}: layer {i}: media type {d.media_type!r} is not a layer lamina takes")
    return Manifest(media, config, layers, _strmap(doc.get("annotations"), what))


@dataclass(frozen=True)
class Index:
    """An image index (Docker: a manifest list): manifests, one a platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict, compare=False)


def parse_index(data: bytes, what: str = "index", media_type: str = "") -> Index:
    doc = load_json(data, what)
    if doc.get("schemaVersion") != 2:
        raise _fail(what, f"schemaVersion {doc.get('schemaVersion')!r} is not 2")
    media = _media_type(doc, what, media_type or OCI_INDEX)
    if media not in INDEXES:
        raise errors.InvalidArgument(f"{what}: media type {media!r} is not an image index")
    raw = doc.get("manifests")
    if not isinstance(raw, list):
        raise _fail(what, "manifests is not a list")
    return Index(media, tuple(parse_descriptor(d, f"{what}: manifest {i}")
                              for i, d in enumerate(raw)),
                 _strmap(doc.get("annotations"), what))


def sniff_media_type(data: bytes, what: str) -> str:
    """The media type a manifest or index's bytes declare (or imply)."""
    doc = load_json(data, what)
    media = doc.get("mediaType")
    if isinstance(media, str) and media:
        return media
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


@dataclass(frozen=True)
class Config:
    """What lamina reads of an image config: the platform and the layers' diff ids."""

    os: str
    architecture: str
    variant: str
    created: str
    diff_ids: tuple[str, ...]
    doc: dict[str, Any] = field(compare=False)

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)


def parse_config(data: bytes, what: str = "config") -> Config:
    doc = load_json(data, what)
    rootfs = _obj(doc.get("rootfs"), f"{what}: rootfs")
    if rootfs.get("type") != "layers":
        raise _fail(what, f"rootfs type {rootfs.get('type')!r} is not 'layers'")
    ids = rootfs.get("diff_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and DIGEST.fullmatch(i)
                                            for i in ids):
        raise _fail(what, "rootfs.diff_ids is not a list of sha256 digests")
    return Config(_str(doc, "os", what, required=False), _str(doc, "architecture", what,
                                                              required=False),
                  _str(doc, "variant", what, required=False),
                  _str(doc, "created", what, required=False), tuple(ids), doc)


def layer_compression(media_type: str) -> str:
    """``""``, ``"gzip"`` or ``"zstd"``: how a layer of ``media_type`` is compressed."""
    if media_type.endswith(("gzip", ".gzip")):
        return "gzip"
    if media_type.endswith("zstd"):
        return "zstd"
    return ""
