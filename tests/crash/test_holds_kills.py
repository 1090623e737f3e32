"""Issue 23's D1 under SIGKILL: an image whose layers containerd's snapshots adopted,
removed, loaded again, then the snapshots removed — killed at every crash point each
step reaches (the first and the last time).

After each kill the home is opened again (``image ls`` sweeps, a snapshotter recovers)
and every image ``image ls`` names must be whole: all its layers there and its tree
mountable (``lamina check``, which sees an image whose layers are gone, exits 0).
Never named and empty.  Then the killed step runs again, as its caller would, and the
rest of the sequence to its end, and the image is whole there too: the snapshots'
going never takes the layers of a loaded image.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.image import build
from tests.image.build import APP, BASE

pytestmark = pytest.mark.root

BACKENDS = ["overlay"]
IMG = build.image(BASE, APP, tag="test/app:1")
STEPS = ["rm", "load", "unsnap"]


def step(home: Path, name: str, archive: Path, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tests.crash.holds_child", str(home), name, str(archive)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=False)


def lamina(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def judge(home: Path, archive: Path, where: str) -> None:
    """Every image named is whole; a snapshotter opens the home and recovers it."""
    ok = step(home, "recover", archive)
    assert ok.returncode == 0, (where, ok.stderr[-2000:])
    images = json.loads(lamina(home, "--json", "image", "ls").stdout)["images"]
    for img in images:
        mounted = lamina(home, "image", "mount", img["name"])
        assert mounted.returncode == 0, f"{where}: {img['name']} named, not whole: {mounted.stderr}"
        assert (Path(mounted.stdout.strip()) / "app/main.py").is_file()
        assert lamina(home, "image", "unmount", img["name"]).returncode == 0
    checked = lamina(home, "check")
    assert checked.returncode == 0, (where, checked.stdout + checked.stderr)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A home with the image loaded and adopted by the snapshots, and its archive."""
    root = tmp_path_factory.mktemp("holds")
    archive = root / "app.tar"
    archive.write_bytes(build.docker_save([IMG]))
    home = root / "home"
    assert lamina(home, "--backend", "overlay", "image", "load", str(archive)).returncode == 0
    (home / "chains.txt").write_text(" ".join(build.sha(layer) for layer in IMG.layers))
    assert step(home, "adopt", archive).returncode == 0
    return home, archive


def copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # whiteouts, xattrs


def survey(baseline: tuple[Path, Path], tmp_path: Path, upto: int) -> dict[str, int]:
    """The crash points step ``STEPS[upto]`` reaches, and how often."""
    home = tmp_path / "survey"
    copy(baseline[0], home)
    for name in STEPS[:upto]:
        assert step(home, name, baseline[1]).returncode == 0
    log = tmp_path / "points.log"
    assert step(home, STEPS[upto], baseline[1],
                {"LAMINA_CRASH_LOG": str(log)}).returncode == 0
    names = log.read_text().split()
    return {p: names.count(p) for p in sorted(set(names))}


@pytest.mark.parametrize("upto", range(len(STEPS)), ids=STEPS)
def test_sequence_killed_at_every_point(baseline: tuple[Path, Path], tmp_path: Path,
                                        upto: int) -> None:
    points = survey(baseline, tmp_path, upto)
    assert points, "the step reaches no crash point"
    kills = 0
    for point, times in points.items():
        for count in sorted({1, times}):
            home = tmp_path / f"{point}-{count}".replace(":", "_")
            copy(baseline[0], home)
            for name in STEPS[:upto]:
                assert step(home, name, baseline[1]).returncode == 0
            proc = step(home, STEPS[upto], baseline[1], {"LAMINA_CRASH_AT": f"{point}:{count}"})
            assert proc.returncode == -signal.SIGKILL, (point, count, proc.stderr)
            kills += 1
            judge(home, baseline[1], f"killed at {point}:{count}")
            for name in STEPS[upto:]:  # the killed step again (as its caller would), the rest
                done = step(home, name, baseline[1])
                assert done.returncode == 0, (point, name, done.stderr)
            judge(home, baseline[1], f"after a kill at {point}:{count}")
            images = json.loads(lamina(home, "--json", "image", "ls").stdout)["images"]
            assert [i["name"] for i in images] == ["docker.io/test/app:1"], images
            lamina(home, "cleanup")
    print(f"\n{STEPS[upto]}: {kills} kills at {len(points)} points")
