"""Small images for the image tests, built in memory: layer tars (:mod:`tests.tarbuild`)
put together as a classic ``docker save`` archive or an OCI image layout, with every
part overridable so that a test can make one wrong on purpose."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import tarbuild as tb

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA = {"": "application/vnd.oci.image.layer.v1.tar",
         "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return tb.gzipped(data)
    if how == "zstd":
        return tb.zstd_compressed(data)
    return data


BASE = [tb.directory("etc"), tb.file("etc/os-release", b"ID=test\n"),
        tb.directory("bin"), tb.file("bin/sh", b"#!sh\n" * 100, mode=0o755)]
APP = [tb.directory("app"), tb.file("app/main.py", b"print('hi')\n"),
       tb.whiteout("etc/os-release")]


@dataclass
class Image:
    """An image's parts, as bytes: layer tars (uncompressed), the config, the manifest."""

    layers: list[bytes]
    compression: str = ""
    tag: str | None = "test/app:1"
    config_extra: dict[str, Any] = field(default_factory=dict)
    diff_ids: list[str] | None = None  # None: the true ones

    @property
    def blobs(self) -> list[bytes]:
        return [compress(layer, self.compression) for layer in self.layers]

    @property
    def config(self) -> bytes:
        doc = {"architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
               "config": {"Cmd": ["/bin/sh"]},
               "rootfs": {"type": "layers",
                          "diff_ids": self.diff_ids or [sha(x) for x in self.layers]},
               **self.config_extra}
        return json.dumps(doc).encode()

    @property
    def id(self) -> str:
        return sha(self.config)

    def manifest(self) -> bytes:
        return json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(self.config),
                       "size": len(self.config)},
            "layers": [{"mediaType": MEDIA[self.compression], "digest": sha(b),
                        "size": len(b)} for b in self.blobs]}).encode()


def image(*layers: Sequence[tb.Entry], **kw: Any) -> Image:
    return Image([tb.build(entries) for entries in layers], **kw)


Member = tuple[str, bytes] | tarfile.TarInfo


def tar_of(members: Sequence[tuple[str, bytes]], *, extra: Sequence[tarfile.TarInfo] = (),
           ) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return out.getvalue()


def docker_save(images: Sequence[Image], *,
                edit: Callable[[list[tuple[str, bytes]], list[dict[str, Any]]], None]
                | None = None, extra: Sequence[tarfile.TarInfo] = ()) -> bytes:
    """The classic ``docker save`` archive of ``images`` (``edit`` may change its members
    and its manifest.json entries before they are written)."""
    members: list[tuple[str, bytes]] = []
    manifest: list[dict[str, Any]] = []
    seen: set[str] = set()
    for img in images:
        paths = []
        for blob in img.blobs:
            lid = sha(blob)[7:]
            paths.append(f"{lid}/layer.tar")
            if lid not in seen:
                seen.add(lid)
                members += [(f"{lid}/VERSION", b"1.0"), (f"{lid}/json", b"{}"),
                            (f"{lid}/layer.tar", blob)]
        cfg = f"{img.id[7:]}.json"
        if cfg not in seen:
            seen.add(cfg)
            members.append((cfg, img.config))
        manifest.append({"Config": cfg, "RepoTags": [img.tag] if img.tag else None,
                         "Layers": paths})
    if edit is not None:
        edit(members, manifest)
    members.append(("manifest.json", json.dumps(manifest).encode()))
    return tar_of(members, extra=extra)


def oci_members(images: Sequence[Image]) -> list[tuple[str, bytes]]:
    blobs: dict[str, bytes] = {}
    index = []
    for img in images:
        for b in [img.config, *img.blobs, img.manifest()]:
            blobs[sha(b)] = b
        entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": sha(img.manifest()),
                                 "size": len(img.manifest())}
        if img.tag:
            entry["annotations"] = {"io.containerd.image.name": f"docker.io/{img.tag}",
                                    "org.opencontainers.image.ref.name": img.tag.split(":")[1]}
        index.append(entry)
    members = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
               ("index.json", json.dumps({"schemaVersion": 2, "manifests": index}).encode())]
    return members + [(f"blobs/sha256/{d[7:]}", b) for d, b in blobs.items()]


def oci_tar(images: Sequence[Image]) -> bytes:
    return tar_of(oci_members(images))


def oci_dir(images: Sequence[Image], root: Path) -> Path:
    for name, data in oci_members(images):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root
