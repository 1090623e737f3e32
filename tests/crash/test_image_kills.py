"""``lamina image load`` killed (SIGKILL) at every point of a load (contract §4, §7).

The home holds, between kills, the *baseline*: image ``test/base:1`` (one layer).  The
load is of ``test/app:1``, three layers on that same base layer, so that a load shares
a layer with what is there.  Each run kills the loading process at a crash point
(:data:`lamina.crashpoints.IMAGE_POINTS`, and the store's ``publish:*`` and
``atomic-write:before-rename``, the first, second and last time each is reached), or
after a random delay.  Then ``lamina image ls`` opens the store again (which sweeps
what the dead load left) and:

- ``test/app:1`` is either absent, and then the home holds exactly the baseline (its
  blobs, its one layer, no ingest file), or whole: every layer there, its mounted tree
  right, and ``image save`` of it verifies every blob;
- the baseline is intact, and a load run again to its end succeeds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lamina import crashpoints
from tests import tarbuild as tb
from tests.image import build

pytestmark = pytest.mark.root

BASE = build.image(build.BASE, tag="test/base:1")
APP = build.image(build.BASE, build.APP, [tb.file(f"data/{i}", os.urandom(4096))
                                          for i in range(200)],
                  [tb.file("top", b"top\n")], tag="test/app:1")
POINTS = [*crashpoints.IMAGE_POINTS, "publish:before-rename", "publish:after-rename",
          "atomic-write:before-rename"]
RANDOM_KILLS = 3


def lamina(home: Path, backend: str, *args: str, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "lamina", "--home", str(home), "--backend", backend, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def state(home: Path, backend: str) -> dict[str, Any]:
    images = json.loads(lamina(home, backend, "--json", "image", "ls").stdout)["images"]
    layers = json.loads(lamina(home, backend, "--json", "ls").stdout)["layers"]
    blobs = sorted(os.listdir(home / "image/blobs/sha256"))
    return {"images": sorted(i["name"] for i in images), "layers": sorted(x["id"] for x in
                                                                          layers),
            "blobs": blobs, "ingest": os.listdir(home / "image/ingest")}


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archives")
    out = {}
    for name, img in (("base", BASE), ("app", APP)):
        out[name] = root / f"{name}.tar"
        out[name].write_bytes(build.docker_save([img]))
    return out


@pytest.fixture(scope="module")
def baseline(backend: str, archives: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    home = tmp_path_factory.mktemp(f"baseline-{backend}") / "home"
    lamina(home, backend, "image", "load", str(archives["base"]))
    return home, state(home, backend)


def fresh_home(baseline: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    home = tmp_path / "home"
    tmp_path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(baseline[0]), str(home)], check=True)
    return home


def judge(home: Path, backend: str, base_state: dict[str, Any],
          archives: dict[str, Path]) -> str:
    after = state(home, backend)
    assert after["ingest"] == []
    if "docker.io/test/app:1" not in after["images"]:
        assert after == base_state, "a dead load left something behind"
        outcome = "absent"
    else:
        assert len(after["layers"]) == 4
        root = Path(lamina(home, backend, "image", "mount", "test/app:1").stdout.strip())
        try:
            assert (root / "top").read_bytes() == b"top\n"
            assert not (root / "etc/os-release").exists()
            assert len(os.listdir(root / "data")) == 200
        finally:
            lamina(home, backend, "image", "unmount", "test/app:1")
        lamina(home, backend, "image", "save", "-o", str(home.parent / "out.tar"),
               "test/app:1")
        outcome = "whole"
    # the baseline intact, and the load goes through now
    lamina(home, backend, "image", "load", str(archives["app"]))
    final = state(home, backend)
    assert final["images"] == ["docker.io/test/app:1", "docker.io/test/base:1"]
    assert set(base_state["layers"]) <= set(final["layers"])
    assert lamina(home, backend, "check", check=False).returncode == 0
    return outcome


@pytest.fixture(scope="module")
def survey(backend: str, baseline: tuple[Path, dict[str, Any]], archives: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """How often an uninterrupted load of APP reaches each point."""
    home = fresh_home(baseline, tmp_path_factory.mktemp(f"survey-{backend}"))
    log = home.parent / "points.log"
    lamina(home, backend, "image", "load", str(archives["app"]),
           env={"LAMINA_CRASH_LOG": str(log)})
    names = log.read_text().split()
    return {p: names.count(p) for p in POINTS}


def test_every_image_point_is_reached(survey: dict[str, int]) -> None:
    assert all(survey[p] > 0 for p in POINTS), survey


@pytest.mark.parametrize("point", POINTS)
def test_load_killed_at_a_point(backend: str, point: str, tmp_path: Path,
                                survey: dict[str, int],
                                baseline: tuple[Path, dict[str, Any]],
                                archives: dict[str, Path]) -> None:
    kills = 0
    for count in sorted({1, survey[point]} - {0}):
        home = fresh_home(baseline, tmp_path / str(count))
        proc = lamina(home, backend, "image", "load", str(archives["app"]),
                      env={"LAMINA_CRASH_AT": f"{point}:{count}"}, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        kills += 1
        judge(home, backend, baseline[1], archives)
    assert kills or survey[point] == 0


def test_load_killed_at_random(backend: str, tmp_path: Path,
                               baseline: tuple[Path, dict[str, Any]],
                               archives: dict[str, Path]) -> None:
    outcomes = []
    for i in range(RANDOM_KILLS):
        home = fresh_home(baseline, tmp_path / str(i))
        argv = [sys.executable, "-m", "lamina", "--home", str(home), "--backend", backend,
                "image", "load", str(archives["app"])]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(0.2, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes.append(judge(home, backend, baseline[1], archives))
    assert outcomes
