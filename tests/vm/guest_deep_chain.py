"""Run inside the VM only (``tests/vm/runner.py``'s ``overlay`` suite; not a ``test_``
module, so the host's suite does not collect it).

overlay's deepest chain, made cheaply: ``MAX_DEPTH`` layers by ``create`` (one applied
file at the bottom), a writable layer on top; its union view mounts with all of them as
lowers and the bottom layer's file shows through.  tests/backends' deep-chain test does
the same with 500 applies, which take minutes under TCG.  On a kernel without
``lowerdir+`` this is the legacy path's page of mount options.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import lamina
from lamina.backends.overlay import max_depth
from lamina.host import mount
from tests import tarbuild as tb

pytestmark = pytest.mark.root


def test_overlay_deepest_chain_mounts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with lamina.open_driver(home, backend="overlay") as drv:
        drv.apply_diff("l0", None, io.BytesIO(tb.build([tb.file("bottom", b"l0\n")])))
        for i in range(1, max_depth()):
            drv.create(f"l{i}", f"l{i - 1}")
        drv.create_rw("ctr", f"l{max_depth() - 1}")
        root = drv.get("ctr")
        try:
            assert (root / "bottom").read_text() == "l0\n"
            (root / "top").write_text("x")
        finally:
            drv.put("ctr")
        assert [c.path for c in drv.changes("ctr")] == ["/top"]
        drv.cleanup()
    # l0's own EROFS image stays mounted while l0 exists (where the kernel mounts them).
    assert [p for p in mount.mounted_below(str(home))
            if not (Path(p).parent / "layer.erofs").is_file()] == []
