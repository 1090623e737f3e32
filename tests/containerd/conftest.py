"""Fixtures for the containerd front end's tests (contract §6).

- ``snapshotter``: a ``lamina snapshotter`` (:class:`~tests.containerd.daemon.Snapshotter`)
  on a fresh home with ``backend``, started, for the module; stopped at the end.
- ``containerd``: a private ``containerd`` (:class:`~tests.containerd.daemon.Containerd`)
  that has that snapshotter as its proxy plugin ``lamina``, started, for the module.

Both need root and Debian's containerd and runc: locally they skip without them, in CI
(``CI=true``) they fail (``tests.conftest.lacking``).  Whatever a module leaves (containers'
shims, mounts, the stores) is killed, unmounted and removed at its end.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import lacking, require_root
from tests.containerd.daemon import Containerd, Snapshotter, containerd_missing
from tests.integration.engine import unmount_below

PLUGIN = "lamina"
"""The proxy plugin's name in containerd's config: ``ctr --snapshotter lamina``."""


@pytest.fixture(scope="module")
def containerd_work(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for the module's (and backend's) stores and logs; removed at the end."""
    require_root()
    work = tmp_path_factory.mktemp(f"containerd-{backend}")
    yield work
    unmount_below(work)
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def containerd_tools() -> None:
    """Lacking (skip, or fail in CI) without containerd, ctr, runc and the runc shim."""
    if (missing := containerd_missing()) is not None:
        lacking(missing)


@pytest.fixture(scope="module")
def snapshotter(backend: str, containerd_work: Path) -> Iterator[Snapshotter]:
    """``lamina --home WORK/home --backend BACKEND snapshotter``, running."""
    sn = Snapshotter(containerd_work / "home", containerd_work / "snapshotter.log",
                     backend=backend)
    try:
        sn.start()
        yield sn
    finally:
        sn.close()


@pytest.fixture(scope="module")
def containerd(containerd_tools: None, snapshotter: Snapshotter,
               containerd_work: Path) -> Iterator[Containerd]:
    """A ``containerd`` with ``snapshotter`` as the proxy plugin ``lamina``, running."""
    daemon = Containerd(containerd_work / "containerd", {PLUGIN: snapshotter.socket})
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()
