"""``image push``: an image of the store to a registry, its bytes exactly as kept.

For each blob (the config, then the layers, :data:`JOBS` at once): a ``HEAD`` first,
and nothing more when the repository has it; else a cross-repository mount
(``POST …/uploads/?mount=DIGEST&from=REPO``) from each repository of the same registry
that the image is known by (a pulled image's name); else an upload: monolithic
(``POST`` then ``PUT ?digest=`` with the body) for blobs up to :data:`MONOLITHIC`,
chunked (``POST``, ``PATCH`` with ``Content-Range`` a :data:`UPLOAD_CHUNK` at a time,
``PUT ?digest=``) for larger ones.  Blobs are read from the content store, verified as
they stream out: a damaged one fails before its final ``PUT``.  The manifest goes
last, with its media type, as the exact bytes its digest names: the registry's
``Docker-Content-Digest`` must be the image's digest.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from lamina import errors
from lamina.image import reference, spec
from lamina.image.registry import Options, Registry, pull_scope, push_scope
from lamina.image.store import Image, ImageStore

JOBS = 3
MONOLITHIC = 1 << 20
"""Blobs up to this size go in one ``PUT``."""
UPLOAD_CHUNK = 16 << 20

Progress = Callable[[str, int], None]
"""Called with (digest, bytes) as a blob's bytes are sent (or skipped: all at once)."""


@dataclass
class Pushed:
    """What a push did: where to, the manifest's digest, and each blob's fate."""

    name: str
    digest: str
    blobs: dict[str, str]
    """digest → ``"exists"``, ``"mounted"`` or ``"uploaded"``."""
    sent: int
    """Bytes uploaded."""


def mount_sources(img: Image, dest: reference.Reference) -> list[str]:
    """The repositories of ``dest``'s registry that the image is known by (not ``dest``'s)."""
    out = []
    for name in img.names:
        ref = reference.parse(name)
        if ref.domain == dest.domain and ref.path != dest.path and ref.path not in out:
            out.append(ref.path)
    return out


def push(store: ImageStore, ref_text: str, dest_text: str | None = None, *,
         jobs: int = JOBS, options: Options | None = None,
         progress: Progress | None = None) -> Pushed:
    """Push the image ``ref_text`` names to ``dest_text`` (default: that same name)."""
    if jobs < 1:
        raise errors.InvalidArgument(f"--jobs {jobs}: at least 1")
    img = store.resolve(ref_text)
    dest = reference.parse(dest_text or ref_text)
    if dest_text is None and ref_text.removeprefix("sha256:") != ref_text:
        raise errors.InvalidArgument("image push: give DEST when REF is an id")
    sources = mount_sources(img, dest)
    blobs = [img.manifest.config, *img.manifest.layers]
    unique = list({d.digest: d for d in blobs}.values())
    for d in unique:  # every blob must be here before anything is sent
        store.content.size(d.digest)
    with Registry(dest.domain, options, pool_size=jobs + 1) as reg, \
            ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="lamina-push") as pool:
        fates = list(pool.map(lambda d: _push_blob(store, reg, dest.path, d, sources,
                                                   progress), unique))
        data = store.content.read(img.digest, limit=spec.MAX_DOCUMENT)
        media = img.manifest_desc.media_type or spec.sniff_media_type(data, "manifest")
        got = reg.put_manifest(dest.path, dest.digest or dest.tag or "latest", data, media)
    if got != img.digest:
        raise errors.Corrupt(f"manifest {img.digest}: the registry stored it as {got}")
    return Pushed(str(dest), img.digest, {d.digest: f for d, f in zip(unique, fates,
                                                                     strict=True)},
                  sum(d.size for d, f in zip(unique, fates, strict=True) if f == "uploaded"))


def _push_blob(store: ImageStore, reg: Registry, path: str, desc: spec.Descriptor,
               sources: list[str], progress: Progress | None) -> str:
    if reg.blob_exists(path, desc.digest):
        if progress is not None:
            progress(desc.digest, desc.size)
        return "exists"
    location = None
    for source in sources:
        scopes = [push_scope(path), pull_scope(source)]
        try:
            mounted, location = reg.start_upload(path, scopes, mount=desc.digest, source=source)
        except errors.Unauthorized:
            continue  # no pull access to that repository: upload instead
        if mounted:
            if progress is not None:
                progress(desc.digest, desc.size)
            return "mounted"
        break  # the registry opened an upload instead: use it
    if location is None:
        _, location = reg.start_upload(path, [push_scope(path)])
    with store.content.open(desc.digest, size=desc.size) as blob:
        if desc.size <= MONOLITHIC:
            data = blob.read()
            blob.read()  # the end: checks the digest
            reg.finish_upload(location, path, desc.digest, data)
        else:
            start = 0
            while chunk := _read_full(blob, UPLOAD_CHUNK):
                location = reg.upload_chunk(location, path, chunk, start)
                start += len(chunk)
                if progress is not None:
                    progress(desc.digest, len(chunk))
            reg.finish_upload(location, path, desc.digest)
            return "uploaded"
    if progress is not None:
        progress(desc.digest, desc.size)
    return "uploaded"


def _read_full(stream: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = stream.read(min(n - got, 1 << 20))
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)
