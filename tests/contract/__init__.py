"""The conformance suite: what every backend of lamina's contract must do (contract §1,
§2, §4), as containerd's ``testsuite.SnapshotterSuite`` and moby's graphtest are for
theirs.

Every module here runs against each registered Linux backend (``backend`` is
parametrized in ``tests/conftest.py``).  Another suite runs the whole of it against a
driver of its own making with :func:`contract_tests`::

    from tests.contract import contract_tests

    BACKENDS = ["vfs"]                      # the backends it runs on (default: all)
    globals().update(contract_tests())      # every contract test and its fixtures

    @pytest.fixture
    def open_store(backend):                # how a store is opened: home, **kw -> Driver
        return functools.partial(my_open_driver, backend=backend)

:data:`DROPPED` names the registered backends that do not run the suite, and why.
"""

from __future__ import annotations

import importlib
from typing import Any

MODULES = ("test_apply", "test_changes", "test_crash", "test_diff", "test_lifecycle",
           "test_streaming")
"""The suite's modules, in ``tests/contract/``."""

DROPPED = {
    "windowsfilter": "it stores Windows container layers (Files/, Hives/, tombstones): "
                     "their tars, union and changes follow hcsshim's rules, not the Linux "
                     "layer semantics of contract §2, and it has no writable layers on "
                     "Linux; tests/windows/ is its suite",
}
"""Registered backends that do not run the conformance suite, with the reason."""


def contract_tests() -> dict[str, Any]:
    """Every test and fixture of the suite, by name, to put into a test module's globals."""
    out: dict[str, Any] = {}
    for name in MODULES:
        module = importlib.import_module(f"tests.contract.{name}")
        for attr, value in vars(module).items():
            if attr.startswith("test_") or attr.startswith("Test") or _is_fixture(value):
                out[attr] = value
    return out


def _is_fixture(value: object) -> bool:
    # pytest marks a fixture function with this attribute (FixtureFunctionDefinition).
    return type(value).__name__ == "FixtureFunctionDefinition" or hasattr(
        value, "_pytestfixturefunction")
