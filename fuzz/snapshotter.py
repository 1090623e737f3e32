"""An atheris (libFuzzer) target for the containerd snapshotter's request handling (needs root).

Each input is a short sequence of calls (``Prepare``, ``View``, ``Mounts``, ``Commit``,
``Remove``, ``Stat``, ``Update``, ``List``, ``Usage``, ``Cleanup``) on the gRPC servicer
(:class:`~lamina.frontends.containerd.server.Servicer`) in-process, over a real store (vfs,
on a tmpfs), with requests either built from the input (keys, parents, labels, filters,
field paths from a small pool or arbitrary strings, so that calls meet each other's
snapshots) or decoded from raw input bytes as the protobuf message.  The store carries
over from input to input; every hundred inputs it is emptied through ``Remove``, and
the server is "restarted" (a new :class:`Snapshotter` on the same home), which must find
the same snapshots.

Allowed: a call that succeeds, or is refused with one of the status codes containerd's
errdefs maps (NotFound, AlreadyExists, InvalidArgument, FailedPrecondition,
Unimplemented).  A finding: any other exception or status (``UNKNOWN`` is an
``OSError`` that escaped), a snapshot whose parent is not a committed snapshot, one whose
layer is gone, a ``Stat`` or ``Mounts`` of a listed snapshot that fails, or a restart that
sees other snapshots.

    .venv/bin/python fuzz/snapshotter.py -seeds fuzz/corpus-snapshotter
    .venv/bin/python fuzz/snapshotter.py fuzz/corpus-snapshotter -max_total_time=600 \\
        -max_len=4096 -rss_limit_mb=2048 -timeout=20 -print_final_stats=1
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Any

import atheris  # type: ignore[import-untyped]
import grpc

with atheris.instrument_imports(include=["lamina"]):
    import lamina
    from lamina.backends.base import StoreDriver
    from lamina.frontends.containerd import server
    from lamina.frontends.containerd.api import snapshots_pb2 as pb
    from lamina.frontends.containerd.records import COMMITTED
    from lamina.frontends.containerd.snapshotter import REF_LABEL, Snapshotter

# libFuzzer ends the process with exit(): each run sweeps the homes of runs that are gone.
_WORK_IN = os.environ.get("LAMINA_FUZZ_WORK") or (
    "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
_work = os.path.join(_WORK_IN, f"lamina-fuzz-sn-{os.getpid()}")

ALLOWED = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
           grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.UNIMPLEMENTED}
KEYS = ["a", "b", "c", "base", "ns/1/extract-1 sha256:" + "a" * 64, "ns/1/sha256:" + "a" * 64,
        "sha256:" + "a" * 64, "x/y/z", " ", "é", "../up", "a\0b"]
FILTERS = ["name==a", "kind==active", "kind!=committed", "parent==base", "labels.l~=^v",
           'labels."k"==v', "name~=[", "name==a,kind==view", "labels.l", "", "!!", "name~=(a|b)"]
RESET_EVERY = 100


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class Context:
    """The part of ``grpc.ServicerContext`` the servicer uses."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        return True


CONTEXT = Context()


class State:
    def __init__(self) -> None:
        self.drv: StoreDriver | None = None
        self.sn: Snapshotter | None = None
        self.servicer: server.Servicer | None = None
        self.count = 0

    def open(self) -> None:
        drv = lamina.open_driver(os.path.join(_work, "home"), backend="vfs")
        assert isinstance(drv, StoreDriver)
        self.drv = drv
        self.sn = Snapshotter(drv)
        self.servicer = server.Servicer(self.sn)

    def restart(self) -> None:
        """A new snapshotter on the same home: it must see the same snapshots."""
        assert self.sn is not None
        before = picture(self.sn)
        self.sn.close()
        self.sn = Snapshotter(self.drv)  # type: ignore[arg-type]
        self.servicer = server.Servicer(self.sn)
        after = picture(self.sn)
        assert after == before, (before, after)


STATE = State()


def picture(sn: Snapshotter) -> list[tuple[str, str, str, tuple[tuple[str, str], ...]]]:
    return sorted((r.name, r.parent, r.kind, tuple(sorted(r.labels.items())))
                  for r in sn.list([]))


def _text(fdp: Any) -> str:
    if fdp.ConsumeIntInRange(0, 3):
        return str(fdp.PickValueInList(KEYS))
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300)))


def _labels(fdp: Any) -> dict[str, str]:
    out = {}
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:
            out[REF_LABEL] = "sha256:" + "a" * 64
        elif kind == 1:
            out["l"] = "v" * fdp.ConsumeIntInRange(0, 5000)
        else:
            out[_text(fdp)] = _text(fdp)
    return out


def _request(fdp: Any, method: str) -> Any:
    """A request for ``method``: built from the input, or its raw bytes decoded."""
    types: dict[str, Any] = {"Prepare": pb.PrepareSnapshotRequest, "View": pb.ViewSnapshotRequest,
             "Mounts": pb.MountsRequest, "Commit": pb.CommitSnapshotRequest,
             "Remove": pb.RemoveSnapshotRequest, "Stat": pb.StatSnapshotRequest,
             "Update": pb.UpdateSnapshotRequest, "List": pb.ListSnapshotsRequest,
             "Usage": pb.UsageRequest, "Cleanup": pb.CleanupRequest}
    if fdp.ConsumeIntInRange(0, 7) == 0:
        try:
            return types[method].FromString(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200)))
        except Exception:  # not a message of that type: what grpc itself refuses
            return None
    if method in ("Prepare", "View"):
        return types[method](key=_text(fdp), parent=_text(fdp), labels=_labels(fdp))
    if method == "Commit":
        return pb.CommitSnapshotRequest(name=_text(fdp), key=_text(fdp), labels=_labels(fdp))
    if method == "Update":
        paths = [fdp.PickValueInList(["labels", "labels.l", "labels." + REF_LABEL, "parent",
                                      "name", "labels."]) for _ in
                 range(fdp.ConsumeIntInRange(0, 2))]
        req = pb.UpdateSnapshotRequest(info=pb.Info(name=_text(fdp), labels=_labels(fdp)))
        if fdp.ConsumeBool():
            req.update_mask.paths.extend(paths)
        return req
    if method == "List":
        fs = [fdp.PickValueInList(FILTERS) if fdp.ConsumeBool() else _text(fdp)
              for _ in range(fdp.ConsumeIntInRange(0, 2))]
        return pb.ListSnapshotsRequest(filters=fs)
    if method == "Cleanup":
        return pb.CleanupRequest()
    return types[method](key=_text(fdp))


METHODS = ["Prepare", "Prepare", "View", "Mounts", "Commit", "Commit", "Remove", "Stat",
           "Update", "List", "Usage", "Cleanup"]


def _call(method: str, req: Any) -> None:
    servicer = STATE.servicer
    try:
        answer = getattr(servicer, method)(req, CONTEXT)
        if method == "List":
            for _ in answer:
                pass
    except Aborted as e:
        if e.code not in ALLOWED:
            raise


def _check() -> None:
    sn = STATE.sn
    assert sn is not None
    recs = {r.name: r for r in sn.list([])}
    for rec in recs.values():
        if rec.parent:
            parent = recs.get(rec.parent)
            assert parent is not None and parent.kind == COMMITTED, (rec, parent)
        if rec.layer is not None:
            assert sn.drv.exists(rec.layer), rec
        assert sn.stat(rec.name) == rec
        sn.mounts(rec.name)


def _empty() -> None:
    """Remove every snapshot (children first) through the servicer."""
    sn = STATE.sn
    assert sn is not None
    for _ in range(1000):
        recs = sn.list([])
        if not recs:
            break
        parents = {r.parent for r in recs}
        for rec in recs:
            if rec.name not in parents:
                _call("Remove", pb.RemoveSnapshotRequest(key=rec.name))
    assert not sn.list([]), "snapshots that cannot be removed"


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        method = fdp.PickValueInList(METHODS)
        req = _request(fdp, method)
        if req is not None:
            _call(method, req)
    _check()
    STATE.count += 1
    if STATE.count % RESET_EVERY == 0:
        STATE.restart()
        _empty()
        _check()


def _sweep() -> None:
    for name in os.listdir(_WORK_IN):
        pid = name.removeprefix("lamina-fuzz-sn-")
        if name.startswith("lamina-fuzz-sn-") and pid.isdigit() and not os.path.exists(
                f"/proc/{pid}"):
            shutil.rmtree(os.path.join(_WORK_IN, name), ignore_errors=True)


def write_seeds(where: str) -> None:
    """A few byte strings: the provider reads them as call sequences."""
    os.makedirs(where, exist_ok=True)
    seeds = [bytes(range(256)), b"\x00" * 64, b"\x01\x02\x03" * 40, b"\xff" * 100,
             bytes((i * 37) % 256 for i in range(512)), bytes((i * 11) % 7 for i in range(300))]
    for i, data in enumerate(seeds):
        with open(os.path.join(where, f"seed{i}"), "wb") as f:
            f.write(data)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "-seeds":
        write_seeds(sys.argv[2])
        return
    logging.disable(logging.CRITICAL)
    _sweep()
    shutil.rmtree(_work, ignore_errors=True)
    os.makedirs(_work)
    STATE.open()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
