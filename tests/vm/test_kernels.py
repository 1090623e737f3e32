"""lamina on the kernels users run: Debian bookworm's 6.1 and bookworm-backports' 6.12.

Each kernel is fetched (``apt-get download``), booted under qemu and runs, inside, the
project-quota tests on xfs and ext4 and the overlay backend's tests (see
:mod:`tests.vm.runner`).  A store on each scratch filesystem must name project quotas
in ``status``; every suite must pass with at least one test run.  What ran is printed
(``lamina status`` of both stores, each suite's summary and time), passing or not.

Missing tools (scripts/bootstrap.sh installs them) or an unreachable package registry
skip outside CI and fail in it.  ``LAMINA_VM=off`` skips these tests outside CI.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from tests.conftest import in_ci, lacking
from tests.vm import runner

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Future[runner.Run]]]:
    """Both kernels, booted at once (one TCG thread each) when the first test asks."""
    started = runner.run_kernels(list(runner.KERNELS))
    yield started
    for future in started.values():
        future.cancel()


@pytest.mark.parametrize("series", list(runner.KERNELS))
def test_kernel(series: str, request: pytest.FixtureRequest,
                capsys: pytest.CaptureFixture[str]) -> None:
    if os.environ.get("LAMINA_VM") == "off" and not in_ci():
        pytest.skip("LAMINA_VM=off")
    if missing := runner.missing_tools():
        lacking(f"the VM runner needs {', '.join(missing)} (scripts/bootstrap.sh)")
    runs: dict[str, Future[runner.Run]] = request.getfixturevalue("runs")
    try:
        run = runs[series].result()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        lacking(f"cannot get or boot Debian's {series} kernel: {e}")
    lines = runner.report(run)
    problems = run.problems(runner.DEFAULT_SUITES)
    with capsys.disabled():
        print("\n" + "\n".join(f"vm: {line}" for line in lines), flush=True)
    if problems:
        tail = "\n".join(f"  {p}" for p in problems)
        pytest.fail(f"Debian's {series} kernel ({run.release or run.package}), "
                    f"console log {run.log}:\n{tail}")
