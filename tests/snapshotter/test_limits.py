"""The gRPC snapshotter's limits (issue 15): an oversized message, more calls than it takes at
once, and a deadline that passed in the queue each get a clear status code at once, and
the server goes on serving with every snapshot it had.

A real server on a unix socket (``server.start``), with small limits so that a test can
reach them; the calls that fill it are held inside the servicer by an event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import lamina
from lamina.backends.base import StoreDriver
from lamina.frontends.containerd import server
from lamina.frontends.containerd.api import snapshots_pb2 as pb
from lamina.frontends.containerd.api import snapshots_pb2_grpc
from lamina.frontends.containerd.snapshotter import Snapshotter

pytestmark = pytest.mark.root

WORKERS = 2
MAX_CONCURRENT = 4
MAX_RECEIVE = 64 << 10


class HeldSnapshotter(Snapshotter):
    """A snapshotter whose ``stat`` of a key starting with ``held`` waits for ``release``."""

    def __init__(self, driver: StoreDriver) -> None:
        super().__init__(driver)
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def stat(self, key: str) -> Any:
        if key.startswith("held"):
            self.entered.release()
            assert self.release.wait(60)
        return super().stat(key)


class Limited:
    def __init__(self, home: Path, sock: Path) -> None:
        self.home, self.sock = home, sock
        self.start()

    def start(self) -> None:
        drv = lamina.open_driver(self.home, backend="vfs")
        assert isinstance(drv, StoreDriver)
        self.drv = drv
        self.sn = HeldSnapshotter(drv)
        self.server = server.start(self.sn, self.sock, workers=WORKERS,
                                   max_concurrent=MAX_CONCURRENT, max_receive=MAX_RECEIVE)
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        self.stub: Any = snapshots_pb2_grpc.SnapshotsStub(self.channel)  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        self.sn.release.set()
        self.channel.close()
        self.server.stop(5).wait()
        self.sn.close()
        self.drv.close()

    def names(self) -> list[str]:
        out: list[str] = []
        for resp in drained(lambda: list(self.stub.List(pb.ListSnapshotsRequest()))):
            out += [i.name for i in resp.info]
        return sorted(out)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Limited]:
    served = Limited(tmp_path / "home", tmp_path / "sn.sock")
    try:
        served.stub.Prepare(pb.PrepareSnapshotRequest(key="base-a"))
        served.stub.Commit(pb.CommitSnapshotRequest(name="base", key="base-a"))
        for key in ("held1", "held2", "held3", "held4", "held5", "free"):
            served.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent="base"))
        yield served
    finally:
        served.stop()


STATE = ["base", "free", "held1", "held2", "held3", "held4", "held5"]


def code(e: grpc.RpcError) -> grpc.StatusCode:
    return e.code()


def drained(call: Any, within: float = 10.0) -> Any:
    """``call()`` once the server has counted its finished calls out: grpcio counts a
    call as active until its poller has seen the call complete, which may come after the
    client has its answer, so right after the held calls return the server can still be
    at its limit for a moment.  A place that never comes back fails."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if code(e) != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_an_oversized_request_is_resource_exhausted(limited: Limited) -> None:
    labels = {f"l{i}": "v" * 4000 for i in range(MAX_RECEIVE // 4000 + 2)}
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        limited.stub.Prepare(pb.PrepareSnapshotRequest(key="huge", parent="base",
                                                       labels=labels))
    took = time.monotonic() - t0
    assert code(e.value) == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    print(f"\noversized Prepare ({len(labels) * 4003} bytes of labels, limit {MAX_RECEIVE}): "
          f"{code(e.value).name} in {took * 1000:.0f} ms: {e.value.details()}")
    # nothing of it was made, everything else is there, and it serves on
    assert limited.names() == STATE
    limited.stub.Prepare(pb.PrepareSnapshotRequest(key="after", parent="base"))
    assert "after" in limited.names()


def test_an_oversized_response_is_resource_exhausted(tmp_path: Path) -> None:
    """A response past the send limit is refused, and only that one: List cuts its
    batches to the limit (issue 23, D6), so only a snapshot larger alone than the limit
    (a test's 32 KiB here) cannot be sent."""
    drv = lamina.open_driver(tmp_path / "home", backend="vfs")
    assert isinstance(drv, StoreDriver)
    sn = Snapshotter(drv)
    srv = server.start(sn, tmp_path / "s.sock", max_send=32 << 10)
    channel = grpc.insecure_channel(f"unix:{tmp_path / 's.sock'}")
    stub: Any = snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
    try:
        for i in range(20):
            stub.Prepare(pb.PrepareSnapshotRequest(key=f"k{i}", labels={"big": "v" * 4000}))
        listed = [i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
        assert sorted(listed) == sorted(f"k{i}" for i in range(20))
        stub.Prepare(pb.PrepareSnapshotRequest(
            key="huge", labels={f"l{i}": "v" * 4000 for i in range(10)}))
        for call in (lambda: stub.Stat(pb.StatSnapshotRequest(key="huge")),
                     lambda: list(stub.List(pb.ListSnapshotsRequest()))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert code(e.value) == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
        info = stub.Stat(pb.StatSnapshotRequest(key="k3")).info
        assert info.labels["big"] == "v" * 4000
    finally:
        channel.close()
        srv.stop(5).wait()
        sn.close()
        drv.close()


def test_excess_concurrency_is_resource_exhausted(limited: Limited) -> None:
    stub = limited.stub
    pool = futures.ThreadPoolExecutor(MAX_CONCURRENT)
    try:
        held = [pool.submit(stub.Stat, pb.StatSnapshotRequest(key=f"held{i + 1}"), timeout=60)
                for i in range(MAX_CONCURRENT)]
        for _ in range(WORKERS):  # the workers are busy, the others wait for one
            assert limited.sn.entered.acquire(timeout=20)
        deadline = time.monotonic() + 20
        refused: grpc.RpcError | None = None
        while refused is None and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                stub.Stat(pb.StatSnapshotRequest(key="free"), timeout=0.5)
            except grpc.RpcError as e:
                # Queued behind the held calls (not all of them had reached the server):
                # it waits until its deadline, and fills a place meanwhile.
                if code(e) != grpc.StatusCode.DEADLINE_EXCEEDED:
                    refused = e
                    took = time.monotonic() - t0
            else:
                raise AssertionError("a call was served while every worker was held")
        assert refused is not None, "a call beyond the limit was served"
        assert code(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert took < 1.0, took
        print(f"\ncall {MAX_CONCURRENT + 1} (limit {MAX_CONCURRENT}, {WORKERS} workers): "
              f"{code(refused).name} in {took * 1000:.0f} ms: "
              f"{refused.details()}")
        limited.sn.release.set()
        names = sorted(f.result(timeout=30).info.name for f in held)
        assert names == [f"held{i + 1}" for i in range(MAX_CONCURRENT)]
    finally:
        limited.sn.release.set()
        pool.shutdown()
    assert drained(lambda: stub.Stat(pb.StatSnapshotRequest(key="free"))).info.name == "free"
    assert limited.names() == STATE
    # and nothing was lost: a new server on the same store has it all
    limited.stop()
    limited.start()
    assert limited.names() == STATE


def test_a_call_whose_deadline_passed_in_the_queue_is_not_run(limited: Limited) -> None:
    stub = limited.stub
    pool = futures.ThreadPoolExecutor(WORKERS + 1)
    try:
        held = [pool.submit(stub.Stat, pb.StatSnapshotRequest(key=f"held{i + 1}"), timeout=60)
                for i in range(WORKERS)]
        for _ in range(WORKERS):
            assert limited.sn.entered.acquire(timeout=20)
        with pytest.raises(grpc.RpcError) as e:
            stub.Prepare(pb.PrepareSnapshotRequest(key="late", parent="base"), timeout=0.5)
        assert code(e.value) == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.2)
        limited.sn.release.set()
        for f in held:
            f.result(timeout=30)
    finally:
        limited.sn.release.set()
        pool.shutdown()
    time.sleep(0.5)  # the queued Prepare reaches a worker, which refuses it
    assert "late" not in limited.names()
    assert limited.names() == STATE


@pytest.mark.slow
def test_atheris_snapshotter_runs_clean(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``fuzz/snapshotter.py`` (the servicer on a real store) for a bounded number of
    call sequences: no finding."""
    from tests.integration.test_plugin_hardening import run_atheris

    execs = run_atheris("snapshotter", 2_000, tmp_path, max_len=4096)
    with capsys.disabled():
        print(f"\natheris snapshotter: {execs} inputs, no finding")
