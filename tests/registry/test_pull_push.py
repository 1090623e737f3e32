"""``image pull`` and ``image push`` against a real registry (issue 17, contract §7).

One ``docker-registry`` (distribution 2.8, Debian's) on 127.0.0.1 for the module, with
the corpus image (``app-docker-save.tar``) pushed into it by ``skopeo``:

- lamina pulls it: ``image mount`` is what ``docker export`` wrote (``app-flat.tar``),
  and ``image inspect`` shows the registry's digest as a RepoDigest;
- lamina pushes what it pulled to another repository of the same registry: every blob
  is mounted across repositories (the registry's access log shows the ``POST
  ?mount=&from=`` answered 201, and no upload), and ``skopeo inspect`` sees the digest;
- lamina pushes an image it loaded (no source repository: chunked uploads, shown by the
  ``PATCH``es in the log) and ``skopeo copy`` and Docker 20.10's ``docker pull`` (a fresh
  overlay2 ``dockerd``) take it back with the same manifest digest and image id, and
  ``docker run`` runs it;
- a multi-platform index resolves to the platform asked for (and to the host's by
  default); a platform the index lacks is a clear ``NotFound``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.image.tools import ImageCli, sha256_file, skopeo
from tests.integration.engine import unmount_below
from tests.registry.harness import DistRegistry, Uploader, docker_engine
from tests.test_corpus import assert_is_docker_export

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("registry")
    try:
        yield path
    finally:
        unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def registry(work: Path) -> Iterator[DistRegistry]:
    reg = DistRegistry(work / "registry")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def source(registry: DistRegistry, corpus_dir: Path) -> str:
    """The corpus image in the registry (skopeo's push); its manifest digest."""
    ref = f"docker://{registry.address}/corpus/app:1"
    skopeo("copy", "--dest-tls-verify=false",
           f"docker-archive:{corpus_dir / 'app-docker-save.tar'}", ref)
    digest: str = json.loads(skopeo("inspect", "--tls-verify=false", ref))["Digest"]
    return digest


@pytest.fixture(scope="module")
def pulled(work: Path, registry: DistRegistry, source: str) -> tuple[ImageCli, dict[str, Any]]:
    cli = ImageCli(work / "pulled" / "home")
    doc = cli.image_json("pull", f"{registry.address}/corpus/app:1")
    return cli, doc


def test_pull_gives_docker_export(pulled: tuple[ImageCli, dict[str, Any]],
                                  registry: DistRegistry, source: str,
                                  corpus_dir: Path) -> None:
    cli, doc = pulled
    name = f"{registry.address}/corpus/app:1"
    assert doc["digest"] == source
    assert doc["layers_applied"] == 3 and doc["layers_reused"] == 0
    info = cli.inspect(name)
    assert info["RepoTags"] == [name]
    assert info["RepoDigests"] == [f"{registry.address}/corpus/app@{source}"]
    root = Path(cli.image("mount", name).strip())
    try:
        assert_is_docker_export(root, corpus_dir)
    finally:
        cli.image("unmount", name)
    # Pulled again: nothing downloaded or applied, the same image.
    again = cli.image_json("pull", name)
    assert again["digest"] == source and again["layers_reused"] == 3
    assert again["bytes_downloaded"] == 0


def test_pull_by_digest(work: Path, registry: DistRegistry, source: str,
                        pulled: tuple[ImageCli, dict[str, Any]]) -> None:
    cli, _ = pulled
    doc = cli.image_json("pull", f"{registry.address}/corpus/app@{source}")
    assert doc["digest"] == source and doc["layers_reused"] == 3


def test_push_mounts_across_repositories(pulled: tuple[ImageCli, dict[str, Any]],
                                         registry: DistRegistry, source: str) -> None:
    cli, _ = pulled
    since = len(registry.log())
    doc = cli.image_json("push", f"{registry.address}/corpus/app:1",
                         f"{registry.address}/copy/app:2")
    assert doc["digest"] == source
    assert doc["blobs_mounted"] == 4 and doc["blobs_uploaded"] == 0 and doc["bytes_sent"] == 0
    log = registry.requests(since)
    mounts = [r for r in log if r.startswith('"POST /v2/copy/app/blobs/uploads/?mount=')]
    assert len(mounts) == 4 and all("from=corpus%2Fapp" in r and '" 201' in r
                                    for r in mounts), log
    assert not [r for r in log if r.startswith(('"PATCH', '"PUT /v2/copy/app/blobs'))], log
    ref = f"docker://{registry.address}/copy/app:2"
    assert json.loads(skopeo("inspect", "--tls-verify=false", ref))["Digest"] == source


@pytest.fixture(scope="module")
def loaded_push(work: Path, registry: DistRegistry,
                corpus_dir: Path) -> tuple[ImageCli, dict[str, Any], int]:
    """The corpus image loaded into a fresh home and pushed (no repository to mount
    from): the push's document and where the registry's log was before it."""
    cli = ImageCli(work / "loaded" / "home")
    cli.image("load", str(corpus_dir / "app-docker-save.tar"))
    since = len(registry.log())
    doc = cli.image_json("push", "corpus/app:1", f"{registry.address}/loaded/app:1")
    return cli, doc, since


def test_push_uploads_chunked_and_skopeo_reads_it(
        loaded_push: tuple[ImageCli, dict[str, Any], int], registry: DistRegistry,
        work: Path) -> None:
    cli, doc, since = loaded_push
    info = cli.inspect("corpus/app:1")
    assert doc["blobs_uploaded"] == 4 and doc["digest"] == json.loads(
        cli.image("inspect", "corpus/app:1"))[0]["Descriptor"]["digest"]
    log = registry.requests(since)
    assert any(r.startswith('"PATCH /v2/loaded/app/blobs/uploads/') and '" 202' in r
               for r in log), log
    assert any(r.startswith('"PUT /v2/loaded/app/blobs/uploads/') and "digest=" in r
               and '" 201' in r for r in log), log
    # Pushed again: every blob is there already (HEAD), nothing is sent.
    again = cli.image_json("push", "corpus/app:1", f"{registry.address}/loaded/app:1")
    assert again["blobs_exists"] == 4 and again["bytes_sent"] == 0
    ref = f"docker://{registry.address}/loaded/app:1"
    seen = json.loads(skopeo("inspect", "--tls-verify=false", ref))
    assert seen["Digest"] == doc["digest"]
    # skopeo's copy to a dir: keeps the manifest's bytes and checks every blob's digest.
    out = work / "skopeo-dir"
    skopeo("copy", "--src-tls-verify=false", ref, f"dir:{out}")
    assert sha256_file(out / "manifest.json") == doc["digest"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [d["digest"] for d in manifest["layers"]] == seen["Layers"]
    assert info["Id"] == manifest["config"]["digest"]


def test_docker_pulls_and_runs_what_lamina_pushed(
        loaded_push: tuple[ImageCli, dict[str, Any], int], registry: DistRegistry) -> None:
    cli, doc, _ = loaded_push
    name = f"{registry.address}/loaded/app:1"
    with docker_engine() as dockerd:
        dockerd.docker("pull", name)
        docker_id = dockerd.docker("image", "inspect", "--format", "{{.Id}}", name).stdout
        assert docker_id.strip() == cli.inspect("corpus/app:1")["Id"]
        digests = dockerd.docker("image", "inspect", "--format", "{{json .RepoDigests}}",
                                 name).stdout
        assert json.loads(digests) == [f"{registry.address}/loaded/app@{doc['digest']}"]
        dockerd.docker("run", "--rm", name, "true")


def test_index_resolves_to_the_platform_asked_for(work: Path,
                                                  registry: DistRegistry) -> None:
    up = Uploader(registry.address)
    amd = up.image("multi/app", "amd64", [{"arch": b"amd64\n"}], arch="amd64")
    arm = up.image("multi/app", "arm64", [{"arch": b"arm64\n"}], arch="arm64", variant="v8")
    armv7 = up.image("multi/app", "armv7", [{"arch": b"armv7\n"}], arch="arm", variant="v7")
    up.index("multi/app", "1", [(amd, "linux/amd64"), (arm, "linux/arm64/v8"),
                                (armv7, "linux/arm/v7")])
    name = f"{registry.address}/multi/app:1"
    for platform, arch, content, digest in (
            ("linux/arm64", "arm64", b"arm64\n", arm["digest"]),
            ("linux/arm/v7", "arm", b"armv7\n", armv7["digest"]),
            ("linux/amd64", None, b"amd64\n", amd["digest"])):  # the host's, by default
        cli = ImageCli(work / f"multi-{platform.replace('/', '-')}" / "home")
        if arch is None:
            doc = cli.image_json("pull", name)
        else:
            doc = cli.image_json("pull", "--platform", platform, name)
        assert doc["digest"] == digest
        assert cli.inspect(name)["Architecture"] == (arch or "amd64")
        root = Path(cli.image("mount", name).strip())
        try:
            assert (root / "arch").read_bytes() == content
        finally:
            cli.image("unmount", name)
    cli = ImageCli(work / "multi-none" / "home")
    err = cli.fails("image", "pull", "--platform", "linux/s390x", name)
    assert "no manifest for linux/s390x" in err and "linux/arm64/v8" in err
    assert cli.image_json("ls")["images"] == []
