"""A pytest plugin for the runs inside the VM (``-p tests.vm.guest_plugin``).

- In the VM the kernel has project quotas: tests/quota's fallback for a kernel without
  them (``kernel_mounts`` false: loop images instead) would pass without testing them,
  so there it is a failure.
- With ``--legacy-mount`` the runner makes lamina take overlay's mount(2) path even
  where the kernel has ``lowerdir+`` (tests/vm/site/sitecustomize.py).
- The summary says which mount path overlay took, the quota filesystems the tests
  mounted, and whether the run had CAP_SYS_RESOURCE.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lamina.host import mount

_mounted: dict[str, bool] = {}

CAP_SYS_RESOURCE = 24


def _has_cap(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def pytest_collection_finish(session: pytest.Session) -> None:
    module: Any = sys.modules.get("tests.quota.test_quota")
    if module is None:
        return
    real: Callable[[str, Path], bool] = module.kernel_mounts

    def kernel_mounts(name: str, tmp: Path) -> bool:
        ok = real(name, tmp)
        _mounted[name] = ok
        if not ok:
            pytest.fail(f"this kernel ({os.uname().release}) should mount {name} with its "
                        "quota options (it has project quotas)")
        return ok

    module.kernel_mounts = kernel_mounts


def pytest_terminal_summary(terminalreporter: Any) -> None:
    api = "lowerdir+" if mount.lowerdir_plus_available() else "mount(2) with lowerdir="
    write = terminalreporter.write_line
    write(f"lamina-vm: kernel {os.uname().release}; overlay mounts through {api}")
    write(f"lamina-vm: CAP_SYS_RESOURCE {'kept' if _has_cap(CAP_SYS_RESOURCE) else 'dropped'}")
    for name, ok in sorted(_mounted.items()):
        write(f"lamina-vm: {name} mounted with its quota options: {ok}")
