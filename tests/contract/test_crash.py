"""Conformance, part 5: an ``apply_diff`` killed with SIGKILL (contract §4), on every backend.

A child process applies a tar that it reads from a pipe; the test writes part of the
tar and kills the child, which is then at an unknown point inside the apply.  No
sleeps: a pipe write returns only once the child has read all but a pipe buffer of it.
Opened again, the store must show the state before the apply or the state after it,
never a half layer, and keep no orphan directory or mount.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tarbuild as tb
from tests.conftest import Stores, mounts_under
from tests.layers import apply, listing, names, read

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]

APPLIER = """
import sys, lamina
drv = lamina.open_driver(sys.argv[1], backend=sys.argv[2])
print("ready", flush=True)
drv.apply_diff("victim", "base", sys.stdin.buffer)
print("done", flush=True)
"""

PROBE = """
import json, sys, lamina
drv = lamina.open_driver(sys.argv[1], backend=sys.argv[2])
print(json.dumps({"exists": drv.exists("victim"), "layers": sorted(drv.layers())}))
drv.close()
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def big_layer() -> tuple[list[tb.Entry], bytes]:
    rng = random.Random(7)
    entries = [tb.directory("data")]
    entries += [tb.file(f"data/f{i:03d}", rng.randbytes(256 * 1024)) for i in range(48)]
    entries += [tb.symlink("data/link", "f000"), tb.hardlink("data/hard", "data/f001")]
    return entries, tb.build(entries)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 1.0])
def test_apply_killed_midway_is_all_or_nothing(
    stores: Stores, backend: str, home: Path, fraction: float
) -> None:
    drv = stores.open()
    apply(drv, "base", None, [tb.file("base-file", b"base")])
    stores.close(drv)
    before = listing(home)
    entries, data = big_layer()

    child = subprocess.Popen(
        [sys.executable, "-c", APPLIER, str(home), backend],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == b"ready\n"
        child.stdin.write(data[: int(len(data) * fraction)])
        child.stdin.flush()
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()

    # Opened again in a process of its own, with a time limit: a stale lock must not hang it.
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(home), backend],
        capture_output=True,
        env=child_env(),
        timeout=120,
        check=True,
    )
    seen = json.loads(probe.stdout)
    drv = stores.open()
    assert drv.exists("victim") == seen["exists"]
    want = {"/base-file", "/data"} | {"/" + e.name for e in entries}
    if drv.exists("victim"):
        # it finished: then it is whole
        assert names(drv, "victim") == want
        assert read(drv, "victim", "data/f047") == entries[48].data
    else:
        assert "victim" not in set(drv.layers())
        left = {p for p in listing(home) - before if "lock" not in p.lower()}
        assert not left, f"an interrupted apply left {sorted(left)[:10]}"
    assert mounts_under(home) == []
    # and the id can be used again
    if drv.exists("victim"):
        drv.remove("victim")
    drv.apply_diff("victim", "base", tb.stream(entries))
    assert names(drv, "victim") == want
