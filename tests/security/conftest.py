"""Fixtures of the security suites.

- ``isolation``: ``"child"`` (lamina's default: the apply runs in the isolated child of
  :mod:`lamina.archive.isolate`) or ``"inline"`` (``LAMINA_NOREEXEC=1``); a module asks for
  it with ``pytestmark = pytest.mark.usefixtures("isolation")``.  It checks afterwards that
  the mode it names is the one that ran: with ``"child"`` every apply went through the
  child, with ``"inline"`` none did.
- ``outside`` and ``guard`` (a base layer, then a :class:`~tests.archive.test_hostile.Guard`
  over everything beside the home), from ``tests/archive/test_hostile.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lamina.archive import isolate
from tests.archive.test_hostile import guard, outside

__all__ = ["guard", "isolation", "outside"]


class Counter:
    """Counts the applies that went through the isolated child."""

    def __init__(self) -> None:
        self.children = 0


@pytest.fixture(params=["child", "inline"])
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
    else:
        assert counter.children > 0, "no apply went through the isolated child"
