"""The long crash run, outside CI: thousands of kills at random points and instants.

    LAMINA_TORTURE_KILLS=2000 .venv/bin/python -m pytest tests/crash -k long -s

splits the kills evenly over the backends.  Each kill picks an operation of
:mod:`tests.crash.child` at random, then either one of its crash points with a
random N (any N of the per-entry points) or a random instant within its
duration, and judges the store as :mod:`tests.crash.test_kills` does.  Every
inconsistency is collected (the run goes on) and the test fails at the end if
there was any.  ``LAMINA_TORTURE_REPORT=FILE`` writes the running tally there
as JSON every 50 kills and at the end; ``LAMINA_TORTURE_SEED`` picks the seed.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import pytest

from lamina.registry import backends
from tests.crash import child
from tests.crash.harness import Torture

pytestmark = pytest.mark.root

KILLS = int(os.environ.get("LAMINA_TORTURE_KILLS", "0"))


def write_report(path: str, backend: str, torture: Torture, started: float) -> None:
    """The tally of ``backend`` so far into the JSON file at ``path`` (one key a backend)."""
    file = Path(path)
    data = json.loads(file.read_text()) if file.exists() else {}
    t = torture.tally
    data[backend] = {
        "kills": t.kills, "at_points": t.at_points, "in_helper": t.in_helper,
        "at_random": t.at_random, "random_mid_op": t.random_mid_op,
        "inconsistencies": len(t.problems), "problems": t.problems[:50],
        "by_op": dict(t.by_op), "seconds": round(time.monotonic() - started),
    }
    file.write_text(json.dumps(data, indent=1, sort_keys=True))


@pytest.mark.skipif(not KILLS, reason="the long run: set LAMINA_TORTURE_KILLS (e.g. 2000)")
def test_long_run(torture: Torture, backend: str) -> None:
    target = math.ceil(KILLS / len(backends()))
    rng = random.Random(f"{os.environ.get('LAMINA_TORTURE_SEED', '0')}-{backend}")
    ops = sorted(child.OPS)
    points = {op: torture.points(op, every=True) for op in ops}
    report = os.environ.get("LAMINA_TORTURE_REPORT")
    started = time.monotonic()
    reported = 0
    while torture.tally.kills < target:
        op = rng.choice(ops)
        if rng.random() < 0.5:
            torture.kill_at(op, rng.choice(points[op]))
        else:
            torture.kill_after(op, torture.random_delay(op))
        if report and torture.tally.kills - reported >= 50:
            reported = torture.tally.kills
            write_report(report, backend, torture, started)
    if report:
        write_report(report, backend, torture, started)
    t = torture.tally
    print(f"\n{backend}: {t.kills} kills ({t.at_points} at crash points, {t.in_helper} of them "
          f"in the apply helper; {t.at_random} at random instants, {t.random_mid_op} mid-op) "
          f"in {time.monotonic() - started:.0f} s: {len(t.problems)} inconsistencies")
    assert not t.problems, "\n".join(t.problems[:20])
