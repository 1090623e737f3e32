"""The real tools the image tests hold lamina's archives against, and lamina's own CLI.

- :class:`ImageCli`: ``python -m lamina --home H --backend B [--json] image …`` in a
  subprocess, as :class:`tests.test_cli.Lamina` runs the CLI, on a backend of choice.
- :func:`skopeo` and :func:`umoci`: Debian's ``skopeo`` and ``umoci``, checked; a tool
  that is not installed is :func:`tests.conftest.lacking` (a skip, a failure in CI).
- :func:`overlay2_engine`: a fresh private ``dockerd`` on its built-in overlay2
  (:class:`tests.integration.engine.Dockerd`), always stopped and unmounted; its
  data-root is left for the caller to remove.
- :func:`tmpfs`: a tmpfs for the tools' own output (their files are never synced, so
  on disk their removal would wait for their writeback: 30 s of a 2-minute run here).
- Readers of what ``docker save`` and ``lamina image save`` write: :func:`docker_save`,
  :func:`oci_layout`, :func:`sha256_file`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import lacking
from tests.integration.engine import Dockerd, docker_missing, unmount_below
from tests.test_cli import Lamina

TOOL_TIMEOUT = 300
"""Seconds any one run of a tool may take (a 355 MB image, a busy 2-core machine)."""


class ImageCli(Lamina):
    """``python -m lamina --home HOME --backend BACKEND …`` (``run``, ``out``, ``json``)."""

    def __init__(self, home: Path, backend: str = "overlay") -> None:
        super().__init__(home)
        self.backend = backend

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lamina", "--home", str(self.home),
                "--backend", self.backend, *args]

    def image(self, *args: str) -> str:
        """Standard output of ``image ARGS…``, which must succeed."""
        return self.out("image", *args)

    def image_json(self, *args: str, input: bytes | None = None) -> Any:
        """The JSON document ``--json image ARGS…`` prints."""
        return self.json("image", *args, input=input)

    def inspect(self, ref: str) -> dict[str, Any]:
        """``image inspect REF``'s one entry (it always prints an array, as Docker does)."""
        doc = json.loads(self.image("inspect", ref))
        assert isinstance(doc, list) and len(doc) == 1, doc
        entry: dict[str, Any] = doc[0]
        return entry


def require(tool: str, package: str) -> str:
    """The path of ``tool``; lacking (skip, or fail in CI) when it is not installed."""
    path = shutil.which(tool)
    if path is None:
        lacking(f"no {tool} (Debian's {package}; scripts/bootstrap.sh installs it)")
    return path


def run_tool(*argv: str, cwd: Path | None = None) -> str:
    """Run a tool that must succeed; its standard output (its errors in the assertion)."""
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=TOOL_TIMEOUT)
    assert proc.returncode == 0, (
        f"{' '.join(argv)}: exit {proc.returncode}\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
    return proc.stdout


def skopeo(*args: str) -> str:
    """``skopeo --insecure-policy ARGS…`` (no signature policy: local transports only)."""
    return run_tool(require("skopeo", "skopeo"), "--insecure-policy", *args)


def umoci(*args: str) -> str:
    """``umoci ARGS…`` (as root, so ``unpack`` keeps owners without ``--rootless``)."""
    return run_tool(require("umoci", "umoci"), *args)


def untar(archive: Path, dest: Path) -> Path:
    """GNU tar's extraction of ``archive`` into ``dest`` (made), as root: owners kept."""
    dest.mkdir(parents=True)
    run_tool("tar", "-C", str(dest), "--same-owner", "-xpf", str(archive))
    return dest


@contextmanager
def overlay2_engine(root: Path) -> Iterator[Dockerd]:
    """A fresh ``dockerd`` on overlay2 with its data-root under ``root`` (made); stopped
    and unmounted after, its files left (removed with the rest of a test's trees: on
    this disk a deletion slows the file creations that follow it, so the image tests
    remove nothing until they end)."""
    reason = docker_missing()
    if reason:
        lacking(reason)
    dockerd = Dockerd(root, "overlay2")
    try:
        dockerd.start()
        yield dockerd
    finally:
        dockerd.stop()
        unmount_below(root)


@contextmanager
def tmpfs(path: Path, size: str = "4g") -> Iterator[Path]:
    """A tmpfs of at most ``size`` at ``path`` (made) for the ``with`` block, unmounted
    after with all it holds; a plain directory where tmpfs cannot be mounted."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                              "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield path
    finally:
        unmount_below(path)  # the engine's mounts, if it left any, then the tmpfs
        if not mounted:
            shutil.rmtree(path, ignore_errors=True)


def image_id(dockerd: Dockerd, ref: str) -> str:
    """Docker's id of ``ref`` (``sha256:`` and the digest of its config)."""
    return dockerd.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()


def sha256_file(path: Path) -> str:
    """``sha256:`` and the hex digest of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


@dataclass
class DockerSave:
    """What a classic ``docker save`` archive says of its one image."""

    id: str
    """``sha256:`` and the config's digest: the image id."""
    config: bytes
    """The config, byte for byte."""
    repo_tags: list[str]
    layer_digests: list[str]
    """The sha256 of each ``layer.tar`` as it is in the archive, bottom first."""


def docker_save(path: Path) -> DockerSave:
    """Read the one image of the ``docker save`` archive at ``path`` (hashing its layers)."""
    with tarfile.open(path) as tar:
        manifest = json.loads(_member(tar, "manifest.json"))
        assert len(manifest) == 1, manifest
        entry = manifest[0]
        config = _member(tar, entry["Config"])
        digests = []
        for name in entry["Layers"]:
            f = tar.extractfile(name)
            assert f is not None, name
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            digests.append(f"sha256:{h.hexdigest()}")
    return DockerSave(f"sha256:{hashlib.sha256(config).hexdigest()}", config,
                      entry.get("RepoTags") or [], digests)


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    assert f is not None, f"{name} is not a file in the archive"
    return f.read()


@dataclass
class OciLayout:
    """An unpacked OCI image layout (``lamina image save``'s, untarred) and its one image."""

    root: Path
    index: dict[str, Any]
    manifest_json: list[dict[str, Any]]
    """Docker's ``manifest.json`` beside the layout ([] when there is none)."""
    manifest: dict[str, Any]
    """The image manifest the index's one entry names."""

    def blob(self, digest: str) -> Path:
        """The path of the blob ``digest`` (``sha256:…``)."""
        algorithm, _, hexdigest = digest.partition(":")
        return self.root / "blobs" / algorithm / hexdigest

    @property
    def layer_digests(self) -> list[str]:
        """The manifest's layer digests, bottom first."""
        return [d["digest"] for d in self.manifest["layers"]]


def oci_layout(root: Path) -> OciLayout:
    """Read the layout at ``root``: its index's one manifest and ``manifest.json``."""
    index = json.loads((root / "index.json").read_text())
    assert len(index["manifests"]) == 1, index
    algorithm, _, hexdigest = index["manifests"][0]["digest"].partition(":")
    manifest = json.loads((root / "blobs" / algorithm / hexdigest).read_text())
    docker = root / "manifest.json"
    manifest_json = json.loads(docker.read_text()) if docker.exists() else []
    return OciLayout(root, index, manifest_json, manifest)
