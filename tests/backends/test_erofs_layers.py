"""Overlay's EROFS layers (``overlay.layers=erofs``): the tar kept, an image mounted over it.

Against the ground truth of the corpus (tests/test_corpus.py): ``rootfs.tar`` applied
as an EROFS layer shows the tree the tar describes and its diff is the tar itself,
byte for byte; the 3-layer corpus image applied as EROFS layers has the union that
``docker export`` wrote, and the changes a store of directory layers finds.  Then
what is particular to the format: the fallback to a directory for a tar the image
cannot hold (a sparse member), the mounts' life (removal unmounts; a store opened
after its mounts went, as after a reboot, mounts them again), and ``check``.  Every
image a store writes is read by erofs-utils' ``fsck.erofs`` at the test's end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from lamina.archive.digests import Digests
from lamina.backends import check, erofslayers
from lamina.backends.contract import backend_of
from lamina.driver import LayerId
from lamina.host import mount
from lamina.host.idmap import IdMapper
from lamina.store import manifest
from lamina.store.meta import LayerFormat
from tests import tarbuild as tb
from tests.conftest import Stores, lacking, mounts_under
from tests.erofsimages import keeping
from tests.layers import apply, mounted, read, tree
from tests.snapshot import assert_same_tree, snapshot_tar
from tests.test_corpus import assert_is_docker_export, tar_data_size

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("erofs_fsck")]
BACKENDS = ["overlay"]
EACH_FORMAT = False  # the format is this module's to pick
EROFS = ["overlay.layers=erofs"]


@pytest.fixture(autouse=True)
def _images_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's images kept for ``fsck.erofs`` (the ``erofs_fsck`` fixture)."""
    monkeypatch.setattr(erofslayers, "index_tar", keeping(erofslayers.index_tar))


@pytest.fixture
def erofs(stores: Stores) -> lamina.Driver:
    """A store whose new read-only layers are EROFS (lacking where the kernel cannot)."""
    drv = stores.open(options=EROFS)
    status = dict(drv.status())
    if status["Layer Format"] != "erofs":
        lacking(f"EROFS layers cannot be used here: {status['Layer Format']}")
    return drv


def fmt(drv: lamina.Driver, id: str) -> LayerFormat:
    return backend_of(drv).record(id).format


def diff_bytes(drv: lamina.Driver, id: str) -> bytes:
    with drv.diff(id) as stream:
        return stream.read()


def image_mount(drv: lamina.Driver, id: str) -> Path:
    return backend_of(drv).store.layer_dir(LayerId(id)) / "diff"


def test_status_says_the_format(stores: Stores, erofs: lamina.Driver) -> None:
    assert dict(stores.open(stores.home.parent / "default").status())["Layer Format"] == "erofs"
    plain = stores.open(stores.home.parent / "plain", options=["overlay.layers=dir"])
    assert dict(plain.status())["Layer Format"] == "dir (overlay.layers=dir)"
    with pytest.raises(lamina.errors.InvalidArgument):
        stores.open(stores.home.parent / "bad", options=["overlay.layers=squashfs"])


# -- the corpus ---------------------------------------------------------------------------


@pytest.mark.corpus
def test_rootfs_is_the_tar_and_gives_it_back(erofs: lamina.Driver, corpus_dir: Path) -> None:
    tar = corpus_dir / "rootfs.tar"
    with open(tar, "rb") as f:
        size = erofs.apply_diff("root", None, f)
    assert size == tar_data_size(tar)  # what a directory layer's apply says
    assert fmt(erofs, "root") is LayerFormat.EROFS
    assert_same_tree(tree(erofs, "root"), snapshot_tar(tar))
    want = hashlib.sha256(tar.read_bytes()).hexdigest()
    assert hashlib.sha256(diff_bytes(erofs, "root")).hexdigest() == want
    assert backend_of(erofs).record("root").identity.diff_id == f"sha256:{want}"


def app_layers(corpus: Path) -> Iterator[bytes]:
    """The corpus image's layer tars, bottom first."""
    with tarfile.open(corpus / "app-docker-save.tar") as outer:
        member = outer.extractfile("manifest.json")
        assert member is not None
        for name in json.load(member)[0]["Layers"]:
            layer = outer.extractfile(name)
            assert layer is not None
            yield layer.read()


@pytest.mark.corpus
def test_corpus_image_chain(stores: Stores, erofs: lamina.Driver, corpus_dir: Path) -> None:
    plain = stores.open(stores.home.parent / "plain", options=["overlay.layers=dir"])
    parent = None
    for i, data in enumerate(app_layers(corpus_dir)):
        for drv in (erofs, plain):
            drv.apply_diff(f"app{i}", parent, io.BytesIO(data))
        assert fmt(erofs, f"app{i}") is LayerFormat.EROFS
        assert diff_bytes(erofs, f"app{i}") == data  # what went in, byte for byte
        assert erofs.changes(f"app{i}") == plain.changes(f"app{i}")
        assert erofs.diff_size(f"app{i}") == plain.diff_size(f"app{i}")
        parent = f"app{i}"
    with mounted(erofs, "app2") as root:
        assert_is_docker_export(root, corpus_dir)
    assert_same_tree(tree(erofs, "app2"), tree(plain, "app2"))
    # A writable layer on an EROFS chain, committed, is a directory in the same chain.
    erofs.create_rw("ctr", "app2")
    with mounted(erofs, "ctr") as root:
        (root / "etc/debian_version").write_text("changed\n")
    assert fmt(erofs, "ctr") is LayerFormat.DIR
    assert check.check(erofs).consistent


# -- the format's own ---------------------------------------------------------------------


def test_a_sparse_member_falls_back_to_a_directory(erofs: lamina.Driver) -> None:
    chunks = [(0, b"h" * 512), (1 << 20, b"tail")]
    data = (tb.raw_member("before", b"1") + tb.raw_gnu_sparse("sparse", chunks, 2 << 20)
            + tb.raw_member("after", b"2") + bytes(1024))
    erofs.apply_diff("s", None, io.BytesIO(data))
    assert fmt(erofs, "s") is LayerFormat.DIR
    layer_dir = image_mount(erofs, "s").parent
    assert not (layer_dir / "layer.tar").exists() and not (layer_dir / "layer.erofs").exists()
    assert read(erofs, "s", "before") == b"1" and read(erofs, "s", "after") == b"2"
    assert read(erofs, "s", "sparse") == tb.expand_sparse(chunks, 2 << 20)
    assert backend_of(erofs).record("s").identity.diff_id == (
        "sha256:" + hashlib.sha256(data).hexdigest())


def test_an_apply_into_an_erofs_layer_makes_it_a_directory(erofs: lamina.Driver) -> None:
    apply(erofs, "a", None, [tb.file("f", b"a")])
    assert fmt(erofs, "a") is LayerFormat.EROFS
    apply(erofs, "a", None, [tb.file("g", b"b")])
    assert fmt(erofs, "a") is LayerFormat.DIR
    assert read(erofs, "a", "f") == b"a" and read(erofs, "a", "g") == b"b"
    assert mounts_under(erofs.home, images=True) == []


def test_removal_unmounts(erofs: lamina.Driver) -> None:
    apply(erofs, "a", None, [tb.file("f", b"a")])
    apply(erofs, "b", "a", [tb.whiteout("f"), tb.file("g", b"b")])
    assert sorted(mounts_under(erofs.home, images=True)) == sorted(
        str(image_mount(erofs, i)) for i in ("a", "b"))
    with mounted(erofs, "b") as root:
        assert sorted(os.listdir(root)) == ["g"]
    erofs.remove("b")
    erofs.remove("a")
    assert mounts_under(erofs.home, images=True) == []


def test_a_store_opened_after_a_reboot_mounts_its_layers(stores: Stores,
                                                          erofs: lamina.Driver) -> None:
    apply(erofs, "a", None, [tb.file("f", b"a")])
    apply(erofs, "b", "a", [tb.file("g", b"b")])
    stores.close(erofs)
    for point in mounts_under(stores.home, images=True):
        mount.unmount(point)  # what a reboot does
    again = stores.open(options=EROFS)
    assert os.path.ismount(image_mount(again, "a")) and os.path.ismount(image_mount(again, "b"))
    assert read(again, "b", "f") == b"a" and read(again, "b", "g") == b"b"
    assert check.check(again).consistent


def test_check_finds_a_tampered_tar(erofs: lamina.Driver) -> None:
    apply(erofs, "a", None, [tb.file("f", b"a" * 600)])
    apply(erofs, "b", "a", [tb.file("g", b"b")])
    assert check.check(erofs).consistent
    tar = image_mount(erofs, "a").parent / "layer.tar"
    at = tar.read_bytes().index(b"a" * 600)
    with open(tar, "r+b") as f:  # the file's first data byte
        f.seek(at)
        f.write(b"x")
    report = check.check(erofs)
    assert not report.consistent
    assert any("a: its tar's sha256" in p for p in report.problems), report.problems
    check.check(erofs, repair=True)
    assert not erofs.exists("a") and not erofs.exists("b")
    assert mounts_under(erofs.home, images=True) == []


def test_an_image_that_will_not_mount_is_found_after_a_reboot(stores: Stores,
                                                              erofs: lamina.Driver) -> None:
    apply(erofs, "a", None, [tb.file("f", b"a")])
    apply(erofs, "b", "a", [tb.file("g", b"b")])
    image = image_mount(erofs, "a").parent / "layer.erofs"
    stores.close(erofs)
    for point in mounts_under(stores.home, images=True):
        mount.unmount(point)  # a reboot, and then the image is damaged
    image.write_bytes(bytes(4096))
    again = stores.open(options=EROFS)  # opens all the same
    report = check.check(again)
    assert any(p.startswith("a: its EROFS image does not mount") for p in report.problems), \
        report.problems
    check.check(again, repair=True)
    assert sorted(again.layers()) == []
    assert check.check(again).consistent


def test_the_manifest_takes_the_indexers_checksums(erofs: lamina.Driver, tmp_path: Path) -> None:
    """The CRC-32s taken while the tar streamed past name the files as the kernel shows
    them (the nid is the inode number, the mtime exact): the manifest reads no file
    again, and says what a manifest made by reading every file says."""
    data = tb.build([
        tb.directory("d"), tb.file("d/a", b"a" * 5000, mtime=1_700_000_000),
        tb.file("d/empty", b""), tb.file("b", os.urandom(70_000)),
        tb.hardlink("d/b-again", "b"), tb.file("c", b"old"), tb.file("c", b"new!"),
    ])
    digests: Digests = {}
    staged = tmp_path / "staged"
    (staged / "diff").mkdir(parents=True)
    size = erofslayers.store_indexed(staged, staged / "diff", io.BytesIO(data), layer="l",
                                     lowers=[], ids=IdMapper(), max_entries=None,
                                     digests=digests)
    try:
        assert size == 5000 + 70_000 + 4
        files = {p: os.stat(staged / "diff" / p) for p in ("d/a", "b", "c")}
        assert {st.st_ino for st in files.values()} == set(digests)
        for st in files.values():
            assert digests[st.st_ino][:2] == (st.st_size, st.st_mtime_ns)
        read = manifest.record(staged / "diff", tmp_path / "read.jsonl")
        known = manifest.record(staged / "diff", tmp_path / "known.jsonl", digests=digests)
        assert read == known
        assert (tmp_path / "read.jsonl").read_bytes() == (tmp_path / "known.jsonl").read_bytes()
    finally:
        mount.unmount(str(staged / "diff"))
    erofs.apply_diff("l", None, io.BytesIO(data))
    assert fmt(erofs, "l") is LayerFormat.EROFS
    layer_dir = backend_of(erofs).store.layer_dir(LayerId("l"))
    assert (layer_dir / manifest.NAME).read_bytes().splitlines()[1:] == \
        (tmp_path / "read.jsonl").read_bytes().splitlines()[1:]


def test_df_counts_the_tar_and_the_image(erofs: lamina.Driver) -> None:
    """What an EROFS layer takes on the host: its tar and its image (two inodes), not
    what the image shows; its bytes are still its files'."""
    from lamina.backends.df import df

    data = tb.build([tb.file(f"d/{i}", b"x" * 1000) for i in range(300)])
    erofs.apply_diff("l", None, io.BytesIO(data))
    layer_dir = backend_of(erofs).store.layer_dir(LayerId("l"))
    (row,) = [r for r in df(erofs)[0] if r.id == "l"]
    on_disk = sum(os.stat(layer_dir / n).st_blocks * 512 for n in ("layer.tar", "layer.erofs"))
    assert (row.bytes, row.disk, row.inodes) == (300_000, on_disk, 2)
