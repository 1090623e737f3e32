"""Image loads at once, as the rest of the store: two loads of images that share a base
layer apply it once between them, and a removal (which sweeps) spares what a load makes
(since issue 23 it does not wait for the load: the sweep is left to a later command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tarbuild as tb
from tests.image import build

pytestmark = pytest.mark.root

BIG_BASE = [*build.BASE, *(tb.file(f"usr/share/{i}", os.urandom(8192)) for i in range(1500))]


def start(home: Path, backend: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lamina", "--home", str(home), "--backend",
                             backend, "--json", "image", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    doc: dict[str, object] = json.loads(out)
    return doc


def test_two_loads_sharing_a_base_apply_it_once(backend: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    a = build.image(BIG_BASE, build.APP, tag="test/a:1")
    b = build.image(BIG_BASE, [tb.file("b", b"b")], tag="test/b:1")
    for name, img in (("a", a), ("b", b)):
        (tmp_path / f"{name}.tar").write_bytes(build.docker_save([img]))
    for round in range(3):
        procs = [start(home, backend, "load", str(tmp_path / f"{n}.tar")) for n in "ab"]
        docs = [finish(p) for p in procs]
        applied = sum(int(d["layers_applied"]) for d in docs)  # type: ignore[call-overload]
        reused = sum(int(d["layers_reused"]) for d in docs)  # type: ignore[call-overload]
        assert (applied, reused) == ((3, 1) if round == 0 else (0, 4))
        listed = finish(start(home, backend, "ls"))
        assert sorted(i["name"] for i in listed["images"]) == [  # type: ignore[attr-defined]
            "docker.io/test/a:1", "docker.io/test/b:1"]
    layers = json.loads(subprocess.run(
        [sys.executable, "-m", "lamina", "--home", str(home), "--json", "ls"],
        capture_output=True, text=True, check=True).stdout)["layers"]
    assert len(layers) == 3


def test_removal_spares_a_running_load(backend: str, tmp_path: Path) -> None:
    """``image rm`` sweeps unreferenced blobs and layers; a load running meanwhile has
    blobs and layers no name reaches yet, which the sweep must not take (the removal
    leaves the sweep to a later command rather than wait)."""
    home = tmp_path / "home"
    old = build.image(build.BASE, tag="test/old:1")
    new = build.image(BIG_BASE, build.APP, tag="test/new:1")
    (tmp_path / "old.tar").write_bytes(build.docker_save([old]))
    (tmp_path / "new.tar").write_bytes(build.docker_save([new]))
    finish(start(home, backend, "load", str(tmp_path / "old.tar")))
    loading = start(home, backend, "load", str(tmp_path / "new.tar"))
    removing = start(home, backend, "rm", "test/old:1")
    finish(removing)
    finish(loading)
    listed = finish(start(home, backend, "ls"))
    assert [i["name"] for i in listed["images"]] == ["docker.io/test/new:1"]  # type: ignore[index]
    root = Path(subprocess.run(
        [sys.executable, "-m", "lamina", "--home", str(home), "image", "mount", "test/new:1"],
        capture_output=True, text=True, check=True).stdout.strip())
    try:
        assert (root / "app/main.py").exists() and len(os.listdir(root / "usr/share")) == 1500
    finally:
        subprocess.run([sys.executable, "-m", "lamina", "--home", str(home), "image",
                        "unmount", "test/new:1"], check=True)
