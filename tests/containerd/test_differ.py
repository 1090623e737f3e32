"""lamina's differ reading a real containerd's content store (contract §6, the differ).

Debian 12's containerd is 1.6, which has no proxy differ: the test plays containerd 2.x's
unpacker.  The corpus's OCI image (``app-oci``: three gzip layers whose diff ids its
config lists) has its layer blobs ingested into containerd's content store (``ctr
content ingest``, kept by a ``containerd.io/gc.root`` label), and for each layer, bottom
first: ``Prepare`` of an active snapshot through lamina's snapshot API (with the
``containerd.io/snapshot.ref`` label, as 2.x's unpacker sends it), ``Diff.Apply`` over
gRPC with the mounts it got and the call's namespace in the metadata, ``Commit`` under
the chain id.  Then, on vfs, overlay and overlay with EROFS layers: each answer's digest
is the config's diff id; each committed layer's record carries that diff id, its chain
id and its format (EROFS or a directory), was filled by lamina (not sealed from writes
through mounts; ``lamina ls --json`` says so too) and passes ``lamina check``; the
differ counts and logs one apply per layer; the top snapshot's view, mounted as
containerd would, is the image's union (what ``test_ctr.py``'s container reads: files,
hard links, whiteouts, an opaque directory); the top layer's blob as zstd and
uncompressed (docker's media type) gives the same diff id.  Mounts of containerd's own
overlayfs snapshotter are ``Unimplemented`` (containerd 2.x goes on to its walking
differ), and so is ``Diff``.  Last, ``lamina snapshotter --containerd-address`` as a
process: the differ on its socket, each apply in its log.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zstandard

from lamina.archive.diffid import chain_id
from lamina.backends import check
from lamina.frontends.containerd.api import descriptor_pb2 as dpb
from lamina.frontends.containerd.api import diff_pb2, diff_pb2_grpc, snapshots_pb2_grpc
from lamina.frontends.containerd.api import snapshots_pb2 as pb
from lamina.image import spec
from lamina.store.meta import LayerFormat
from tests.conftest import lacking
from tests.containerd.daemon import Containerd, Snapshotter, containerd_missing
from tests.integration.engine import unmount_below
from tests.snapshotter.served import Served

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

NS = "differ"
REF = "containerd.io/snapshot.ref"
VARIANTS = {"vfs": ("vfs", ()), "overlay": ("overlay", ()),
            "overlay+dir": ("overlay", ("overlay.layers=dir",))}


class Image:
    """The corpus's OCI image: its layers' descriptors and diff ids."""

    def __init__(self, corpus: Path) -> None:
        self.dir = corpus / "app-oci"
        index = json.loads((self.dir / "index.json").read_text())
        manifest = json.loads(self.blob(index["manifests"][0]["digest"]).read_text())
        config = json.loads(self.blob(manifest["config"]["digest"]).read_text())
        self.layers: list[dict[str, Any]] = manifest["layers"]
        self.diff_ids: list[str] = config["rootfs"]["diff_ids"]
        self.chains: list[str] = []
        for diff_id in self.diff_ids:
            self.chains.append(chain_id(self.chains[-1] if self.chains else None, diff_id))

    def blob(self, digest: str) -> Path:
        return self.dir / "blobs" / "sha256" / digest.removeprefix("sha256:")


def ingest(ctd: Containerd, path: Path) -> tuple[str, int]:
    """``path`` put into containerd's content store (namespace :data:`NS`) and kept there
    (a gc root); its digest and size."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    digest, size = "sha256:" + sha.hexdigest(), path.stat().st_size
    with open(path, "rb") as f:
        subprocess.run(["ctr", "--address", str(ctd.address), "-n", NS, "content", "ingest",
                        "--expected-size", str(size), "--expected-digest", digest,
                        f"differ-test-{digest[7:19]}"], stdin=f, check=True, timeout=600)
    ctd.ctr("-n", NS, "content", "label", digest, "containerd.io/gc.root=differ-test")
    return digest, size


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Iterator[
        tuple[Containerd, Image, dict[str, tuple[str, int]]]]:
    """A containerd (1.6, its own content store) holding the image's layer blobs, and the
    top layer's as zstd and uncompressed: blobs by name (``0``…, ``zstd``, ``tar``)."""
    if (missing := containerd_missing()) is not None:
        lacking(missing)
    work = tmp_path_factory.mktemp("differ-containerd")
    ctd = Containerd(work / "containerd", {})
    img = Image(corpus_dir)
    try:
        ctd.start()
        blobs = {str(i): ingest(ctd, img.blob(layer["digest"]))
                 for i, layer in enumerate(img.layers)}
        top = gzip.decompress(img.blob(img.layers[-1]["digest"]).read_bytes())
        (work / "top.tar").write_bytes(top)
        (work / "top.tar.zst").write_bytes(zstandard.compress(top))
        blobs["tar"] = ingest(ctd, work / "top.tar")
        blobs["zstd"] = ingest(ctd, work / "top.tar.zst")
        yield ctd, img, blobs
    finally:
        ctd.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(params=list(VARIANTS))
def served(request: pytest.FixtureRequest, tmp_path: Path,
           daemon: tuple[Containerd, Image, dict[str, tuple[str, int]]]) -> Iterator[Served]:
    backend, options = VARIANTS[request.param]
    s = Served(tmp_path / "home", tmp_path / "s.sock", backend, options=options,
               containerd_address=str(daemon[0].address))
    try:
        yield s
    finally:
        s.stop()
        unmount_below(tmp_path)


def apply(s: Served, mounts: Any, media: str, digest: str, size: int) -> Any:
    req = diff_pb2.ApplyRequest(diff=dpb.Descriptor(media_type=media, digest=digest, size=size),
                                mounts=mounts, sync_fs=True)
    return s.diff.Apply(req, metadata=[("containerd-namespace", NS)], timeout=600).applied


def unpack(s: Served, img: Image, blobs: dict[str, tuple[str, int]]) -> None:
    """The image's layers through lamina's snapshots and differ, as 2.x's unpacker."""
    parent = ""
    for i, (layer, diff_id, chain) in enumerate(zip(img.layers, img.diff_ids, img.chains,
                                                    strict=True)):
        key = f"{NS}/{i}/extract-{i} {chain}"
        mounts = s.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent,
                                                          labels={REF: chain})).mounts
        got = apply(s, mounts, layer["mediaType"], *blobs[str(i)])
        assert (got.media_type, got.digest) == (spec.OCI_LAYER, diff_id)
        s.stub.Commit(pb.CommitSnapshotRequest(name=chain, key=key))
        parent = chain


def mounted(mounts: Any, where: Path) -> None:
    """Mount ``mounts`` (one) at ``where`` as containerd would."""
    (m,) = mounts
    opts = [o for o in m.options if o not in ("rbind", "bind")]
    flags = ["--rbind"] if m.type == "bind" else ["-t", m.type]
    subprocess.run(["mount", *flags, "-o", ",".join(opts), m.source, str(where)], check=True)


def lamina_ls(s: Served) -> dict[str, dict[str, Any]]:
    """``lamina ls --json``'s layers by id, on the served home (another process)."""
    opts = [a for o in s.options for a in ("--opt", o)]
    out = subprocess.run([sys.executable, "-m", "lamina", "--home", str(s.home), "--backend",
                          s.backend, *opts, "--json", "ls"], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    return {row["id"]: row for row in json.loads(out)["layers"]}


def test_unpack_through_the_differ(served: Served, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture,
                                   daemon: tuple[Containerd, Image,
                                                 dict[str, tuple[str, int]]]) -> None:
    _, img, blobs = daemon
    caplog.set_level(logging.INFO, logger="lamina.differ")
    unpack(served, img, blobs)
    assert served.differ.applied == len(img.layers)  # one apply per layer, by lamina
    applies = [r.getMessage() for r in caplog.records if r.name == "lamina.differ"]
    assert len(applies) == len(img.layers)
    assert all(f"diff id {d}" in m for m, d in zip(applies, img.diff_ids, strict=True))
    listed = lamina_ls(served)
    erofs = served.backend == "overlay" and "overlay.layers=dir" not in served.options
    for diff_id, chain in zip(img.diff_ids, img.chains, strict=True):
        lid = served.sn.stat(chain).layer
        assert lid is not None
        meta = served.drv.record(lid)
        assert (meta.identity.diff_id, meta.identity.chain_id) == (diff_id, chain)
        assert not meta.rw and not meta.sealed  # filled by lamina, not written through mounts
        assert meta.format is (LayerFormat.EROFS if erofs else LayerFormat.DIR)
        assert (listed[lid]["diff_id"], listed[lid]["format"], listed[lid]["sealed"]) == (
            diff_id, meta.format.value, False)
    report = check.check(served.drv)
    assert report.consistent, report.problems
    # the union, mounted as containerd mounts the top snapshot's view
    view = served.stub.View(pb.ViewSnapshotRequest(key="view", parent=img.chains[-1])).mounts
    where = tmp_path / "rootfs"
    where.mkdir()
    mounted(view, where)
    try:
        # (what tests/containerd/test_ctr.py's container reads of the same image)
        assert (where / "app/a.txt").read_text() == "hello\n"
        assert (where / "app/a.txt").stat().st_ino == (where / "app/b.txt").stat().st_ino
        assert os.readlink(where / "app/abs-link") == "/etc/passwd"
        assert sorted(os.listdir(where / "etc/apt/apt.conf.d")) == ["99x"]  # opaque
        for gone in ("usr/share/man", "usr/bin/perl", "etc/cron.daily"):  # whiteouts
            assert not os.path.lexists(where / gone), gone
        assert (where / "etc/debian_version").is_file()
    finally:
        subprocess.run(["umount", str(where)], check=True)
    # the top layer again, as zstd and uncompressed: the same diff id
    for name, media in (("zstd", spec.OCI_LAYER_ZSTD), ("tar", spec.DOCKER_LAYER)):
        key = f"{NS}/again/{name}"
        mounts = served.stub.Prepare(pb.PrepareSnapshotRequest(
            key=key, parent=img.chains[-2])).mounts
        assert apply(served, mounts, media, *blobs[name]).digest == img.diff_ids[-1]


def test_containerds_own_mounts_fall_through(
        served: Served, daemon: tuple[Containerd, Image, dict[str, tuple[str, int]]]) -> None:
    ctd, img, blobs = daemon
    with grpc.insecure_channel(f"unix:{ctd.address}") as channel:
        theirs: Any = snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
        md = [("containerd-namespace", NS)]
        key = f"differ-foreign-{served.backend}-{len(served.options)}"
        # (a gc root: containerd collects a snapshot that nothing holds after a removal)
        mounts = theirs.Prepare(pb.PrepareSnapshotRequest(
            snapshotter="overlayfs", key=key, labels={"containerd.io/gc.root": "differ-test"}),
            metadata=md).mounts
        try:
            with pytest.raises(grpc.RpcError) as err:
                apply(served, mounts, img.layers[0]["mediaType"], *blobs["0"])
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as err:
                served.diff.Diff(diff_pb2.DiffRequest(left=[], right=mounts))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            theirs.Remove(pb.RemoveSnapshotRequest(snapshotter="overlayfs", key=key),
                          metadata=md)
    assert served.differ.applied == 0


def test_lamina_snapshotter_serves_the_differ(
        tmp_path: Path, daemon: tuple[Containerd, Image, dict[str, tuple[str, int]]]) -> None:
    """``lamina snapshotter --containerd-address`` (the command containerd 2.x runs
    beside it) serves the differ on its socket and logs each apply without ``-v``."""
    ctd, img, blobs = daemon
    sn = Snapshotter(tmp_path / "home", tmp_path / "snapshotter.log", backend="overlay",
                     args=["--containerd-address", str(ctd.address)])
    try:
        sn.start()
        with grpc.insecure_channel(f"unix:{sn.socket}") as channel:
            snaps: Any = snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
            differ: Any = diff_pb2_grpc.DiffStub(channel)  # type: ignore[no-untyped-call]
            key = f"{NS}/1/extract {img.chains[0]}"
            mounts = snaps.Prepare(pb.PrepareSnapshotRequest(key=key)).mounts
            req = diff_pb2.ApplyRequest(
                diff=dpb.Descriptor(media_type=img.layers[0]["mediaType"], digest=blobs["0"][0],
                                    size=blobs["0"][1]), mounts=mounts)
            got = differ.Apply(req, metadata=[("containerd-namespace", NS)], timeout=600)
            assert got.applied.digest == img.diff_ids[0]
            snaps.Commit(pb.CommitSnapshotRequest(name=img.chains[0], key=key))
        assert sn.stop() == 0
        assert "lamina differ: applied" in sn.log.read_text()
        rows = [r for r in sn.layers() if r.get("diff_id") == img.diff_ids[0]]
        assert len(rows) == 1 and rows[0]["sealed"] is False
    finally:
        sn.close()
        unmount_below(tmp_path)
