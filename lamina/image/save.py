"""``image save``: images as one tar that Docker, podman, skopeo and umoci all read.

The tar is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``)
with Docker's ``manifest.json`` beside it, as Docker ≥ 25 writes it: ``docker load``
(Docker 20.10 reads ``manifest.json``), ``podman load``, ``skopeo copy docker-archive:``
and ``oci-archive:`` take it, and ``umoci`` takes it untarred.  Every blob is written
as the store holds it, byte for byte as it was loaded or pulled (so every digest
survives the round trip), and verified against its digest as it streams out.

The documents come first, then the blobs (configs, layers, manifests, once each), so a
reader that streams can know the images before their layers arrive.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from typing import BinaryIO

from lamina.image import reference, spec
from lamina.image.content import CHUNK
from lamina.image.store import Image, ImageStore

BLOCK = 512
MTIME = 0
"""Every member's time: a save of the same images is the same bytes."""


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = MTIME
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def plan(store: ImageStore, refs: list[str]) -> list[tuple[Image, list[str]]]:
    """The images ``refs`` name, each with the names to save it under: the one a name
    asked for (none for an image asked for by id or digest, as ``docker save``)."""
    chosen: dict[str, tuple[Image, list[str]]] = {}
    for ref in refs:
        img = store.resolve(ref)
        names: list[str] = []
        if not _is_id(ref, img):
            parsed = reference.parse(ref)
            if parsed.digest is None:
                names = [str(parsed)]
        held = chosen.setdefault(img.digest, (img, []))
        held[1].extend(n for n in names if n not in held[1])
    return list(chosen.values())


def _is_id(ref: str, img: Image) -> bool:
    hexpart = ref.removeprefix("sha256:")
    return len(hexpart) >= 12 and (img.id[7:].startswith(hexpart)
                                   or img.digest[7:].startswith(hexpart))


def documents(images: list[tuple[Image, list[str]]]) -> dict[str, bytes]:
    """``oci-layout``, ``index.json`` and ``manifest.json`` for ``images``."""
    index: list[dict[str, object]] = []
    docker: list[dict[str, object]] = []
    for img, names in images:
        base = img.manifest_desc.to_json()
        base.pop("annotations", None)
        base.pop("platform", None)
        named: list[str | None] = [*names] or [None]
        for name in named:
            entry = dict(base)
            if name is not None:
                ref = reference.parse(name)
                entry["annotations"] = {spec.ANNOTATION_IMAGE_NAME: str(ref),
                                        spec.ANNOTATION_REF_NAME: ref.tag or ""}
            index.append(entry)
        docker.append({"Config": f"blobs/sha256/{img.id[7:]}",
                       "RepoTags": [reference.parse(n).familiar for n in names] or None,
                       "Layers": [f"blobs/sha256/{d.digest[7:]}" for d in img.manifest.layers]})
    return {
        "oci-layout": spec.dumps({"imageLayoutVersion": "1.0.0"}),
        "index.json": spec.dumps({"schemaVersion": 2, "mediaType": spec.OCI_INDEX,
                                  "manifests": index}),
        "manifest.json": spec.dumps(docker),
    }


def save(store: ImageStore, refs: list[str], out: BinaryIO,
         progress: Callable[[int, int], None] | None = None) -> int:
    """Write the tar of the images ``refs`` name to ``out``; the bytes written."""
    images = plan(store, refs)
    docs = documents(images)
    blobs: dict[str, int] = {}
    for img, _names in images:
        blobs.setdefault(img.id, img.manifest.config.size)
        for d in img.manifest.layers:
            blobs.setdefault(d.digest, d.size)
        blobs.setdefault(img.digest, img.manifest_desc.size)
    total = sum(blobs.values())
    written = 0

    def emit(data: bytes | memoryview) -> None:
        nonlocal written
        out.write(data)
        written += len(data)

    for name, data in docs.items():
        emit(_header(name, len(data)) + data + _padding(len(data)))
    for digest, size in blobs.items():
        with store.content.open(digest, size=size) as f:
            emit(_header(f"blobs/sha256/{digest[7:]}", size))
            while chunk := f.read(CHUNK):
                emit(chunk)
                if progress is not None:
                    progress(len(chunk), total)
        emit(_padding(size))
    emit(bytes(2 * BLOCK))
    return written
