"""Issue 23, D6: labels cannot make ``List`` fail for everyone.

containerd bounds a label (key plus value) to 4096 bytes and nothing else; lamina also
bounds the labels of one snapshot (``labels.MAX_TOTAL``), on every call that sets them,
and cuts ``List`` responses by bytes as well as by count, so that snapshots an older
home still holds with a megabyte of labels each are listed all the same.

A real server on a unix socket (``server.start``) and the generated client.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

import lamina
from lamina.backends.base import StoreDriver
from lamina.frontends.containerd import labels, server
from lamina.frontends.containerd.api import snapshots_pb2 as pb
from lamina.frontends.containerd.api import snapshots_pb2_grpc
from lamina.frontends.containerd.snapshotter import Snapshotter
from tests.snapshotter.served import Served

pytestmark = pytest.mark.root


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "home", tmp_path / "s.sock")
    try:
        yield s
    finally:
        s.stop()


def many(total: int, size: int = 1000) -> dict[str, str]:
    """Labels of ``size`` bytes each (key plus value), ``total`` bytes or a bit more."""
    out = {}
    for i in range(-(-total // size)):
        key = f"l{i:06d}"
        out[key] = "v" * (size - len(key))
    return out


def invalid(call: Any, request: Any) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    return str(e.value.details())


def test_labels_of_one_snapshot_are_bounded_on_every_call(served: Served) -> None:
    stub = served.stub
    fits = many(labels.MAX_TOTAL)
    while sum(len(k) + len(v) for k, v in fits.items()) > labels.MAX_TOTAL:
        fits.popitem()
    over = many(labels.MAX_TOTAL + 1000)
    huge = many(1 << 20, 100)  # the issue's: 10,000 labels, 1 MB
    for too_many in (over, huge):
        msg = invalid(stub.Prepare, pb.PrepareSnapshotRequest(key="a", labels=too_many))
        assert str(labels.MAX_TOTAL) in msg
        invalid(stub.View, pb.ViewSnapshotRequest(key="v", labels=too_many))
    # one label over containerd's 4096 bytes
    invalid(stub.Prepare, pb.PrepareSnapshotRequest(key="a", labels={"k": "v" * 4096}))
    stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels=fits))
    stub.View(pb.ViewSnapshotRequest(key="v", labels=fits))
    invalid(stub.Commit, pb.CommitSnapshotRequest(name="c", key="a", labels=over))
    stub.Commit(pb.CommitSnapshotRequest(name="c", key="a", labels=fits))
    # Update: all labels at once, or one more on top of a full set
    info = pb.Info(name="c", labels=over)
    invalid(stub.Update, pb.UpdateSnapshotRequest(info=info))
    more = pb.Info(name="c", labels={"extra": "x" * 2000})
    mask = field_mask_pb2.FieldMask(paths=["labels.extra"])
    invalid(stub.Update, pb.UpdateSnapshotRequest(info=more, update_mask=mask))
    names = {i.name: dict(i.labels) for r in stub.List(pb.ListSnapshotsRequest())
             for i in r.info}
    assert names == {"c": fits, "v": fits}


def test_list_batches_by_bytes_what_an_older_home_holds(served: Served) -> None:
    """The issue's case: 31 snapshots of 1 MB of labels each (as an older lamina took
    them; written to the records here, past today's bound) made every List exceed
    gRPC's 16 MiB.  They are listed whole, in responses of at most 4 MiB."""
    stub = served.stub
    big = many(1 << 20, 100)
    for i in range(31):
        stub.Prepare(pb.PrepareSnapshotRequest(key=f"k{i:02d}"))
        rec = served.sn.records.get(f"k{i:02d}")
        assert rec is not None
        served.sn.records.put(replace(rec, labels=dict(big, n=str(i))))
    for i in range(150):  # and small ones, more than one count-bounded batch of them
        stub.Prepare(pb.PrepareSnapshotRequest(key=f"s{i:03d}", labels={"n": str(i)}))
    sizes, seen = [], {}
    for resp in stub.List(pb.ListSnapshotsRequest()):
        sizes.append((len(resp.info), resp.ByteSize()))
        for info in resp.info:
            seen[info.name] = dict(info.labels)
    assert len(seen) == 181
    assert all(seen[f"k{i:02d}"] == dict(big, n=str(i)) for i in range(31))
    assert all(seen[f"s{i:03d}"] == {"n": str(i)} for i in range(150))
    assert all(n <= server.LIST_BATCH and size <= server.LIST_BATCH_BYTES
               for n, size in sizes), sizes
    print(f"\nList of 31 snapshots of 1 MB of labels and 150 small: {len(sizes)} responses, "
          f"the largest {max(s for _, s in sizes)} bytes")
    # the snapshotter still serves its other calls
    assert stub.Stat(pb.StatSnapshotRequest(key="k30")).info.labels["n"] == "30"


def test_list_batches_fit_a_smaller_send_limit(tmp_path: Path) -> None:
    """Batches follow the server's send limit: labels within today's bound, 100 to a
    batch, would be 6 MB, past a 1 MiB limit."""
    drv = lamina.open_driver(tmp_path / "home", backend="vfs")
    assert isinstance(drv, StoreDriver)
    sn = Snapshotter(drv)
    srv = server.start(sn, tmp_path / "s.sock", max_send=1 << 20)
    channel = grpc.insecure_channel(f"unix:{tmp_path / 's.sock'}")
    stub: Any = snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
    try:
        full = many(60_000)
        for i in range(120):
            stub.Prepare(pb.PrepareSnapshotRequest(key=f"k{i:03d}", labels=full))
        got = [(len(r.info), r.ByteSize()) for r in stub.List(pb.ListSnapshotsRequest())]
        assert sum(n for n, _ in got) == 120
        assert max(size for _, size in got) <= 1 << 19, got
    finally:
        channel.close()
        srv.stop(5).wait()
        sn.close()
        drv.close()
