"""containerd 2.x (the lab's, Debian sid's) on ``lamina snapshotter``: snapshotter and differ.

One ``lamina snapshotter --containerd-address …`` on the host (the project's venv) per
layer format, and one containerd 2.x in the lab whose config is what lamina prints for
it (``--print-containerd-config``): ``lamina`` the snapshotter, ``lamina-diff`` first in
the diff service and the transfer service's differ.  With the corpus's image, pushed
gzip-compressed to a local ``docker-registry`` by skopeo: ``ctr image pull
--snapshotter lamina`` (the transfer service) unpacks every layer through lamina's
differ — one apply a layer in lamina's log, each layer lamina's own format (EROFS on
overlay, where the kernel mounts it), none applied by containerd's walking differ;
``ctr image import`` of ``app-docker-save.tar`` into a second namespace fetches and
applies nothing (the remote-snapshotter path: lamina holds each layer already);
``ctr run`` sees the image's union; a container's writes show in ``snapshots usage``;
lamina restarted loses nothing; under a running container (``ctr run -d``) lamina and then
containerd restart (containerd alone: :meth:`LabContainerd.restart`), and the container
goes on running, its writes kept, its snapshot the same; ``ctr images rm --sync`` in
both namespaces leaves no snapshot and no layer; ``lamina check`` passes.

The tests share the daemons and run in file order; the last ones remove everything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import lab
from tests.conftest import mounts_under
from tests.containerd.daemon import Snapshotter, short_dir
from tests.containerd.test_ctr import EXPECTED_READ, READ
from tests.engines.daemons import (
    LabContainerd,
    host_snapshotter,
    push_corpus,
    remove_work,
    shared_dir,
)
from tests.registry.harness import DistRegistry

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

BACKENDS = ["overlay", "overlay+dir", "vfs"]
IMAGE = "docker.io/corpus/app:1"
NS = "default"
NS2 = "second"
PLUGIN = "lamina"
APPLY_LINE = re.compile(r"lamina differ: applied \S+ .*?: diff id (sha256:[0-9a-f]{64})")


@dataclass
class Lab:
    containerd: LabContainerd
    snapshotter: Snapshotter
    registry: DistRegistry
    tar: Path
    variant: str

    @property
    def pulled(self) -> str:
        """The image's name in the registry."""
        return f"{self.registry.address}/corpus/app:1"

    def ctr(self, *args: str, check: bool = True, ns: str = NS) -> str:
        return self.containerd.ctr("-n", ns, *args, check=check,
                                   binds=[self.tar.parent]).stdout

    def snapshots(self, ns: str = NS) -> dict[str, str]:
        """``ctr snapshots ls``: key to kind."""
        rows = self.ctr("snapshots", "--snapshotter", PLUGIN, "ls", ns=ns).splitlines()[1:]
        return {row.split()[0]: row.split()[-1] for row in rows if row.strip()}

    def applies(self) -> list[str]:
        """The diff ids lamina's differ applied, from its log (a line each)."""
        return APPLY_LINE.findall(self.snapshotter.log.read_text(errors="replace"))


@pytest.fixture(scope="module")
def stack(backend: str, corpus_dir: Path) -> Iterator[Lab]:
    lab.lab_root()
    work = short_dir("lab2-")
    shared_dir(work)
    sn = host_snapshotter(work, backend)
    ctd = LabContainerd(work, sn)
    registry = DistRegistry(work / "registry")
    tar = corpus_dir / "app-docker-save.tar"
    try:
        registry.start()
        push_corpus(registry, tar)
        sn.start()
        ctd.start()
        print(f"lab: {ctd.version()}; runc {lab.versions().get('runc', '')}")
        yield Lab(ctd, sn, registry, tar, backend)
    finally:
        ctd.close()
        sn.close()
        registry.stop()
        remove_work(work)


def test_pull_goes_through_laminas_differ(stack: Lab) -> None:
    stack.ctr("image", "pull", "--plain-http", "--snapshotter", PLUGIN, stack.pulled)
    snapshots = stack.snapshots()
    assert len(snapshots) == 3 and set(snapshots.values()) == {"Committed"}, snapshots
    # One apply a layer, by lamina: containerd's walking differ applied none (it would
    # have written through the mounts, and lamina would have no diff id to log).
    assert len(stack.applies()) == 3, stack.snapshotter.log.read_text()[-3000:]
    layers = stack.snapshotter.layers()
    assert len(layers) == 3
    formats = {str(layer.get("format")) for layer in layers}
    want = "erofs" if stack.variant == "overlay" else "dir"
    assert formats == {want}, layers
    assert sorted(str(layer.get("diff_id")) for layer in layers) == sorted(stack.applies())
    stack.ctr("image", "tag", stack.pulled, IMAGE)


def test_another_namespace_fetches_nothing(stack: Lab) -> None:
    # containerd asks with Prepare(label containerd.io/snapshot.ref=CHAIN); lamina holds
    # the layer, answers AlreadyExists, and containerd neither reads nor applies it.
    layers = {str(layer["id"]) for layer in stack.snapshotter.layers()}
    stack.ctr("image", "import", "--snapshotter", PLUGIN, str(stack.tar), ns=NS2)
    assert sorted(stack.snapshots(ns=NS2)) == sorted(stack.snapshots())
    assert {str(layer["id"]) for layer in stack.snapshotter.layers()} == layers
    assert len(stack.applies()) == 3


def test_run_sees_the_image(stack: Lab) -> None:
    out = stack.ctr("run", "--rm", "--snapshotter", PLUGIN, IMAGE, "reader",
                    "python3", "-c", READ)
    assert json.loads(out) == EXPECTED_READ


def test_a_container_writes_and_lamina_restarts(stack: Lab) -> None:
    stack.ctr("run", "--snapshotter", PLUGIN, IMAGE, "writer", "sh", "-c",
              "head -c 1048576 /dev/zero > /big && echo written > /new")
    usage = stack.ctr("snapshots", "--snapshotter", PLUGIN, "usage", "writer")
    assert "1.0 MiB" in usage or "1.004 MiB" in usage or "MiB" in usage, usage
    before = stack.snapshots()
    assert stack.snapshotter.stop() == 0
    stack.snapshotter.start()
    for _ in range(50):  # containerd redials a proxy plugin with a backoff
        if stack.ctr("snapshots", "--snapshotter", PLUGIN, "ls", check=False):
            break
    assert stack.snapshots() == before
    assert len(stack.applies()) == 3  # nothing applied again


def test_restarts_under_a_running_container(stack: Lab) -> None:
    stack.ctr("run", "-d", "--null-io", "--snapshotter", PLUGIN, IMAGE, "sleeper",
              "sleep", "3600")
    runs = 0

    def in_it(script: str) -> str:
        nonlocal runs
        runs += 1
        return stack.ctr("task", "exec", "--exec-id", f"e{runs}", "sleeper",
                         "sh", "-c", script)

    def running() -> None:
        tasks = {row.split()[0]: row.split()[-1]
                 for row in stack.ctr("task", "ls").splitlines()[1:] if row.strip()}
        assert tasks.get("sleeper") == "RUNNING", tasks

    try:
        in_it("echo before > /mark")
        before = stack.snapshots()
        assert before.get("sleeper") == "Active", before
        pid = stack.containerd.pid()
        assert stack.snapshotter.stop() == 0
        stack.snapshotter.start()
        for _ in range(50):  # containerd redials a proxy plugin with a backoff
            if stack.ctr("snapshots", "--snapshotter", PLUGIN, "ls", check=False):
                break
        running()
        assert in_it("cat /mark") == "before\n"
        stack.containerd.restart()
        assert stack.containerd.pid() not in (None, pid)
        running()  # the shim kept it, the new containerd found it
        assert in_it("echo after >> /mark && cat /mark") == "before\nafter\n"
        assert stack.snapshots() == before
        usage = stack.ctr("snapshots", "--snapshotter", PLUGIN, "usage", "sleeper")
        assert "sleeper" in usage, usage
    finally:
        stack.ctr("task", "rm", "-f", "sleeper", check=False)
        stack.ctr("containers", "rm", "sleeper", check=False)
    assert "sleeper" not in stack.snapshots()
    assert len(stack.applies()) == 3  # nothing applied again


def test_remove_and_gc(stack: Lab) -> None:
    stack.ctr("containers", "rm", "writer")
    stack.ctr("images", "rm", "--sync", IMAGE, ns=NS2)
    assert stack.snapshots(ns=NS2) == {}
    assert len(stack.snapshotter.layers()) == 3  # the first namespace's (the writer's went with it)
    stack.ctr("images", "rm", "--sync", IMAGE, stack.pulled)
    assert stack.snapshots() == {}
    assert stack.snapshotter.layers() == [], "containerd's collection left layers in lamina"


def test_check(stack: Lab) -> None:
    assert stack.snapshotter.stop() == 0
    proc = stack.snapshotter.lamina("check", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert mounts_under(stack.snapshotter.home) == []
    stack.snapshotter.start()
