"""lamina's images against the real tools (issue 16, contract §7): Docker 20.10, skopeo, umoci.

The corpus image (``app-docker-save.tar``: ``corpus/app:1``, 3 layers, made by Docker
20.10) is loaded once into an overlay home and saved once (``image save``), and the
saved file is what the tools must take:

- Docker 20.10's ``docker load`` of it, on a fresh overlay2 ``dockerd`` of its own, gives
  the image id ``docker load`` of the original gives (the config's sha256), and ``docker
  run`` works;
- ``skopeo copy`` from ``docker-archive:`` and ``oci-archive:`` succeeds and ``skopeo
  inspect`` shows the layer digests lamina shows and the saved manifest names;
- ``umoci unpack`` of the untarred file (the tag as the ref name) gives a rootfs equal
  to what ``docker export`` wrote (``app-flat.tar``), as ``image mount`` does.

And the input formats give one image: the classic archive, the OCI layout skopeo made
of the same image (``app-oci/``, gzip layers; as a directory, and as a tar on standard
input) and lamina's own saved file (Docker ≥ 25's layout), each loaded into a fresh
home, have the same diff ids and the same union tree; the saved file reloaded has the
original's id.

The saved file is loaded on vfs (its union is also compared with docker export there),
the others on overlay.  The module's fixtures are shared: one load, one save, one engine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unmount_layer_images
from tests.image.tools import (
    DockerSave,
    ImageCli,
    OciLayout,
    docker_save,
    image_id,
    oci_layout,
    overlay2_engine,
    sha256_file,
    skopeo,
    tmpfs,
    umoci,
    untar,
)
from tests.snapshot import Node, assert_same_tree, snapshot
from tests.test_corpus import assert_is_docker_export

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

IMAGE = "corpus/app:1"
FULL_NAME = "docker.io/corpus/app:1"
TAG = "1"


@dataclass
class Loaded:
    """A home with the corpus image loaded, what the load said, and the original archive."""

    cli: ImageCli
    load: dict[str, Any]
    original: DockerSave

    def mounted_tree(self, ref: str) -> dict[str, Node]:
        """:func:`snapshot` of ``image mount REF``'s path (unmounted after)."""
        root = Path(self.cli.image("mount", ref).strip())
        try:
            return snapshot(root)
        finally:
            self.cli.image("unmount", ref)


def fresh_home(work: Path, name: str, backend: str = "overlay") -> ImageCli:
    return ImageCli(work / name / "home", backend)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every tree the module makes, homes and the tools' output, on a tmpfs: on this
    disk, removing the module's trees (homes of 7,000 files, the tools' never-synced
    output waiting for its writeback) took 20-30 s of a 2-minute run.  lamina on a real
    disk is the other suites' business; this one is about what the tools accept."""
    with tmpfs(tmp_path_factory.mktemp("image-tools") / "tmpfs", size="6g") as path:
        yield path


@pytest.fixture(scope="module")
def original(corpus_dir: Path) -> DockerSave:
    return docker_save(corpus_dir / "app-docker-save.tar")


@pytest.fixture(scope="module")
def loaded(work: Path, corpus_dir: Path, original: DockerSave) -> Loaded:
    cli = fresh_home(work, "loaded")
    doc = cli.image_json("load", str(corpus_dir / "app-docker-save.tar"))
    return Loaded(cli, doc, original)


@pytest.fixture(scope="module")
def saved(loaded: Loaded, work: Path) -> Path:
    """``image save -o out.tar corpus/app:1`` of the loaded image."""
    out = work / "out.tar"
    assert loaded.cli.image("save", "-o", str(out), IMAGE) == ""
    return out


@pytest.fixture(scope="module")
def layout(saved: Path, work: Path) -> OciLayout:
    """The saved file, untarred by GNU tar."""
    return oci_layout(untar(saved, work / "out"))


@pytest.fixture(scope="module")
def original_tree(loaded: Loaded) -> dict[str, Node]:
    return loaded.mounted_tree(IMAGE)


# --- load, inspect, save -----------------------------------------------------------------


def test_load_reports_the_image(loaded: Loaded) -> None:
    [image] = loaded.load["images"]
    assert (image["name"], image["id"]) == (FULL_NAME, loaded.original.id)
    assert image["digest"].startswith("sha256:")
    assert (loaded.load["layers_applied"], loaded.load["layers_reused"]) == (3, 0)


def test_load_again_applies_nothing(loaded: Loaded, corpus_dir: Path) -> None:
    out = loaded.cli.image("load", str(corpus_dir / "app-docker-save.tar"))
    assert out == f"Loaded image: {IMAGE}\n"
    listed = loaded.cli.image_json("ls")["images"]
    assert [(i["name"], i["id"]) for i in listed] == [(FULL_NAME, loaded.original.id)]


def test_inspect_is_docker_s(loaded: Loaded) -> None:
    config = json.loads(loaded.original.config)
    got = loaded.cli.inspect(IMAGE)
    assert got["Id"] == loaded.original.id
    assert got["RepoTags"] == [IMAGE]
    assert isinstance(got["RepoDigests"], list)
    assert got["Created"] == config["created"]
    assert (got["Architecture"], got["Os"]) == (config["architecture"], config["os"])
    assert got["Config"] == config["config"]
    assert got["RootFS"] == {"Type": "layers", "Layers": config["rootfs"]["diff_ids"]}
    assert got["Size"] > 0
    # every way of naming the image names this one
    digest = loaded.load["images"][0]["digest"]
    for ref in (FULL_NAME, f"corpus/app@{digest}", loaded.original.id):
        assert loaded.cli.inspect(ref)["Id"] == loaded.original.id, ref


def test_saved_layout(layout: OciLayout, loaded: Loaded) -> None:
    assert json.loads((layout.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    entry = layout.index["manifests"][0]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == TAG
    assert entry["annotations"]["io.containerd.image.name"] == FULL_NAME
    assert entry["digest"] == loaded.load["images"][0]["digest"]
    assert sha256_file(layout.blob(entry["digest"])) == entry["digest"]
    assert layout.manifest["config"]["digest"] == loaded.original.id
    # the config and the layers byte for byte as they were loaded
    assert layout.blob(loaded.original.id).read_bytes() == loaded.original.config
    assert layout.layer_digests == loaded.original.layer_digests
    for digest in layout.layer_digests:
        assert sha256_file(layout.blob(digest)) == digest
    # Docker's manifest.json beside it
    [docker] = layout.manifest_json
    assert docker["Config"] == "blobs/sha256/" + loaded.original.id.removeprefix("sha256:")
    assert docker["RepoTags"] == [IMAGE]
    assert docker["Layers"] == [
        "blobs/sha256/" + d.removeprefix("sha256:") for d in loaded.original.layer_digests
    ]


# --- Docker 20.10 ------------------------------------------------------------------------


def test_docker_loads_the_saved_file(saved: Path, corpus_dir: Path, loaded: Loaded,
                                     work: Path) -> None:
    with overlay2_engine(work / "docker") as dockerd:
        # First on a fresh engine, so that no layer of it is there already.
        out = dockerd.docker("load", "-i", str(saved)).stdout
        assert f"Loaded image: {IMAGE}" in out
        from_lamina = image_id(dockerd, IMAGE)
        dockerd.docker("run", "--rm", IMAGE, "true")
        # The original loaded beside it takes the tag; had its config other bytes, it
        # would be a second image with another id.
        dockerd.docker("load", "-i", str(corpus_dir / "app-docker-save.tar"))
        assert image_id(dockerd, IMAGE) == from_lamina == loaded.original.id
        assert dockerd.lines("image", "ls", "--quiet", "--no-trunc") == [from_lamina]
    shutil.rmtree(work / "docker")  # (a tmpfs: the removal costs nothing)


# --- skopeo --------------------------------------------------------------------------------


def test_skopeo_copies_the_docker_archive(saved: Path, work: Path, layout: OciLayout,
                                          loaded: Loaded) -> None:
    dest = work / "skopeo-oci"
    # (skopeo would gzip the layers on the way to oci:, 7 s here, without the option)
    skopeo("copy", "--quiet", "--dest-oci-accept-uncompressed-layers",
           f"docker-archive:{saved}", f"oci:{dest}:x")
    copied = oci_layout(dest)
    entry = copied.index["manifests"][0]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "x"
    # skopeo writes a config of its own, with lamina's diff ids, and the layers as
    # they are
    config = json.loads(copied.blob(copied.manifest["config"]["digest"]).read_bytes())
    assert config["rootfs"]["diff_ids"] == loaded.cli.inspect(IMAGE)["RootFS"]["Layers"]
    assert copied.layer_digests == layout.layer_digests
    for digest in copied.layer_digests:
        assert sha256_file(copied.blob(digest)) == digest
    shutil.rmtree(dest)


def test_skopeo_copies_the_oci_archive(saved: Path, work: Path, layout: OciLayout) -> None:
    dest = work / "skopeo-dir"
    skopeo("copy", "--quiet", f"oci-archive:{saved}", f"dir:{dest}")
    # dir: keeps the blobs as they are: lamina's manifest, config and layers
    copied = json.loads((dest / "manifest.json").read_bytes())
    assert copied == layout.manifest
    for digest in [*layout.layer_digests, layout.manifest["config"]["digest"]]:
        assert sha256_file(dest / digest.removeprefix("sha256:")) == digest
    shutil.rmtree(dest)


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive"])
def test_skopeo_inspect_of_the_saved_file(transport: str, saved: Path, layout: OciLayout,
                                          loaded: Loaded) -> None:
    got = json.loads(skopeo("inspect", f"{transport}:{saved}"))
    # The layers were loaded uncompressed: their digests are the diff ids.
    assert got["Layers"] == layout.layer_digests == loaded.cli.inspect(IMAGE)["RootFS"]["Layers"]
    assert got["Digest"].startswith("sha256:")


# --- umoci and image mount ------------------------------------------------------------------


def test_umoci_unpacks_the_saved_layout(layout: OciLayout, work: Path,
                                       corpus_dir: Path) -> None:
    bundle = work / "bundle"
    umoci("unpack", "--image", f"{layout.root}:{TAG}", str(bundle))
    assert_is_docker_export(bundle / "rootfs", corpus_dir)
    shutil.rmtree(bundle)


def test_image_mount_is_docker_export(loaded: Loaded, corpus_dir: Path) -> None:
    root = Path(loaded.cli.image("mount", IMAGE).strip())
    try:
        assert_is_docker_export(root, corpus_dir)
    finally:
        loaded.cli.image("unmount", IMAGE)


# --- three input formats, one image -------------------------------------------------------


def oci_tar(corpus_dir: Path) -> bytes:
    """``tar -C app-oci -cf - .``: the OCI layout as a tar, for ``image load -``."""
    proc = subprocess.run(["tar", "-C", str(corpus_dir / "app-oci"), "-cf", "-", "."],
                          capture_output=True, check=True)
    return proc.stdout


@pytest.mark.parametrize(("source", "on"), [
    ("app-oci", "overlay"), ("app-oci.tar on stdin", "overlay"), ("saved", "vfs")])
def test_formats_give_one_image(source: str, on: str, loaded: Loaded,
                                original_tree: dict[str, Node], corpus_dir: Path, work: Path,
                                request: pytest.FixtureRequest) -> None:
    stdin: bytes | None = None
    if source == "app-oci":
        arg = str(corpus_dir / "app-oci")
    elif source == "app-oci.tar on stdin":
        arg, stdin = "-", oci_tar(corpus_dir)
    else:
        arg = str(request.getfixturevalue("saved"))
    cli = fresh_home(work, f"format-{source.split()[0]}", on)
    doc: dict[str, Any] = cli.image_json("load", arg, input=stdin)
    [image] = doc["images"]
    assert (doc["layers_applied"], doc["layers_reused"]) == (3, 0)
    ref = image["name"] or image["id"]
    got = cli.inspect(ref)
    want = loaded.cli.inspect(IMAGE)
    assert got["RootFS"] == want["RootFS"]
    if source == "saved":
        # Docker >= 25's layout, lamina's own: the same config, so the same id and name
        assert (image["name"], image["id"], got["Id"]) == (FULL_NAME, want["Id"], want["Id"])
        assert image["digest"] == loaded.load["images"][0]["digest"]
    else:
        # skopeo wrote its own config (the same diff ids); its index names a tag only
        assert image["name"] is None
        assert got["Id"] == image["id"] == sha256_file(
            corpus_dir / "app-oci/blobs/sha256" / config_hex(corpus_dir / "app-oci"))
        assert got["Id"] != want["Id"]
        assert cli.out("image", "load", arg, input=stdin) == f"Loaded image ID: {image['id']}\n"
    root = Path(cli.image("mount", ref).strip())
    try:
        assert_same_tree(snapshot(root), original_tree)
        if on == "vfs":
            assert_is_docker_export(root, corpus_dir)
    finally:
        cli.image("unmount", ref)
    unmount_layer_images(cli.home.parent)
    shutil.rmtree(cli.home.parent)


def config_hex(layout_dir: Path) -> str:
    """The hex digest of the config of the one image in the OCI layout at ``layout_dir``."""
    digest: str = oci_layout(layout_dir).manifest["config"]["digest"]
    return digest.removeprefix("sha256:")


def test_saved_file_is_a_plain_tar(saved: Path) -> None:
    """Every member a file or a directory, no name outside the layout."""
    with tarfile.open(saved) as tar:
        for member in tar:
            assert member.isfile() or member.isdir(), member.name
            assert not member.name.startswith("/") and ".." not in member.name.split("/")
