"""``image load`` and ``image save`` on small images built by the tests: the three
layouts, compressed layers, shared layers, the round trip, and every way an archive can
be wrong — each a clear error that leaves nothing stored."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina import errors
from lamina.image import load, save
from lamina.image.store import ImageStore, chain_ids, layer_id
from tests import tarbuild as tb
from tests.image import build
from tests.image.build import APP, BASE

pytestmark = pytest.mark.root
EACH_FORMAT = True  # with overlay+dir too (tests/conftest.py)


def store_of(drv: lamina.Driver) -> ImageStore:
    return ImageStore(drv)


def load_bytes(store: ImageStore, data: bytes) -> list[load.Loaded]:
    return load.load(store, stream=io.BytesIO(data))


def assert_empty(store: ImageStore) -> None:
    """Nothing stored: no image, no blob, no layer, no ingest file."""
    assert store.images() == []
    assert store.content.digests() == []
    assert os.listdir(store.content.ingest_dir) == []
    assert list(store.drv.layers()) == []


def tree(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(dirpath) / name
            rel = str(full.relative_to(path))
            st = full.lstat()
            out[rel] = (st.st_mode, full.read_bytes() if full.is_file() and not
                        full.is_symlink() else None)
    return out


# -- the layouts -----------------------------------------------------------------------


def test_classic_load_names_layers_by_chain_id(driver: lamina.Driver) -> None:
    store = store_of(driver)
    img = build.image(BASE, APP)
    [loaded] = load_bytes(store, build.docker_save([img]))
    assert loaded.names == ["docker.io/test/app:1"]
    assert (loaded.applied, loaded.reused) == (2, 0)
    assert loaded.image.id == img.id
    chains = chain_ids(build.sha(x) for x in img.layers)
    assert sorted(driver.layers()) == sorted(layer_id(c) for c in chains)
    assert driver.parent(layer_id(chains[1])) == layer_id(chains[0])
    found = store.resolve("test/app:1")
    assert found.id == img.id and found.config.diff_ids == tuple(build.sha(x) for x in img.layers)
    root = store.mount("test/app:1")
    try:
        assert (root / "app/main.py").read_bytes() == b"print('hi')\n"
        assert not (root / "etc/os-release").exists()  # the whiteout
        assert (root / "bin/sh").stat().st_mode & 0o777 == 0o755
    finally:
        store.unmount("test/app:1")


@pytest.mark.parametrize("how", ["", "gzip", "zstd"])
def test_formats_give_one_image(driver: lamina.Driver, tmp_path: Path, how: str) -> None:
    """classic, OCI tar, OCI directory and lamina's own save (Docker >= 25's layout)."""
    img = build.image(BASE, APP, compression=how)
    archives = {"classic": build.docker_save([img]), "oci-tar": build.oci_tar([img])}
    homes = []
    for i, (kind, data) in enumerate(archives.items()):
        drv = lamina.open_driver(tmp_path / f"h{i}", backend=driver.name)
        homes.append(drv)
        [got] = load_bytes(store_of(drv), data)
        assert got.image.config.diff_ids == tuple(build.sha(x) for x in img.layers), kind
        assert got.image.id == img.id, kind
        assert got.names == ["docker.io/test/app:1"], kind
    drv = lamina.open_driver(tmp_path / "hdir", backend=driver.name)
    homes.append(drv)
    [got] = load.load(store_of(drv), path=str(build.oci_dir([img], tmp_path / "layout")))
    assert got.image.id == img.id and got.image.digest == build.sha(img.manifest())
    out = io.BytesIO()
    save.save(store_of(drv), ["test/app:1"], out)
    drv2 = lamina.open_driver(tmp_path / "hsaved", backend=driver.name)
    homes.append(drv2)
    [again] = load_bytes(store_of(drv2), out.getvalue())
    assert again.image.digest == got.image.digest and again.names == got.names
    tops = []
    for d in homes:
        s = store_of(d)
        tops.append(tree(s.mount("test/app:1")))
        s.unmount("test/app:1")
        d.cleanup()
        d.close()
    assert all(t == tops[0] for t in tops)


def test_compressed_layer_tar_in_classic_archive(driver: lamina.Driver) -> None:
    img = build.image(BASE, compression="gzip")
    [got] = load_bytes(store_of(driver), build.docker_save([img]))
    assert got.image.manifest.layers[0].media_type.endswith("+gzip")


def test_shared_layer_applied_once(driver: lamina.Driver) -> None:
    store = store_of(driver)
    a = build.image(BASE, APP, tag="test/a:1")
    b = build.image(BASE, [tb.file("other", b"x")], tag="test/b:1")
    [la] = load_bytes(store, build.docker_save([a]))
    [lb] = load_bytes(store, build.docker_save([b]))
    assert (la.applied, la.reused, lb.applied, lb.reused) == (2, 0, 1, 1)
    again = load_bytes(store, build.docker_save([a, b]))
    assert [(x.applied, x.reused) for x in again] == [(0, 2), (0, 2)]
    assert len(list(driver.layers())) == 3


def test_save_round_trip_is_exact_and_deterministic(driver: lamina.Driver,
                                                      tmp_path: Path) -> None:
    store = store_of(driver)
    img = build.image(BASE, APP, compression="gzip")
    load_bytes(store, build.oci_tar([img]))
    first, second = io.BytesIO(), io.BytesIO()
    save.save(store, ["test/app:1"], first)
    save.save(store, ["test/app:1"], second)
    assert first.getvalue() == second.getvalue()
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as tar:
        names = tar.getnames()
        blobs = {n: tar.extractfile(n).read() for n in names  # type: ignore[union-attr]
                 if n.startswith("blobs/")}
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    for blob in [img.config, *img.blobs, img.manifest()]:
        assert blobs[f"blobs/sha256/{build.sha(blob)[7:]}"] == blob  # byte for byte
    assert manifest == [{"Config": f"blobs/sha256/{img.id[7:]}", "RepoTags": ["test/app:1"],
                         "Layers": [f"blobs/sha256/{build.sha(b)[7:]}" for b in img.blobs]}]
    assert index["manifests"][0]["annotations"] == {
        "io.containerd.image.name": "docker.io/test/app:1",
        "org.opencontainers.image.ref.name": "1"}


def test_tag_rm_and_prune(driver: lamina.Driver) -> None:
    store = store_of(driver)
    a = build.image(BASE, APP, tag="test/a:1")
    b = build.image(BASE, [tb.file("other", b"x")], tag="test/b:1")
    load_bytes(store, build.docker_save([a, b]))
    store.tag("test/a:1", "localhost:5000/a:copy")
    assert store.resolve("localhost:5000/a:copy").id == a.id
    assert store.remove("test/a:1") == (["docker.io/test/a:1"], None)  # a name of two
    names, gone = store.remove(a.id)
    assert names == ["localhost:5000/a:copy"] and gone == a.id
    # b's layers (the shared base too) and blobs stay; a's own are gone
    assert len(list(driver.layers())) == 2
    assert store.resolve("test/b:1").id == b.id
    assert build.sha(a.config) not in store.content.digests()
    with pytest.raises(errors.NotFound):
        store.resolve("test/a:1")
    store.mount("test/b:1")
    with pytest.raises(errors.Busy):
        store.remove("test/b:1")
    store.unmount("test/b:1")
    store.remove("test/b:1")
    assert_empty(store)
    assert store.prune() == ([], 0)


def test_untagged_image_is_kept_and_listed(driver: lamina.Driver) -> None:
    store = store_of(driver)
    img = build.image(BASE, tag=None)
    [got] = load_bytes(store, build.docker_save([img]))
    assert got.names == []
    [listed] = store.images()
    assert listed.id == img.id and listed.names == []
    assert store.resolve(img.id[7:19]).id == img.id


# -- archives that are wrong: a clear error each, nothing stored -------------------------


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


def _flip_layer(members: list[tuple[str, bytes]], manifest: list[dict[str, Any]]) -> None:
    for i, (name, data) in enumerate(members):
        if name.endswith("layer.tar"):
            members[i] = (name, data[:600] + bytes([data[600] ^ 0x20]) + data[601:])
            return


def _missing_layer(members: list[tuple[str, bytes]], manifest: list[dict[str, Any]]) -> None:
    members[:] = [m for m in members if not m[0].endswith("layer.tar")][:1] + \
        [m for m in members if m[0].endswith(".json") and "/" not in m[0]]


def _outside(members: list[tuple[str, bytes]], manifest: list[dict[str, Any]]) -> None:
    manifest[0]["Layers"][0] = "../../../etc/passwd"


def _dotdot_member(members: list[tuple[str, bytes]], manifest: list[dict[str, Any]]) -> None:
    members.insert(0, ("../evil", b"x"))


def _absolute_config(members: list[tuple[str, bytes]], manifest: list[dict[str, Any]]) -> None:
    manifest[0]["Config"] = "/etc/passwd"


CLASSIC_FAULTS = {
    "flipped byte in a layer": (_flip_layer, errors.LaminaError),
    "missing layer": (_missing_layer, errors.NotFound),
    "layer outside the archive": (_outside, errors.UnsafeArchive),
    "../ member": (_dotdot_member, errors.UnsafeArchive),
    "absolute config path": (_absolute_config, errors.UnsafeArchive),
}


@pytest.mark.parametrize("fault", sorted(CLASSIC_FAULTS))
def test_classic_fault_leaves_nothing(driver: lamina.Driver, fault: str) -> None:
    edit, kind = CLASSIC_FAULTS[fault]
    store = store_of(driver)
    img = build.image(BASE, APP)
    with pytest.raises(kind) as e:
        load_bytes(store, build.docker_save([img], edit=edit))
    assert "\n" not in str(e.value)
    assert_empty(store)


def test_wrong_diff_id_is_corrupt(driver: lamina.Driver) -> None:
    store = store_of(driver)
    good = build.image(BASE, APP)
    bad = build.image(BASE, APP, diff_ids=[build.sha(good.layers[0]), "sha256:" + "0" * 64])
    with pytest.raises(errors.Corrupt, match="diff id"):
        load_bytes(store, build.docker_save([bad]))
    assert_empty(store)


def test_link_out_of_the_archive(driver: lamina.Driver) -> None:
    store = store_of(driver)
    link = tarfile.TarInfo("aaaa/layer.tar")
    link.type = tarfile.SYMTYPE
    link.linkname = "../../../../etc/passwd"
    img = build.image(BASE)

    def point_at_link(members: list[tuple[str, bytes]], manifest: list[dict[str, Any]]) -> None:
        manifest[0]["Layers"] = ["aaaa/layer.tar"]

    with pytest.raises(errors.UnsafeArchive, match="outside"):
        load_bytes(store, build.docker_save([img], edit=point_at_link, extra=[link]))
    assert_empty(store)


def _oci_with(img: build.Image, change: Any) -> bytes:
    members = build.oci_members([img])
    change(members)
    return build.tar_of(members)


def test_oci_blob_that_does_not_hash_to_its_name(driver: lamina.Driver) -> None:
    store = store_of(driver)
    img = build.image(BASE, APP, compression="gzip")
    layer = f"blobs/sha256/{build.sha(img.blobs[1])[7:]}"

    def flip(members: list[tuple[str, bytes]]) -> None:
        members[:] = [(n, _flip(d) if n == layer else d) for n, d in members]

    with pytest.raises(errors.Corrupt, match="hash"):
        load_bytes(store, _oci_with(img, flip))
    assert_empty(store)


def test_oci_missing_blob(driver: lamina.Driver) -> None:
    store = store_of(driver)
    img = build.image(BASE, APP)
    layer = f"blobs/sha256/{build.sha(img.blobs[0])[7:]}"
    with pytest.raises(errors.NotFound, match="holds no"):
        load_bytes(store, _oci_with(img, lambda m: m.__setitem__(
            slice(None), [x for x in m if x[0] != layer])))
    assert_empty(store)


def _with_manifest(img: build.Image, manifest: dict[str, Any]) -> bytes:
    """``img``'s OCI layout as a tar, its index pointing at ``manifest`` instead."""
    data = json.dumps(manifest).encode()

    def swap(members: list[tuple[str, bytes]]) -> None:
        index = {"schemaVersion": 2, "manifests": [
            {"mediaType": build.OCI_MANIFEST, "digest": build.sha(data), "size": len(data)}]}
        members[1] = ("index.json", json.dumps(index).encode())
        members.append((f"blobs/sha256/{build.sha(data)[7:]}", data))

    return _oci_with(img, swap)


def test_manifest_over_4_mib(driver: lamina.Driver) -> None:
    store = store_of(driver)
    img = build.image(BASE)
    big = json.loads(img.manifest())
    big["annotations"] = {"pad": "x" * (4 << 20)}
    with pytest.raises(errors.Corrupt, match="MiB"):
        load_bytes(store, _with_manifest(img, big))
    assert_empty(store)


def test_unknown_media_type(driver: lamina.Driver) -> None:
    store = store_of(driver)
    img = build.image(BASE)
    manifest = json.loads(img.manifest())
    manifest["layers"][0]["mediaType"] = "application/x-not-a-layer"
    with pytest.raises(errors.InvalidArgument, match="media type"):
        load_bytes(store, _with_manifest(img, manifest))
    assert_empty(store)


def test_layer_that_escapes(driver: lamina.Driver) -> None:
    store = store_of(driver)
    evil = build.Image([tb.raw_member("../../escaped", b"x") + bytes(1024)])
    with pytest.raises(errors.UnsafeArchive):
        load_bytes(store, build.docker_save([evil]))
    assert_empty(store)


def test_not_an_image_archive(driver: lamina.Driver) -> None:
    store = store_of(driver)
    with pytest.raises(errors.InvalidArgument, match="neither"):
        load_bytes(store, build.tar_of([("hello", b"x")]))
    with pytest.raises(errors.UnsafeArchive):
        load_bytes(store, b"not a tar at all" * 64)
    assert_empty(store)


def test_truncated_archive(driver: lamina.Driver) -> None:
    store = store_of(driver)
    data = build.docker_save([build.image(BASE, APP)])
    with pytest.raises(errors.UnsafeArchive, match="truncated"):
        load_bytes(store, data[: len(data) // 2])
    assert_empty(store)


def test_tampered_blob_in_the_store_is_caught_on_save(driver: lamina.Driver) -> None:
    store = store_of(driver)
    img = build.image(BASE, APP)
    load_bytes(store, build.docker_save([img]))
    path = store.content.path(build.sha(img.blobs[1]))
    os.chmod(path, 0o644)
    path.write_bytes(_flip(path.read_bytes()))
    with pytest.raises(errors.Corrupt, match="hash"):
        save.save(store, ["test/app:1"], io.BytesIO())


def test_a_damaged_name_hides_one_image_and_stops_the_sweep(driver: lamina.Driver) -> None:
    store = store_of(driver)
    a = build.image(BASE, APP, tag="test/a:1")
    b = build.image(BASE, [tb.file("other", b"x")], tag="test/b:1")
    load_bytes(store, build.docker_save([a, b]))
    [record] = [p for p in store.refs_dir.iterdir()
                if json.loads(p.read_bytes())["name"] == "docker.io/test/a:1"]
    record.write_bytes(b"{not json")
    damaged: list[str] = []
    assert [i.names for i in store.images(damaged)] == [["docker.io/test/b:1"]]
    assert len(damaged) == 1 and str(record) in damaged[0]
    blobs = store.content.digests()
    assert store.collect() == ([], [])  # a's blobs and layers may still be wanted
    assert store.content.digests() == blobs and len(list(driver.layers())) == 3


def test_unpacked_docker_save_directory(driver: lamina.Driver, tmp_path: Path) -> None:
    img = build.image(BASE, APP)
    root = tmp_path / "unpacked"
    root.mkdir()
    with tarfile.open(fileobj=io.BytesIO(build.docker_save([img]))) as tar:
        tar.extractall(root, filter="data")
    [got] = load.load(store_of(driver), path=str(root))
    assert got.image.id == img.id and got.names == ["docker.io/test/app:1"]
    os.symlink("/etc/passwd", root / "escape")
    doc = json.loads((root / "manifest.json").read_bytes())
    doc[0]["Layers"][0] = "escape"
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(errors.UnsafeArchive, match="outside"):
        load.load(store_of(driver), path=str(root))


@pytest.mark.parametrize("how", ["", "gzip"])
def test_tampered_blob_in_the_store_is_caught_on_apply(driver: lamina.Driver, how: str) -> None:
    """An uncompressed layer's blob is checked by the apply's diff id, a compressed one by
    its digest as it is read: either way a tampered blob makes no layer."""
    store = store_of(driver)
    img = build.image(BASE, APP, compression=how)
    load_bytes(store, build.docker_save([img]))
    top = layer_id(chain_ids(build.sha(x) for x in img.layers)[-1])
    driver.remove(top)
    path = store.content.path(build.sha(img.blobs[1]))
    os.chmod(path, 0o644)
    path.write_bytes(_flip(path.read_bytes()))
    with pytest.raises(errors.LaminaError, match=r"diff id|hash"):
        load.apply_layers(store, store.resolve("test/app:1"))
    assert not driver.exists(top)
