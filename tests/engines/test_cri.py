"""Kubernetes' CRI on lamina: containerd 2.1's CRI plugin (the lab's), driven from the host
as the kubelet drives it, over containerd's socket (``runtime.v1``: :mod:`tests.engines.cri`).

The stack is test_containerd2's — ``lamina snapshotter`` on the host, a containerd 2.x in
the lab configured from ``lamina snapshotter --print-containerd-config``, a local
``docker-registry`` holding the corpus image (gzip layers, pushed by skopeo) — with what
the CRI plugin needs beside it (:meth:`CriContainerd.config_text`):

- a sandbox ("pause") image of our own in the same registry: one uncompressed layer
  holding Debian's static busybox, whose entrypoint sleeps (:func:`pause_layout`, an
  OCI layout written here and pushed by skopeo); the CRI pins it as ``sandbox``;
- ``registry.config_path``: a ``certs.d`` directory whose ``HOST:PORT/hosts.toml`` says
  the local registry speaks plain HTTP;
- pods on the host's network (``NamespaceMode.NODE``), so no CNI plugin is needed;
- NRI off (its socket would be the lab's, shared with other containerds), the CRI's
  stats collected every second (``ContainerStats`` reads what it collected).

What the CRI's ``PullImage`` goes through: containerd 2.1's CRI image service pulls with
the **transfer service** (``internal/cri/server/images/image_pull.go``: unless
``use_local_image_pull`` is set, or a setting the transfer service lacks — e.g.
``disable_snapshot_annotations = false`` on Linux, ``discard_unpacked_layers``,
``image_pull_with_sync_fs`` — makes it fall back to the client's own pull and unpacker),
so the unpack follows the transfer service's ``unpack_config``: lamina's snapshotter and
lamina's differ, as lamina prints them. The tests check the containerd log's "using
transfer service" and one ``lamina differ: applied …`` line per layer.  The variant
``overlay+local-pull`` sets ``use_local_image_pull``: the client's unpacker then applies
through the diff service's ``default`` order (lamina's differ first), each Apply carrying
the ocicrypt decoders' payloads — one ``lamina differ: applied …`` per layer there too.

The calls, in file order, sharing the daemons: ``PullImage`` (corpus and pause),
``ImageStatus``, ``ImageFsInfo`` (its mountpoint lamina's home, the proxy plugin's
``exports.root``), ``RunPodSandbox``, ``CreateContainer`` and ``StartContainer`` (the
corpus image, sleeping), ``ExecSync`` (reads a file of the image, writes one),
``ContainerStats`` (the writable layer's usage: lamina's ``Usage`` of the container's
snapshot), ``StopContainer``/``RemoveContainer``, ``StopPodSandbox``/``RemovePodSandbox``,
``RemoveImage``; then lamina holds no layer and ``lamina check`` passes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from lamina.frontends.containerd.api import snapshots_pb2, snapshots_pb2_grpc
from tests import lab
from tests.conftest import lacking, mounts_under
from tests.containerd.daemon import Snapshotter, short_dir
from tests.engines.cri import api_pb2 as cri
from tests.engines.cri import api_pb2_grpc as cri_grpc
from tests.engines.daemons import (
    LabContainerd,
    host_snapshotter,
    push_corpus,
    remove_work,
    shared_dir,
)
from tests.registry.harness import DistRegistry

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

BACKENDS = ["overlay", "overlay+dir", "vfs", "overlay+local-pull"]
"""lamina's variants; ``overlay+local-pull`` is overlay (EROFS layers) with the CRI pulling
through containerd's client and its own unpacker (``use_local_image_pull``) instead of
the transfer service."""
LOCAL_PULL = "local-pull"
APPLY_LINE = re.compile(r"lamina differ: applied \S+ .*?: diff id (sha256:[0-9a-f]{64})")
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static (bootstrap installs it)
CALL_TIMEOUT = 300.0
T = TypeVar("T")


def pause_layout(out: Path) -> None:
    """An OCI image layout at ``out`` (tag ``1``): one uncompressed layer with
    ``bin/busybox`` (static), the entrypoint ``busybox sleep`` forever — a pause image."""
    def blob(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (out / "blobs/sha256").mkdir(parents=True, exist_ok=True)
        (out / "blobs/sha256" / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("bin")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(info)
        data = BUSYBOX.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    layer_digest, layer_size = blob(layer.getvalue())
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    config_digest, config_size = blob(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    }
    manifest_digest, manifest_size = blob(json.dumps(manifest).encode())
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (out / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": "1"}}],
    }))


class CriContainerd(LabContainerd):
    """:class:`LabContainerd` with the CRI plugin's needs (see the module's docstring)."""

    def __init__(self, work: Path, snapshotter: Snapshotter, *, sandbox: str,
                 hosts: Path, local_pull: bool = False) -> None:
        super().__init__(work, snapshotter)
        self.sandbox = sandbox
        self.hosts = hosts
        self.local_pull = local_pull

    def config_text(self) -> str:
        q = json.dumps
        images = '[plugins."io.containerd.cri.v1.images"]\n  snapshotter = "lamina"\n'
        printed = super().config_text()
        assert images in printed, printed  # lamina's line; a TOML table is written once
        extra = "  stats_collect_period = 1\n"
        if self.local_pull:
            extra += "  use_local_image_pull = true\n"
        printed = printed.replace(images, images + extra)
        return printed + "\n".join([
            "",
            "# tests/engines/test_cri.py: the CRI plugin's needs",
            '[plugins."io.containerd.cri.v1.images".pinned_images]',
            f"  sandbox = {q(self.sandbox)}",
            '[plugins."io.containerd.cri.v1.images".registry]',
            f"  config_path = {q(str(self.hosts))}",
            # The pause container's oom_score_adj is -998 by default; lowering it needs
            # CAP_SYS_RESOURCE, which this machine's root may lack (runc: "failed to update
            # /proc/self/oom_score_adj: Permission denied"): keep no lower than containerd's.
            '[plugins."io.containerd.cri.v1.runtime"]',
            "  restrict_oom_score_adj = true",
            # Collect garbage after every deletion (the default waits for 100 mutations):
            # removed containers' snapshots then leave lamina at once.
            '[plugins."io.containerd.gc.v1.scheduler"]',
            "  deletion_threshold = 1",
            '[plugins."io.containerd.nri.v1.nri"]',
            "  disable = true",
            "",
        ])


@dataclass
class Stack:
    containerd: CriContainerd
    snapshotter: Snapshotter
    registry: DistRegistry
    variant: str
    channel: grpc.Channel
    runtime: cri_grpc.RuntimeServiceStub
    images: cri_grpc.ImageServiceStub
    ids: dict[str, str]
    """What the tests made, for the later ones: ``pod``, ``container``, image refs."""

    @property
    def image(self) -> str:
        return f"{self.registry.address}/corpus/app:1"

    @property
    def pause(self) -> str:
        return f"{self.registry.address}/pause:1"

    def applies(self) -> list[str]:
        """The diff ids lamina's differ applied, from its log (a line each)."""
        return APPLY_LINE.findall(self.snapshotter.log.read_text(errors="replace"))

    def call(self, method: Callable[..., T], request: Any) -> T:
        """A CRI call; on failure the containerd log's tail comes with the error."""
        try:
            return method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            tail = self.containerd.log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"{e}\n--- containerd log ---\n{tail}") from e

    def usage(self, key_suffix: str) -> snapshots_pb2.UsageResponse:
        """lamina's own ``Usage`` of the snapshot whose key ends in ``/KEY_SUFFIX`` (the
        metadata store prefixes containerd's keys with the namespace and a number)."""
        with grpc.insecure_channel(f"unix://{self.snapshotter.socket}") as ch:
            stub = snapshots_pb2_grpc.SnapshotsStub(ch)
            keys = [info.name for page in stub.List(snapshots_pb2.ListSnapshotsRequest(
                        snapshotter="lamina"), timeout=60) for info in page.info
                    if info.name.endswith("/" + key_suffix)]
            assert len(keys) == 1, keys
            return stub.Usage(snapshots_pb2.UsageRequest(snapshotter="lamina", key=keys[0]),
                              timeout=60)


def fill_registry(registry: DistRegistry, corpus_dir: Path, work: Path, hosts: Path) -> None:
    """Into the started ``registry``: the corpus image and the pause image
    (:func:`pause_layout`, ``REGISTRY/pause:1``); and in ``hosts`` (containerd's
    ``config_path``) the ``hosts.toml`` that lets containerd pull from it over plain HTTP."""
    push_corpus(registry, corpus_dir / "app-docker-save.tar")
    pause_layout(work / "pause-oci")
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{work / 'pause-oci'}:1", f"docker://{registry.address}/pause:1"],
                   check=True)
    (hosts / registry.address).mkdir(parents=True)
    (hosts / registry.address / "hosts.toml").write_text(
        f'server = "http://{registry.address}"\n\n'
        f'[host."http://{registry.address}"]\n'
        '  capabilities = ["pull", "resolve"]\n')


@pytest.fixture(scope="module")
def stack(backend: str, corpus_dir: Path) -> Iterator[Stack]:
    lab.lab_root()
    if not BUSYBOX.is_file():
        lacking(f"no {BUSYBOX} (Debian's busybox-static) for the pause image")
    local_pull = backend.endswith("+" + LOCAL_PULL)
    work = short_dir("labcri-")
    shared_dir(work)
    sn = host_snapshotter(work, backend.removesuffix("+" + LOCAL_PULL))
    registry = DistRegistry(work / "registry")
    hosts = work / "certs.d"
    ctd = CriContainerd(work, sn, sandbox=f"{registry.address}/pause:1", hosts=hosts,
                        local_pull=local_pull)
    channel: grpc.Channel | None = None
    try:
        registry.start()
        fill_registry(registry, corpus_dir, work, hosts)
        sn.start()
        ctd.start()
        print(f"lab: {ctd.version()}; runc {lab.versions().get('runc', '')}")
        channel = grpc.insecure_channel(f"unix://{ctd.address}")
        yield Stack(ctd, sn, registry, backend, channel,
                    cri_grpc.RuntimeServiceStub(channel), cri_grpc.ImageServiceStub(channel), {})
    finally:
        if channel is not None:
            channel.close()
        ctd.close()
        sn.close()
        registry.stop()
        remove_work(work)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
    """``probe()`` until it answers something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


POD = cri.PodSandboxMetadata(name="lamina", uid="lamina-cri-test", namespace="default")


def pod_config() -> cri.PodSandboxConfig:
    """A pod on the host's network: no CNI."""
    return cri.PodSandboxConfig(
        metadata=POD,  # no hostname: the host's UTS namespace is shared too
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            namespace_options=cri.NamespaceOption(network=cri.NamespaceMode.NODE))))


def test_pull_goes_through_the_transfer_service_and_laminas_differ(stack: Stack) -> None:
    for name, ref in (("image", stack.image), ("pause", stack.pause)):
        pulled = stack.call(stack.images.PullImage, cri.PullImageRequest(
            image=cri.ImageSpec(image=ref)))
        assert pulled.image_ref.startswith("sha256:"), pulled
        stack.ids[name] = pulled.image_ref
        # containerd 2.1's CRI logs which path its pull took (at debug level).
        taken = re.compile(r'PullImage \\?"' + re.escape(ref)
                           + r'\\?" with snapshotter lamina using transfer service')
        transfer = taken.search(stack.containerd.log.read_text(errors="replace"))
        assert bool(transfer) != stack.variant.endswith(LOCAL_PULL), ref
    # One apply a layer, by lamina's differ (3 of the corpus image, 1 of the pause image):
    # containerd's walking differ applied none.  On the local pull path every Apply
    # carries the ocicrypt decoders' payloads (image_decryption key_model "node"), which
    # lamina's differ passes by on a layer that is not encrypted.
    layers = stack.snapshotter.layers()
    assert len(layers) == 4, layers
    assert len(stack.applies()) == 4, stack.snapshotter.log.read_text()[-3000:]
    assert sorted(str(layer.get("diff_id")) for layer in layers) == sorted(stack.applies())
    want = "dir" if stack.variant in ("overlay+dir", "vfs") else "erofs"
    assert {str(layer.get("format")) for layer in layers} == {want}, layers


def test_image_status(stack: Stack) -> None:
    status = stack.call(stack.images.ImageStatus, cri.ImageStatusRequest(
        image=cri.ImageSpec(image=stack.image)))
    assert status.image.id == stack.ids["image"]
    assert stack.image in status.image.repo_tags
    assert status.image.size > 0
    listed = stack.call(stack.images.ListImages, cri.ListImagesRequest())
    assert {i.id for i in listed.images} == {stack.ids["image"], stack.ids["pause"]}


def test_image_fs_info_is_laminas_home(stack: Stack) -> None:
    info = stack.call(stack.images.ImageFsInfo, cri.ImageFsInfoRequest())
    assert info.image_filesystems, info
    assert info.image_filesystems[0].fs_id.mountpoint == str(stack.snapshotter.home), info


def test_run_a_pod_and_a_container(stack: Stack) -> None:
    pod = stack.call(stack.runtime.RunPodSandbox, cri.RunPodSandboxRequest(
        config=pod_config())).pod_sandbox_id
    stack.ids["pod"] = pod
    created = stack.call(stack.runtime.CreateContainer, cri.CreateContainerRequest(
        pod_sandbox_id=pod, sandbox_config=pod_config(),
        config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="app"),
            image=cri.ImageSpec(image=stack.image),
            command=["sleep", "3600"])))
    stack.ids["container"] = created.container_id
    stack.call(stack.runtime.StartContainer, cri.StartContainerRequest(
        container_id=created.container_id))
    status = stack.call(stack.runtime.ContainerStatus, cri.ContainerStatusRequest(
        container_id=created.container_id))
    assert status.status.state == cri.ContainerState.CONTAINER_RUNNING, status
    # The pause container's and the app's writable layers are lamina's too.
    assert len(stack.snapshotter.layers()) == 6


def test_exec_reads_the_image_and_writes(stack: Stack) -> None:
    cid = stack.ids["container"]
    read = stack.call(stack.runtime.ExecSync, cri.ExecSyncRequest(
        container_id=cid, cmd=["cat", "/app/a.txt"], timeout=60))
    assert (read.exit_code, read.stdout, read.stderr) == (0, b"hello\n", b""), read
    wrote = stack.call(stack.runtime.ExecSync, cri.ExecSyncRequest(
        container_id=cid, timeout=60,
        cmd=["sh", "-c", "head -c 1048576 /dev/zero > /big && echo written > /new && cat /new"]))
    assert (wrote.exit_code, wrote.stdout) == (0, b"written\n"), wrote


def test_container_stats_are_laminas_usage(stack: Stack) -> None:
    cid = stack.ids["container"]
    own = stack.usage(cid)  # lamina's Usage of the container's snapshot
    assert own.size >= 1 << 20 and own.inodes >= 2, own

    def stats() -> cri.ContainerStats | None:
        got = stack.call(stack.runtime.ContainerStats, cri.ContainerStatsRequest(
            container_id=cid)).stats
        layer = got.writable_layer
        return got if layer.used_bytes.value == own.size else None

    # The CRI collects snapshot usage every stats_collect_period (1 s here).
    got = wait_for("the CRI's stats to show lamina's usage", stats, timeout=30)
    assert got.writable_layer.inodes_used.value == own.inodes
    assert got.writable_layer.fs_id.mountpoint == str(stack.snapshotter.home)


def test_stop_and_remove(stack: Stack) -> None:
    cid, pod = stack.ids["container"], stack.ids["pod"]
    stack.call(stack.runtime.StopContainer, cri.StopContainerRequest(container_id=cid,
                                                                     timeout=0))
    stack.call(stack.runtime.RemoveContainer, cri.RemoveContainerRequest(container_id=cid))
    stack.call(stack.runtime.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    stack.call(stack.runtime.RemovePodSandbox, cri.RemovePodSandboxRequest(
        pod_sandbox_id=pod))
    listed = stack.call(stack.runtime.ListContainers, cri.ListContainersRequest())
    assert list(listed.containers) == []
    # Only the images' layers are left (the writable ones went with their containers).
    # (containerd collects them in the background; a vfs layer is a whole tree to delete,
    # which takes minutes on a loaded machine)
    # containerd 2.1 can drop a removal that lands while its previous cleanup of the same
    # snapshotter still runs (its GC scheduler ignores a deletion event older than the
    # end of the last collection): the snapshot leaves its metadata but no cleanup asks
    # lamina for it until the next removal.  lamina's Remove no longer waits for the
    # tree (it was the app container's vfs tree that made the window seconds wide), so
    # this is rare now; if the layers have not settled anyway, one more removal (a
    # throwaway snapshot's) has containerd walk lamina's snapshots again.
    try:
        wait_for("the writable layers to go",
                 lambda: len(stack.snapshotter.layers()) == 4 or None, timeout=60)
    except AssertionError:
        lamina = ("-n", "k8s.io", "snapshots", "--snapshotter", "lamina")
        stack.containerd.ctr(*lamina, "prepare", "gc-nudge")
        stack.containerd.ctr(*lamina, "rm", "gc-nudge")
        wait_for("the writable layers to go",
                 lambda: len(stack.snapshotter.layers()) == 4 or None, timeout=300)


def test_remove_images_leaves_no_layer(stack: Stack) -> None:
    for ref in (stack.image, stack.pause):
        stack.call(stack.images.RemoveImage, cri.RemoveImageRequest(
            image=cri.ImageSpec(image=ref)))
    listed = stack.call(stack.images.ListImages, cri.ListImagesRequest())
    assert list(listed.images) == []
    # containerd's garbage collection removes the snapshots, lamina the layers.
    wait_for("lamina to hold no layer", lambda: stack.snapshotter.layers() == [] or None)


def test_check(stack: Stack) -> None:
    assert stack.snapshotter.stop() == 0
    proc = stack.snapshotter.lamina("check", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert mounts_under(stack.snapshotter.home) == []
    stack.snapshotter.start()
