"""One store, two engines (contract §6, issue 14): Docker 20.10 and containerd 1.6 on one home.

Per backend, one lamina home served twice at once: by ``lamina --home H serve`` as
Docker's graph driver plugin (``tests.integration.engine``: a private ``dockerd
--experimental --storage-driver lamina-test-…``) and by ``lamina --home H snapshotter``
as containerd's proxy snapshotter (``tests.containerd.conftest``: a private
containerd).  Docker would put its plugin's store at ``DATA_ROOT/NAME`` (``Init``'s
Home); both servers are given the same ``--home`` and ``--backend`` instead.

With the corpus's ``app-docker-save.tar``:

- ``docker load`` makes one lamina layer per image layer, each recording its diff id and
  chain id (``layer.json``) as the image's config has them;
- ``ctr image import --snapshotter lamina`` of the same tar makes no layer: the set of
  layers (``lamina --json ls``) is the same before and after, and every committed
  snapshot containerd names by chain id is Docker's layer.  (containerd 1.6's import
  still extracts each layer into a scratch snapshot — ``Image.Unpack`` sends no
  ``containerd.io/snapshot.ref`` label — and lamina's Commit drops that copy for the
  layer it holds: the extractions are counted from containerd's log, ``diff applied``,
  and ``ctr image import`` gets no shortcut here.)
- ``ctr run --rm`` reads the image;
- ``ctr images rm --sync`` (containerd's gc) leaves Docker's layers, and ``docker run``
  still works; then, re-imported, ``docker rmi`` while containerd has the image leaves
  containerd's snapshots working (``ctr run``), and the last user's removal takes the
  layers away;
- ``lamina check`` is clean at the end, nothing mounted under the home.

The tests share the daemons and run in file order.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import lacking, mounts_under
from tests.containerd.conftest import PLUGIN
from tests.containerd.daemon import Containerd, Snapshotter
from tests.containerd.test_ctr import EXPECTED_READ, IMAGE, READ, chain_ids
from tests.integration.engine import (
    PLUGINS_DIR,
    Dockerd,
    Serve,
    docker_missing,
    plugin_name,
    teardown,
)

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

BACKENDS = ["overlay", "vfs"]
NS = "one"
DOCKER_IMAGE = "corpus/app:1"  # the save's RepoTags; containerd calls it IMAGE
APPLIED = "diff applied"  # containerd's diff service logs this (debug) for each layer it applies


@dataclass
class Both:
    """The two engines on one lamina home, and the corpus image's facts."""

    dockerd: Dockerd
    serve: Serve
    containerd: Containerd
    snapshotter: Snapshotter
    tar: Path
    chain: list[str]

    @property
    def home(self) -> Path:
        return self.snapshotter.home

    def docker(self, *args: str) -> str:
        return self.dockerd.docker(*args).stdout

    def ctr(self, *args: str, check: bool = True) -> str:
        return self.containerd.ctr("-n", NS, *args, check=check).stdout

    def layers(self) -> set[str]:
        """lamina's layers, as ``lamina --json ls`` lists them."""
        return {str(layer["id"]) for layer in self.snapshotter.layers()}

    def chain_of(self, layer: str) -> str | None:
        """The chain id lamina recorded for ``layer`` at apply time (its ``layer.json``)."""
        meta = json.loads((self.home / "layers" / layer / "layer.json").read_text())
        found = meta.get("chain_id")
        return found if isinstance(found, str) else None

    def by_chain(self) -> dict[str, str]:
        """Chain id → layer, for the layers that record one."""
        return {c: lid for lid in self.layers() if (c := self.chain_of(lid)) is not None}

    def snapshots(self) -> dict[str, str]:
        """``ctr snapshots ls`` of the namespace: key → kind."""
        rows = self.ctr("snapshots", "--snapshotter", PLUGIN, "ls").splitlines()[1:]
        return {f[0]: f[-1] for f in (r.split() for r in rows) if f}

    def applied(self) -> int:
        """How many layers containerd's diff service has applied so far (its log)."""
        return self.containerd.log.read_text(errors="replace").count(APPLIED)

    def run_reads_the_image(self, name: str) -> None:
        out = self.ctr("run", "--rm", "--snapshotter", PLUGIN, IMAGE, name, "python3", "-c",
                       READ)
        assert json.loads(out) == EXPECTED_READ

    def docker_runs(self) -> None:
        out = self.docker("run", "--rm", DOCKER_IMAGE, "sh", "-c",
                          "cat /app/a.txt; test ! -e /usr/share/man && echo no-man")
        assert out.splitlines() == ["hello", "no-man"], out


@pytest.fixture(scope="module")
def both(backend: str, containerd: Containerd, snapshotter: Snapshotter,
         containerd_work: Path, corpus_dir: Path) -> Iterator[Both]:
    """Docker on ``lamina serve --home H``, beside the module's containerd and snapshotter
    on the same home H and backend."""
    reason = docker_missing()
    if reason:
        lacking(reason)
    work = containerd_work / "docker"
    work.mkdir()
    name = plugin_name()
    PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    serve = Serve(PLUGINS_DIR / f"{name}.sock", work / "serve.log", home=snapshotter.home,
                  backend=backend)
    dockerd = Dockerd(work / "engine", name)
    tar = corpus_dir / "app-docker-save.tar"
    try:
        serve.start()
        dockerd.start()
        yield Both(dockerd, serve, containerd, snapshotter, tar, chain_ids(tar))
    finally:
        # What Docker still has (a failed test's) goes with its engine's data-root.
        teardown(dockerd, [serve], work)
        shutil.rmtree(work, ignore_errors=True)


def test_docker_load_records_chain_ids(both: Both) -> None:
    info = json.loads(both.docker("info", "--format", "{{json .DriverStatus}}"))
    assert ["Home", str(both.home)] in info, info  # serve's --home, not Docker's
    both.docker("load", "-i", str(both.tar))
    assert len(both.layers()) == len(both.chain), both.layers()
    assert sorted(both.by_chain()) == sorted(both.chain)
    both.docker_runs()


def test_containerd_import_makes_no_layer(both: Both) -> None:
    before = both.layers()
    docker_layers = both.by_chain()
    applied = both.applied()
    out = both.ctr("image", "import", "--snapshotter", PLUGIN, str(both.tar))
    assert IMAGE in out, out
    assert both.snapshots() == dict.fromkeys(both.chain, "Committed")
    # containerd applies no layer of its own: the store holds the same layers, Docker's.
    assert both.layers() == before
    assert both.by_chain() == docker_layers
    # containerd 1.6.20's import extracts each layer (3 "diff applied") and lamina's
    # Commit drops the copy (see the module docstring); a pull through the
    # remote-snapshotter protocol would extract none.  Never more than one per layer.
    assert both.applied() - applied in (0, len(both.chain))


def test_ctr_run(both: Both) -> None:
    both.run_reads_the_image("reader")
    assert both.layers() >= set(both.by_chain().values())


def test_ctr_images_rm_leaves_dockers_layers(both: Both) -> None:
    layers = set(both.by_chain().values())
    both.ctr("images", "rm", "--sync", IMAGE)
    assert both.snapshots() == {}
    assert both.layers() == layers, "containerd's gc took layers Docker uses"
    both.docker_runs()
    assert both.layers() == layers


def test_docker_rmi_leaves_containerd_working(both: Both) -> None:
    layers = set(both.by_chain().values())
    both.ctr("image", "import", "--snapshotter", PLUGIN, str(both.tar))
    assert both.layers() == layers
    containers = both.docker("ps", "-aq").split()
    if containers:
        both.docker("rm", "-f", *containers)
    both.docker("rmi", DOCKER_IMAGE)
    assert both.docker("images", "-aq").strip() == ""
    # Docker has let its layers go, containerd still has them: they stay.
    assert both.layers() == layers
    assert both.snapshots() == dict.fromkeys(both.chain, "Committed")
    both.run_reads_the_image("reader2")
    # The last user's removal takes them away.
    both.ctr("images", "rm", "--sync", IMAGE)
    assert both.snapshots() == {}
    assert both.layers() == set(), "the layers outlived both users"


def test_docker_again_then_rmi_with_containerd_gone(both: Both) -> None:
    # Both orders: containerd first, Docker last this time.
    both.docker("load", "-i", str(both.tar))
    layers = set(both.by_chain().values())
    both.ctr("image", "import", "--snapshotter", PLUGIN, str(both.tar))
    assert both.layers() == layers
    both.ctr("images", "rm", "--sync", IMAGE)
    assert both.layers() == layers
    both.docker("rmi", DOCKER_IMAGE)
    assert both.layers() == set()


def test_check_clean(both: Both) -> None:
    proc = both.snapshotter.lamina("check", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert mounts_under(both.home) == [], "mounts left under the store"
    held = [p.name for p in (both.home / "holds").iterdir()
            if not p.name.startswith(".")]
    assert held == [], f"holds left for layers: {held}"
