"""``lamina snapshotter`` through its gRPC surface: a real server on a unix socket, a real
client (the generated stub), on every Linux backend.

Hostile input (keys of any bytes and length, missing and active parents, filters that
do not parse, 1,000 concurrent calls), restarts, the remote-snapshotter protocol (a
layer applied through the driver found by its chain id) and the two users of a layer.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import lamina
from lamina.archive.diffid import chain_id
from lamina.backends import check
from lamina.backends.base import StoreDriver
from lamina.frontends.containerd import filters
from lamina.frontends.containerd.api import snapshots_pb2 as pb
from lamina.frontends.containerd.snapshotter import REF_LABEL, Snapshotter
from lamina.store import reaper
from tests.snapshotter.served import Served as ServedStore

pytestmark = pytest.mark.root

BACKENDS = ["overlay", "vfs"]


class Served(ServedStore):
    """A store served on a socket, with a client, and shorthands for its calls."""

    # shorthands
    def prepare(self, key: str, parent: str = "", **labels: str) -> Any:
        return self.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent,
                                                           labels=labels))

    def commit(self, name: str, key: str) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key))

    def stat(self, key: str) -> Any:
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def names(self, *fs: str) -> list[str]:
        out = []
        for resp in self.stub.List(pb.ListSnapshotsRequest(filters=list(fs))):
            out += [i.name for i in resp.info]
        return sorted(out)


@pytest.fixture(params=BACKENDS)
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "home", tmp_path / "s.sock", request.param)
    try:
        yield s
    finally:
        s.stop()


def code(e: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return e.value.code()  # type: ignore[attr-defined, no-any-return]


def test_life_cycle_and_mount_specs(served: Served) -> None:
    m = served.prepare("a-key", "").mounts
    assert [(x.type, list(x.options)) for x in m] == [("bind", ["rbind", "rw"])]
    served.commit("base", "a-key")
    with pytest.raises(grpc.RpcError) as e:
        served.stat("a-key")
    assert code(e) == grpc.StatusCode.NOT_FOUND
    info = served.stat("base")
    assert info.kind == pb.COMMITTED and info.parent == ""
    m = served.prepare("top", "base").mounts
    if served.backend == "overlay":
        (o,) = m
        assert o.type == "overlay"
        opts = {k: v for k, _, v in (x.partition("=") for x in o.options)}
        assert opts["lowerdir"].startswith(str(served.home / "l")) and "upperdir" in opts
    else:
        assert [x.type for x in m] == ["bind"]
    v = served.stub.View(pb.ViewSnapshotRequest(key="v", parent="base")).mounts
    assert [list(x.options) for x in v] == [["rbind", "ro"]]
    assert served.stat("v").kind == pb.VIEW
    with pytest.raises(grpc.RpcError) as e:
        served.stub.Remove(pb.RemoveSnapshotRequest(key="base"))
    assert code(e) == grpc.StatusCode.FAILED_PRECONDITION
    for k in ("v", "top", "base"):
        served.stub.Remove(pb.RemoveSnapshotRequest(key=k))
    assert served.names() == []
    assert list(served.drv.layers()) == []


def test_keys_of_any_bytes_and_length(served: Served) -> None:
    keys = ["default/7/extract-123 sha256:" + "a" * 64, "../../etc/passwd", "a\nb\tc",
            "x" * 10_000, "ключ/🙂", " ", "/", "-removing", "\x7f"]
    for k in keys:
        served.prepare(k, "")
    assert served.names() == sorted(keys)
    served.restart()
    assert served.names() == sorted(keys)
    for k in keys:
        assert served.stat(k).name == k
    with pytest.raises(grpc.RpcError) as e:
        served.prepare("", "")
    assert code(e) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        served.prepare(keys[0], "")
    assert code(e) == grpc.StatusCode.ALREADY_EXISTS


def test_parents_must_be_committed_and_exist(served: Served) -> None:
    served.prepare("active", "")
    with pytest.raises(grpc.RpcError) as e:
        served.prepare("child", "active")
    assert code(e) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        served.prepare("child", "missing")
    assert code(e) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        served.commit("c", "missing")
    assert code(e) == grpc.StatusCode.NOT_FOUND
    served.stub.View(pb.ViewSnapshotRequest(key="view", parent=""))
    with pytest.raises(grpc.RpcError) as e:
        served.commit("c", "view")
    assert code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert served.names() == ["active", "view"]


def test_filters_and_update(served: Served) -> None:
    served.prepare("p-tmp", "")
    served.commit("p", "p-tmp")
    served.prepare("a", "p", l="2")
    assert served.names('labels.l==2') == ["a"]
    assert served.names("kind==committed", "name==a") == ["a", "p"]
    assert served.names('parent!="",kind~=^act') == ["a"]
    for bad in ("name==", "name=a", "labels.", "name==a,", "kind==active ,x", '"unterminated'):
        with pytest.raises(grpc.RpcError) as e:
            served.names(bad)
        assert code(e) == grpc.StatusCode.INVALID_ARGUMENT, bad
    info = served.stat("a")
    info.labels.clear()
    info.labels["new"] = "1"
    got = served.stub.Update(pb.UpdateSnapshotRequest(
        info=info, update_mask={"paths": ["labels.new", "labels.l"]})).info
    assert dict(got.labels) == {"new": "1"} and got.created_at == info.created_at
    with pytest.raises(grpc.RpcError) as e:
        served.stub.Update(pb.UpdateSnapshotRequest(info=info, update_mask={"paths": ["parent"]}))
    assert code(e) == grpc.StatusCode.INVALID_ARGUMENT
    served.restart()
    assert dict(served.stat("a").labels) == {"new": "1"}


def test_concurrent_calls(served: Served) -> None:
    served.prepare("base-a", "")
    served.commit("base", "base-a")

    def one(i: int) -> str:
        key = f"k{i}"
        served.prepare(key, "base")
        served.stat(key)
        if i % 2:
            served.stub.Remove(pb.RemoveSnapshotRequest(key=key))
        return key

    with futures.ThreadPoolExecutor(32) as pool:
        done = list(pool.map(one, range(1000)))
    assert len(done) == 1000
    assert served.names("kind==active") == sorted(f"k{i}" for i in range(0, 1000, 2))


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_remote_snapshot_protocol_and_two_users(served: Served) -> None:
    t1, t2 = _tar({"a": b"1"}), _tar({"b": b"2"})
    d1 = "sha256:" + hashlib.sha256(t1).hexdigest()
    d2 = "sha256:" + hashlib.sha256(t2).hexdigest()
    served.drv.apply_diff("docker1", None, io.BytesIO(t1))   # as `lamina serve` would
    served.drv.apply_diff("docker2", "docker1", io.BytesIO(t2))
    identity = served.drv.record("docker2").identity
    c1, c2 = chain_id(None, d1), chain_id(chain_id(None, d1), d2)
    assert identity.diff_id == d2 and identity.chain_id == c2
    with pytest.raises(grpc.RpcError) as e:
        served.prepare("ns/1/extract-1 " + c1, "", **{REF_LABEL: c1})
    assert code(e) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:
        served.prepare("ns/2/extract-2 " + c2, c1, **{REF_LABEL: c2})
    assert code(e) == grpc.StatusCode.ALREADY_EXISTS
    assert served.names(f'labels."{REF_LABEL}"=={c2},parent=="{c1}"') == [c2]
    assert sorted(served.drv.layers()) == ["docker1", "docker2"]  # nothing new on disk
    # Docker removes its layers: the snapshots keep them ...
    served.drv.remove("docker2")
    served.drv.remove("docker1")
    assert sorted(served.drv.layers()) == ["docker1", "docker2"]
    m = served.prepare("ctr", c2).mounts
    assert m
    served.stub.Remove(pb.RemoveSnapshotRequest(key="ctr"))
    # ... until the snapshots go too.
    served.stub.Remove(pb.RemoveSnapshotRequest(key=c2))
    served.stub.Remove(pb.RemoveSnapshotRequest(key=c1))
    assert list(served.drv.layers()) == []


def test_snapshot_remove_keeps_what_docker_still_has(served: Served) -> None:
    t1 = _tar({"a": b"1"})
    c1 = "sha256:" + hashlib.sha256(t1).hexdigest()
    served.drv.apply_diff("docker1", None, io.BytesIO(t1))
    with pytest.raises(grpc.RpcError):
        served.prepare("k", "", **{REF_LABEL: c1})
    served.stub.Remove(pb.RemoveSnapshotRequest(key=c1))
    assert list(served.drv.layers()) == ["docker1"]
    served.drv.remove("docker1")
    assert list(served.drv.layers()) == []


def test_remove_answers_before_the_tree_is_deleted(served: Served,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # containerd's garbage collection removes snapshots in passes; a pass that waits for
    # trees to be deleted leaves the removals asked for meanwhile to a later pass.  So a
    # Remove retires the layer (its commit point) and answers; the tree goes after.
    store = served.drv.store
    deleting, go_on = threading.Event(), threading.Event()
    delete = store._delete

    def slow_delete(path: Path) -> None:
        if path.name.endswith("-removing"):  # a removal's; not a build's staging dir
            deleting.set()
            assert go_on.wait(60)
        delete(path)

    monkeypatch.setattr(store, "_delete", slow_delete)
    served.prepare("k", "")
    layer = served.sn.records.get("k").layer
    served.stub.Remove(pb.RemoveSnapshotRequest(key="k"))  # answered while being deleted
    assert deleting.wait(30)
    doomed = store.layers_dir / f"{layer}-removing"
    assert doomed.exists() and list(served.drv.layers()) == []
    # Being deleted by its remover: neither a problem for check, nor a sweep's to take.
    assert check.check(served.drv).problems == []
    assert str(doomed) not in store.sweep()
    go_on.set()
    assert store.wait_deleted(30) and not doomed.exists()


def test_a_full_reaper_leaves_the_remover_its_own_tree(served: Served,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    # Each tree given to the reaper holds a file descriptor: past MAX_PENDING (the one
    # being deleted among them), a Remove deletes its own tree before it answers.
    store = served.drv.store
    monkeypatch.setattr(reaper, "MAX_PENDING", 2)
    deleting, go_on = threading.Event(), threading.Event()
    delete = store._delete

    def slow_delete(path: Path) -> None:
        if path.name.startswith("ctrd-") and threading.current_thread().name == "lamina-reaper":
            deleting.set()
            assert go_on.wait(60)
        delete(path)

    monkeypatch.setattr(store, "_delete", slow_delete)
    for key in ("a", "b", "c"):
        served.prepare(key, "")
    layers = {key: served.sn.records.get(key).layer for key in ("a", "b", "c")}
    try:
        served.stub.Remove(pb.RemoveSnapshotRequest(key="a"))  # the reaper holds it
        assert deleting.wait(30)
        served.stub.Remove(pb.RemoveSnapshotRequest(key="b"))  # queued: one waits
        served.stub.Remove(pb.RemoveSnapshotRequest(key="c"))  # full: deleted at once
        assert not (store.layers_dir / f"{layers['c']}-removing").exists()
        assert (store.layers_dir / f"{layers['b']}-removing").exists()
    finally:
        go_on.set()
    assert store.wait_deleted(30)
    assert not list(store.layers_dir.glob("*-removing"))


def test_commit_adopts_a_layer_the_store_holds(served: Served) -> None:
    # ctr image import (containerd 1.6) sends no snapshot.ref label: the commit dedups.
    t1 = _tar({"a": b"1"})
    c1 = "sha256:" + hashlib.sha256(t1).hexdigest()
    served.drv.apply_diff("docker1", None, io.BytesIO(t1))
    served.prepare(f"ns/1/extract-9 {c1}", "")
    served.commit(f"ns/2/{c1}", f"ns/1/extract-9 {c1}")
    assert list(served.drv.layers()) == ["docker1"]
    assert served.stat(f"ns/2/{c1}").kind == pb.COMMITTED


def test_usage_and_restart_keeps_everything(served: Served) -> None:
    served.prepare("k", "")
    (mounts,) = served.stub.Mounts(pb.MountsRequest(key="k")).mounts
    Path(mounts.source, "file").write_bytes(b"x" * 10_000)
    u = served.stub.Usage(pb.UsageRequest(key="k"))
    assert u.inodes == 1 and u.size >= 10_000
    served.commit("c", "k")
    before = served.stat("c")
    served.restart()
    assert served.stat("c") == before
    assert served.stub.Usage(pb.UsageRequest(key="c")).inodes == 1


def test_a_second_server_on_the_home_is_refused(served: Served, tmp_path: Path) -> None:
    drv = lamina.open_driver(served.home, backend=served.backend)
    try:
        assert isinstance(drv, StoreDriver)
        with pytest.raises(lamina.errors.Busy):
            Snapshotter(drv)
    finally:
        drv.close()


def test_filter_grammar_matches_containerds() -> None:
    f = filters.parse_all(['labels."containerd.io/gc.root"==x,kind==active'])
    look = filters.snapshot_fields("n", "", "active", {"containerd.io/gc.root": "x"})
    assert f.matches(look)


def test_filter_slash_must_be_quoted() -> None:
    with pytest.raises(filters.FilterError):
        filters.parse_all(["name==/a/b"])
    f = filters.parse_all(['name=="/a/b"'])
    assert f.matches(filters.snapshot_fields("/a/b", "", "view", {}))
    assert filters.parse_all(["name~=/a.b/"]).matches(filters.snapshot_fields("xa/b", "", "", {}))



def test_image_layers_are_found_by_chain_id(served: Served) -> None:
    """``lamina image load`` names its layers by chain id: containerd's remote protocol
    finds them; ``image rm`` leaves them while snapshots use them."""
    from lamina.image import load
    from lamina.image.store import ImageStore, chain_ids, layer_id
    from tests.image import build

    img = build.image(build.BASE, build.APP)
    store = ImageStore(served.drv)
    load.load(store, stream=io.BytesIO(build.docker_save([img])))
    c1, c2 = chain_ids(build.sha(x) for x in img.layers)
    for key, parent, chain in (("ns/1/extract-1 " + c1, "", c1), ("ns/2/extract-2 " + c2, c1, c2)):
        with pytest.raises(grpc.RpcError) as e:
            served.prepare(key, parent, **{REF_LABEL: chain})
        assert code(e) == grpc.StatusCode.ALREADY_EXISTS
    assert sorted(served.drv.layers()) == sorted([layer_id(c1), layer_id(c2)])
    store.remove("test/app:1")
    assert sorted(served.drv.layers()) == sorted([layer_id(c1), layer_id(c2)])
    served.stub.Remove(pb.RemoveSnapshotRequest(key=c2))
    served.stub.Remove(pb.RemoveSnapshotRequest(key=c1))
    assert list(served.drv.layers()) == []
