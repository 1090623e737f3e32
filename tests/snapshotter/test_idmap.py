"""containerd's ``remap-ids`` on lamina's snapshotter, through its gRPC surface.

The id-mapping labels (``containerd.io/snapshot/uidmapping``/``gidmapping``) on
``Prepare`` and ``View``: the mounts containerd's overlayfs would give (``uidmap=`` and
``gidmap=`` first, the lowers as real directories that containerd's idmapped clone of
their common directory shows), the upper owned by the mapped root; hostile labels
refused as ``InvalidArgument`` naming the key, leaving nothing; a backend or layer that
cannot serve a mapping refusing it (``Unimplemented``) rather than ignoring it.  The
real engine's side is ``tests/engines/test_userns.py``.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from lamina import errors
from lamina.frontends.containerd.api import snapshots_pb2 as pb
from lamina.frontends.containerd.idmap import GID_LABEL, UID_LABEL, mapping_of
from tests.conftest import unmount_layer_images
from tests.snapshotter.served import Served

pytestmark = pytest.mark.root

MAP = {UID_LABEL: "0:100000:65536", GID_LABEL: "0:100000:65536"}
VARIANTS = {"overlay": ("overlay", ()), "overlay+dir": ("overlay", ("overlay.layers=dir",)),
            "vfs": ("vfs", ())}


@pytest.fixture(params=list(VARIANTS))
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    backend, options = VARIANTS[request.param]
    s = Served(tmp_path / "home", tmp_path / "s.sock", backend, options=options)
    try:
        yield s
    finally:
        s.stop()


def prepare(served: Served, key: str, parent: str = "", **labels: str) -> Any:
    return served.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent,
                                                         labels=labels)).mounts


def _tar(name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo(name)
        ti.size = 1
        t.addfile(ti, io.BytesIO(b"x"))
    return buf.getvalue()


def _chain(served: Served) -> str:
    """Two committed snapshots, ``base`` and ``mid`` on it, each holding one file."""
    for key, parent, name in (("k1", "", "base"), ("k2", "base", "mid")):
        (m,) = prepare(served, key, parent)
        upper = next((o[len("upperdir="):] for o in m.options if o.startswith("upperdir=")),
                     m.source)
        Path(upper, name).write_text(name)
        served.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key))
    return "mid"


def _options(m: Any) -> dict[str, str]:
    return dict(o.split("=", 1) for o in m.options if "=" in o)


def test_prepare_with_a_mapping(served: Served) -> None:
    parent = _chain(served)
    if served.backend == "vfs":
        with pytest.raises(grpc.RpcError) as e:
            prepare(served, "ctr", parent, **MAP)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        assert "vfs cannot serve an id-mapped snapshot" in str(e.value)
        assert served.sn.records.get("ctr") is None
        return
    (m,) = prepare(served, "ctr", parent, **MAP)
    assert m.type == "overlay"
    assert list(m.options[:2]) == ["uidmap=0:100000:65536", "gidmap=0:100000:65536"]
    opts = _options(m)
    upper = Path(opts["upperdir"])
    assert (os.stat(upper).st_uid, os.stat(upper).st_gid) == (100000, 100000)
    lowers = opts["lowerdir"].split(":")
    # Real directories of layers/ (no l/ links: through containerd's idmapped clone of
    # their common directory a relative link would lead out of it).
    layers = served.drv.store.layers_dir
    assert all(Path(p).parent.parent == layers and not Path(p).is_symlink() for p in lowers)
    assert [sorted(os.listdir(p)) for p in lowers] == [["mid"], ["base"]]
    assert all(os.stat(Path(p)).st_uid == 0 for p in lowers)  # nothing chowned
    # Mounts says the same, and the differ still knows the snapshot as lamina's.
    again = served.stub.Mounts(pb.MountsRequest(key="ctr")).mounts
    assert [list(x.options) for x in again] == [list(m.options)]
    assert served.sn.active_for(served.sn.mounts("ctr")) == "ctr"
    # Without a mapping: the usual mounts, the upper root's.
    (plain,) = prepare(served, "plain", parent)
    assert not any(o.startswith(("uidmap=", "gidmap=")) for o in plain.options)
    assert os.stat(_options(plain)["upperdir"]).st_uid == 0


def test_view_and_bind_with_a_mapping(served: Served) -> None:
    if served.backend == "vfs":
        pytest.skip("vfs refuses mappings (test_prepare_with_a_mapping)")
    parent = _chain(served)
    (v,) = served.stub.View(pb.ViewSnapshotRequest(key="v", parent=parent, labels=MAP)).mounts
    assert v.type == "overlay" and "ro" in v.options
    assert list(v.options[:2]) == ["uidmap=0:100000:65536", "gidmap=0:100000:65536"]
    assert len(_options(v)["lowerdir"].split(":")) == 2
    # A base snapshot is a bind, as containerd's overlayfs gives it (with the options,
    # which containerd's mount turns into an idmapped bind), its directory the root's.
    (b,) = prepare(served, "base-ctr", "", **MAP)
    assert b.type == "bind" and list(b.options[:2]) == list(v.options[:2])
    assert os.stat(b.source).st_uid == 100000


def test_erofs_lowers_are_idmapped_by_lamina(served: Served) -> None:
    if served.backend != "overlay" or dict(served.drv.status()).get("Layer Format") != "erofs":
        pytest.skip("EROFS layers only")
    for name, parent in (("img1", None), ("img2", "img1")):
        served.drv.apply_diff(name, parent, io.BytesIO(_tar(name)))
    chains = [served.drv.record(n).identity.chain_id for n in ("img1", "img2")]
    for key, chain, parent in (("x1", chains[0], ""), ("x2", chains[1], chains[0])):
        assert chain is not None
        with pytest.raises(grpc.RpcError):  # AlreadyExists: committed from the layer held
            prepare(served, key, parent or "", **{"containerd.io/snapshot.ref": chain})
    top = str(chains[1])
    (m,) = prepare(served, "ctr", top, **MAP)
    # containerd's clone of the lowers' common directory would not show the images
    # (mounts of their own): lamina gives idmapped clones of them, and no map.
    assert not any(o.startswith(("uidmap=", "gidmap=")) for o in m.options)
    opts = _options(m)
    lowers = [Path(p) for p in opts["lowerdir"].split(":")]
    assert [p.parent.parent for p in lowers] == [served.home / "idmapped"] * 2
    assert all(os.path.ismount(p) for p in lowers)
    assert [os.stat(p / f"img{2 - i}").st_uid for i, p in enumerate(lowers)] == [100000] * 2
    assert os.stat(served.drv.lower("img1") / "img1").st_uid == 0  # the layer as applied
    assert os.stat(opts["upperdir"]).st_uid == 100000
    # A second snapshot of the same map shares them; another map has its own.
    (m2,) = prepare(served, "ctr2", top, **MAP)
    assert _options(m2)["lowerdir"] == opts["lowerdir"]
    other = {UID_LABEL: "0:200000:65536", GID_LABEL: "0:200000:65536"}
    (m3,) = prepare(served, "ctr3", top, **other)
    assert os.stat(Path(_options(m3)["lowerdir"].split(":")[0]) / "img2").st_uid == 200000
    # A view of the chain: both images as lowers, idmapped, read-only.
    (v,) = served.stub.View(pb.ViewSnapshotRequest(key="v", parent=top, labels=MAP)).mounts
    assert "ro" in v.options and _options(v)["lowerdir"] == opts["lowerdir"]
    served.stub.Remove(pb.RemoveSnapshotRequest(key="v"))
    served.stub.Remove(pb.RemoveSnapshotRequest(key="ctr"))
    assert all(os.path.ismount(p) for p in lowers)  # ctr2 still needs them
    served.stub.Remove(pb.RemoveSnapshotRequest(key="ctr2"))
    assert not any(p.exists() for p in lowers)
    # A restart detaches the rest; Mounts makes them again.
    served.restart()
    assert not [p for p in mount_points() if "/idmapped/" in p and p.startswith(str(served.home))]
    (again,) = served.stub.Mounts(pb.MountsRequest(key="ctr3")).mounts
    assert os.stat(Path(_options(again)["lowerdir"].split(":")[0]) / "img2").st_uid == 200000
    for key in ("ctr3", top, str(chains[0])):
        served.stub.Remove(pb.RemoveSnapshotRequest(key=key))
    assert not (served.home / "idmapped").exists() or not os.listdir(served.home / "idmapped")
    for name in ("img2", "img1"):
        served.drv.remove(name)


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


HOSTILE = {
    "one label only": {UID_LABEL: "0:100000:65536"},
    "not numbers": {UID_LABEL: "0:x:65536", GID_LABEL: "0:100000:65536"},
    "two fields": {UID_LABEL: "0:100000", GID_LABEL: "0:100000:65536"},
    "negative": {UID_LABEL: "0:-1:65536", GID_LABEL: "0:100000:65536"},
    "empty": {UID_LABEL: "", GID_LABEL: "0:100000:65536"},
    "size 0": {UID_LABEL: "0:100000:0", GID_LABEL: "0:100000:65536"},
    "past the last id": {UID_LABEL: "0:4294967000:65536", GID_LABEL: "0:100000:65536"},
    "host ids twice": {UID_LABEL: "0:100000:10,10:100005:10", GID_LABEL: "0:100000:65536"},
    "container ids twice": {UID_LABEL: "0:100000:10,5:200000:10",
                            GID_LABEL: "0:100000:65536"},
    "no root": {UID_LABEL: "1:100000:65536", GID_LABEL: "0:100000:65536"},
    "too many ranges": {UID_LABEL: ",".join(f"{i}:{1000 + i}:1" for i in range(341)),
                        GID_LABEL: "0:100000:65536"},
    "spaces": {UID_LABEL: " 0:100000:65536", GID_LABEL: "0:100000:65536"},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_labels_are_invalid_and_leave_nothing(served: Served, case: str) -> None:
    parent = _chain(served)
    layers = sorted(served.drv.layers())
    for call in ("prepare", "view"):
        with pytest.raises(grpc.RpcError) as e:
            if call == "prepare":
                prepare(served, "ctr-key", parent, **HOSTILE[case])
            else:
                served.stub.View(pb.ViewSnapshotRequest(key="ctr-key", parent=parent,
                                                        labels=HOSTILE[case]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "'ctr-key'" in str(e.value)
    assert served.sn.records.get("ctr-key") is None
    assert sorted(served.drv.layers()) == layers


def test_the_mapping_as_read() -> None:
    m = mapping_of({UID_LABEL: "0:100000:1,1:200001:65535", GID_LABEL: "0:300000:65536"}, "k")
    assert m is not None
    assert m.root() == (100000, 300000)
    assert m.options() == ("uidmap=0:100000:1,1:200001:65535", "gidmap=0:300000:65536")
    assert mapping_of({"other": "x"}, "k") is None
    ranges = ",".join(f"{i}:{100000 + i}:1" for i in range(340))
    assert mapping_of({UID_LABEL: ranges, GID_LABEL: ranges}, "k") is not None
    with pytest.raises(errors.InvalidArgument, match="'k'"):
        mapping_of({UID_LABEL: "0:4294967294:2", GID_LABEL: "0:1:1"}, "k")


def test_idmapped_lowers_under_a_shared_mount(tmp_path: Path) -> None:
    # A home under a shared mount (systemd makes / one; the engines' work directories
    # are): the clones must not keep their sources' peer groups, or mounts travel
    # between them (the idmapped clone of a directory layer appeared on its diff/).
    base = tmp_path / "shared"
    base.mkdir()
    subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
    try:
        subprocess.run(["mount", "--make-rshared", str(base)], check=True)
        s = Served(base / "home", tmp_path / "s.sock", "overlay")
        try:
            s.drv.apply_diff("img", None, io.BytesIO(_tar("f")))
            chain = str(s.drv.record("img").identity.chain_id)
            with pytest.raises(grpc.RpcError):
                prepare(s, "x", "", **{"containerd.io/snapshot.ref": chain})
            (m,) = prepare(s, "k", chain)
            Path(_options(m)["upperdir"], "g").write_text("g")
            s.stub.Commit(pb.CommitSnapshotRequest(name="top", key="k"))
            (m,) = prepare(s, "ctr", "top", **MAP)
            lowers = [Path(p) for p in _options(m)["lowerdir"].split(":")]
            assert [os.stat(p / n).st_uid for p, n in zip(lowers, "gf", strict=True)] == [
                100000, 100000]
            layers = str(s.drv.store.layers_dir) + "/"
            assert not [p for p in idmapped_points() if p.startswith(layers)]
            # Each clone in a peer group of its own, not the home's (nor an image's).
            groups = peer_groups()
            assert all(groups[str(p)] != groups[str(base)] for p in lowers), groups
            top = s.sn.records.get("top")
            assert top is not None and top.layer is not None
            assert [os.stat(s.drv.lower(lid) / n).st_uid
                    for lid, n in ((top.layer, "g"), ("img", "f"))] == [0, 0]
            s.stub.Remove(pb.RemoveSnapshotRequest(key="ctr"))
            assert not idmapped_points()
            for key in ("top", chain):
                s.stub.Remove(pb.RemoveSnapshotRequest(key=key))
            s.drv.remove("img")
        finally:
            s.stop()
    finally:
        unmount_layer_images(base)
        subprocess.run(["umount", "-R", str(base)], check=True)


def idmapped_points() -> list[str]:
    """Mount points of idmapped mounts (in this mount namespace)."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if "idmapped" in line.split(" - ")[0].split()[5]]


def peer_groups() -> dict[str, str]:
    """Mount point to its ``shared:N`` peer group ("" for none), from mountinfo."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head = line.split(" - ")[0].split()
            out[head[4]] = next((t for t in head[6:] if t.startswith("shared:")), "")
    return out
