"""The crash suites' fixture: one :class:`~tests.crash.harness.Torture` per backend."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lamina import errors
from tests.conftest import lacking, mounts_under
from tests.crash.harness import TOTAL, Torture


@pytest.fixture(scope="module")
def torture(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Torture]:
    """A home with the baseline layers for ``backend``; nothing may stay mounted after."""
    workdir = tmp_path_factory.mktemp(f"torture-{backend}")
    seed = int(os.environ.get("LAMINA_TORTURE_SEED", "0"))
    try:
        t = Torture(backend, workdir, seed=seed)
    except errors.Unsupported as e:
        lacking(f"backend {backend} cannot work here: {e}")
    yield t
    with t.opened() as drv:
        drv.cleanup()
    assert mounts_under(workdir) == [], "the torture home kept mounts"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TOTAL.kills:
        terminalreporter.write_line(
            f"crash harness: {TOTAL.kills} kills ({TOTAL.at_points} at crash points, "
            f"{TOTAL.in_helper} of them in the isolated apply's helper, "
            f"{TOTAL.at_random} at random instants, {TOTAL.random_mid_op} of them mid-op), "
            f"{len(TOTAL.problems)} inconsistencies"
        )


