"""Docker 28 (the lab's, Debian sid's) with its containerd image store on lamina.

One ``lamina snapshotter --containerd-address …`` on the host per layer format, one
containerd 2.x in the lab configured from what lamina prints for it (as in
``test_containerd2``), and one ``dockerd`` 28 of the lab's on that containerd
(:class:`tests.engines.docker.LabDockerd`: ``--containerd SOCK``, daemon.json's
``"features": {"containerd-snapshotter": true}`` and ``"storage-driver": "lamina"``, which
with the containerd image store names the snapshotter).  With the corpus image:

- ``docker load`` unpacks every layer through lamina's differ (one ``lamina differ:
  applied`` a layer; containerd's walking differ applied none), each layer lamina's own
  format with the image's diff id;
- ``docker run`` sees the image's union; ``run -d`` and ``exec``; ``docker diff`` is
  what overlay2 said when the corpus was made; ``docker commit`` makes a layer lamina
  holds (applied by its differ); ``docker save`` gives the loaded layers back byte for
  byte; ``docker export`` is the image's tree;
- ``docker buildx build`` (BuildKit in dockerd, on the same snapshotter): a multi-stage
  Dockerfile with a ``RUN --mount=type=cache`` whose cache a later build finds, a
  rebuild from the cache, every layer it unpacks applied by lamina's differ too;
  ``builder prune``, ``system df``, ``image prune``;
- lamina restarted under a running container, dockerd restarted;
- at the end ``rm`` and ``rmi`` of everything leave no layer, ``lamina check`` passes
  and nothing is mounted under the work directory.

The tests share the daemons and run in file order; the last ones remove everything.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import lab
from tests.conftest import mounts_under
from tests.containerd.daemon import Snapshotter, _tail, short_dir
from tests.containerd.test_ctr import EXPECTED_READ, READ
from tests.engines.daemons import (
    LabContainerd,
    host_snapshotter,
    remove_work,
    shared_dir,
)
from tests.engines.docker import LabDockerd, _descendant
from tests.engines.test_cri import pause_layout
from tests.integration.test_docker import CHANGE, original_layers, save_layer_digests
from tests.registry.harness import DistRegistry
from tests.snapshot import assert_same_tree, snapshot_tar
from tests.test_corpus import NOT_IN_IMAGE

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

BACKENDS = ["overlay", "vfs", "overlay+dir"]
IMAGE = "corpus/app:1"
COMMITTED = "corpus/committed:1"
BUILT = "corpus/built:1"
APPLY_LINE = re.compile(r"lamina differ: applied \S+ .*?: diff id (sha256:[0-9a-f]{64})")
# containerd's own differ logs each apply (at debug level, which LabContainerd sets).
WALKING_APPLY = 'msg="diff applied"'
DOCKERFILE = """\
FROM corpus/app:1 AS build
ARG PASS=1
RUN --mount=type=cache,target=/cache \\
    echo "pass $PASS" >> /cache/passes && cp /cache/passes /passes && \\
    cat /app/a.txt > /built
FROM corpus/app:1
COPY --from=build /passes /built /out/
RUN echo final > /out/final && rm /app/a.txt
"""


@dataclass
class Stack:
    dockerd: LabDockerd
    containerd: LabContainerd
    snapshotter: Snapshotter
    corpus: Path
    work: Path
    variant: str
    pulled: str
    """A small image (one layer) in a local registry, for ``docker pull``."""

    def docker(self, *args: str, check: bool = True) -> str:
        return self.dockerd.docker(*args, check=check, binds=[self.corpus]).stdout

    def applies(self) -> list[str]:
        """The diff ids lamina's differ applied, from its log (a line each)."""
        return APPLY_LINE.findall(self.snapshotter.log.read_text(errors="replace"))

    def walking_applies(self) -> int:
        """How many layers containerd's walking differ applied (its debug log)."""
        return self.containerd.log.read_text(errors="replace").count(WALKING_APPLY)

    def diff_ids(self, image: str) -> list[str]:
        info = json.loads(self.docker("image", "inspect", image))[0]
        layers: list[str] = info["RootFS"]["Layers"]
        return layers

    def layer_ids(self) -> set[str]:
        return {str(layer["id"]) for layer in self.snapshotter.layers()}

    def snapshots(self) -> list[str]:
        """The keys of the snapshots in Docker's containerd namespace."""
        out = self.containerd.ctr("-n", "moby", "snapshots", "--snapshotter", "lamina",
                                  "ls").stdout
        return [row.split()[0] for row in out.splitlines()[1:] if row.strip()]


@pytest.fixture(scope="module")
def stack(backend: str, corpus_dir: Path) -> Iterator[Stack]:
    lab.lab_root()
    work = short_dir("d28-")
    shared_dir(work)
    sn = host_snapshotter(work, backend)
    ctd = LabContainerd(work, sn)
    dockerd = LabDockerd(ctd)
    registry = DistRegistry(work / "registry")
    try:
        registry.start()
        pause_layout(work / "small-oci")
        pulled = f"{registry.address}/small:1"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{work / 'small-oci'}:1", f"docker://{pulled}"], check=True)
        sn.start()
        ctd.start()
        dockerd.start()
        buildx = dockerd.docker("buildx", "version").stdout.strip()
        print(f"lab: {dockerd.version()}; {buildx}; {ctd.version()}; "
              f"runc {lab.versions().get('runc', '')}")
        yield Stack(dockerd, ctd, sn, corpus_dir, work, backend, pulled)
    finally:
        dockerd.stop()
        ctd.close()
        sn.close()
        registry.stop()
        remove_work(work)


def test_load_goes_through_laminas_differ(stack: Stack) -> None:
    stack.docker("load", "-i", str(stack.corpus / "app-docker-save.tar"))
    info = stack.docker("info", "--format", "{{json .DriverStatus}} {{.Driver}}")
    assert info.split()[-1] == "lamina" and "io.containerd.snapshotter.v1" in info, info
    diff_ids = stack.diff_ids(IMAGE)
    assert diff_ids == [f"sha256:{d}" for d in original_layers(stack.corpus)]
    # One apply a layer, by lamina; containerd's walking differ applied none.
    assert stack.applies() == diff_ids, stack.snapshotter.log.read_text()[-3000:]
    assert stack.walking_applies() == 0
    layers = stack.snapshotter.layers()
    want = "erofs" if stack.variant == "overlay" else "dir"
    assert {str(layer.get("format")) for layer in layers} == {want}, layers
    assert sorted(str(layer.get("diff_id")) for layer in layers) == sorted(diff_ids)


def test_run_sees_the_image(stack: Stack) -> None:
    out = stack.docker("run", "--rm", "--network", "none", IMAGE, "python3", "-c", READ)
    assert json.loads(out) == EXPECTED_READ


def test_run_detached_and_exec(stack: Stack) -> None:
    stack.docker("run", "-d", "--name", "running", "--network", "none", IMAGE, "sleep", "600")
    stack.docker("exec", "running", "sh", "-c", "echo made > /exec-made")
    assert stack.docker("exec", "running", "cat", "/exec-made", "/app/a.txt") == "made\nhello\n"


@pytest.fixture(scope="module")
def changed(stack: Stack) -> str:
    """A container that did what build-corpus.sh's last container did."""
    stack.docker("run", "--name", "changed", "--network", "none", IMAGE, "sh", "-c", CHANGE)
    return "changed"


def test_docker_diff_is_overlay2s(stack: Stack, changed: str) -> None:
    got = stack.docker("diff", changed).splitlines()
    want = (stack.corpus / "app-changes.txt").read_text().splitlines()
    assert sorted(got, key=lambda line: line[2:]) == want


def test_commit_makes_a_layer_lamina_holds(stack: Stack, changed: str) -> None:
    applied = len(stack.applies())
    stack.docker("commit", changed, COMMITTED)
    diff_ids = stack.diff_ids(COMMITTED)
    assert diff_ids[:-1] == stack.diff_ids(IMAGE)
    # dockerd wrote the diff with containerd's walking differ (lamina answers
    # Unimplemented for Compare) and unpacked it through lamina's.
    assert stack.applies()[applied:] == diff_ids[-1:]
    assert stack.walking_applies() == 0
    assert diff_ids[-1] in {str(layer.get("diff_id")) for layer in stack.snapshotter.layers()}
    out = stack.docker("run", "--rm", "--network", "none", COMMITTED, "sh", "-c",
                       "tail -1 /etc/debian_version; ls /newdir; ls /usr/share/zoneinfo || :")
    assert out.splitlines() == ["changed", "f"]


def test_pull_goes_through_laminas_differ(stack: Stack) -> None:
    # From a local registry (127.0.0.0/8 is insecure to Docker by default): the pulled
    # layer is unpacked by lamina's differ, none by containerd's walking differ.
    applied = len(stack.applies())
    stack.docker("pull", stack.pulled)
    assert stack.applies()[applied:] == stack.diff_ids(stack.pulled)
    assert stack.walking_applies() == 0
    stack.docker("run", "--rm", "--network", "none", "--entrypoint", "/bin/busybox",
                 stack.pulled, "true")
    stack.docker("rmi", stack.pulled)


def test_save_gives_the_loaded_layers_back(stack: Stack) -> None:
    saved = stack.work / "committed.tar"
    stack.docker("save", "-o", str(saved), COMMITTED)
    with tarfile.open(saved) as tar:
        digests = save_layer_digests(tar)
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        top = tar.extractfile(json.load(manifest_file)[0]["Layers"][-1])
        assert top is not None
        # The committed layer is stored compressed: its diff id is the tar's digest.
        with gzip.open(top) as layer:
            diff_id = hashlib.file_digest(layer, "sha256").hexdigest()  # type: ignore[arg-type]
    saved.unlink()
    assert digests[:-1] == original_layers(stack.corpus)  # byte for byte
    assert f"sha256:{diff_id}" == stack.diff_ids(COMMITTED)[-1]


def test_export_is_the_image(stack: Stack) -> None:
    cid = stack.docker("create", "--network", "none", IMAGE, "true").strip()
    exported = stack.work / "export.tar"
    stack.docker("export", "-o", str(exported), cid)
    stack.docker("rm", cid)

    def keep(path: str) -> bool:
        return path != "/" and not any(path == p or path.startswith(p + "/") for p in NOT_IN_IMAGE)

    got = snapshot_tar(exported, keep=keep)
    exported.unlink()
    assert_same_tree(got, snapshot_tar(stack.corpus / "app-flat.tar", keep=keep))


def build(stack: Stack, *args: str) -> str:
    """``docker buildx build`` of :data:`DOCKERFILE` into :data:`BUILT`; its log."""
    context = stack.work / "context"
    context.mkdir(exist_ok=True)
    (context / "Dockerfile").write_text(DOCKERFILE)
    proc = stack.dockerd.docker("buildx", "build", "--progress", "plain", "--network", "none",
                                "-t", BUILT, *args, str(context))
    return proc.stdout + proc.stderr


def test_buildx_build_with_a_cache_mount(stack: Stack) -> None:
    layers = stack.layer_ids()
    build(stack)
    out = stack.docker("run", "--rm", "--network", "none", BUILT, "sh", "-c",
                       "cat /out/passes /out/built /out/final; test ! -e /app/a.txt")
    assert out == "pass 1\nhello\nfinal\n"
    assert len(stack.diff_ids(BUILT)) == len(stack.diff_ids(IMAGE)) + 2
    assert stack.layer_ids() > layers  # BuildKit's snapshots are lamina's layers too
    # BuildKit unpacks the final stage's new layers (COPY, RUN) onto lamina's mounts
    # less their redirect_dir= option: lamina's differ applies them all the same.
    assert stack.walking_applies() == 0
    # The same build again: every step from BuildKit's cache.
    again = build(stack)
    assert "CACHED" in again and re.search(r"RUN --mount.*\n.*CACHED", again), again
    # Another pass runs the RUN again, and finds the cache mount of the first.
    build(stack, "--build-arg", "PASS=2")
    out = stack.docker("run", "--rm", "--network", "none", BUILT, "cat", "/out/passes")
    assert out == "pass 1\npass 2\n"


def test_prune_and_df(stack: Stack) -> None:
    df = stack.docker("system", "df")
    assert re.search(r"^Images\s+[1-9]", df, re.M) and "Build Cache" in df, df
    stack.docker("builder", "prune", "-af")
    assert stack.docker("buildx", "du").strip().splitlines()[-1].startswith("Total:")
    stack.docker("image", "prune", "-f")  # the first build's image, untagged since
    df = stack.docker("system", "df", "--format", "{{json .}}")
    rows = {row["Type"]: row for row in map(json.loads, df.splitlines())}
    assert rows["Build Cache"]["TotalCount"] == "0", rows
    assert stack.docker("images", "--filter", "dangling=true", "-q") == ""


def wait_for_proxy(stack: Stack) -> None:
    """Until containerd's proxy plugin reaches the restarted snapshotter."""
    for _ in range(100):
        if stack.containerd.ctr("-n", "moby", "snapshots", "--snapshotter", "lamina", "ls",
                                check=False).returncode == 0:
            return
        time.sleep(0.2)


def test_lamina_restarts_under_a_running_container(stack: Stack) -> None:
    layers = stack.layer_ids()
    applied = len(stack.applies())
    assert stack.snapshotter.stop() == 0
    stack.snapshotter.start()
    wait_for_proxy(stack)
    assert stack.layer_ids() == layers
    assert stack.docker("exec", "running", "cat", "/exec-made") == "made\n"
    out = stack.docker("run", "--rm", "--network", "none", IMAGE, "cat", "/app/a.txt")
    assert out == "hello\n"
    assert len(stack.applies()) == applied  # nothing applied again


def test_dockerd_restarts(stack: Stack) -> None:
    images = stack.docker("images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}")
    assert stack.dockerd.stop() == 0, _tail(stack.dockerd.log)
    stack.dockerd.start()
    assert stack.docker("images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}") == images
    stack.docker("start", "running")
    # The container's own layer kept what exec wrote before.
    assert stack.docker("exec", "running", "cat", "/exec-made") == "made\n"
    assert "A /exec-made" in stack.docker("diff", "running").splitlines()


def test_remove_everything(stack: Stack) -> None:
    containers = stack.docker("ps", "-aq").split()
    assert len(containers) == 2  # running, changed
    stack.docker("rm", "-f", *containers)
    stack.docker("rmi", IMAGE, COMMITTED, BUILT)
    stack.docker("builder", "prune", "-af")
    stack.docker("image", "prune", "-af")
    assert stack.docker("images", "-aq").strip() == ""
    # containerd collects the snapshots in the background after a removal
    deadline = time.monotonic() + 60
    while (stack.snapshots() or stack.snapshotter.layers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stack.snapshots() == []
    assert stack.snapshotter.layers() == [], "containerd's collection left layers in lamina"


def test_check_and_nothing_mounted(stack: Stack) -> None:
    # In containerd's (and dockerd's) mount namespace: nothing of Docker's or
    # containerd's still mounted (what is left is the lab's binds of the work dir).
    ctd = stack.containerd.proc
    assert ctd is not None
    pid = _descendant(ctd.pid, "containerd")
    with open(f"/proc/{pid}/mountinfo") as f:
        inside = [line.split()[4] for line in f]
    below = [p for p in inside if p.startswith(str(stack.work) + "/")]
    assert below == [], below
    # Every layer applied in the module (load, commit, BuildKit's) was lamina's differ's.
    assert stack.walking_applies() == 0
    assert stack.snapshotter.stop() == 0
    proc = stack.snapshotter.lamina("check", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert mounts_under(stack.work, images=True) == [str(stack.work)]
    stack.snapshotter.start()
