"""Who holds an image's layers: the image store and containerd's snapshots, one truth.

Issue 23's D1: an image's layers adopted by containerd's snapshots (the
remote-snapshotter protocol), the image removed, loaded again, then the snapshots
removed — the re-loaded image must keep its layers.  And ``lamina check`` sees an image
whose layers are gone, and ``--repair`` applies them again from the blobs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lamina
from lamina import errors
from lamina.backends import check
from lamina.frontends.containerd.snapshotter import REF_LABEL, Snapshotter
from lamina.image import load
from lamina.image.store import ImageStore, layer_id
from tests.image import build
from tests.image.build import APP, BASE

pytestmark = pytest.mark.root
EACH_FORMAT = True  # with overlay+dir too (tests/conftest.py)

IMG = build.image(BASE, APP, tag="test/app:1")


def _adopt(sn: Snapshotter, chains: list[str]) -> None:
    """containerd's pull of an image lamina holds: each Prepare answers AlreadyExists."""
    parent = ""
    for i, chain in enumerate(chains):
        with pytest.raises(errors.AlreadyExists):
            sn.prepare(f"default/{i}/extract {chain}", parent, {REF_LABEL: chain})
        parent = chain


def test_reloaded_image_keeps_the_layers_the_snapshots_let_go(driver: lamina.Driver) -> None:
    store = ImageStore(driver)
    data = build.docker_save([IMG])
    load.load(store, stream=io.BytesIO(data))
    chains = store.resolve("test/app:1").chains
    layers = [layer_id(c) for c in chains]
    sn = Snapshotter(driver)  # type: ignore[arg-type]
    try:
        _adopt(sn, chains)
        store.remove("test/app:1")
        assert all(driver.exists(lid) for lid in layers), "the snapshots still use them"
        load.load(store, stream=io.BytesIO(data))  # the layers reused, claimed again
        for chain in reversed(chains):
            sn.remove(chain)
        assert all(driver.exists(lid) for lid in layers), "the re-loaded image lost a layer"
        root = store.mount("test/app:1")
        assert (root / "app" / "main.py").read_bytes() == b"print('hi')\n"
        store.unmount("test/app:1")
        assert check.check(driver).consistent
        assert store.check() == ([], [])
        # Once nobody holds them, they go.
        store.remove("test/app:1")
        assert list(driver.layers()) == []
    finally:
        sn.close()


def test_layers_go_with_the_last_of_image_and_snapshots(driver: lamina.Driver) -> None:
    store = ImageStore(driver)
    load.load(store, stream=io.BytesIO(build.docker_save([IMG])))
    chains = store.resolve("test/app:1").chains
    sn = Snapshotter(driver)  # type: ignore[arg-type]
    try:
        _adopt(sn, chains)
        # A layer both hold is not the API's to delete: `lamina rm` lets its hold go only.
        store.remove("test/app:1")
        assert all(driver.exists(layer_id(c)) for c in chains)
        with pytest.raises(errors.Busy, match="containerd snapshot"):
            driver.remove(layer_id(chains[-1]))
        for chain in reversed(chains):
            sn.remove(chain)
        assert list(driver.layers()) == []
    finally:
        sn.close()


def _lamina(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--home", str(home), "--json",
                           *args], capture_output=True, text=True, timeout=120, check=False)


def test_check_sees_an_image_whose_layers_are_gone(stores: object, tmp_path: Path) -> None:
    home = tmp_path / "home"
    archive = tmp_path / "app.tar"
    archive.write_bytes(build.docker_save([IMG]))
    assert _lamina(home, "image", "load", str(archive)).returncode == 0
    with lamina.open_driver(home) as drv:
        chains = ImageStore(drv).resolve("test/app:1").chains
        drv.remove(layer_id(chains[-1]))  # behind the image store's back
    found = _lamina(home, "check")
    assert found.returncode == 1, found.stdout + found.stderr
    doc = json.loads(found.stdout)
    assert any("image docker.io/test/app:1: 1 of its 2 layers are gone" in p
               for p in doc["problems"]), doc
    fixed = _lamina(home, "check", "--repair")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert any("applied again" in r for r in json.loads(fixed.stdout)["repairs"])
    again = _lamina(home, "check")
    assert again.returncode == 0, again.stdout
    with lamina.open_driver(home) as drv:
        assert drv.exists(layer_id(chains[-1]))
        assert drv.record(layer_id(chains[-1])).identity.chain_id == chains[-1]  # type: ignore[attr-defined]
