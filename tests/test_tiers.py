"""The package's import structure: what importing a module brings in.

Importing one backend module registers that one backend, and nothing else does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> object:
    """What ``code`` prints as JSON, run in a fresh interpreter (nothing imported yet)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def test_importing_one_backend_registers_that_one() -> None:
    for name in ("overlay", "vfs", "windowsfilter"):
        seen = _fresh(
            f"import json, sys, lamina.backends.{name}\n"
            "from lamina import registry\n"
            "print(json.dumps([sorted(registry._backends),\n"
            "    sorted(m for m in sys.modules if m in registry.BUILTIN_BACKENDS)]))")
        assert seen == [[name], [f"lamina.backends.{name}"]]


def test_the_registry_loads_every_builtin_backend() -> None:
    seen = _fresh("import json, lamina\nprint(json.dumps(lamina.registry.backends(None)))")
    assert seen == ["overlay", "vfs", "windowsfilter"]
