"""The corpus: real layers made by a real Docker engine (shared/corpus/build-corpus.sh).

- ``rootfs.tar`` (and its ``.gz`` and ``.zst``): a Debian root filesystem, applied as one
  layer, must give exactly the tree the tar describes.
- ``app-docker-save.tar``: a ``docker save`` of a 3-layer image; its layers applied as a
  chain must give, as the top layer's union, exactly what ``docker export`` wrote
  (``app-flat.tar``), less what Docker's init layer adds to a container.
- ``app-changes.txt``: what ``docker diff`` said about a container of that image after a
  few commands; the same commands on a ``create_rw`` layer must give the same changes.
- Every corpus layer, diffed and applied again onto its parent, must come back exactly.

The stores are module-scoped (one per backend) and the layers are built once: the vfs
backend copies its parent's tree for each layer, some 200 MB here.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from lamina import ChangeKind, errors
from tests.conftest import lacking, unmount_layer_images
from tests.layers import links, mounted, tree
from tests.snapshot import (
    Node,
    assert_same_tree,
    hardlink_groups,
    snapshot,
    snapshot_tar,
    without,
)

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

# What a container's init layer adds, and what docker export therefore has on top.
NOT_IN_IMAGE = [
    "/dev",
    "/proc",
    "/sys",
    "/.dockerenv",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/etc/mtab",
]


class Corpus:
    """One backend's store of the corpus's layers, built on first use."""

    def __init__(self, drv: lamina.Driver, corpus: Path) -> None:
        self.drv = drv
        self.corpus = corpus
        self.app: list[str] = []

    def app_chain(self) -> list[str]:
        """The ids of the docker-save image's layers, bottom first, applied as a chain."""
        if not self.app:
            with tarfile.open(self.corpus / "app-docker-save.tar") as outer:
                manifest_file = outer.extractfile("manifest.json")
                assert manifest_file is not None
                manifest = json.load(manifest_file)
                parent = None
                for i, name in enumerate(manifest[0]["Layers"]):
                    member = outer.extractfile(name)  # streamed, never extracted to disk
                    assert member is not None
                    self.drv.apply_diff(f"app{i}", parent, member)
                    parent = f"app{i}"
                    self.app.append(parent)
        return self.app


@pytest.fixture(scope="module")
def corpus(
    backend: str, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Corpus]:
    home = tmp_path_factory.mktemp(f"corpus-{backend}") / "home"
    try:
        drv = lamina.open_driver(home, backend=backend)
    except errors.Unsupported as e:
        lacking(f"backend {backend} cannot work here: {e}")
    try:
        yield Corpus(drv, corpus_dir)
    finally:
        drv.cleanup()
        drv.close()
        unmount_layer_images(home)  # the EROFS layers' own mounts stay with their layers
        shutil.rmtree(home.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def rootfs_tree(corpus_dir: Path) -> dict[str, Node]:
    return snapshot_tar(corpus_dir / "rootfs.tar")


def tar_data_size(path: Path) -> int:
    """What ``apply_diff`` returns for the tar at ``path``: its regular files' data."""
    with tarfile.open(path, mode="r|") as tar:
        return sum(m.size for m in tar if m.isreg())


@pytest.mark.parametrize("name", ["rootfs.tar", "rootfs.tar.gz", "rootfs.tar.zst"])
def test_rootfs(corpus: Corpus, rootfs_tree: dict[str, Node], name: str) -> None:
    drv = corpus.drv
    id = name.replace(".", "-")
    with open(corpus.corpus / name, "rb") as f:
        size = drv.apply_diff(id, None, f)
    try:
        assert size == tar_data_size(corpus.corpus / "rootfs.tar")
        assert_same_tree(tree(drv, id), rootfs_tree)
    finally:
        drv.remove(id)


def assert_is_docker_export(root: Path, corpus: Path) -> None:
    """Assert that the corpus image's tree at ``root`` (a union view, an unpacked bundle)
    is exactly what ``docker export`` wrote (``app-flat.tar``), less what Docker's init
    layer adds to a container; mtimes aside (docker export's are the container's)."""
    assert_docker_export_tree(snapshot(root), hardlink_groups(root), corpus)


def assert_docker_export_tree(tree: dict[str, Node], links: set[frozenset[str]],
                              corpus: Path) -> None:
    """:func:`assert_is_docker_export` for a tree (:func:`tests.snapshot.snapshot`) and its
    hard link groups taken elsewhere (inside a user namespace)."""

    def keep(path: str) -> bool:
        return path != "/" and not any(path == p or path.startswith(p + "/") for p in NOT_IN_IMAGE)

    want = {
        p: n._replace(mtime=None)
        for p, n in snapshot_tar(corpus / "app-flat.tar", keep=keep).items()
    }
    got = {p: n._replace(mtime=None) for p, n in without(tree, NOT_IN_IMAGE).items()}
    got.pop("/")
    assert_same_tree(got, want)
    # the app layer's own oddities, by name
    assert got["/app/a.txt"].mode == 0o4644
    assert got["/app/cap"].cap == bytes.fromhex("0100000200200000000000000000000000000000")
    assert got["/app/fifo"].type == "fifo"
    assert got["/app/abs-link"].link == "/etc/passwd"
    assert got["/home"].uid == 1000
    assert "/usr/bin/perl" not in got and "/usr/share/man" not in got
    assert {p for p in got if p.startswith("/etc/apt/apt.conf.d/")} == {"/etc/apt/apt.conf.d/99x"}
    assert frozenset({"/app/a.txt", "/app/b.txt"}) in links


def test_app_chain_union_is_docker_export(corpus: Corpus) -> None:
    top = corpus.app_chain()[-1]
    with mounted(corpus.drv, top) as root:
        assert_is_docker_export(root, corpus.corpus)


def test_container_changes_are_docker_diff(corpus: Corpus) -> None:
    drv = corpus.drv
    top = corpus.app_chain()[-1]
    drv.create_rw("ctr", top)
    try:
        with mounted(drv, "ctr") as root:
            with open(root / "etc/debian_version", "a") as f:
                f.write("changed\n")
            shutil.rmtree(root / "usr/share/zoneinfo")
            (root / "newdir").mkdir()
            (root / "newdir/f").touch()
        got = {f"{c.kind.letter} {c.path}" for c in drv.changes("ctr")}
        want = set((corpus.corpus / "app-changes.txt").read_text().splitlines())
        assert got == want
    finally:
        drv.remove("ctr")


def changed_links(drv: lamina.Driver, id: str, changed: set[str]) -> set[frozenset[str]]:
    return {group & changed for group in links(drv, id) if len(group & changed) > 1}


@pytest.mark.parametrize("index", [0, 1, 2])
def test_diff_then_apply_reproduces_corpus_layer(corpus: Corpus, index: int) -> None:
    drv = corpus.drv
    chain = corpus.app_chain()
    layer = chain[index]
    parent = chain[index - 1] if index else None
    copy = f"{layer}-again"
    with drv.diff(layer) as stream:
        drv.apply_diff(copy, parent, stream)
    try:
        assert_same_tree(tree(drv, copy), tree(drv, layer))
        changes = drv.changes(layer)
        assert drv.changes(copy) == changes
        # Hard links among the files the layer changes are exported as links.  (A link
        # to an unchanged lower file is not a change Docker's naive diff can see.)
        changed = {c.path for c in changes if c.kind != ChangeKind.DELETE}
        assert changed_links(drv, copy, changed) == changed_links(drv, layer, changed)
    finally:
        drv.remove(copy)
