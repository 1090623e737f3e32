"""The Windows layer import in the isolated child (``isolate.import_windows_layer``).

That the windowsfilter backend's import runs in the child, not in the caller: the child is
seen from outside while it imports (its own mount namespace, a root of ``layer``,
``lower`` and ``proc`` only, the parent layers as ``/lower/N``, root's capabilities cut
down); an importer patched in the caller is not the one that runs; and an importer with a
bug (it follows the layer's symlinks), run on a hostile tar, writes through a symlink into
the host inline but finds nothing of the host in the child.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina import errors
from lamina.archive import isolate, wclayer
from lamina.host import jail, mount
from tests.security.test_isolation import _children
from tests.windows.test_windowsfilter import ATTR_DIR, _export, _tar, _win, base_layer, child_layer

pytestmark = pytest.mark.root


@pytest.fixture
def drv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[lamina.Driver]:
    monkeypatch.delenv(isolate.NOREEXEC, raising=False)
    with lamina.open_driver(tmp_path / "home", backend="windowsfilter") as d:
        yield d
        d.cleanup()
    assert mount.mounted_below(str(tmp_path / "home")) == []


class Watched:
    """A tar that, once the caller has sent the child its first MiB, looks at the importing
    child from outside (until it shows its import under way, or 10 s), then gives the rest.

    (The caller reads it through the decompressor's 1 MiB buffer: a read that starts past
    2 MiB comes after the first block went to the child.)"""

    AFTER = 2 << 20

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.seen: dict[str, Any] | None = None

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.AFTER and self.seen is None:
            self.seen = self._look()
        out = self.data[self.pos : self.pos + n if n >= 0 else len(self.data)]
        self.pos += len(out)
        return out

    def _look(self) -> dict[str, Any]:
        server = isolate._fork_server().proc.pid
        deadline = time.monotonic() + 10
        seen: dict[str, Any] = {}
        while time.monotonic() < deadline:
            for child in _children(server):
                try:
                    root = f"/proc/{child}/root"
                    seen = {
                        "pid": child,
                        "mnt_ns": os.readlink(f"/proc/{child}/ns/mnt"),
                        "root": sorted(os.listdir(root)),
                        "lower": sorted(os.listdir(f"{root}/lower")),
                        "lower0": sorted(os.listdir(f"{root}/lower/0")),
                        "files": sorted(os.listdir(f"{root}/layer/Files")),
                        "cap_eff": _cap_eff(child),
                    }
                except OSError:
                    continue
                if "big.bin" in seen["files"]:  # the import is under way, in this child
                    return seen
            time.sleep(0.005)
        return seen


def _cap_eff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def test_the_import_runs_in_the_child(drv: lamina.Driver) -> None:
    drv.apply_diff("base", None, io.BytesIO(base_layer()))
    # The suite's child layer, then a file big enough to hold the import while it is seen.
    members = [*_child_members(), _win("Files/big.bin", data=os.urandom(6 << 20))]
    data = _tar(members)
    stream = Watched(data)
    drv.apply_diff("child", "base", stream)  # type: ignore[arg-type]
    seen = stream.seen
    assert seen, "no child of the fork server imported the layer"
    assert seen["pid"] != os.getpid()
    assert seen["mnt_ns"] != os.readlink("/proc/self/ns/mnt")
    assert seen["root"] == ["layer", "lower", "proc"]
    assert seen["lower"] == ["0"]  # the parent layer, read-only
    assert {"Files", "Hives", "UtilityVM", "tar-split.jsonl"} <= set(seen["lower0"])
    assert {"old.txt", "a.txt", "big.bin"} <= set(seen["files"])  # its tombstone and files
    kept = sum(1 << cap for cap in jail.KEPT_CAPABILITIES) & jail.capabilities(permitted=True)
    assert seen["cap_eff"] == kept
    assert _export(drv, "child") == data
    assert isolate.last_child_usage() is not None


def _child_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(child_layer())) as tf:
        return [(m, tf.extractfile(m).read() if m.isreg() else b"")  # type: ignore[union-attr]
                for m in tf.getmembers()]


def test_the_callers_importer_is_not_the_one_that_runs(
    drv: lamina.Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: wclayer.WindowsImporter, stream: Any) -> int:
        raise AssertionError("the Windows importer ran in the caller")

    monkeypatch.setattr(wclayer.WindowsImporter, "apply", refuse)
    drv.apply_diff("base", None, io.BytesIO(base_layer()))
    drv.apply_diff("child", "base", io.BytesIO(child_layer()))
    assert _export(drv, "child") == child_layer()
    monkeypatch.setenv(isolate.NOREEXEC, "1")
    with pytest.raises(AssertionError, match="ran in the caller"):
        drv.apply_diff("inline", None, io.BytesIO(base_layer()))
    assert isolate.last_child_usage() is None


# An importer with a bug: it makes and opens a member's directories by path, following
# whatever symlinks the layer has put there.
BUGGY = """
import os
from lamina.archive import wclayer

def _parent(self, root_fd, parts, name):
    path = os.path.join(str(self.root), *parts)
    if not os.path.isdir(path):
        os.makedirs(path)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

wclayer.WindowsImporter._parent = _parent
"""


def _hostile(target: str) -> bytes:
    return _tar([
        _win("Files", kind=tarfile.DIRTYPE, attrs=ATTR_DIR),
        _win("Files/escape", kind=tarfile.SYMTYPE, link=target),
        _win("Files/escape/pwned.txt", data=b"pwned"),
        _win("Files/escape/sub/pwned.txt", data=b"pwned"),
    ])


@pytest.mark.parametrize("how", ["absolute", "dot-dot"])
@pytest.mark.parametrize("mode", ["child", "inline"])
def test_a_buggy_importer_finds_nothing_of_the_host(
    drv: lamina.Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, mode: str
) -> None:
    """The jail is the second wall, as for Linux layers: with the importer's own checks
    broken (it follows symlinks), a tar's symlink to the host leads the inline import out
    of the layer, and the child's import nowhere."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(outside) if how == "absolute" else "../" * 40 + str(outside).lstrip("/")
    if mode == "inline":
        monkeypatch.setenv(isolate.NOREEXEC, "1")
        namespace: dict[str, Any] = {}
        exec(BUGGY.replace("wclayer.WindowsImporter._parent = _parent", ""), namespace)
        monkeypatch.setattr(wclayer.WindowsImporter, "_parent", namespace["_parent"])
    else:
        isolate.shutdown()
        monkeypatch.setattr(isolate, "_BOOT", isolate._BOOT.replace(
            "from lamina.archive.forkserver import serve;",
            f"exec({BUGGY!r}); from lamina.archive.forkserver import serve;"))
    try:
        try:
            drv.apply_diff("hostile", None, io.BytesIO(_hostile(target)))
        except errors.LaminaError as e:
            refused: str | None = str(e)
        else:
            refused = None
    finally:
        if mode == "child":
            isolate.shutdown()  # the next test's fork server has the real importer
    escaped = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    if mode == "inline":
        assert escaped == ["pwned.txt", "sub", "sub/pwned.txt"], "the bug is not one"
        assert refused is None
    else:
        assert escaped == [], f"the child wrote into the host: {escaped}"
        assert refused is not None and "cannot import entry" in refused
        assert not drv.exists("hostile")
