"""Fixtures of the security suites.

- ``isolation``: ``"child"`` (the directory applier in the isolated child of
  :mod:`lamina.archive.isolate`), ``"inline"`` (``LAMINA_NOREEXEC=1``) or, on overlay,
  ``"index"`` (overlay's default EROFS layers: the tar indexed in the calling process,
  nothing extracted; the kernel's EROFS is then what a hostile tar meets); a module asks
  for it with ``pytestmark = pytest.mark.usefixtures("isolation")``.  It checks afterwards
  that the mode it names is the one that ran: with ``"child"`` every apply went through
  the child, with ``"inline"`` none did, with ``"index"`` the stores make EROFS layers
  (what the indexer finds Unsupported, a sparse member, still goes to the applier),
  each of which ``fsck.erofs`` (erofs-utils 1.9, in the lab) reads at the test's end.
  Outside ``"index"``, the suites' overlay stores keep directory layers
  (``overlay.layers=dir``), so that the applier is what they test.
- ``outside`` and ``guard`` (a base layer, then a :class:`~tests.archive.test_hostile.Guard`
  over everything beside the home), from ``tests/archive/test_hostile.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina.archive import isolate
from lamina.backends import erofslayers
from tests.archive.test_hostile import guard, outside
from tests.conftest import DIR_LAYERS, Opener, open_with
from tests.erofsimages import keeping

__all__ = ["guard", "isolation", "open_store", "outside"]

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``"index"`` is overlay's alone: deselected on the other backends."""
    here = Path(__file__).parent
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        if (spec is not None and item.path.is_relative_to(here)
                and spec.params.get("isolation") == "index"
                and spec.params.get("backend") not in DIR_LAYERS):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def open_store(backend: str, backend_options: tuple[str, ...],
               request: pytest.FixtureRequest) -> Opener:
    """The stores of the suites: directory layers, but in ``"index"`` mode."""
    index = ("isolation" in request.fixturenames
             and request.getfixturevalue("isolation") == "index")
    extra = backend_options if index else (*backend_options, *DIR_LAYERS.get(backend, ()))
    opener: Opener = functools.partial(open_with, backend=backend, extra=extra)
    if not index:
        return opener
    # Every image the test's stores write is read by fsck.erofs at its end (in the lab).
    request.getfixturevalue("erofs_fsck")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(erofslayers, "index_tar", keeping(erofslayers.index_tar))

    def open_checked(*args: Any, **kw: Any) -> lamina.Driver:
        drv = opener(*args, **kw)
        assert dict(drv.status())["Layer Format"] == "erofs", drv.status()
        return drv

    return open_checked


class Counter:
    """Counts the applies that went through the isolated child."""

    def __init__(self) -> None:
        self.children = 0


@pytest.fixture(params=["child", "inline", "index"])
def isolation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The apply mode of the test (see the module docstring)."""
    counter = Counter()
    real = isolate._Run.run

    def counted(self: isolate._Run, tar: Any) -> dict[str, Any]:
        if self.spec["action"] == "apply":
            counter.children += 1
        return real(self, tar)

    monkeypatch.setattr(isolate._Run, "run", counted)
    if request.param == "inline":
        monkeypatch.setenv(isolate.NOREEXEC, "1")
    else:
        monkeypatch.delenv(isolate.NOREEXEC, raising=False)
    yield request.param
    if request.param == "inline":
        assert counter.children == 0, "an inline test applied in the child"
    elif request.param == "child":
        assert counter.children > 0, "no apply went through the isolated child"
