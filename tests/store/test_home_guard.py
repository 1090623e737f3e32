"""A home's backend is never guessed over its layers: with ``lamina.json`` gone, the
layers' layout tells whose they are, another backend is refused, and ``check --repair``
through a wrong backend cannot remove them (issue: ``--backend vfs check --repair``
once removed an overlay store's 3 layers)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lamina
from lamina import errors
from tests import tarbuild as tb
from tests.test_cli import REPO

pytestmark = pytest.mark.root


def _store(home: Path, backend: str) -> None:
    try:
        drv = lamina.open_driver(home, backend=backend)
    except errors.Unsupported as e:
        pytest.skip(f"{backend}: {e}")
    with drv:
        drv.apply_diff("base", None, tb.stream([tb.file("a", b"1")]))
        drv.apply_diff("app", "base", tb.stream([tb.file("b", b"2")]))
        drv.create_rw("ctr", "app")
    (home / "lamina.json").unlink()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--home", str(home), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(("made", "other"), [("overlay", "vfs"), ("vfs", "overlay")])
def test_a_home_without_its_record_keeps_its_backend(tmp_path: Path, made: str,
                                                      other: str) -> None:
    home = tmp_path / "home"
    _store(home, made)
    with pytest.raises(errors.InvalidArgument, match=f"holds {made} layers"):
        lamina.open_driver(home, backend=other)
    assert not (home / "lamina.json").exists()
    for args in (["ls"], ["check", "--repair"]):
        proc = _cli(home, "--backend", other, *args)
        assert proc.returncode == 1, proc
        assert proc.stderr.startswith("lamina: ") and "Traceback" not in proc.stderr
    with lamina.open_driver(home) as drv:  # auto: the layers' own backend, recorded again
        assert drv.name == made
        assert sorted(drv.layers()) == ["app", "base", "ctr"]
    assert json.loads((home / "lamina.json").read_text())["backend"] == made


@pytest.mark.parametrize("content", [b"[]", b"{}", b'{"backend": 5}', b"\xff"])
def test_a_bad_record_is_corrupt(tmp_path: Path, content: bytes) -> None:
    home = tmp_path / "home"
    _store(home, "vfs")
    (home / "lamina.json").write_bytes(content)
    with pytest.raises(errors.Corrupt, match=r"lamina\.json"):
        lamina.open_driver(home, backend="vfs")
    assert (home / "lamina.json").read_bytes() == content  # nothing written over it
    with pytest.raises(errors.Corrupt):
        lamina.open_driver(home, backend="vfs").close()
    assert sorted(p.name for p in (home / "layers").iterdir()) == ["app", "base", "ctr"]


def test_an_empty_home_still_takes_any_backend(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with lamina.open_driver(home, backend="vfs"):
        pass
    (home / "lamina.json").unlink()
    with lamina.open_driver(home, backend="vfs") as drv:
        assert drv.name == "vfs"
    assert io.BytesIO((home / "lamina.json").read_bytes()).read()
