"""containerd's own snapshotter conformance suite against ``lamina snapshotter`` (§6).

``scripts/build-containerd-suite.sh`` builds containerd 1.6's ``snapshots/testsuite``
(Debian's golang-github-containerd-containerd-dev, offline) around
``tests/containerd/suite``, which starts a fresh ``lamina --home ROOT/home --backend B
snapshotter --socket S`` for each of its subtests and talks to it through containerd's
proxy client, as containerd talks to a proxy plugin.  It runs once per backend; every
subtest must pass, except those the suite skips itself (:data:`SUITE_SKIPS`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import lacking
from tests.containerd.daemon import short_dir, snapshotter_command
from tests.integration.engine import REPO, unmount_below

pytestmark = [pytest.mark.root, pytest.mark.slow]

BUILD = REPO / "scripts" / "build-containerd-suite.sh"
TESTSUITE = Path("/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite")
TOP = "TestLaminaSnapshotter"
SUBTESTS = 21
"""How many subtests containerd 1.6.20's ``SnapshotterSuite`` runs."""
SUITE_SKIPS = {"Rename": "rename test still fails on some kernels with overlay"}
"""Subtests the suite skips unconditionally, and the reason it gives."""
BUILD_TIMEOUT = 900
RUN_TIMEOUT = 1200  # seconds; the run itself takes well under a minute when all is well
RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(([\d.]+)s\)")
HEADER = re.compile(r"^=== (?:RUN|CONT|PAUSE|NAME)\s+(\S+)")


@dataclass
class Subtest:
    """One subtest's outcome and the output the run attributed to it."""

    name: str
    status: str = "NONE"
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)

    @property
    def server_logs(self) -> list[Path]:
        """The logs of the snapshotters it started (the suite driver names them)."""
        return [Path(m) for line in self.output for m in re.findall(r"\blog=(\S+)", line)]


def parse(output: str) -> dict[str, Subtest]:
    """``go test -test.v`` output, by test name (``TOP`` and ``TOP/Sub``)."""
    tests: dict[str, Subtest] = {}
    current: Subtest | None = None
    for line in output.splitlines():
        if m := RESULT.match(line):
            test = tests.setdefault(m[2], Subtest(m[2]))
            test.status, test.seconds = m[1], float(m[3])
            current = test
        elif m := HEADER.match(line):
            current = tests.setdefault(m[1], Subtest(m[1]))
        elif current is not None and line.startswith("    "):
            current.output.append(line)
    return tests


def summary(tests: dict[str, Subtest]) -> str:
    """One line a subtest, and the counts."""
    subs = [t for name, t in sorted(tests.items()) if name.startswith(TOP + "/")]
    lines = [f"{t.status:4} {t.name.removeprefix(TOP + '/'):32} {t.seconds:7.2f}s"
             for t in subs]
    counts = {s: sum(t.status == s for t in subs) for s in ("PASS", "FAIL", "SKIP", "NONE")}
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
                 + f" of {len(subs)} subtests")
    return "\n".join(lines)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def suite_binary() -> Path:
    """The suite, built (or found up to date) by ``scripts/build-containerd-suite.sh``."""
    if shutil.which("go") is None:
        lacking("no go (Debian's golang-go)")
    if not TESTSUITE.is_dir():
        lacking(f"no {TESTSUITE} (Debian's golang-github-containerd-containerd-dev)")
    proc = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if proc.returncode != 0:
        pytest.fail(f"{BUILD.name} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


def test_containerd_snapshotter_suite(suite_binary: Path, backend: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    scratch = short_dir("lcs-")  # the suite's TMPDIR: short, for the sockets; ours to clean
    env = {
        **os.environ,
        "LAMINA_SNAPSHOTTER_CMD": json.dumps(snapshotter_command()),
        "LAMINA_BACKEND": backend,
        "LAMINA_SNAPSHOTTER_CWD": str(REPO),
        "LAMINA_SUITE_LOGDIR": str(logs),
        "TMPDIR": str(scratch),
    }
    args = [str(suite_binary), "-test.v", "-test.count", "1",
            "-test.timeout", f"{RUN_TIMEOUT - 60}s"]
    if parallel := os.environ.get("LAMINA_SUITE_PARALLEL"):
        args += ["-test.parallel", parallel]
    try:
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=RUN_TIMEOUT, env=env, cwd=tmp_path)
    finally:
        unmount_below(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    (tmp_path / "suite.log").write_text(proc.stdout)

    tests = parse(proc.stdout)
    report = summary(tests)
    print(f"containerd snapshotter suite, backend {backend}:\n{report}")

    problems = []
    subs = {n.removeprefix(TOP + "/"): t for n, t in tests.items() if n.startswith(TOP + "/")}
    if len(subs) != SUBTESTS:
        problems.append(f"{len(subs)} subtests ran, not {SUBTESTS}")
    for name, test in sorted(subs.items()):
        if test.status == "PASS":
            continue
        reason = SUITE_SKIPS.get(name)
        if test.status == "SKIP" and reason and any(reason in line for line in test.output):
            continue
        detail = "\n".join(test.output[-40:])
        for log in test.server_logs:
            if _tail(log, 3) not in detail:  # not already in the error (a failed start)
                detail += f"\n--- {log} ---\n{_tail(log)}"
        problems.append(f"{name}: {test.status}\n{detail}")
    top = tests.get(TOP)
    if top is None or top.status != "PASS":
        problems.append(f"{TOP}: {top.status if top else 'did not run'}")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        problems.append(f"the suite exited with {proc.returncode}:\n{tail}")
    assert not problems, (f"backend {backend}:\n{report}\n\n" + "\n\n".join(problems)
                          + f"\n\n(whole output: {tmp_path / 'suite.log'})")
