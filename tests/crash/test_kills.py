"""Contract §4 under SIGKILL: every operation killed at every crash point and at random.

For each operation of :mod:`tests.crash.child` (``apply_diff`` of a new layer and
into an existing one, ``create``, ``create_rw``, ``remove`` of an idle and of a
mounted layer, ``get``/``put``, ``diff`` against its own parent and against
another layer) the harness first runs it uninterrupted — which gives the crash
points it reaches and the reference of what it leaves — then kills it at every
one of those points (at several N — first, second, middle, last two, one at
random — for the points reached once per tar entry) and at random instants
within its duration.  After each kill the store is opened
again and judged (:meth:`tests.crash.harness.Torture.judge`).  Both backends;
about 230 kills (the summary line counts them), two to three minutes.
"""

from __future__ import annotations

import os

import pytest

from tests.crash import child
from tests.crash.harness import UNREACHED, Torture, all_points

pytestmark = pytest.mark.root

BACKENDS = ["overlay", "overlay+dir", "vfs"]
"""overlay with its EROFS layers (its default here) and with directory layers."""

RANDOM_KILLS = int(os.environ.get("LAMINA_TORTURE_RANDOM", "4"))
"""Random-instant kills per operation and backend."""


@pytest.mark.parametrize("op", sorted(child.OPS))
def test_killed_at_every_crash_point(torture: Torture, op: str) -> None:
    points = torture.points(op)
    assert points, f"{op} reaches no crash point"
    problems = [p for target in points for p in torture.kill_at(op, target)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("op", sorted(child.OPS))
def test_killed_at_random_instants(torture: Torture, op: str) -> None:
    problems = [p for _ in range(RANDOM_KILLS)
                for p in torture.kill_after(op, torture.random_delay(op))]
    assert not problems, "\n".join(problems)


def test_every_crash_point_is_reached(torture: Torture, backend: str) -> None:
    reached = {name for op in child.OPS for name in torture.survey(op).reached}
    assert all_points() - reached == UNREACHED[backend]


def test_enough_kills(torture: Torture) -> None:
    # Last in the module: with every operation run, at least 100 kills per backend.
    if set(torture.tally.by_op) != set(child.OPS):
        pytest.skip("counts only when every operation above has run (no -k)")
    assert torture.tally.kills >= 100, torture.tally.by_op
