"""containerd 2.x's own snapshotter conformance suite against ``lamina snapshotter`` (§6).

``scripts/build-containerd2-suite.sh`` builds containerd 2.1's
``core/snapshots/testsuite`` in the engines' lab (Debian sid's
golang-github-containerd-containerd-dev, offline) around ``tests/containerd/suite2``,
which starts a fresh ``lamina [--opt …] --home ROOT/home --backend B snapshotter --socket
S`` for each of its subtests and talks to it through containerd 2's proxy client
(``core/snapshots/proxy``), as containerd 2 talks to a proxy plugin.  The binary is
static: it runs on the host, beside the lamina it starts (the lab only builds it).

It runs under lamina's own name once per backend and layer format (vfs, overlay with its
EROFS layers, overlay+dir), and every subtest must pass, with one exception on overlay:
``Rename`` renames a directory of a lower layer, which overlayfs refuses (``EXDEV``)
without ``redirect_dir``, and lamina mounts with ``redirect_dir=off`` (its diffs read a
layer's upper directory as it is, as Docker's overlay2 does).  containerd's suite leaves
that rename out for its own ``overlayfs`` for this very reason; here the subtest must fail
with exactly that error and nothing else (:data:`RENAME_EXDEV`), and then the same
subtest run under the name ``overlayfs`` must pass (the suite's other renames: files
over and out of a lower layer's directory).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import lab
from tests.conftest import LAYER_FORMATS
from tests.containerd.daemon import short_dir, snapshotter_command
from tests.containerd.test_suite import TOP, Subtest, parse
from tests.integration.engine import REPO, unmount_below

pytestmark = [pytest.mark.root, pytest.mark.slow]

BACKENDS = ("vfs", "overlay")
EACH_FORMAT = True
"""overlay runs again with ``overlay.layers=dir`` (``tests.conftest.LAYER_FORMATS``)."""

BUILD = REPO / "scripts" / "build-containerd2-suite.sh"
SUBTESTS = 21
"""How many subtests containerd 2.1.9's ``SnapshotterSuite`` runs."""
AS_OVERLAYFS = "TestRenameAsOverlayfs"
RENAME_EXDEV = re.compile(r"rename \S+/dir1 \S+/dir2: invalid cross-device link")
"""How ``Rename`` fails on overlayfs without ``redirect_dir``: the only failure allowed,
and only on :data:`REDIRECT_DIR_OFF`."""
REDIRECT_DIR_OFF = {"overlay": "a lower layer's directory renamed on overlayfs without "
                               "redirect_dir: EXDEV (containerd's suite exempts its own "
                               "overlayfs for it)"}
"""The backends whose mounts are overlayfs with ``redirect_dir=off``, and why their
``Rename`` fails."""
BUILD_TIMEOUT = 900
RUN_TIMEOUT = 900  # seconds; the run itself takes under a minute when all is well


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def suite2_binary() -> Path:
    """The suite, built in the lab (or found up to date) by
    ``scripts/build-containerd2-suite.sh`` (``VERSION`` beside it: which containerd)."""
    lab.lab_root()  # skips locally (fails in CI) without the lab or root
    proc = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                          env={**os.environ, "LAMINA_LAB": str(lab.location())})
    if proc.returncode != 0:
        pytest.fail(f"{BUILD.name} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


def run_suite(binary: Path, backend: str, options: tuple[str, ...],
              work: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run the suite binary with ``args`` against ``lamina --opt OPTIONS… --backend
    BACKEND snapshotter``; its ``-test.v`` output (also in WORK/suite.log)."""
    logs = work / "logs"
    logs.mkdir(parents=True)
    scratch = short_dir("lcs2-")  # the suite's TMPDIR: short, for the sockets; ours to clean
    command = [*snapshotter_command(), *(a for o in options for a in ("--opt", o))]
    full_env = {
        **os.environ,
        "LAMINA_SNAPSHOTTER_CMD": json.dumps(command),
        "LAMINA_BACKEND": backend,
        "LAMINA_SNAPSHOTTER_CWD": str(REPO),
        "LAMINA_SUITE_LOGDIR": str(logs),
        "TMPDIR": str(scratch),
        **(env or {}),
    }
    argv = [str(binary), "-test.v", "-test.count", "1", "-test.timeout", f"{RUN_TIMEOUT - 60}s",
            *args]
    if parallel := os.environ.get("LAMINA_SUITE_PARALLEL"):
        argv += ["-test.parallel", parallel]
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=RUN_TIMEOUT, env=full_env, cwd=work)
    finally:
        unmount_below(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    (work / "suite.log").write_text(proc.stdout)
    return proc.stdout


def summary(subs: dict[str, Subtest]) -> str:
    """One line a subtest, and the counts (an excused failure is ``XFAIL``)."""
    lines = [f"{t.status:5} {name:32} {t.seconds:7.2f}s" for name, t in sorted(subs.items())]
    counts = {s: sum(t.status == s for t in subs.values())
              for s in ("PASS", "XFAIL", "FAIL", "SKIP", "NONE")}
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
                 + f" of {len(subs)} subtests")
    return "\n".join(lines)


def failure(name: str, test: Subtest) -> str:
    """What a subtest that did not pass said, and the end of its servers' logs."""
    detail = "\n".join(test.output[-40:])
    for log in test.server_logs:
        if _tail(log, 3) not in detail:  # not already in the error (a failed start)
            detail += f"\n--- {log} ---\n{_tail(log)}"
    return f"{name}: {test.status}\n{detail}"


def test_containerd2_snapshotter_suite(suite2_binary: Path, backend: str,
                                       backend_options: tuple[str, ...],
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       ) -> None:
    variant = backend + next((f"+{kind}" for kind, opts in LAYER_FORMATS.get(backend, {}).items()
                              if opts == backend_options), "")
    output = run_suite(suite2_binary, backend, backend_options, tmp_path / "lamina",
                       "-test.run", f"^{TOP}$")
    tests = parse(output)
    subs = {n.removeprefix(TOP + "/"): t for n, t in tests.items() if n.startswith(TOP + "/")}
    header = next((line.strip() for line in output.splitlines()
                   if "containerd snapshotter testsuite" in line), "(no version line)")

    problems = []
    if len(subs) != SUBTESTS:
        problems.append(f"{len(subs)} subtests ran, not {SUBTESTS}")
    excused: dict[str, str] = {}
    for name, test in sorted(subs.items()):
        if test.status == "PASS":
            continue
        reason = REDIRECT_DIR_OFF.get(backend)
        if (name == "Rename" and test.status == "FAIL" and reason
                and any(RENAME_EXDEV.search(line) for line in test.output)):
            excused[name] = reason
            continue
        problems.append(failure(name, test))
    top = tests.get(TOP)
    failed_top = top is None or top.status != "PASS"
    if failed_top and not (excused and top is not None and top.status == "FAIL"):
        problems.append(f"{TOP}: {top.status if top else 'did not run'}")

    for name in excused:
        subs[name].status = "XFAIL"  # shown as such; counted apart
    report = summary(subs)
    if excused:
        # The rest of Rename, under the name containerd's suite exempts from the rename.
        again = parse(run_suite(suite2_binary, backend, backend_options, tmp_path / "as-overlayfs",
                                "-test.run", f"^{AS_OVERLAYFS}$/^Rename$",
                                env={"LAMINA_SUITE_AS_OVERLAYFS": "1"}))
        rename = again.get(f"{AS_OVERLAYFS}/Rename", Subtest(f"{AS_OVERLAYFS}/Rename"))
        if rename.status != "PASS":
            problems.append(failure("Rename as overlayfs (without the directory rename)", rename))
        report += "".join(f"\n{name} failed as expected on {variant}: {why}; run as "
                          f"\"overlayfs\" (without that rename): {rename.status}"
                          for name, why in excused.items())
    built = (suite2_binary.parent / "VERSION").read_text().strip().replace("\n", ", ")
    with capsys.disabled():  # into the test log even when it passes (make test: -q)
        print(f"\ncontainerd 2 snapshotter suite, backend {variant} ({built}):\n"
              f"{header}\n{report}")
    assert not problems, (f"backend {variant}:\n{report}\n\n" + "\n\n".join(problems)
                          + f"\n\n(whole output: {tmp_path}/*/suite.log)")
