"""The crash harness: kill a process using a store, reopen the store, judge what is left.

One :class:`Torture` per backend keeps a home that holds, between kills, the
*baseline*: ``base`` (no parent), ``sib`` and ``victim`` on ``base``.  A kill
runs one operation of :mod:`tests.crash.child` in a child process and kills it
with SIGKILL, either at a named crash point (``LAMINA_CRASH_AT=NAME:N``) or after
a random delay within the operation's measured duration.  Then the harness opens
the store again (which recovers it) and :meth:`Torture.judge` checks contract §4:

- ``lamina check`` finds nothing (metadata, chains, every layer's content against
  the manifest recorded when it was built, counts against mounts, leftovers);
- every layer that exists is one the operation can leave, and its union view is
  exactly what an uninterrupted run left (the *reference*, taken from the survey
  run of the same operation) or what was there before;
- no orphan: no staging directory, no ``*-removing``, no stray entry in
  ``layers/``, no count of a layer that is gone, no dangling ``l/`` link;
- no stale mount: everything mounted under the home is a counted layer's view, and
  on overlay every counted layer with a parent is mounted; no count exceeds the
  ``get`` calls the operation had outstanding;
- no stale lock: every lock file of the home can be taken at once;
- every id is usable again: counts are given back, the ids the operation made or
  removed are removed and made again, and the operation then runs to its
  reference result in this process.

Problems are collected as strings rather than asserted one by one, so that the
long run (``tests/crash/test_long.py``) can count inconsistencies.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lamina
from lamina import crashpoints
from lamina.backends import check
from lamina.driver import REMOVING_SUFFIX
from lamina.host import fsutil
from tests import tarbuild as tb
from tests.conftest import mounts_under, open_variant
from tests.crash import child
from tests.snapshot import Node, snapshot, snapshot_tar, tree_differences

REPO = Path(__file__).resolve().parents[2]
BASELINE = ("base", "sib", "victim")
CHILD_TIMEOUT = 60.0  # a hung child is a failure, not a wait

Tree = dict[str, Node]

MANY = ("apply:entry", "index:entry", "diff:chunk")
"""Points reached once per tar entry: killed at every N, not only the first."""
HELPER_POINTS = ("apply:entry",)
"""Points that may be reached in a helper process (the isolated tar engine's): a kill
there fails the operation (the child exits with :data:`child.FAILED`) instead of
killing it."""
APPLIES = ("apply", "apply-into", "apply-inproc", "apply-into-inproc")
OP_ENV = {"apply-inproc": {"LAMINA_NOREEXEC": "1"}, "apply-into-inproc": {"LAMINA_NOREEXEC": "1"}}

# What each operation may leave counted (get calls it has outstanding at most).
MAX_COUNTS: dict[str, dict[str, int]] = {
    "remove-mounted": {"victim": 1},
    "get-put": {"victim": 2, "sib": 1},
    "diff-other": {"victim": 1, "sib": 1},
}
# Ids an operation makes or removes: removed and made again after every kill.
REMADE: dict[str, tuple[str, ...]] = {
    "apply": ("new",),
    "apply-inproc": ("new",),
    "apply-into-inproc": ("victim",),
    "create": ("new",),
    "create_rw": ("new",),
    "apply-into": ("victim",),
    "remove": ("victim",),
    "remove-mounted": ("victim",),
}


def layer_tars() -> dict[str, list[tb.Entry]]:
    """The layers of the baseline and of the operations: small, every entry type."""
    rng = random.Random(8)
    blob = rng.randbytes
    return {
        "base": [
            tb.directory("etc"), tb.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            tb.file("etc/motd", b"base\n"), tb.directory("usr"), tb.directory("usr/bin"),
            tb.file("usr/bin/tool", blob(3000), mode=0o755),
            tb.hardlink("usr/bin/tool2", "usr/bin/tool"), tb.symlink("bin", "usr/bin"),
            tb.directory("var"), tb.directory("var/cache"), tb.file("var/cache/a", blob(100)),
            tb.file("var/cache/b", blob(200)), tb.fifo("var/fifo"),
        ],
        "sib": [
            tb.directory("etc"), tb.file("etc/motd", b"sib\n"), tb.whiteout("var/cache/a"),
            tb.directory("srv"), tb.file("srv/data", blob(5000), uid=1000, gid=1000),
        ],
        "victim": [
            tb.directory("app", mode=0o750, uid=7, gid=7),
            *(tb.file(f"app/f{i}", blob(1000 + 700 * i), uid=7) for i in range(5)),
            tb.hardlink("app/hard", "app/f0"), tb.symlink("app/link", "f1"),
            tb.whiteout("etc/passwd"), tb.opaque("var/cache"), tb.file("var/cache/c", b"c"),
            tb.file("app/ping", b"", mode=0o755, xattrs={"security.capability": tb.CAP_NET_RAW}),
            tb.chardev("app/null", 1, 3),
        ],
        "new": [
            tb.directory("opt"), tb.directory("opt/pkg"),
            *(tb.file(f"opt/pkg/m{i}", blob(500 * (i + 1)), mode=0o600) for i in range(6)),
            tb.symlink("opt/pkg/current", "m0"), tb.hardlink("opt/pkg/again", "opt/pkg/m1"),
            tb.whiteout("etc/motd"), tb.file("usr/bin/tool", blob(1500), mode=0o700),
            tb.blockdev("opt/disk", 7, 0),
        ],
        "more": [
            tb.directory("app"), tb.file("app/f1", blob(4000)), tb.whiteout("app/f2"),
            tb.directory("app/sub"), *(tb.file(f"app/sub/s{i}", blob(300)) for i in range(5)),
            tb.symlink("app/sub/up", ".."), tb.file("etc/hosts", b"127.0.0.1 localhost\n"),
        ],
    }


def child_env(**extra: str) -> dict[str, str]:
    """The child's environment: this checkout importable, no crash point unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_CRASH")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


@dataclass
class Survey:
    """What an uninterrupted run of an operation reached, took and left."""

    reached: dict[str, int]
    took: float
    after: dict[str, Tree | None]  # every layer id's union view afterwards (None: absent)


@dataclass
class Tally:
    """Kills so far, and what was wrong after them."""

    kills: int = 0
    at_points: int = 0
    at_random: int = 0
    random_mid_op: int = 0  # random kills that landed before the operation finished
    in_helper: int = 0  # point kills that struck a helper process, failing the operation
    problems: list[str] = field(default_factory=list)
    by_op: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        """Fold ``other`` into this tally."""
        self.kills += other.kills
        self.at_points += other.at_points
        self.at_random += other.at_random
        self.random_mid_op += other.random_mid_op
        self.in_helper += other.in_helper
        self.problems += other.problems
        self.by_op.update(other.by_op)


TOTAL = Tally()
"""Every kill of this test session (printed in the terminal summary)."""


class Torture:
    """A home with the baseline layers, killed into and judged (see the module docstring)."""

    def __init__(self, backend: str, workdir: Path, seed: int = 0) -> None:
        self.backend = backend
        """The variant (:func:`open_variant`)."""
        self.home = workdir / "home"
        self.tars = workdir / "tars"
        self.tars.mkdir(parents=True)
        self.rng = random.Random(seed)
        self.tally = Tally()
        for name, entries in layer_tars().items():
            tb.write(self.tars / f"{name}.tar", entries)
        with self.opened() as drv:
            for id in BASELINE:
                with open(self.tars / f"{id}.tar", "rb") as f:
                    drv.apply_diff(id, None if id == "base" else "base", f)
            self.baseline: dict[str, Tree | None] = {id: view(drv, id) for id in BASELINE}
        # The references start from the tar itself: base, with no parent, is its tar.
        base = {path: node for path, node in (self.baseline["base"] or {}).items() if path != "/"}
        assert base == snapshot_tar(self.tars / "base.tar"), "base differs from its tar"
        self.surveys: dict[str, Survey] = {}

    @contextmanager
    def opened(self) -> Iterator[lamina.Driver]:
        """The store opened (and so recovered) in this process, closed after."""
        drv = open_variant(self.home, self.backend)
        try:
            yield drv
        finally:
            drv.close()

    # -- children ---------------------------------------------------------------

    def _spawn(self, op: str, env: dict[str, str], wait: bool = False) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "tests.crash.child", str(self.home), self.backend, op,
                str(self.tars)]
        return subprocess.Popen(args + (["--wait"] if wait else []), cwd=REPO, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    @staticmethod
    def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, list[str], str]:
        try:
            out, err = proc.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return -999, out.decode().splitlines(), "timed out: " + err.decode()
        return proc.returncode, out.decode().splitlines(), err.decode()

    def survey(self, op: str) -> Survey:
        """Run ``op`` uninterrupted: the crash points it reaches, its duration, its result."""
        if op in self.surveys:
            return self.surveys[op]
        env = child_env(LAMINA_CRASH_SURVEY="1", **OP_ENV.get(op, {}))
        rc, lines, err = self._finish(self._spawn(op, env))
        assert rc == 0 and len(lines) == 2, f"{op} failed uninterrupted (rc {rc}):\n{err}"
        result = json.loads(lines[1])
        assert not result["opening"], f"opening the baseline reached {result['opening']}"
        with self.opened() as drv:
            after: dict[str, Tree | None] = {id: None for id in BASELINE}
            after.update({id: view(drv, id) for id in drv.layers()})
        reached = dict(result["reached"])
        if op in APPLIES and not reached.get("index:entry"):
            # Applied in a helper, the entries are counted by progress (an EROFS layer's
            # index is written here: its points are counted as they are reached).
            reached["apply:entry"] = max(reached.get("apply:entry", 0), result["entries"])
        survey = Survey(reached, result["took"], after)
        self.surveys[op] = survey
        problems = self.judge(op)  # an uninterrupted run must pass every check too
        assert not problems, f"after an uninterrupted {op}:\n" + "\n".join(problems)
        return survey

    def points(self, op: str, *, every: bool = False) -> list[str]:
        """``NAME:N`` for every crash point ``op`` reaches, the first and the last time.

        The per-entry points are killed at more places: the first two entries, the
        middle one, the last two and one at random; ``every`` takes every N.
        """
        out = []
        for name, times in sorted(self.survey(op).reached.items()):
            if name in MANY:
                ns = set(range(1, times + 1)) if every else {
                    1, 2, (times + 1) // 2, times - 1, times, self.rng.randint(1, times)}
            else:
                ns = {1, times}
            out += [f"{name}:{n}" for n in sorted(n for n in ns if n >= 1)]
        return out

    def kill_at(self, op: str, target: str) -> list[str]:
        """Kill ``op`` at crash point ``target`` (``NAME:N``); judge and reset the store."""
        env = child_env(LAMINA_CRASH_AT=target, **OP_ENV.get(op, {}))
        rc, _, err = self._finish(self._spawn(op, env))
        in_helper = rc == child.FAILED and target.rpartition(":")[0] in HELPER_POINTS
        if rc != -signal.SIGKILL and not in_helper:
            return self._record(
                [f"{op} at {target}: the child did not die there (rc {rc}): {err[-2000:]}"]
            ) + self.judge(op)  # judged still, to get back to the baseline
        self._count(op, point=True, in_helper=in_helper)
        return [f"{op} killed at {target}: {p}" for p in self.judge(op)]

    def kill_after(self, op: str, delay: float) -> list[str]:
        """Kill ``op`` ``delay`` seconds after it is told to start; judge and reset."""
        proc = self._spawn(op, child_env(**OP_ENV.get(op, {})), wait=True)
        assert proc.stdin is not None and proc.stdout is not None
        ready = proc.stdout.readline()
        if ready != b"ready\n":
            rc, _, err = self._finish(proc)
            return self._record([f"{op}: the child did not start (rc {rc}): {err[-2000:]}"]
                                ) + self.judge(op)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        time.sleep(delay)  # a random instant: not synchronization, the point of the test
        proc.send_signal(signal.SIGKILL)
        rc, lines, err = self._finish(proc)
        if rc != -signal.SIGKILL:
            if rc == 0:  # it finished and exited first: not a kill (not counted)
                return [f"{op} run to its end: {p}" for p in self.judge(op)]
            return self._record([f"{op}: the child failed (rc {rc}): {err[-2000:]}"]
                                ) + self.judge(op)
        self._count(op, point=False, mid_op=not lines)
        return [f"{op} killed after {delay * 1000:.1f} ms: {p}" for p in self.judge(op)]

    def random_delay(self, op: str) -> float:
        """A random instant within ``op``'s duration (a little past it, for the ends)."""
        return self.rng.uniform(0, self.survey(op).took * 1.1)

    def _count(self, op: str, *, point: bool, mid_op: bool = False,
               in_helper: bool = False) -> None:
        for tally in (self.tally, TOTAL):
            tally.kills += 1
            tally.by_op[op] += 1
            if point:
                tally.at_points += 1
                tally.in_helper += in_helper
            else:
                tally.at_random += 1
                tally.random_mid_op += mid_op

    # -- judging ------------------------------------------------------------------

    def judge(self, op: str) -> list[str]:
        """Reopen the store after ``op`` ran or was killed: what is wrong (see module doc)."""
        problems: list[str] = []
        try:
            with self.opened() as drv:
                problems += [f"check: {p}" for p in check.check(drv).problems]
                problems += self._states(drv, op)
                problems += self._leftovers(drv)
                problems += self._mounts(drv, op)
                problems += self._locks()
                # Back to the baseline even after a problem, so that one does not
                # cascade into every later kill.
                problems += self._reuse(drv, op)
        except Exception:  # judging must report, not stop the run
            problems.append("judging raised:\n" + traceback.format_exc())
        return self._record(problems)

    def _record(self, problems: list[str]) -> list[str]:
        for tally in (self.tally, TOTAL):
            tally.problems += problems
        return problems

    def _states(self, drv: lamina.Driver, op: str) -> list[str]:
        # Each layer as before the operation or as an uninterrupted run left it.
        after = self.surveys[op].after if op in self.surveys else self.baseline
        problems = []
        present = set(drv.layers())
        for id in sorted(present | set(after) | set(self.baseline)):
            got = view(drv, id) if id in present else None
            allowed = [self.baseline.get(id), after.get(id)]
            if got not in allowed:
                want = next((a for a in allowed if a is not None), {})
                diff = tree_differences(got or {}, want, limit=8)
                problems.append(f"layer {id} is neither before nor after {op}: "
                                + ("absent" if got is None else "; ".join(diff)))
        return problems

    def _leftovers(self, drv: lamina.Driver) -> list[str]:
        home = self.home
        problems = []
        for entry in os.listdir(home / "layers"):
            if entry.endswith(REMOVING_SUFFIX) or not (home / "layers" / entry / "layer.json"
                                                       ).is_file():
                problems.append(f"orphan layers/{entry}")
        problems += [f"orphan staging/{e}" for e in os.listdir(home / "staging")]
        layers = set(drv.layers())
        for entry in os.listdir(home / "mounts"):
            if entry not in layers:
                problems.append(f"orphan mounts/{entry}")
        if (home / "l").is_dir():
            for entry in os.listdir(home / "l"):
                if not (home / "l" / entry).exists():
                    problems.append(f"dangling l/{entry}")
            for id in layers:
                short = (home / "layers" / id / "link").read_text()
                if not (home / "l" / short).is_symlink():
                    problems.append(f"layer {id}: its short link l/{short} is missing")
        for bucket in sorted(os.listdir(home / "chains")) if (home / "chains").is_dir() else []:
            for id in os.listdir(home / "chains" / bucket):
                if id not in layers:  # swept on open: an entry of a layer that is gone
                    problems.append(f"chains/{bucket}/{id}: an index entry of no layer")
        for id in os.listdir(home / "holds") if (home / "holds").is_dir() else []:
            problems.append(f"holds/{id}: a hold on a layer no snapshot ever used")
        expected = {"lamina.json", ".lock", "layers", "staging", "mounts", "locks", "l",
                    "mountlocks", "holds", "chains"}
        problems += [f"stray {e} in the home" for e in set(os.listdir(home)) - expected]
        return problems

    def _mounts(self, drv: lamina.Driver, op: str) -> list[str]:
        store = drv.store  # type: ignore[attr-defined]
        problems = []
        mounted = set(mounts_under(self.home))
        layers = set(drv.layers())
        for point in mounted:
            rel = Path(point).relative_to(self.home).parts
            if len(rel) != 3 or rel[0] != "layers" or rel[2] != "merged" or rel[1] not in layers:
                problems.append(f"stale mount {point}")
            elif store.count(rel[1]) == 0:
                problems.append(f"stale mount {point}: no count")
        for id in layers:
            count = store.count(id)
            if count > MAX_COUNTS.get(op, {}).get(id, 0):
                problems.append(f"layer {id}: a count of {count} after {op}")
            merged = str(self.home / "layers" / id / "merged")
            if (count and self.backend.startswith("overlay") and drv.parent(id)
                    and merged not in mounted):
                problems.append(f"layer {id}: a count of {count} with nothing mounted")
        return problems

    def _locks(self) -> list[str]:
        problems = []
        locks = [self.home / ".lock", *(self.home / "locks").iterdir(),
                 *(self.home / "staging").glob("*.lock")]
        for path in locks:
            lock = fsutil.FileLock(path)
            try:
                if not lock.acquire(blocking=False):
                    problems.append(f"stale lock {path.relative_to(self.home)}")
            finally:
                lock.release()
        return problems

    def _reuse(self, drv: lamina.Driver, op: str) -> list[str]:
        # Give every count back, then remove and make again what the operation
        # touched, back to the baseline; an operation that makes an id then runs
        # to its reference result here, and that id goes too.
        problems = []
        store = drv.store  # type: ignore[attr-defined]
        for id in list(store.counted()):
            while store.count(id) > 0:
                drv.put(id)
        extra = [id for id in drv.layers() if id not in self.baseline]
        for id in sorted(extra, key=lambda i: -len(store.chain(i))):
            drv.remove(id)
        for id in REMADE.get(op, ()):
            if id in self.baseline:
                if drv.exists(id):
                    drv.remove(id)
                with open(self.tars / f"{id}.tar", "rb") as f:
                    drv.apply_diff(id, "base", f)
                if view(drv, id) != self.baseline[id]:
                    problems.append(f"layer {id} made again differs from the baseline")
            elif op in self.surveys:
                child.OPS[op](drv, self.tars)
                if view(drv, id) != self.surveys[op].after[id]:
                    problems.append(f"layer {id} made again differs from the reference")
                drv.remove(id)
        if mounts_under(self.home):
            problems.append(f"mounted after every put: {mounts_under(self.home)}")
        if set(drv.layers()) != set(self.baseline):
            problems.append(f"not back to the baseline: {sorted(drv.layers())}")
        return problems


def view(drv: lamina.Driver, id: str) -> Tree:
    """:func:`snapshot` of ``id``'s union view (one get, one put)."""
    root = drv.get(id)
    try:
        return snapshot(root)
    finally:
        drv.put(id)


# Crash points no operation of the harness reaches on a backend, and why.
UNREACHED = {
    # No operation here writes a metadata file with atomic_write: a new layer's files
    # are made durable with the layer (its syncfs, or an fsync each for an empty one).
    # The snapshotter's records are written so, and tests/crash/test_snapshotter_kills
    # kills at that point.
    # Only overlay's EROFS layers are indexed (its default where the kernel has EROFS).
    "vfs": {"atomic-write:before-rename", "index:entry"},
    "overlay": {"atomic-write:before-rename"},
    "overlay+dir": {"atomic-write:before-rename", "index:entry"},
}


def all_points() -> set[str]:
    """Every crash point lamina names."""
    return set(crashpoints.POINTS)
