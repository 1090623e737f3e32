"""``lamina snapshotter`` killed (SIGKILL) inside Prepare, Commit and Remove (contract §4, §6).

One ``lamina --home H --backend B snapshotter`` process per backend
(:class:`tests.containerd.daemon.Snapshotter`, run through
:mod:`tests.crash.snapshotter_child`, which logs the crash points it reaches), driven
over its unix socket with the generated gRPC stubs (``lamina/frontends/containerd/api``).
The home holds, between kills, the *baseline*: the committed snapshot ``base`` (with a
file), and a read-only layer ``other`` that another front end (the CLI, as ``lamina
serve`` would) applied, with its chain id.  Each operation is first run uninterrupted,
which gives the crash points it reaches (:data:`lamina.crashpoints.POINTS`: the store's
``publish:*``, ``retire:*``, ``remove:deleting``, ``atomic-write:before-rename`` of
every record, hold and metadata file); then, for each point, the first and last time it
is reached (every time for ``atomic-write:before-rename``, the snapshots' own commit
points), a fresh server is started with ``LAMINA_CRASH_AT=NAME:N``, the operation's
setup and call are sent, and the server dies in the call.  Then the server is
started again on the same home and:

- the operation's snapshots are all as before it or all as after it (Stat), and List
  returns exactly the snapshots Stat finds, with the same kind, parent and labels;
- no orphan: every layer in the home (``lamina --json ls``) is a snapshot's or
  ``other`` (the other front end's), every snapshot's layer exists, every hold is of a
  layer a snapshot uses; ``lamina check`` exits 0;
- the client carries on: the same call again succeeds (or, when the kill came after its
  commit point, answers what containerd takes as done: ``AlreadyExists`` for a
  Prepare or Commit, ``NotFound`` for a Remove), the result is usable (Mounts,
  content), and the home goes back to the baseline through the API.

The operations: ``prepare`` (an active snapshot on ``base``), ``prepare-ref`` (the
remote-snapshotter protocol: a Prepare labelled ``containerd.io/snapshot.ref`` with
``other``'s chain id, answered AlreadyExists once committed on ``other``), ``commit``
(of an active snapshot with a file written into it), ``commit-adopt`` (containerd's
import: an extraction snapshot committed under a name with ``other``'s chain id, which
adopts ``other`` and drops the extracted copy), ``remove`` (a committed leaf) and
``remove-active``.  About 50 kills over both backends, about 50 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

import lamina
from lamina.backends import check
from lamina.frontends.containerd.api import snapshots_pb2 as pb
from lamina.frontends.containerd.api import snapshots_pb2_grpc
from lamina.frontends.containerd.records import SnapshotRecords
from lamina.frontends.containerd.snapshotter import REF_LABEL
from lamina.store.holds import Holder, Holds
from tests import tarbuild as tb
from tests.containerd.daemon import Snapshotter
from tests.crash.harness import child_env

pytestmark = [pytest.mark.root]

BACKENDS = ["overlay", "vfs"]
CALL_TIMEOUT = 30.0
OTHER = "other"  # the other front end's layer
EVERY_N = ("atomic-write:before-rename",)  # killed at every N, not only the first and last
BACKGROUND = ("remove:deleting",)
"""Reached by the snapshotter's reaper after the call answered (a removed snapshot's tree
is deleted in the background): a kill there may come before or after the answer."""
WRAPPER = json.dumps([sys.executable, "-m", "tests.crash.snapshotter_child"])
OK = grpc.StatusCode.OK
State = dict[str, tuple[int, str] | None]  # snapshot name → (kind, parent), None: absent


def other_tar(path: Path) -> None:
    rng = random.Random(14)
    tb.write(path, [tb.directory("srv"), tb.file("srv/data", rng.randbytes(3000)),
                    tb.symlink("srv/link", "data")])


def diff_id(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class Client:
    """The Snapshots service of a socket, through the generated stubs."""

    def __init__(self, sock: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{sock}")
        self.stub: Any = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, **fields: Any) -> Any:
        request = getattr(pb, {
            "Prepare": "PrepareSnapshotRequest", "View": "ViewSnapshotRequest",
            "Commit": "CommitSnapshotRequest", "Remove": "RemoveSnapshotRequest",
            "Stat": "StatSnapshotRequest", "Mounts": "MountsRequest",
        }[method])(**fields)
        return getattr(self.stub, method)(request, timeout=CALL_TIMEOUT)

    def code(self, method: str, **fields: Any) -> grpc.StatusCode:
        """The call's status code (OK when it succeeded)."""
        try:
            self.call(method, **fields)
        except grpc.RpcError as e:
            return e.code()  # type: ignore[attr-defined, no-any-return]
        return OK

    def stat(self, name: str) -> Any | None:
        try:
            return self.call("Stat", key=name).info
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise
            return None

    def list(self) -> dict[str, Any]:
        out = {}
        for resp in self.stub.List(pb.ListSnapshotsRequest(), timeout=CALL_TIMEOUT):
            for info in resp.info:
                assert info.name not in out, f"List returned {info.name!r} twice"
                out[info.name] = info
        return out


def writable_dir(mounts: Any) -> Path:
    """Where an active snapshot's writes go: a bind's source, or overlay's upperdir."""
    (m,) = mounts
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir=")).split("=", 1)[1])


def top_dir(mounts: Any) -> Path:
    """The topmost layer's directory of a read-only view's mounts."""
    (m,) = mounts
    if m.type == "bind":
        return Path(m.source)
    lower = next(o for o in m.options if o.startswith("lowerdir=")).split("=", 1)[1]
    return Path(lower.split(":")[0])


@dataclass
class Op:
    """An operation: its setup calls, its call (killed), and the states it may leave."""

    setup: Callable[[Rig], None]
    call: tuple[str, dict[str, Any]]
    before: State
    after: State
    done_code: grpc.StatusCode  # the call again, after its commit point: containerd's "done"
    check_after: Callable[[Rig], None] | None = None
    first_code: grpc.StatusCode = OK  # what the uninterrupted call answers


class Rig:
    """One server's home with the baseline; kills the server in operations and judges."""

    def __init__(self, backend: str, work: Path) -> None:
        self.backend = backend
        self.work = work
        self.log = work / "crash-points.log"
        self.sn = Snapshotter(work / "home", work / "snapshotter.log", backend=backend)
        self.client: Client | None = None
        self.kills: Counter[str] = Counter()
        self.chain = ""
        self.baseline_layers: set[str] = set()

    def make_baseline(self) -> None:
        """``other`` applied by the CLI, ``base`` committed through the API."""
        tar = self.work / "other.tar"
        other_tar(tar)
        self.sn.lamina("apply", OTHER, str(tar))
        self.chain = diff_id(tar)  # a layer with no parent: its chain id is its diff id
        self.start()
        c = self.c
        base = c.call("Prepare", key="base-key", parent="").mounts
        (writable_dir(base) / "base-file").write_text("base\n")
        c.call("Commit", name="base", key="base-key")
        self.baseline_layers = self.layers()
        assert len(self.baseline_layers) == 2, self.baseline_layers

    # -- the server ---------------------------------------------------------------

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    def start(self, crash_at: str | None = None, survey: bool = False) -> None:
        extra = {"LAMINA_SNAPSHOTTER_CMD": WRAPPER}
        if crash_at:
            extra["LAMINA_CRASH_AT"] = crash_at
        if survey:
            self.log.write_text("")
            extra["LAMINA_CRASH_LOG"] = str(self.log)
        with environment(child_env(**extra)):
            self.sn.start()
        self.client = Client(self.sn.socket)

    def stop(self) -> int | None:
        if self.client is not None:
            self.client.close()
            self.client = None
        return self.sn.stop()

    def wait_deleted(self, timeout: float = 60) -> None:
        """Until the server's reaper has deleted the trees of the snapshots removed."""
        layers = self.sn.home / "layers"
        deadline = time.monotonic() + timeout
        while any(e.endswith("-removing") for e in os.listdir(layers)):
            assert time.monotonic() < deadline, f"trees not deleted: {os.listdir(layers)}"
            time.sleep(0.02)

    # -- the store, as other processes see it ---------------------------------------

    @contextlib.contextmanager
    def driver(self) -> Iterator[lamina.Driver]:
        """The store opened in this process (another user of the home, beside the server)."""
        drv = lamina.open_driver(self.sn.home, backend=self.backend)
        try:
            yield drv
        finally:
            drv.close()

    def layers(self) -> set[str]:
        with self.driver() as drv:
            return set(drv.layers())

    def check(self) -> list[str]:
        """What ``lamina check`` finds (its code, in this process: it is run per kill)."""
        with self.driver() as drv:
            return [f"check: {p}" for p in check.check(drv).problems]

    def check_cli(self) -> list[str]:
        """``lamina check``, the command, unless it exits 0."""
        proc = self.sn.lamina("check", check=False)
        return [] if proc.returncode == 0 else [f"lamina check: {proc.stdout}{proc.stderr}"]

    def records(self) -> SnapshotRecords:
        return SnapshotRecords(self.sn.home, serve=False)

    # -- operations -------------------------------------------------------------------

    def ops(self) -> dict[str, Op]:
        chain = self.chain
        extract = f"ns/1/extract-7 {chain}"
        committed_name = f"ns/2/{chain}"

        def nothing(rig: Rig) -> None:
            pass

        def active(key: str, parent: str, write: str | None = None) -> Callable[[Rig], None]:
            def setup(rig: Rig) -> None:
                mounts = rig.c.call("Prepare", key=key, parent=parent).mounts
                if write:
                    (writable_dir(mounts) / write).write_text(f"{write}\n")
            return setup

        def committed(name: str) -> Callable[[Rig], None]:
            def setup(rig: Rig) -> None:
                active(f"{name}-key", "base", write=name)(rig)
                rig.c.call("Commit", name=name, key=f"{name}-key")
            return setup

        def file_in(name: str, file: str) -> Callable[[Rig], None]:
            def check(rig: Rig) -> None:
                view = rig.c.call("View", key="check-view", parent=name).mounts
                assert (top_dir(view) / file).read_text() == f"{file}\n", (name, file)
                rig.c.call("Remove", key="check-view")
            return check

        def is_other(name: str) -> Callable[[Rig], None]:
            def check(rig: Rig) -> None:
                rec = rig.records().get(name)
                assert rec is not None and rec.layer == OTHER, rec
                view = rig.c.call("View", key="check-view", parent=name).mounts
                assert (top_dir(view) / "srv/link").is_symlink()
                rig.c.call("Remove", key="check-view")
            return check

        A, C = pb.ACTIVE, pb.COMMITTED
        return {
            "prepare": Op(nothing, ("Prepare", {"key": "new", "parent": "base"}),
                          {"new": None}, {"new": (A, "base")}, grpc.StatusCode.ALREADY_EXISTS),
            "prepare-ref": Op(
                nothing,
                ("Prepare", {"key": extract, "parent": "", "labels": {REF_LABEL: chain}}),
                {chain: None, extract: None}, {chain: (C, ""), extract: None},
                grpc.StatusCode.ALREADY_EXISTS, is_other(chain),
                first_code=grpc.StatusCode.ALREADY_EXISTS),
            "commit": Op(active("work", "base", write="work-file"),
                         ("Commit", {"name": "done", "key": "work"}),
                         {"work": (A, "base"), "done": None},
                         {"work": None, "done": (C, "base")},
                         grpc.StatusCode.NOT_FOUND, file_in("done", "work-file")),
            "commit-adopt": Op(active(extract, "", write="srv"),
                               ("Commit", {"name": committed_name, "key": extract}),
                               {extract: (A, ""), committed_name: None},
                               {extract: None, committed_name: (C, "")},
                               grpc.StatusCode.NOT_FOUND, is_other(committed_name)),
            "remove": Op(committed("gone"), ("Remove", {"key": "gone"}),
                         {"gone": (C, "base")}, {"gone": None}, grpc.StatusCode.NOT_FOUND),
            "remove-active": Op(active("gone-key", "base", write="x"),
                                ("Remove", {"key": "gone-key"}),
                                {"gone-key": (A, "base")}, {"gone-key": None},
                                grpc.StatusCode.NOT_FOUND),
        }

    def survey(self, name: str, op: Op) -> tuple[Counter[str], Counter[str]]:
        """Run ``op`` uninterrupted: the crash points the server reached before its call
        (starting, the setup) and in its call, with how many times."""
        self.stop()
        self.start(survey=True)
        op.setup(self)
        mark = len(self.log.read_text().splitlines())
        method, fields = op.call
        assert self.c.code(method, **fields) == op.first_code, name
        self.wait_deleted()
        lines = self.log.read_text().splitlines()
        problems = self.judge(name, op, killed=False)
        assert not problems, f"after an uninterrupted {name}:\n" + "\n".join(problems)
        return Counter(lines[:mark]), Counter(lines[mark:])

    @staticmethod
    def targets(before: Counter[str], reached: Counter[str]) -> list[str]:
        """``NAME:N`` for the crash points of the call (N counts from the server's start)."""
        out = []
        for point, times in sorted(reached.items()):
            ns = range(1, times + 1) if point in EVERY_N else sorted({1, times})
            out += [f"{point}:{before[point] + n}" for n in ns]
        return out

    def kill_at(self, name: str, op: Op, target: str) -> list[str]:
        """Kill the server at ``target`` in ``op``'s call; restart, judge, back to baseline."""
        self.stop()
        self.start(crash_at=target)
        problems: list[str] = []
        try:
            op.setup(self)
        except grpc.RpcError as e:
            problems.append(f"{name} at {target}: died in the setup ({e.code()})")
        else:
            method, fields = op.call
            got = self.c.code(method, **fields)
            dies = {grpc.StatusCode.UNAVAILABLE}
            if target.rsplit(":", 1)[0] in BACKGROUND:
                dies.add(op.first_code)  # answered, then killed in the background
            if got not in dies:
                problems.append(f"{name} at {target}: the call answered {got}, "
                                "the server did not die there")
        assert self.sn.proc is not None
        try:
            rc = self.sn.proc.wait(CALL_TIMEOUT)
        except Exception:
            rc = None
        if rc != -signal.SIGKILL:
            problems.append(f"{name} at {target}: the server exited with {rc}, not SIGKILL")
        else:
            self.kills[name] += 1
        self.stop()
        self.start()
        return problems + [f"{name} killed at {target}: {p}"
                           for p in self.judge(name, op, killed=True)]

    # -- judging -------------------------------------------------------------------------

    def state(self, op: Op) -> State:
        out: State = {}
        for name in op.before:
            info = self.c.stat(name)
            out[name] = None if info is None else (info.kind, info.parent)
        return out

    def judge(self, name: str, op: Op, *, killed: bool) -> list[str]:
        problems: list[str] = []
        try:
            state = self.state(op)
            was = "before" if state == op.before else "after" if state == op.after else None
            if was is None:
                problems.append(f"neither before nor after {name}: {state}")
            problems += self._list_agrees()
            problems += self._orphans()
            problems += self.check()
            if killed:
                problems += self._carry_on(name, op, was)
        except Exception as e:  # judging must report, not stop the run
            problems.append(f"judging raised {type(e).__name__}: {e}")
        problems += self._reset()
        return problems

    def _list_agrees(self) -> list[str]:
        problems = []
        listed = self.c.list()
        on_disk = {rec.name for rec in self.records()}
        if set(listed) != on_disk:
            problems.append(f"List {sorted(listed)} is not the records {sorted(on_disk)}")
        for key, info in listed.items():
            st = self.c.stat(key)
            if st is None:
                problems.append(f"List has {key!r}, Stat does not find it")
            elif (st.kind, st.parent, dict(st.labels)) != (info.kind, info.parent,
                                                          dict(info.labels)):
                problems.append(f"Stat and List disagree on {key!r}: {st} / {info}")
        return problems

    def _orphans(self) -> list[str]:
        problems = []
        layers = self.layers()
        records = self.records()
        used = {rec.layer for rec in records if rec.layer is not None}
        for rec in records:
            if rec.layer is not None and rec.layer not in layers:
                problems.append(f"snapshot {rec.name!r}: its layer {rec.layer} is missing")
        for layer in sorted(layers - used - {OTHER}):
            problems.append(f"orphan layer {layer}: no snapshot uses it")
        if OTHER not in layers:
            problems.append("the other front end's layer is gone")
        for layer, who in Holds(self.sn.home).recorded():
            if Holder.SNAPSHOTS in who and layer not in used:
                problems.append(f"a hold ({sorted(who)}) of {layer}, which no snapshot uses")
        for entry in os.listdir(self.sn.home / "layers"):
            if entry.endswith("-removing"):
                problems.append(f"an unfinished removal: layers/{entry}")
        return problems

    def _carry_on(self, name: str, op: Op, was: str | None) -> list[str]:
        """The same call again: it succeeds, or says it is done; the result is usable."""
        problems = []
        method, fields = op.call
        got = self.c.code(method, **fields)
        want = op.first_code if was == "before" else op.done_code
        if got != want:
            problems.append(f"{name} again (state {was}): {got}, not {want}")
        if self.state(op) != op.after:
            problems.append(f"{name} again did not reach the state after it: {self.state(op)}")
        elif op.check_after is not None:
            op.check_after(self)
        for key, st in op.after.items():
            if st is not None and st[0] == pb.ACTIVE:
                (writable_dir(self.c.call("Mounts", key=key).mounts) / "more").write_text("x")
        return problems

    def _reset(self) -> list[str]:
        """Remove every snapshot but ``base`` (leaves first): back to the baseline."""
        problems = []
        for _ in range(5):
            extra = [n for n in self.c.list() if n != "base"]
            if not extra:
                break
            for key in extra:
                code = self.c.code("Remove", key=key)
                if code not in (OK, grpc.StatusCode.FAILED_PRECONDITION):
                    problems.append(f"reset: Remove {key!r}: {code}")
        if set(self.c.list()) != {"base"}:
            problems.append(f"reset: not back to the baseline: {sorted(self.c.list())}")
        if self.layers() != self.baseline_layers:
            problems.append(f"reset: layers {sorted(self.layers())}, "
                            f"not {sorted(self.baseline_layers)}")
        return problems


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


@pytest.fixture(scope="module")
def rig(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(backend, tmp_path_factory.mktemp(f"snapshotter-kills-{backend}"))
    try:
        r.make_baseline()
        yield r
    finally:
        r.stop()
        r.sn.close()


OPS = ("prepare", "prepare-ref", "commit", "commit-adopt", "remove", "remove-active")


@pytest.mark.parametrize("name", OPS)
def test_killed_at_every_crash_point(rig: Rig, name: str) -> None:
    op = rig.ops()[name]
    targets = rig.targets(*rig.survey(name, op))
    assert targets, f"{name} reaches no crash point"
    problems = [p for target in targets for p in rig.kill_at(name, op, target)]
    problems += rig.check_cli()
    assert not problems, "\n".join(problems)
    assert rig.kills[name] == len(targets)


def test_the_calls_reach_the_stores_commit_points(rig: Rig) -> None:
    # Every kind of call is killed somewhere: the records' and holds' writes at least.
    assert all(rig.kills[name] for name in OPS), rig.kills
