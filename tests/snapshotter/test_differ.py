"""lamina's differ (``containerd.services.diff.v1.Diff``) against hostile peers.

A real server on a unix socket and the generated client, as containerd 2.x's proxy differ
calls it; the content store it reads is a small gRPC server of this test's
(:class:`~tests.snapshotter.blobs.Blobs`), which can lie: a size that is not the
descriptor's, wrong bytes, more or fewer bytes than it said, offsets out of order, a
message past the client's size limit, a stream cut off, a stream that stalls past the
caller's deadline.  Each is a clear status, and the snapshot's layer is left as it was
(empty, no diff id, nothing in staging), so that a later honest Apply onto it succeeds.
Malformed descriptors, media types lamina does not decode, stream processor payloads, a
request past the server's size limit, foreign mounts and ``Diff`` itself get the
statuses containerd falls through or stops on.  The real containerd's content store is
``tests/containerd/test_differ.py``'s.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from lamina.frontends.containerd.api import descriptor_pb2 as dpb
from lamina.frontends.containerd.api import diff_pb2, mount_pb2
from lamina.frontends.containerd.api import snapshots_pb2 as pb
from lamina.image import spec
from tests.integration.engine import unmount_below
from tests.snapshotter.blobs import Blobs, serving
from tests.snapshotter.served import Served

pytestmark = pytest.mark.root

BACKENDS = [("vfs", ()), ("overlay", ()), ("overlay", ("overlay.layers=dir",))]
CHUNK = 64 << 10
NS = "hostile-ns"


def layer_tar() -> bytes:
    """A small layer: a directory, a file of 300 KiB, a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("etc")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(d)
        data = bytes(range(256)) * 1200
        f = tarfile.TarInfo("etc/data")
        f.size, f.mode = len(data), 0o644
        tf.addfile(f, io.BytesIO(data))
        s = tarfile.TarInfo("etc/link")
        s.type, s.linkname = tarfile.SYMTYPE, "/etc/data"
        tf.addfile(s)
    return buf.getvalue()


def big_tar() -> bytes:
    """A layer of one file of 1 MiB of noise: its gzip is many chunks of the store's."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = os.urandom(1 << 20)
        info = tarfile.TarInfo("blob")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


TAR = layer_tar()
DIFF_ID = "sha256:" + hashlib.sha256(TAR).hexdigest()
GZ = gzip.compress(TAR)
GZ_DIGEST = "sha256:" + hashlib.sha256(GZ).hexdigest()
BIG = big_tar()
BIG_GZ = gzip.compress(BIG, compresslevel=1)
BIG_DIFF_ID = "sha256:" + hashlib.sha256(BIG).hexdigest()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Blobs, Path]]:
    sock = tmp_path_factory.mktemp("blobs") / "content.sock"
    with serving(sock) as store:
        yield store, sock


@pytest.fixture(params=BACKENDS, ids=["vfs", "overlay", "overlay+dir"])
def served(request: pytest.FixtureRequest, tmp_path: Path,
           blobs: tuple[Blobs, Path]) -> Iterator[Served]:
    backend, options = request.param
    blobs[0].mode = "honest"
    s = Served(tmp_path / "home", tmp_path / "s.sock", backend, options=options,
               containerd_address=str(blobs[1]))
    try:
        yield s
    finally:
        s.stop()
        unmount_below(tmp_path)  # the EROFS layers' images


def apply(s: Served, mounts: Any, digest: str, size: int,
          media: str = spec.OCI_LAYER_GZIP, timeout: float = 60, **kw: Any) -> Any:
    req = diff_pb2.ApplyRequest(diff=dpb.Descriptor(media_type=media, digest=digest, size=size),
                                mounts=mounts, **kw)
    return s.diff.Apply(req, timeout=timeout, metadata=[("containerd-namespace", NS)])


def code_of(call: Any, *args: Any, **kw: Any) -> grpc.StatusCode:
    """The status ``call(*args, **kw)`` fails with."""
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kw)
    return err.value.code()


def settled(s: Served, key: str) -> None:
    """Wait until no fill of snapshot ``key`` is in progress (one whose caller gave up
    stops at its next read of the blob)."""
    deadline = time.monotonic() + 20
    while key in s.sn._busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert key not in s.sn._busy


def untouched(s: Served, key: str, mounts: Any) -> None:
    """The snapshot's layer is as Prepare made it: empty, no diff id, still active, and
    no staging directory is left."""
    settled(s, key)
    assert not list((s.home / "staging").glob("*/*")), "a staging dir was left"
    lid = s.sn.stat(key).layer
    assert lid is not None
    assert s.drv.record(lid).identity.diff_id is None
    assert os.listdir(mounts[0].source) == []
    assert s.stub.Stat(pb.StatSnapshotRequest(key=key)).info.kind == pb.ACTIVE


def test_apply_then_commit(served: Served, blobs: tuple[Blobs, Path]) -> None:
    store, _ = blobs
    store.put(GZ)
    mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/extract")).mounts
    got = apply(served, mounts, GZ_DIGEST, len(GZ)).applied
    assert (got.media_type, got.digest, got.size) == (spec.OCI_LAYER, DIFF_ID, len(TAR))
    assert store.namespaces[-1] == NS  # the call's namespace, passed on
    assert served.differ.applied == 1
    assert sorted(os.listdir(mounts[0].source)) == ["etc"]
    served.stub.Commit(pb.CommitSnapshotRequest(name=DIFF_ID, key="ns/1/extract"))
    lid = served.sn.stat(DIFF_ID).layer
    assert lid is not None
    meta = served.drv.record(lid)
    assert (meta.identity.diff_id, meta.identity.chain_id) == (DIFF_ID, DIFF_ID)
    assert not meta.rw and not meta.sealed
    erofs = served.backend == "overlay" and "overlay.layers=dir" not in served.options
    assert meta.format.value == ("erofs" if erofs else "dir")
    with served.drv.diff(lid) as f:
        exported = f.read()
    if erofs:  # the layer's diff is the tar it was applied from
        assert hashlib.sha256(exported).hexdigest() == DIFF_ID.removeprefix("sha256:")
    with tarfile.open(fileobj=io.BytesIO(exported)) as tf:
        names = tf.getnames()
    assert {n.strip("/") for n in names} >= {"etc", "etc/data", "etc/link"}
    # the remote-snapshotter protocol finds it by its chain id, as any layer of lamina's
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Prepare(pb.PrepareSnapshotRequest(
            key="ns/2/extract", labels={"containerd.io/snapshot.ref": DIFF_ID}))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_decryption_payloads_on_a_plain_layer_are_passed_by(
        served: Served, blobs: tuple[Blobs, Path]) -> None:
    # containerd 2.1's CRI, pulling with its own unpacker (use_local_image_pull), sends the
    # ocicrypt decoders' payloads with every layer (image_decryption.key_model "node"):
    # they concern only +encrypted media types, which the walking differ decrypts.
    store, _ = blobs
    store.put(GZ)
    payload = any_pb2.Any(type_url="github.com/containerd/imgcrypt/Payload", value=b"{}")
    payloads = {"io.containerd.ocicrypt.decoder.v1.tar": payload,
                "io.containerd.ocicrypt.decoder.v1.tar.gzip": payload}
    mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(key="crypt")).mounts
    assert apply(served, mounts, GZ_DIGEST, len(GZ), payloads=payloads).applied.digest \
        == DIFF_ID
    assert served.differ.applied == 1
    other = served.stub.Prepare(pb.PrepareSnapshotRequest(key="crypt2")).mounts
    assert code_of(apply, served, other, GZ_DIGEST, len(GZ), payloads={
        **payloads, "example.com/processor": payload}) == grpc.StatusCode.UNIMPLEMENTED
    assert code_of(apply, served, other, GZ_DIGEST, len(GZ),
                   "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                   payloads=payloads) == grpc.StatusCode.UNIMPLEMENTED


def test_uncompressed_and_zstd(served: Served, blobs: tuple[Blobs, Path]) -> None:
    import zstandard

    store, _ = blobs
    for i, (media, blob) in enumerate([(spec.DOCKER_LAYER, TAR),
                                       (spec.OCI_LAYER_ZSTD, zstandard.compress(TAR))]):
        digest = store.put(blob)
        mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(key=f"k{i}")).mounts
        assert apply(served, mounts, digest, len(blob), media).applied.digest == DIFF_ID


def test_foreign_mounts_and_diff_are_unimplemented(served: Served, tmp_path: Path,
                                                   blobs: tuple[Blobs, Path]) -> None:
    blobs[0].put(GZ)
    mounts = list(served.stub.Prepare(pb.PrepareSnapshotRequest(key="a")).mounts)
    served.stub.Commit(pb.CommitSnapshotRequest(name="c", key="a"))
    view = list(served.stub.View(pb.ViewSnapshotRequest(key="v", parent="c")).mounts)
    src = mounts[0].source
    foreign = [
        [mount_pb2.Mount(type="bind", source=str(tmp_path), options=["rbind", "rw"])],
        [mount_pb2.Mount(type="overlay", source="overlay", options=[
            f"upperdir={tmp_path}/u", f"workdir={tmp_path}/w", f"lowerdir={tmp_path}/l"])],
        mounts,  # a committed snapshot's layer: no longer an active one
        view,  # a view: read-only
        [],
        [mount_pb2.Mount(type="bind", source=src + "/../..", options=["rbind", "rw"])],
    ]
    for m in foreign:
        assert code_of(apply, served, m, GZ_DIGEST, len(GZ)) \
            == grpc.StatusCode.UNIMPLEMENTED, m
    active = served.stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="c")).mounts
    changed = [mount_pb2.Mount(type=active[0].type, source=active[0].source,
                               options=[*active[0].options, "noatime"])]
    assert code_of(apply, served, changed, GZ_DIGEST, len(GZ)) \
        == grpc.StatusCode.UNIMPLEMENTED
    assert code_of(served.diff.Diff, diff_pb2.DiffRequest(left=view, right=active)) \
        == grpc.StatusCode.UNIMPLEMENTED
    assert served.differ.applied == 0


def test_mounts_buildkit_passes_on_are_laminas(served: Served,
                                               blobs: tuple[Blobs, Path]) -> None:
    # BuildKit's snapshotter wrapper (setRedirectDir) drops overlay's redirect_dir=
    # option, or moves it last, before Docker 28's builds apply a layer onto the mounts.
    blobs[0].put(GZ)
    served.stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    served.stub.Commit(pb.CommitSnapshotRequest(name="c", key="a"))
    for key, moved in (("dropped", False), ("moved", True)):
        given = served.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent="c")).mounts
        mounts = []
        for m in given:
            options = [o for o in m.options if not o.startswith("redirect_dir=")]
            if moved and len(options) != len(m.options):
                options.append("redirect_dir=off")
            mounts.append(mount_pb2.Mount(type=m.type, source=m.source, options=options))
        assert apply(served, mounts, GZ_DIGEST, len(GZ)).applied.digest == DIFF_ID
    assert served.differ.applied == 2


def test_bad_descriptors(served: Served, blobs: tuple[Blobs, Path]) -> None:
    store, _ = blobs
    store.put(GZ)
    key = "bad"
    mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(key=key)).mounts
    invalid = [(spec.OCI_LAYER_GZIP, "sha256:xyz", len(GZ)),
               (spec.OCI_LAYER_GZIP, "sha256" + GZ_DIGEST[7:], len(GZ)),
               (spec.OCI_LAYER_GZIP, "", len(GZ)),
               (spec.OCI_LAYER_GZIP, GZ_DIGEST + "\n", len(GZ)),
               (spec.OCI_LAYER_GZIP, GZ_DIGEST, -1),
               ("", GZ_DIGEST, len(GZ))]
    for media, digest, size in invalid:
        assert code_of(apply, served, mounts, digest, size, media) \
            == grpc.StatusCode.INVALID_ARGUMENT, (media, digest, size)
    unimplemented = [("application/vnd.oci.image.layer.v1.tar+gzip+encrypted", GZ_DIGEST),
                     ("application/octet-stream", GZ_DIGEST),
                     (spec.OCI_LAYER_GZIP, "sha512:" + "ab" * 64)]
    for media, digest in unimplemented:
        assert code_of(apply, served, mounts, digest, len(GZ), media) \
            == grpc.StatusCode.UNIMPLEMENTED, (media, digest)
    payload = any_pb2.Any(type_url="example.com/decryption-keys", value=b"k")
    assert code_of(apply, served, mounts, GZ_DIGEST, len(GZ), payloads={"p": payload}) \
        == grpc.StatusCode.UNIMPLEMENTED  # stream processors: walking's
    # a request over the server's limit (4 MiB): refused before it runs
    fat = [mount_pb2.Mount(type=m.type, source=m.source, options=[*m.options, "x" * (5 << 20)])
           for m in mounts]
    assert code_of(apply, served, fat, GZ_DIGEST, len(GZ)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    missing = "sha256:" + "0" * 64
    assert code_of(apply, served, mounts, missing, 10) == grpc.StatusCode.NOT_FOUND
    # a size other than the blob's, a gzip media type on an uncompressed blob
    assert code_of(apply, served, mounts, GZ_DIGEST, len(GZ) + 1) \
        == grpc.StatusCode.DATA_LOSS
    plain = store.put(TAR)
    assert code_of(apply, served, mounts, plain, len(TAR)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    junk = store.put(os.urandom(100_000))
    assert code_of(apply, served, mounts, junk, 100_000, spec.OCI_LAYER) \
        == grpc.StatusCode.INVALID_ARGUMENT
    untouched(served, key, mounts)
    assert apply(served, mounts, GZ_DIGEST, len(GZ)).applied.digest == DIFF_ID


@pytest.mark.parametrize("mode,code", [
    ("info-lies", grpc.StatusCode.DATA_LOSS),
    ("wrong", grpc.StatusCode.DATA_LOSS),
    ("more", grpc.StatusCode.DATA_LOSS),
    ("less", grpc.StatusCode.DATA_LOSS),
    ("offsets", grpc.StatusCode.DATA_LOSS),
    ("cut", grpc.StatusCode.UNAVAILABLE),
    ("stall", grpc.StatusCode.DEADLINE_EXCEEDED),
    ("huge", grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_a_lying_content_store_leaves_nothing(served: Served, blobs: tuple[Blobs, Path],
                                              mode: str, code: grpc.StatusCode) -> None:
    store, _ = blobs
    digest = store.put(BIG_GZ)
    mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(key="k")).mounts
    store.mode = mode
    started = time.monotonic()
    assert code_of(apply, served, mounts, digest, len(BIG_GZ), timeout=3) == code
    assert time.monotonic() - started < 30
    store.mode = "honest"
    untouched(served, "k", mounts)
    got = apply(served, mounts, digest, len(BIG_GZ)).applied
    assert (got.digest, got.size) == (BIG_DIFF_ID, len(BIG))


def test_the_caller_going_away_leaves_nothing(served: Served,
                                              blobs: tuple[Blobs, Path]) -> None:
    store, _ = blobs
    digest = store.put(BIG_GZ)
    mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(key="k")).mounts
    store.mode = "stall"
    req = diff_pb2.ApplyRequest(diff=dpb.Descriptor(media_type=spec.OCI_LAYER_GZIP,
                                                    digest=digest, size=len(BIG_GZ)),
                                mounts=mounts)
    call = served.diff.Apply.future(req)
    time.sleep(1)
    call.cancel()
    store.mode = "honest"
    untouched(served, "k", mounts)
    assert apply(served, mounts, digest, len(BIG_GZ)).applied.digest == BIG_DIFF_ID


def test_commit_while_applying_is_refused(served: Served, blobs: tuple[Blobs, Path]) -> None:
    store, _ = blobs
    digest = store.put(BIG_GZ)
    mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(key="k")).mounts
    store.mode = "stall"
    failed: list[grpc.StatusCode] = []

    def run() -> None:
        failed.append(code_of(apply, served, mounts, digest, len(BIG_GZ), timeout=3))

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while "k" not in served.sn._busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert code_of(served.stub.Commit, pb.CommitSnapshotRequest(name="n", key="k")) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(served.stub.Remove, pb.RemoveSnapshotRequest(key="k")) \
        == grpc.StatusCode.FAILED_PRECONDITION
    t.join()
    assert failed == [grpc.StatusCode.DEADLINE_EXCEEDED]
    settled(served, "k")
    store.mode = "honest"
    assert apply(served, mounts, digest, len(BIG_GZ)).applied.digest == BIG_DIFF_ID
    # applied once: a second Apply onto the same snapshot is refused
    assert code_of(apply, served, mounts, digest, len(BIG_GZ)) \
        == grpc.StatusCode.FAILED_PRECONDITION


def test_a_snapshot_written_through_its_mounts_falls_through(
        served: Served, blobs: tuple[Blobs, Path]) -> None:
    """Changes of its own (containerd wrote there): the next differ applies onto them."""
    digest = blobs[0].put(GZ)
    served.stub.Prepare(pb.PrepareSnapshotRequest(key="base"))
    assert apply(served, served.stub.Mounts(pb.MountsRequest(key="base")).mounts, digest,
                 len(GZ)).applied.digest == DIFF_ID
    served.stub.Commit(pb.CommitSnapshotRequest(name="b", key="base"))
    for parent in ("", "b"):
        key = f"written-{parent}"
        mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent)).mounts
        (m,) = mounts
        upper = m.source if m.type == "bind" else next(
            o.split("=", 1)[1] for o in m.options if o.startswith("upperdir="))
        Path(upper, "written").write_text("by containerd\n")
        assert code_of(apply, served, mounts, digest, len(GZ)) == grpc.StatusCode.UNIMPLEMENTED
        assert Path(upper, "written").read_text() == "by containerd\n"
        lid = served.sn.stat(key).layer
        assert lid is not None and served.drv.record(lid).identity.diff_id is None


def test_a_filled_snapshot_removed_goes_whole(served: Served, blobs: tuple[Blobs, Path]) -> None:
    """containerd removes the snapshot of an unpack that failed after the Apply: the
    filled layer goes, its image unmounted."""
    digest = blobs[0].put(GZ)
    mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(key="k")).mounts
    assert apply(served, mounts, digest, len(GZ)).applied.digest == DIFF_ID
    lid = served.sn.stat("k").layer
    served.stub.Remove(pb.RemoveSnapshotRequest(key="k"))
    assert lid is not None and not served.drv.exists(lid)
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert not [p for p in points if p.startswith(str(served.home))]
