"""The whole conformance suite again, on vfs opened with ``vfs.copy=copy`` (every layer
a real copy of its parent, no reflinks): the contract suite run against a driver
factory of another suite's making, as :mod:`tests.contract` shows how."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import pytest

import lamina
from tests.conftest import Opener
from tests.contract import DROPPED, contract_tests

BACKENDS = ["vfs"]
globals().update(contract_tests())


@pytest.fixture
def open_store(backend: str) -> Opener:
    """vfs with plain copies; a caller's own options come after ours."""

    def opener(home: Any, **kw: Any) -> lamina.Driver:
        given = kw.pop("options", ())
        if isinstance(given, Mapping):
            given = [f"{k}={v}" for k, v in given.items()]
        options = ["vfs.copy=copy", *given]
        return lamina.open_driver(home, backend=backend, options=options, **kw)

    return functools.partial(opener)


def test_every_backend_runs_the_suite_or_says_why() -> None:
    from lamina.registry import backends

    registered = set(backends(None))
    assert set(DROPPED) <= registered
    assert registered - set(DROPPED) == set(backends()), "a Linux backend is missing"
