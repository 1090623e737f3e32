"""Contract §4, "several processes may use one home at once": a crowd on one store.

Three processes of three threads each (:mod:`tests.crash.worker`) run ~1,100
random operations between them on one home — applies (into the same layers too),
removals, ``get``/``put``, writes into mounted writable layers, ``diff``,
``changes``, stores opened (and so recovered) while the others work.  Then, with
every process paused holding its mounts, the shared mount counts must equal the
sum of each process's gets minus puts, every counted view must be mounted and
nothing else, and ``lamina check`` must find the store consistent; once every
process has put its mounts back, nothing may be mounted and the store must still
check clean.  Synchronization is by pipes (the workers' report lines and the
parent's release line), never by sleeping; a watchdog kills everything after
``DEADLINE`` seconds, which fails the test.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina.backends import check
from tests import tarbuild as tb
from tests.conftest import Stores, mounts_under
from tests.crash.harness import REPO, child_env
from tests.crash.worker import STABLE

pytestmark = pytest.mark.root
EACH_FORMAT = True  # with overlay+dir too (tests/conftest.py)

PROCESSES, THREADS, OPS = 3, 3, 125  # 1,125 operations
DEADLINE = 300.0


def write_tars(where: Path) -> None:
    """The layers the workers apply: small, with whiteouts of the stable layers' files."""
    rng = random.Random(3)
    for i in range(4):
        entries = [tb.directory("etc"), tb.file(f"etc/conf{i}", rng.randbytes(300)),
                   tb.directory(f"d{i}"),
                   *(tb.file(f"d{i}/f{j}", rng.randbytes(700)) for j in range(4)),
                   tb.symlink(f"d{i}/l", "f0"), tb.hardlink(f"d{i}/h", f"d{i}/f1")]
        if i % 2:
            entries.append(tb.whiteout("etc/stable"))
        tb.write(where / f"t{i}.tar", entries)


def counted_views(drv: lamina.Driver, home: Path) -> set[str]:
    """Where the union views of the counted layers are mounted (overlay, with a parent)."""
    store = drv.store  # type: ignore[attr-defined]
    return {str(home / "layers" / id / "merged") for id, n in store.counted().items()
            if n and drv.name == "overlay" and drv.parent(id)}


def test_many_processes_and_threads_on_one_home(stores: Stores, backend: str, home: Path,
                                                tmp_path: Path) -> None:
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tars(tars)
    drv = stores.open()
    drv.apply_diff("base", None, tb.stream([tb.directory("etc"),
                                            tb.file("etc/stable", b"stable\n")]))
    for id in STABLE[1:]:
        drv.apply_diff(id, "base", tb.stream([tb.file(f"etc/{id}", id.encode())]))
    stores.close(drv)

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.crash.worker", str(home), backend, str(w), str(w),
             str(THREADS), str(OPS), str(tars)],
            cwd=REPO, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        for w in range(PROCESSES)
    ]
    watchdog = threading.Timer(DEADLINE, lambda: [p.kill() for p in procs])
    watchdog.start()
    try:
        reports: list[dict[str, Any]] = []
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line, f"a worker died or timed out (rc {p.poll()})"
            reports.append(json.loads(line))
        failures = [f for r in reports for f in r["failures"]]
        assert not failures, "\n".join(failures[:5])
        assert sum(r["ops"] for r in reports) >= 1000

        # Every process paused, holding its mounts: counts are the sum of theirs.
        holds: Counter[str] = Counter()
        for r in reports:
            holds.update(r["holds"])
        drv = stores.open()
        store = drv.store  # type: ignore[attr-defined]
        assert {id: n for id, n in store.counted().items() if n} == dict(holds)
        assert set(mounts_under(home)) == counted_views(drv, home)
        report = check.check(drv)
        assert report.consistent, report.problems
        stores.close(drv)

        for p in procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"release\n")
            p.stdin.flush()
            assert p.stdout.readline() == b"released\n"
        for p in procs:
            assert p.wait() == 0
    finally:
        watchdog.cancel()
        for p in procs:
            p.kill()
            p.wait()

    drv = stores.open()
    store = drv.store  # type: ignore[attr-defined]
    assert store.counted() == {}
    assert mounts_under(home) == []
    report = check.check(drv)
    assert report.consistent, report.problems
    assert os.listdir(home / "staging") == []
    assert not [e for e in os.listdir(home / "layers") if e.endswith("-removing")]
    errors = Counter[str]()
    for r in reports:
        errors.update(r["errors"])
    print(f"\n{sum(r['ops'] for r in reports)} operations; expected errors: {dict(errors)}")
