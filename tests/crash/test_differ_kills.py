"""``lamina snapshotter`` killed (SIGKILL) inside the differ's Apply (contract §4, §6).

A ``lamina snapshotter`` process (run through :mod:`tests.crash.snapshotter_child`)
reads blobs from a content store of the test's own (:mod:`tests.snapshotter.blobs`).
An active snapshot is prepared, then ``Diff.Apply`` of a gzip layer onto it kills the
server at the fill's swap of the new content into the snapshot's layer: just before
(``swap:before-exchange``: the layer's content is complete in staging, and on overlay
with EROFS layers its image is mounted there) and just after (``swap:after-exchange``:
the old empty content is in staging).  Restarted on the same home, the server finds:
the snapshot still active; its layer either as Prepare made it (empty, no diff id)
before the commit point or filled (the diff id, the format) after it; nothing left in
staging and nothing mounted there; ``lamina check`` passes.  And the client carries on:
Apply again (before) or Commit (after) gives the layer of the blob's diff id.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from lamina.frontends.containerd.api import descriptor_pb2 as dpb
from lamina.frontends.containerd.api import diff_pb2, diff_pb2_grpc, snapshots_pb2_grpc
from lamina.frontends.containerd.api import snapshots_pb2 as pb
from lamina.image import spec
from tests.containerd.daemon import Snapshotter
from tests.crash.harness import child_env
from tests.integration.engine import unmount_below
from tests.snapshotter.blobs import serving

pytestmark = [pytest.mark.root]

WRAPPER = json.dumps([sys.executable, "-m", "tests.crash.snapshotter_child"])
VARIANTS = {"vfs": ("vfs", ()), "overlay": ("overlay", ()),
            "overlay+dir": ("overlay", ("overlay.layers=dir",))}
POINTS = ("swap:before-exchange", "swap:after-exchange")


def layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(20):
            data = os.urandom(10_000)
            info = tarfile.TarInfo(f"dir/f{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` is ``env`` within (what the server started inside inherits)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start(sn: Snapshotter, crash_at: str | None = None) -> None:
    extra = {"LAMINA_SNAPSHOTTER_CMD": WRAPPER}
    if crash_at:
        extra["LAMINA_CRASH_AT"] = crash_at
    with environment(child_env(**extra)):
        sn.start()


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_killed_in_apply(variant: str, point: str, tmp_path: Path) -> None:
    backend, options = VARIANTS[variant]
    tar = layer()
    blob = gzip.compress(tar)
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    home = tmp_path / "home"
    with serving(tmp_path / "content.sock") as store:
        digest = store.put(blob)
        sn = Snapshotter(home, tmp_path / "snapshotter.log", backend=backend, options=options,
                         args=["--containerd-address", str(tmp_path / "content.sock")])
        try:
            start(sn, point)
            req: Any = None
            with grpc.insecure_channel(f"unix:{sn.socket}") as ch:
                snaps: Any = snapshots_pb2_grpc.SnapshotsStub(ch)  # type: ignore[no-untyped-call]
                differ: Any = diff_pb2_grpc.DiffStub(ch)  # type: ignore[no-untyped-call]
                mounts = snaps.Prepare(pb.PrepareSnapshotRequest(key="k"), timeout=30).mounts
                req = diff_pb2.ApplyRequest(diff=dpb.Descriptor(
                    media_type=spec.OCI_LAYER_GZIP, digest=digest, size=len(blob)),
                    mounts=mounts)
                with pytest.raises(grpc.RpcError) as err:
                    differ.Apply(req, timeout=60)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the server died
            assert sn.proc is not None
            assert sn.proc.wait(30) != 0
            sn.proc = None
            start(sn)
            assert not list((home / "staging").iterdir()), "staging not swept"
            points = [line.split()[1] for line in
                      Path("/proc/self/mounts").read_text().splitlines()]
            assert not [p for p in points if p.startswith(f"{home}/staging")], \
                "a mount left in staging"
            with grpc.insecure_channel(f"unix:{sn.socket}") as ch:
                snaps = snapshots_pb2_grpc.SnapshotsStub(ch)  # type: ignore[no-untyped-call]
                differ = diff_pb2_grpc.DiffStub(ch)  # type: ignore[no-untyped-call]
                info = snaps.Stat(pb.StatSnapshotRequest(key="k"), timeout=30).info
                assert info.kind == pb.ACTIVE
                (row,) = sn.layers()
                if point == "swap:before-exchange":
                    assert row["diff_id"] is None
                    assert os.listdir(mounts[0].source) == []
                    got = differ.Apply(req, timeout=60).applied
                    assert got.digest == diff_id
                else:  # past the commit point: filled
                    assert row["diff_id"] == diff_id
                    assert sorted(os.listdir(mounts[0].source)) == ["dir"]
                snaps.Commit(pb.CommitSnapshotRequest(name=diff_id, key="k"), timeout=30)
            (row,) = sn.layers()
            assert (row["diff_id"], row["sealed"]) == (diff_id, False)
            erofs = backend == "overlay" and not options  # overlay's default
            assert row["format"] == ("erofs" if erofs else "dir")
            sn.lamina("check")
        finally:
            sn.close()
            unmount_below(tmp_path)
