"""containerd on ``lamina snapshotter`` beside containerd on its built-in overlayfs (issue 14).

    sudo .venv/bin/python bench/bench_snapshotter.py [--runs N] [--work DIR] [--profile]
    sudo .venv/bin/python bench/bench_snapshotter.py --containerd lab [...]   # issue 25

Side by side in one run, each figure printed with its ratio (lamina/reference):

1. **Image**: for each run, alternating (lamina first on even runs, overlayfs first on odd
   ones), a fresh private ``containerd`` (Debian's 1.6, config, root, state and socket of
   its own, :class:`tests.containerd.daemon.Containerd`) on a fresh root, with a fresh
   ``lamina --backend overlay snapshotter`` as its proxy plugin ``lamina`` or with none
   (its overlayfs).  After a ``sync``, timed from the outside: ``ctr image import
   --snapshotter S`` of the corpus's ``app-docker-save.tar`` (3 layers, 355 MB), then
   ``ctr run --rm --snapshotter S IMAGE ID true`` (the first, then the median of
   :data:`RUNS_OF_TRUE` more).  Medians over the runs.  Nothing is deleted before the
   end: on this disk file creation slows down after large deletions.
2. **Latency** p50/p99 of 1,000 calls each of ``Stat``, ``Prepare`` + ``Mounts`` and
   ``Commit``, with the generated stubs (``lamina/frontends/containerd/api``): directly
   on lamina's socket, and, as the reference, on containerd's own Snapshots service
   (``containerd-namespace: bench`` metadata, ``snapshotter="overlayfs"``).  Also shown:
   lamina through the same containerd service (``snapshotter="lamina"``), what a
   containerd client sees.  The targets take turns in blocks of :data:`BLOCK` calls.
3. **List** of 2,000 snapshots (the 1,001 committed ones above and 999 more active
   ones), streamed to the end; median of :data:`LIST_REPEATS`, the targets in turn.

Then a table: figure, lamina, reference, ratio, goal, met.  When a goal is missed (or with
``--profile``) a profiling pass follows: the server has no profiling switch, so the
:class:`~lamina.frontends.containerd.server.Servicer` runs in this process on a gRPC
server whose worker pool runs each call under ``cProfile`` (the Python side of a call:
decoding, lamina, encoding, sending), the same calls are made over its socket, and each
call's top functions are printed; beside it, the servicer called directly (no gRPC).

With ``--containerd lab`` (issue 25) the containerd is the engines' lab's 2.x
(:class:`tests.engines.daemons.LabContainerd`: lamina's printed config, its differ
``lamina-diff`` first in the diff order; the same config for both snapshotters, lamina
running but unused in overlayfs's passes), ``ctr`` the lab's too, and the goals are
issue 25's: ``Stat`` p50 <= 0.3 ms at lamina's gRPC boundary, ``Prepare``+``Mounts`` p50
<= 1.2x overlayfs (lamina through containerd against overlayfs through containerd, both
one containerd hop away), and the walk of 2,000 snapshots through containerd (its
``Walk`` calls the proxy's ``Stat`` once per snapshot) <= 0.5 s.

Needs root, Debian's containerd and runc (or the lab), and the corpus ($LAMINA_CORPUS, default
/var/tmp/lamina-corpus).  Everything it made is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' containerd harness

import grpc

from lamina.frontends.containerd.api import (
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from tests import lab
from tests.conftest import unmount_layer_images
from tests.containerd.daemon import (
    Containerd,
    Snapshotter,
    containerd_missing,
    short_dir,
)
from tests.engines.daemons import LabContainerd, host_snapshotter, shared_dir
from tests.integration.engine import unmount_below

IMAGE = "docker.io/corpus/app:1"  # the save's RepoTags "corpus/app:1", as ctr names it
NS = "bench"
BACKEND = "overlay"
RUNS_OF_TRUE = 5
CALLS = 1000
BLOCK = 100
LIST_TOTAL = 2000
LIST_REPEATS = 7
WARMUP = 20
MS = 1e3
GOAL_RATIO = 1.1
GOAL_STAT_P50_MS = 1.0
GOAL_LIST_S = 0.3
LAB_GOAL_STAT_P50_MS = 0.3
LAB_GOAL_PREPARE_RATIO = 1.2
LAB_GOAL_WALK_S = 0.5
LAB = False
"""With ``--containerd lab``: containerd 2.x of the engines' lab, issue 25's goals."""
BASE_KEY, BASE = "bench-base-key", "bench-base"
GC_ROOT = {"containerd.io/gc.root": "bench"}
"""Every snapshot's label, so that containerd's garbage collector keeps it (no lease)."""


def log(msg: str) -> None:
    print(msg, flush=True)


def sync() -> None:
    subprocess.run(["sync"], check=True)


def timed(action: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def pct(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- 1. ctr image import + ctr run ---------------------------------------------------------

IMAGE_STEPS = ("import", "run (first)", f"run (median of {RUNS_OF_TRUE})", "import + first run")


def new_containerd(work: Path, sn: Snapshotter | None) -> Containerd | LabContainerd:
    """A containerd under ``work`` (Debian's, or the lab's with :data:`LAB`) with ``sn``
    as its proxy plugin ``lamina`` (the lab's needs one: its config is lamina's)."""
    if LAB:
        assert sn is not None
        return LabContainerd(work, sn)
    return Containerd(work / "containerd", {"lamina": sn.socket} if sn else {}, debug=False)


def new_snapshotter(work: Path, name: str) -> Snapshotter:
    """A ``lamina snapshotter`` on a fresh home in ``work`` (for the lab's containerd,
    with its differ reading that containerd's content store)."""
    if LAB:
        return host_snapshotter(work, BACKEND)
    return Snapshotter(work / f"home-{name}", work / f"snapshotter-{name}.log",
                       backend=BACKEND)


def image_pass(work: Path, which: str, tar: Path) -> dict[str, float]:
    """One fresh containerd (on lamina or overlayfs): import, then run; seconds per step."""
    sn: Snapshotter | None = None
    if which == "lamina" or LAB:
        work.mkdir(parents=True)
        sn = new_snapshotter(work, "image")
        sn.start()
    ctd = new_containerd(work, sn)
    snapshotter = "lamina" if which == "lamina" else "overlayfs"
    extra: dict[str, Any] = {"binds": (tar.parent,)} if LAB else {}
    try:
        ctd.start()
        sync()
        t_import = timed(lambda: ctd.ctr("-n", NS, "image", "import", "--snapshotter",
                                         snapshotter, str(tar), **extra))
        runs = []
        for i in range(1 + RUNS_OF_TRUE):
            sync()
            runs.append(timed(lambda i=i: ctd.ctr(  # type: ignore[misc]
                "-n", NS, "run", "--rm", "--snapshotter", snapshotter, IMAGE, f"bench-{i}",
                "true")))
        return {IMAGE_STEPS[0]: t_import, IMAGE_STEPS[1]: runs[0],
                IMAGE_STEPS[2]: statistics.median(runs[1:]),
                IMAGE_STEPS[3]: t_import + runs[0]}
    finally:
        ctd.close()
        if sn is not None:
            sn.close()


def image_bench(work: Path, tar: Path, runs: int) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {
        w: {s: [] for s in IMAGE_STEPS} for w in ("lamina", "overlayfs")}
    for i in range(runs):
        order = ("lamina", "overlayfs") if i % 2 == 0 else ("overlayfs", "lamina")
        for which in order:
            got = image_pass(work / f"image-{i}-{which}", which, tar)
            for step, secs in got.items():
                times[which][step].append(secs)
            log(f"  run {i + 1}/{runs} {which:9}: "
                + ", ".join(f"{s} {v:.2f} s" for s, v in got.items()))
    return times


# -- 2./3. the Snapshots service, call by call -----------------------------------------------

@dataclass
class Target:
    """One Snapshots service to call: lamina's socket, or containerd's with a snapshotter."""

    name: str
    stub: snapshots_pb2_grpc.SnapshotsStub
    snapshotter: str = ""
    metadata: tuple[tuple[str, str], ...] = ()
    lat: dict[str, list[float]] = field(default_factory=dict)

    def record(self, what: str, secs: float) -> None:
        self.lat.setdefault(what, []).append(secs)

    def stat(self, key: str) -> None:
        self.stub.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=key),
                       metadata=self.metadata)

    def prepare(self, key: str, parent: str) -> None:
        self.stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=GC_ROOT),
            metadata=self.metadata)

    def mounts(self, key: str) -> None:
        self.stub.Mounts(snapshots_pb2.MountsRequest(snapshotter=self.snapshotter, key=key),
                         metadata=self.metadata)

    def commit(self, name: str, key: str) -> None:
        self.stub.Commit(snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=GC_ROOT),
            metadata=self.metadata)

    def list(self) -> int:
        n = 0
        for resp in self.stub.List(snapshots_pb2.ListSnapshotsRequest(
                snapshotter=self.snapshotter), metadata=self.metadata):
            n += len(resp.info)
        return n


def stub_on(path: Path) -> tuple[grpc.Channel, snapshots_pb2_grpc.SnapshotsStub]:
    channel = grpc.insecure_channel(f"unix:{path}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel, snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]


def in_turn(targets: Sequence[Target], step: Callable[[Target, int], None],
            calls: int = CALLS) -> None:
    """``step(target, i)`` for i < ``calls`` on every target, in blocks of :data:`BLOCK`."""
    for start in range(0, calls, BLOCK):
        for t in targets:
            for i in range(start, min(calls, start + BLOCK)):
                try:
                    step(t, i)
                except grpc.RpcError as e:
                    raise RuntimeError(f"{t.name}: call {i}: {e}") from e


def call_bench(targets: Sequence[Target]) -> None:
    """Latencies of Stat, Prepare+Mounts, Commit; then List of :data:`LIST_TOTAL`."""
    for t in targets:
        t.prepare(BASE_KEY, "")
        t.commit(BASE, BASE_KEY)
        for _ in range(WARMUP):
            t.stat(BASE)

    def stat(t: Target, i: int) -> None:
        t.record("Stat", timed(lambda: t.stat(BASE)))

    def prepare_mounts(t: Target, i: int) -> None:
        t0 = time.perf_counter()
        t.prepare(f"bench-active-{i}", BASE)
        t1 = time.perf_counter()
        t.mounts(f"bench-active-{i}")
        t2 = time.perf_counter()
        t.record("Prepare", t1 - t0)
        t.record("Mounts", t2 - t1)
        t.record("Prepare+Mounts", t2 - t0)

    def commit(t: Target, i: int) -> None:
        t.record("Commit", timed(lambda: t.commit(f"bench-committed-{i}",
                                                  f"bench-active-{i}")))

    def fill(t: Target, i: int) -> None:
        t.prepare(f"bench-more-{i}", BASE)

    for label, step in (("Stat", stat), ("Prepare+Mounts", prepare_mounts),
                        ("Commit", commit)):
        log(f"  {CALLS} x {label}...")
        in_turn(targets, step)
    more = LIST_TOTAL - 1 - CALLS
    log(f"  {more} more snapshots, then List x {LIST_REPEATS}...")
    in_turn(targets, fill, more)
    for _ in range(LIST_REPEATS):
        for t in targets:
            n = 0

            def listing(t: Target = t) -> None:
                nonlocal n
                n = t.list()

            t.record("List", timed(listing))
            if n != LIST_TOTAL:
                raise AssertionError(f"{t.name}: List gave {n} snapshots, not {LIST_TOTAL}")


def floor_server(socket_path: str) -> None:
    """Serve a Snapshots service whose ``Stat`` answers at once with a fixed snapshot,
    on a gRPC server made as lamina's is (:func:`lamina.frontends.containerd.server.new_server`:
    the same thread pool, limits and options), until killed: what any call to a Python
    grpcio server costs, lamina's work aside."""
    from lamina.frontends.containerd import server as lamina_server

    answer = snapshots_pb2.StatSnapshotResponse(info=snapshots_pb2.Info(
        name=BASE, kind=snapshots_pb2.COMMITTED, labels=GC_ROOT))
    answer.info.created_at.GetCurrentTime()
    answer.info.updated_at.GetCurrentTime()

    class Floor(snapshots_pb2_grpc.SnapshotsServicer):  # type: ignore[misc]
        def Stat(self, request: Any, context: Any) -> Any:
            return answer

    server = lamina_server.new_server()
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(  # type: ignore[no-untyped-call]
        Floor(), server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    server.wait_for_termination()


def floor_bench(lamina: Target) -> Target:
    """``Stat`` on :func:`floor_server` (a process of its own) and on lamina, in turn."""
    sock_dir = short_dir("lbf-")
    sock = sock_dir / "floor.sock"
    proc = subprocess.Popen([sys.executable, __file__, "--floor-server", str(sock)])
    channel: grpc.Channel | None = None
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        channel, stub = stub_on(sock)
        floor = Target("grpcio floor", stub)
        for _ in range(WARMUP):
            floor.stat(BASE)

        def stat(t: Target, i: int) -> None:
            t.record("Stat (floor run)", timed(lambda: t.stat(BASE)))

        in_turn([floor, lamina], stat)
        return floor
    finally:
        if channel is not None:
            channel.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


def service_bench(work: Path) -> dict[str, dict[str, list[float]]]:
    """Fresh lamina (direct), containerd's overlayfs and lamina through containerd."""
    work.mkdir(parents=True, exist_ok=True)
    direct = Snapshotter(work / "home-direct", work / "snapshotter-direct.log", backend=BACKEND)
    proxied = new_snapshotter(work, "proxied")
    ctd = new_containerd(work, proxied)
    channels: list[grpc.Channel] = []
    try:
        direct.start()
        proxied.start()
        ctd.start()
        ch1, lamina_stub = stub_on(direct.socket)
        ch2, ctd_stub = stub_on(ctd.address)
        channels += [ch1, ch2]
        ns = (("containerd-namespace", NS),)
        targets = [Target("lamina", lamina_stub),
                   Target("overlayfs", ctd_stub, "overlayfs", ns),
                   Target("lamina via containerd", ctd_stub, "lamina", ns)]
        sync()
        call_bench(targets)
        floor = floor_bench(targets[0])
        return {t.name: t.lat for t in [*targets, floor]}
    finally:
        for ch in channels:
            ch.close()
        ctd.close()
        direct.close()
        proxied.close()


# -- profiling: the servicer in this process -------------------------------------------------

class ProfilingPool(futures.ThreadPoolExecutor):
    """One worker that runs every submitted call under the current ``cProfile`` profile."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="profiled")
        self.profile: cProfile.Profile | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> futures.Future[Any]:
        def run() -> Any:
            prof = self.profile
            if prof is None:
                return fn(*args, **kwargs)
            prof.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.disable()

        return super().submit(run)


def top(prof: cProfile.Profile, limit: int = 14) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(limit)
    text = out.getvalue()
    start = text.find("   ncalls")
    text = text[start:] if start >= 0 else text
    syncs = io.StringIO()
    stats = pstats.Stats(prof, stream=syncs).strip_dirs()
    if any(f[2] in ("syncfs", "<built-in method posix.fsync>") for f in stats.stats):  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_callers(r"syncfs|posix.fsync")
        callers = syncs.getvalue()
        text += "\n" + callers[callers.find("Function"):].rstrip() + "\n"
    return text.rstrip()


@contextlib.contextmanager
def in_process_server(home: Path, socket_path: Path,
                      pool: ProfilingPool) -> Iterator[Any]:
    """lamina's Servicer on a fresh store, served from this process on ``pool``."""
    from lamina import open_driver
    from lamina.frontends.containerd.server import Servicer
    from lamina.frontends.containerd.snapshotter import Snapshotter as LaminaSnapshotter

    drv = open_driver(home, backend=BACKEND)
    sn = LaminaSnapshotter(drv)  # type: ignore[arg-type]
    servicer = Servicer(sn)
    server = grpc.server(pool)
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    try:
        yield servicer
    finally:
        server.stop(5).wait()
        sn.close()
        drv.close()


def profile_import(work: Path, tar: Path) -> None:
    """``ctr image import`` + ``ctr run`` on the servicer in this process, profiled.

    The pool has one worker, so containerd's concurrent calls queue: the profile is of
    lamina's work, not of the wall time.
    """
    pool = ProfilingPool()
    sock_dir = short_dir("lbi-")
    ctd = Containerd(work / "containerd-profile", {"lamina": sock_dir / "s.sock"}, debug=False)
    try:
        with in_process_server(work / "home-import", sock_dir / "s.sock", pool):
            ctd.start()
            sync()
            pool.profile = cProfile.Profile()
            secs = timed(lambda: ctd.ctr("-n", NS, "image", "import", "--snapshotter",
                                         "lamina", str(tar)))
            secs += timed(lambda: ctd.ctr("-n", NS, "run", "--rm", "--snapshotter", "lamina",
                                          IMAGE, "bench-profile", "true"))
            prof, pool.profile = pool.profile, None
            ctd.close()
            log(f"\n--- profile: ctr image import + ctr run --rm on the in-process servicer "
                f"({secs:.2f} s) ---")
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out).strip_dirs()
            stats.sort_stats("cumulative").print_stats(r"server.py|snapshotter.py|base.py", 25)
            text = out.getvalue()
            log(text[text.find("   ncalls"):].rstrip())
            log(top(prof))
    finally:
        ctd.close()
        pool.shutdown()
        shutil.rmtree(sock_dir, ignore_errors=True)


def profile_pass(work: Path) -> None:
    """Each call's profile in lamina's servicer (over gRPC), and its time without gRPC."""
    pool = ProfilingPool()
    sock_dir = short_dir("lbp-")
    try:
        with in_process_server(work / "home-profile", sock_dir / "s.sock", pool) as servicer:
            ch, stub = stub_on(sock_dir / "s.sock")
            t = Target("lamina in-process", stub)
            t.prepare(BASE_KEY, "")
            t.commit(BASE, BASE_KEY)
            phases: list[tuple[str, Callable[[int], None]]] = [
                ("Stat", lambda i: t.stat(BASE)),
                ("Prepare", lambda i: t.prepare(f"p-{i}", BASE)),
                ("Mounts", lambda i: t.mounts(f"p-{i}")),
                ("Commit", lambda i: t.commit(f"pc-{i}", f"p-{i}")),
            ]
            for name, call in phases:
                pool.profile = cProfile.Profile()
                secs = [timed(lambda i=i, c=call: c(i))  # type: ignore[misc]
                        for i in range(CALLS)]
                prof, pool.profile = pool.profile, None
                log(f"\n--- profile: {CALLS} x {name} over gRPC, in-process server "
                    f"(p50 {pct(secs, 50) * MS:.3f} ms) ---")
                log(top(prof))
            for i in range(LIST_TOTAL - 1 - CALLS):
                t.prepare(f"m-{i}", BASE)
            pool.profile = cProfile.Profile()
            secs = [timed(t.list) for _ in range(LIST_REPEATS)]
            prof, pool.profile = pool.profile, None
            log(f"\n--- profile: {LIST_REPEATS} x List of {LIST_TOTAL} over gRPC "
                f"(median {statistics.median(secs):.3f} s) ---")
            log(top(prof))
            ch.close()
            direct_calls(servicer)
    finally:
        pool.shutdown()
        shutil.rmtree(sock_dir, ignore_errors=True)


def direct_calls(servicer: Any) -> None:
    """The servicer's own time per call, without gRPC (no socket, no encoding)."""
    stat_req = snapshots_pb2.StatSnapshotRequest(key=BASE)
    stat = [timed(lambda: servicer.Stat(stat_req, None)) for _ in range(CALLS)]
    prep = []
    mnt = []
    com = []
    for i in range(CALLS):
        prep.append(timed(lambda i=i: servicer.Prepare(  # type: ignore[misc]
            snapshots_pb2.PrepareSnapshotRequest(key=f"d-{i}", parent=BASE), None)))
        mnt.append(timed(lambda i=i: servicer.Mounts(  # type: ignore[misc]
            snapshots_pb2.MountsRequest(key=f"d-{i}"), None)))
    for i in range(CALLS):
        com.append(timed(lambda i=i: servicer.Commit(  # type: ignore[misc]
            snapshots_pb2.CommitSnapshotRequest(name=f"dc-{i}", key=f"d-{i}"), None)))
    lst = [timed(lambda: list(servicer.List(snapshots_pb2.ListSnapshotsRequest(), None)))
           for _ in range(LIST_REPEATS)]
    log("\n--- the servicer called directly, no gRPC (p50 / p99) ---")
    for name, secs in (("Stat", stat), ("Prepare", prep), ("Mounts", mnt), ("Commit", com)):
        log(f"  {name:8} {pct(secs, 50) * MS:8.3f} ms / {pct(secs, 99) * MS:8.3f} ms")
    log(f"  List of {LIST_TOTAL + CALLS} (median of {LIST_REPEATS}): "
        f"{statistics.median(lst):.3f} s")


# -- the report --------------------------------------------------------------------------

@dataclass
class Row:
    figure: str
    lamina: float
    reference: float
    unit: str
    goal: str
    met: bool | None
    via: float | None = None


def fmt(v: float, unit: str) -> str:
    return f"{v:.3f} ms" if unit == "ms" else f"{v:.2f} s" if v >= 1 else f"{v:.3f} s"


def rows_of(image: dict[str, dict[str, list[float]]] | None,
            calls: dict[str, dict[str, list[float]]] | None) -> list[Row]:
    rows: list[Row] = []
    if image is not None:
        for step in IMAGE_STEPS:
            lam = statistics.median(image["lamina"][step])
            ref = statistics.median(image["overlayfs"][step])
            rows.append(Row(f"ctr {step}", lam, ref, "s", f"<= {GOAL_RATIO}x",
                            lam / ref <= GOAL_RATIO))
    if calls is not None:
        cl, cr, cv = calls["lamina"], calls["overlayfs"], calls["lamina via containerd"]
        for what in ("Stat", "Prepare+Mounts", "Prepare", "Mounts", "Commit"):
            for p in (50, 99):
                goal, met = "-", None
                if what == "Stat" and p == 50:
                    limit = LAB_GOAL_STAT_P50_MS if LAB else GOAL_STAT_P50_MS
                    goal = f"<= {limit:g} ms"
                    met = pct(cl[what], p) * MS <= limit
                if LAB and what == "Prepare+Mounts" and p == 50:
                    goal = f"<= {LAB_GOAL_PREPARE_RATIO:g}x"
                    met = pct(cl[what], p) <= LAB_GOAL_PREPARE_RATIO * pct(cr[what], p)
                rows.append(Row(f"{what} p{p}", pct(cl[what], p) * MS,
                                pct(cr[what], p) * MS, "ms", goal, met,
                                pct(cv[what], p) * MS))
        if "grpcio floor" in calls:  # Stat on an empty grpcio server, lamina's in turn
            floor, mine = calls["grpcio floor"]["Stat (floor run)"], cl["Stat (floor run)"]
            rows.append(Row("Stat p50, an empty grpcio server (the floor)", pct(floor, 50) * MS,
                            pct(cr["Stat"], 50) * MS, "ms", "-", None))
            rows.append(Row("Stat p50, lamina, in turn with the floor", pct(mine, 50) * MS,
                            pct(cr["Stat"], 50) * MS, "ms", "-", None))
        l_list = statistics.median(cl["List"])
        v_list = statistics.median(cv["List"])
        if LAB:  # the walk through containerd is the goal: one Stat per snapshot
            goal, met = f"<= {LAB_GOAL_WALK_S:g} s via containerd", v_list <= LAB_GOAL_WALK_S
        else:
            goal, met = f"<= {GOAL_LIST_S:g} s", l_list <= GOAL_LIST_S
        rows.append(Row(f"List of {LIST_TOTAL}", l_list, statistics.median(cr["List"]), "s",
                        goal, met, v_list))
    return rows


def table(rows: Iterable[Row]) -> str:
    lines = ["| figure | lamina | reference (overlayfs) | lamina/reference | goal | met? "
             "| lamina via containerd | via/reference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "-" if r.met is None else "yes" if r.met else "**no**"
        via = "-" if r.via is None else fmt(r.via, r.unit)
        via_ratio = "-" if r.via is None else f"{r.via / r.reference:.2f}x"
        lines.append(f"| {r.figure} | {fmt(r.lamina, r.unit)} | {fmt(r.reference, r.unit)} "
                     f"| {r.lamina / r.reference:.2f}x | {r.goal} | {met} | {via} "
                     f"| {via_ratio} |")
    return "\n".join(lines)


def machine(work: Path) -> str:
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True,
                        text=True).stdout.strip()
    ctd = (lab.run(["containerd", "--version"]) if LAB else subprocess.run(
        ["containerd", "--version"], capture_output=True, text=True)).stdout.split()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.machine()}, nproc {os.cpu_count()}, kernel {platform.release()}, "
            f"Python {platform.python_version()}, grpcio {grpc.__version__}, containerd "
            f"{ctd[2] if len(ctd) > 2 else '?'}, work dir on {fs}, load average {load}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3,
                        help="image passes per snapshotter (default 3)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"),
                        help="where the stores and containerd roots go (default /var/tmp)")
    parser.add_argument("--skip-image", action="store_true", help="only the gRPC figures")
    parser.add_argument("--skip-calls", action="store_true", help="only the ctr figures")
    parser.add_argument("--profile", action="store_true",
                        help="the profiling pass even when every goal is met")
    parser.add_argument("--containerd", choices=("debian", "lab"), default="debian",
                        help="Debian's containerd 1.6, or the engines' lab's 2.x (issue 25)")
    parser.add_argument("--floor-server", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--profile-only", action="store_true",
                        help="only the profiling pass (what the full run starts in a child)")
    args = parser.parse_args()
    if args.floor_server:
        floor_server(args.floor_server)
        return 0
    if os.geteuid() != 0:
        print("bench_snapshotter: needs root", file=sys.stderr)
        return 2
    global LAB
    LAB = args.containerd == "lab"
    if LAB and not lab.present():
        print(f"bench_snapshotter: no lab at {lab.location()} (make lab)", file=sys.stderr)
        return 2
    if not LAB and (reason := containerd_missing()) is not None:
        print(f"bench_snapshotter: {reason}", file=sys.stderr)
        return 2
    corpus = Path(os.environ.get("LAMINA_CORPUS") or "/var/tmp/lamina-corpus")
    tar = corpus / "app-docker-save.tar"
    if not tar.is_file():
        print(f"bench_snapshotter: no corpus at {corpus}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lamina-bench-snapshotter-", dir=args.work))
    if args.profile_only:
        try:
            if not args.skip_image:
                profile_import(work, tar)
            if not args.skip_calls:
                profile_pass(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    log(f"machine: {machine(work)}")
    image = calls = None
    if LAB:  # lamina's EROFS layers, mounted on the host, must show in the lab
        shared_dir(work)
    try:
        subprocess.run(["cat", str(tar)], stdout=subprocess.DEVNULL, check=True)  # page cache
        if not args.skip_image:
            log(f"1. ctr image import + ctr run --rm, {args.runs} runs each, alternating")
            image = image_bench(work, tar, args.runs)
        if not args.skip_calls:
            log("2./3. the Snapshots service over gRPC")
            calls = service_bench(work / "calls")
        rows = rows_of(image, calls)
        log("\n" + table(rows))
        missed = [r.figure for r in rows if r.met is False]
        log("\nmissed: " + (", ".join(missed) if missed else "none"))
        if missed or args.profile:
            # In a process of its own: cProfile in this one, after the gRPC clients above,
            # recorded nothing.
            skips = []
            if LAB or image is None or not (args.profile or any(
                    r.met is False for r in rows_of(image, None))):
                skips.append("--skip-image")
            if calls is None or not (args.profile or any(
                    r.met is False for r in rows_of(None, calls))):
                skips.append("--skip-calls")
            subprocess.run([sys.executable, __file__, "--profile-only", "--work", str(work),
                            *skips], check=True)
        log(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        unmount_layer_images(work)
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
