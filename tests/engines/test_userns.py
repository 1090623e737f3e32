"""User-namespaced containers on lamina: containerd 2.1's ``remap-ids`` (the lab's).

The stack is test_cri's (``lamina snapshotter`` on the host, the lab's containerd 2.1
configured from ``--print-containerd-config``, which declares ``capabilities =
["remap-ids"]``, the corpus image and a pause image in a local registry), so that ``ctr``
and the CRI run on one containerd.  With the capability, containerd passes the id
mappings as labels on the container's ``Prepare`` and lamina answers as containerd's
overlayfs does: the upper owned by the mapped root, ``uidmap=``/``gidmap=`` options that
containerd turns into idmapped mounts of the lowers.  Checked:

- ``ctr run --uidmap 0:100000:65536 --gidmap 0:100000:65536``: inside, the image's files
  are root's and a file written is root's; on the host that file, in the container's
  upper, is uid 100000, the lowers' files are still uid 0 (nothing chowned), and there
  is no ``-remap`` snapshot (containerd's chowned copy of the image) nor any committed
  snapshot beyond the image's layers;
- a second container with ``0:200000:65536`` shares the same read-only layers (same
  committed snapshots, no layer more than its own writable one);
- a CRI pod with a user namespace (``userns_options``, mode POD, mappings) runs a
  container whose file lands in the mapped range on the host.

Both layer formats: ``overlay+dir`` (directory layers: containerd idmaps them) and
``overlay`` (EROFS layers, the default).  containerd 2.1 idmaps the lowers' common
directory without the mounts below it, and each EROFS layer is a mount of its own, so
there lamina gives lowers it idmapped itself (``HOME/idmapped/``), and no map.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests import lab
from tests.conftest import lacking, mounts_under
from tests.containerd.daemon import Snapshotter, short_dir
from tests.engines.cri import api_pb2 as cri
from tests.engines.cri import api_pb2_grpc as cri_grpc
from tests.engines.daemons import host_snapshotter, remove_work, shared_dir
from tests.engines.test_cri import BUSYBOX, CriContainerd, fill_registry
from tests.registry.harness import DistRegistry

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

BACKENDS = ["overlay+dir", "overlay"]
PLUGIN = "lamina"
NS = "default"
MAP1 = "0:100000:65536"
MAP2 = "0:200000:65536"
CALL_TIMEOUT = 300.0
WRITE = "stat -c %u:%g /etc/passwd /app/a.txt; echo hi > /written; stat -c %u:%g /written"


FAKE_CNI = """#!/bin/sh
# A CNI plugin that configures nothing and answers an address: the CRI wants a pod
# network namespace for a user-namespaced pod (it pins the user namespace through it)
# and an address on eth0 for the pod; nothing here uses the network.
read -r _ || true
case "$CNI_COMMAND" in
ADD)
  if [ "$CNI_IFNAME" = lo ]; then ip=127.0.0.1/8; else ip=10.99.0.2/24; fi
  printf '{"cniVersion":"1.0.0","interfaces":[{"name":"%s","sandbox":"%s"}],'\\
'"ips":[{"address":"%s","interface":0}]}' "$CNI_IFNAME" "$CNI_NETNS" "$ip" ;;
VERSION) printf '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}' ;;
esac
exit 0
"""


class UsernsContainerd(CriContainerd):
    """test_cri's containerd, with a CNI plugin that configures nothing (:data:`FAKE_CNI`)."""

    def config_text(self) -> str:
        cni = self.work / "cni"
        (cni / "bin").mkdir(parents=True, exist_ok=True)
        (cni / "conf").mkdir(exist_ok=True)
        for name in ("loopback", "lamina-fake"):
            (cni / "bin" / name).write_text(FAKE_CNI)
            (cni / "bin" / name).chmod(0o755)
        (cni / "conf" / "10-fake.conflist").write_text(
            '{"cniVersion": "1.0.0", "name": "fake", "plugins": [{"type": "lamina-fake"}]}')
        return super().config_text() + "\n".join([
            '[plugins."io.containerd.cri.v1.runtime".cni]',
            f'  bin_dirs = ["{cni / "bin"}"]',
            f'  conf_dir = "{cni / "conf"}"', ""])


@dataclass
class Stack:
    containerd: UsernsContainerd
    snapshotter: Snapshotter
    registry: DistRegistry
    variant: str
    runtime: cri_grpc.RuntimeServiceStub
    images: cri_grpc.ImageServiceStub

    @property
    def image(self) -> str:
        return f"{self.registry.address}/corpus/app:1"

    @property
    def erofs(self) -> bool:
        return self.variant == "overlay"

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr("-n", NS, *args, check=check)

    def ctr_pivoted(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ctr ARGS…`` in the lab entered with ``pivot_root``: ctr mounts an idmapped
        rootfs itself (to read the image's ``/etc/passwd``), and the kernel refuses a
        new user namespace to a chrooted process (``clone(2)``: EPERM)."""
        argv = lab.command(["ctr", "--address", str(self.containerd.address), "-n", NS,
                            *args], binds=self.containerd.binds, pivot=True)
        return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)

    def snapshots(self) -> dict[str, str]:
        """``ctr snapshots ls``: key to kind."""
        rows = self.ctr("snapshots", "--snapshotter", PLUGIN, "ls").stdout.splitlines()[1:]
        return {row.split()[0]: row.split()[-1] for row in rows if row.strip()}

    def committed(self) -> set[str]:
        return {k for k, kind in self.snapshots().items() if kind == "Committed"}

    def mount_dirs(self, key: str) -> tuple[Path, list[Path]]:
        """The host paths of snapshot ``key``'s upper and lowers (``ctr snapshots
        mounts`` prints the mount command containerd would run)."""
        out = self.ctr("snapshots", "--snapshotter", PLUGIN, "mounts", "/mnt", key).stdout
        upper = re.search(r"upperdir=([^,\s]+)", out)
        lower = re.search(r"lowerdir=([^,\s]+)", out)
        assert upper and lower, out
        lowers = [Path(p) for p in lower.group(1).split(":")]
        if self.erofs:  # idmapped by lamina: containerd is given no map
            assert "uidmap=" not in out, out
            assert all(p.parent.parent == self.snapshotter.home / "idmapped" for p in lowers)
        else:
            assert f"uidmap={MAP1}" in out or f"uidmap={MAP2}" in out, out
        return Path(upper.group(1)), lowers

    def layer_owners(self) -> set[tuple[int, int]]:
        """The owners of the image's files in lamina's layers, as the host sees them."""
        return {(st.st_uid, st.st_gid)
                for layer in (self.snapshotter.home / "layers").iterdir()
                for path in (layer / "diff/etc/passwd", layer / "diff/app/a.txt")
                if path.exists() for st in [os.stat(path)]}

    def run(self, name: str, mapping: str, script: str) -> subprocess.CompletedProcess[str]:
        # --remap-labels: the mappings as labels (without it ctr 2.1 makes containerd's
        # chowned copy of the image whatever the snapshotter can do).
        return self.ctr_pivoted("run", "--snapshotter", PLUGIN, "--remap-labels", "--uidmap",
                                mapping, "--gidmap", mapping, self.image, name, "sh", "-c",
                                script)


@pytest.fixture(scope="module")
def stack(backend: str, corpus_dir: Path) -> Iterator[Stack]:
    lab.lab_root()
    if not BUSYBOX.is_file():
        lacking(f"no {BUSYBOX} (Debian's busybox-static) for the pause image")
    work = short_dir("labuserns-")
    # runc, as the container's root (a mapped uid), goes through it to the rootfs.
    work.chmod(0o711)
    shared_dir(work)
    sn = host_snapshotter(work, backend)
    registry = DistRegistry(work / "registry")
    hosts = work / "certs.d"
    ctd = UsernsContainerd(work, sn, sandbox=f"{registry.address}/pause:1", hosts=hosts)
    channel: grpc.Channel | None = None
    try:
        registry.start()
        fill_registry(registry, corpus_dir, work, hosts)
        sn.start()
        ctd.start()
        assert 'capabilities = ["remap-ids"]' in ctd.config.read_text()
        channel = grpc.insecure_channel(f"unix://{ctd.address}")
        stack = Stack(ctd, sn, registry, backend, cri_grpc.RuntimeServiceStub(channel),
                      cri_grpc.ImageServiceStub(channel))
        stack.ctr("image", "pull", "--plain-http", "--snapshotter", PLUGIN, stack.image)
        yield stack
    finally:
        if channel is not None:
            channel.close()
        ctd.close()
        sn.close()
        registry.stop()
        remove_work(work)


def test_ctr_run_with_a_uidmap(stack: Stack) -> None:
    image_layers = stack.committed()
    layers = len(stack.snapshotter.layers())
    done = stack.run("c1", MAP1, WRITE)
    assert done.returncode == 0, done.stdout + done.stderr
    # Inside: the image's files and the file written are root's.
    assert done.stdout.split() == ["0:0", "0:0", "0:0"], done.stdout
    upper, _ = stack.mount_dirs("c1")
    # On the host: the write is the mapped root's; the layers' files are as applied.
    assert (os.stat(upper / "written").st_uid, os.stat(upper / "written").st_gid) == (
        100000, 100000)
    assert (os.stat(upper).st_uid, os.stat(upper).st_gid) == (100000, 100000)
    assert stack.layer_owners() == {(0, 0)}
    snapshots = stack.snapshots()
    assert not [k for k in snapshots if "remap" in k], snapshots
    assert stack.committed() == image_layers  # no chowned copy of the image
    assert len(stack.snapshotter.layers()) == layers + 1  # the container's own alone


def test_a_second_mapping_shares_the_layers(stack: Stack) -> None:
    image_layers = stack.committed()
    layers = len(stack.snapshotter.layers())
    done = stack.run("c2", MAP2, WRITE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["0:0", "0:0", "0:0"], done.stdout
    upper, lowers = stack.mount_dirs("c2")
    assert os.stat(upper / "written").st_uid == 200000
    assert stack.committed() == image_layers
    assert len(stack.snapshotter.layers()) == layers + 1
    if not stack.erofs:
        assert lowers == stack.mount_dirs("c1")[1]  # the very same directories
    assert stack.layer_owners() == {(0, 0)}
    for name in ("c1", "c2"):
        stack.ctr("containers", "rm", name)
    # containerd's collection removes the snapshots from lamina, in the background.
    deadline = time.monotonic() + 120
    while len(stack.snapshotter.layers()) != layers - 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(stack.snapshotter.layers()) == layers - 1


def _pod_config(mapping: cri.IDMapping) -> cri.PodSandboxConfig:
    userns = cri.UserNamespace(mode=cri.NamespaceMode.POD, uids=[mapping], gids=[mapping])
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="userns", uid="lamina-userns", namespace="default"),
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            namespace_options=cri.NamespaceOption(network=cri.NamespaceMode.POD,
                                                  userns_options=userns))))


def test_a_cri_pod_with_a_user_namespace(stack: Stack) -> None:
    mapping = cri.IDMapping(container_id=0, host_id=300000, length=65536)
    config = _pod_config(mapping)
    rt = stack.runtime
    for ref in (stack.image, f"{stack.registry.address}/pause:1"):
        stack.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)),
                               timeout=CALL_TIMEOUT)
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                           timeout=CALL_TIMEOUT).pod_sandbox_id
    try:
        cid = rt.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, sandbox_config=config,
            config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="app"),
                image=cri.ImageSpec(image=stack.image), command=["sleep", "3600"],
                linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=config.linux.security_context.namespace_options)))),
            timeout=CALL_TIMEOUT).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=CALL_TIMEOUT)
        done = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", WRITE],
                                               timeout=60), timeout=CALL_TIMEOUT)
        assert done.exit_code == 0, done
        assert done.stdout.split() == [b"0:0", b"0:0", b"0:0"], done
        keys = [k for k in stack.containerd.ctr("-n", "k8s.io", "snapshots", "--snapshotter",
                                                PLUGIN, "ls").stdout.split() if k == cid]
        assert keys == [cid]
        out = stack.containerd.ctr("-n", "k8s.io", "snapshots", "--snapshotter", PLUGIN,
                                   "mounts", "/mnt", cid).stdout
        upper = re.search(r"upperdir=([^,\s]+)", out)
        mapped = "/idmapped/" if stack.erofs else "uidmap=0:300000:65536"
        assert upper and mapped in out, out
        written = os.stat(Path(upper.group(1)) / "written")
        assert (written.st_uid, written.st_gid) == (300000, 300000)
        rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=0),
                         timeout=CALL_TIMEOUT)
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=CALL_TIMEOUT)
    finally:
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=CALL_TIMEOUT)
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod),
                            timeout=CALL_TIMEOUT)


def test_check(stack: Stack) -> None:
    # Every mapped snapshot gone (the pod's go with containerd's collection, in the
    # background): nothing idmapped is left, and lamina check passes.
    idmapped = stack.snapshotter.home / "idmapped"
    deadline = time.monotonic() + 120
    while idmapped.exists() and list(idmapped.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not idmapped.exists() or not list(idmapped.iterdir()), (
        list(idmapped.iterdir()), stack.snapshots())
    assert stack.snapshotter.stop() == 0
    proc = stack.snapshotter.lamina("check", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert mounts_under(stack.snapshotter.home) == []
    stack.snapshotter.start()
