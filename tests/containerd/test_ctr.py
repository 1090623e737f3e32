"""A real containerd on ``lamina snapshotter`` (contract §6), driven with ``ctr``.

One ``lamina snapshotter`` and one private ``containerd`` (Debian's 1.6, the snapshotter
as its proxy plugin ``lamina``) per backend, for the module (``conftest.py``).  With the
corpus's ``app-docker-save.tar`` (``shared/corpus/build-corpus.sh``): ``ctr image import
--snapshotter lamina`` makes one committed snapshot per layer, named by chain id, and one
lamina layer each; ``ctr run`` sees the image's union (the top layer's files, hardlinks,
symlinks, fifo, setuid bit, file capability, whiteouts, opaque directory, owners); a
container's writes show in ``ctr snapshots usage`` / ``info`` and in its mounts;
restarting lamina and then containerd loses nothing; a second namespace's import of the
same image gets lamina's layers through the remote-snapshotter protocol, no new layers;
``ctr images rm --sync`` (containerd's garbage collection) leaves no snapshot and no
layer; ``lamina check`` passes at the end.

The tests share the daemons and run in file order; the last ones remove everything.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import mounts_under
from tests.containerd.conftest import PLUGIN
from tests.containerd.daemon import Containerd, Snapshotter

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

IMAGE = "docker.io/corpus/app:1"  # the save's RepoTags "corpus/app:1", as ctr names it
NS = "test"
NS2 = "test2"
WRITER = "writer"  # the container that writes, kept until test_remove_and_gc
MB = 1 << 20
WRITE = "echo written > /newfile && mkdir /newdir && head -c 3145728 /dev/zero > /newdir/big"
# What the container reads, as JSON: the top layer's contents and the union's whiteouts.
READ = r"""
import json, os, stat
deep = "/app/deep" + "".join(f"/dir-with-a-rather-long-name-{i}" for i in range(1, 13))
a, b = os.stat("/app/a.txt"), os.stat("/app/b.txt")
print(json.dumps({
    "a": open("/app/a.txt").read(),
    "a_setuid": bool(a.st_mode & stat.S_ISUID),
    "a_b_hardlinked": (a.st_ino, a.st_nlink) == (b.st_ino, 2),
    "abs_link": os.readlink("/app/abs-link"),
    "rel_link": os.readlink("/app/rel-link"),
    "fifo": stat.S_ISFIFO(os.lstat("/app/fifo").st_mode),
    "cap": os.getxattr("/app/cap", "security.capability").hex(),
    "long": open("/app/" + "n" * 150).read(),
    "deep": open(deep + "/f").read(),
    "man": os.path.exists("/usr/share/man"),
    "perl": os.path.exists("/usr/bin/perl"),
    "cron_daily": os.path.exists("/etc/cron.daily"),
    "apt_conf": sorted(os.listdir("/etc/apt/apt.conf.d")),
    "var_log_mode": oct(os.stat("/var/log").st_mode & 0o7777),
    "home_owner": [os.stat("/home").st_uid, os.stat("/home").st_gid],
}))
"""
EXPECTED_READ = {
    "a": "hello\n",
    "a_setuid": True,
    "a_b_hardlinked": True,
    "abs_link": "/etc/passwd",
    "rel_link": "../etc/hostname",
    "fifo": True,
    "cap": "0100000200200000000000000000000000000000",
    "long": "long\n",
    "deep": "deep\n",
    "man": False,
    "perl": False,
    "cron_daily": False,
    "apt_conf": ["99x"],
    "var_log_mode": "0o700",
    "home_owner": [1000, 1000],
}


@dataclass
class Stack:
    """The daemons, the image's chain ids (base first) and what the module has seen."""

    containerd: Containerd
    snapshotter: Snapshotter
    chain: list[str]
    tar: Path
    writer_usage: tuple[int, int] = (0, 0)

    def ctr(self, *args: str, ns: str = NS, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``ctr -n NS ARGS…``."""
        return self.containerd.ctr("-n", ns, *args, check=check, timeout=timeout)

    def snapshots(self, ns: str = NS) -> dict[str, tuple[str, str]]:
        """``ctr snapshots --snapshotter lamina ls``: key → (parent, kind)."""
        found = {}
        out = self.ctr("snapshots", "--snapshotter", PLUGIN, "ls", ns=ns).stdout
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) == 3:
                found[fields[0]] = (fields[1], fields[2])
            elif len(fields) == 2:
                found[fields[0]] = ("", fields[1])
        return found

    def usage(self, key: str, ns: str = NS) -> tuple[int, int]:
        """``ctr snapshots usage --b KEY``: (bytes, inodes)."""
        out = self.ctr("snapshots", "--snapshotter", PLUGIN, "usage", "--b", key, ns=ns).stdout
        _, size, inodes = out.splitlines()[-1].split()
        return int(size), int(inodes)

    def info(self, key: str, ns: str = NS) -> dict[str, object]:
        """``ctr snapshots info KEY``."""
        info: dict[str, object] = json.loads(
            self.ctr("snapshots", "--snapshotter", PLUGIN, "info", key, ns=ns).stdout)
        return info

    def layers(self) -> list[dict[str, object]]:
        """lamina's own layers (``lamina ls --json``)."""
        return self.snapshotter.layers()

    def until_ok(self, *args: str, ns: str = NS,
                 timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``ctr ARGS…``, retried while containerd's connection to lamina comes back."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.ctr(*args, ns=ns, check=time.monotonic() > deadline)
            if proc.returncode == 0:
                return proc
            time.sleep(0.5)


def chain_ids(docker_save: Path) -> list[str]:
    """The image's layers' chain ids, base first (OCI image-spec, config.md)."""
    with tarfile.open(docker_save) as tar:
        def member(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None, name
            return f.read()

        manifest = json.loads(member("manifest.json"))
        config = json.loads(member(manifest[0]["Config"]))
    chain: list[str] = []
    for diff_id in config["rootfs"]["diff_ids"]:
        chain.append(diff_id if not chain else
                     "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


@pytest.fixture(scope="module")
def stack(containerd: Containerd, snapshotter: Snapshotter, corpus_dir: Path) -> Stack:
    """The module's daemons and the corpus image's facts."""
    tar = corpus_dir / "app-docker-save.tar"
    return Stack(containerd, snapshotter, chain_ids(tar), tar)


def check_writes_mounted(stack: Stack) -> None:
    """Mounting ``ctr snapshots mounts`` of the writer's snapshot shows what it wrote."""
    out = stack.ctr("snapshots", "--snapshotter", PLUGIN, "mounts", "/TARGET", WRITER).stdout
    specs = [line.split() for line in out.splitlines() if line.strip()]
    assert specs, "no mounts for the writer's snapshot"
    with tempfile.TemporaryDirectory(prefix="lamina-ctr-") as target:
        mounted = 0
        try:
            for spec in specs:
                # mount -t TYPE SOURCE /TARGET -o OPTIONS (ctr's printMounts)
                assert spec[:2] == ["mount", "-t"] and spec[4] == "/TARGET", spec
                subprocess.run(["mount", "-t", spec[2], spec[3], target, *spec[5:]],
                               check=True, capture_output=True)
                mounted += 1
            root = Path(target)
            assert (root / "newfile").read_text() == "written\n"
            assert (root / "newdir/big").stat().st_size == 3 * MB
            assert (root / "app/a.txt").read_text() == "hello\n"
            assert not (root / "usr/share/man").exists()
        finally:
            for _ in range(mounted):
                subprocess.run(["umount", target], capture_output=True)


def test_plugin_listed(stack: Stack) -> None:
    plugins = stack.containerd.lines("plugins", "ls")
    rows = [line.split() for line in plugins if line.split()[:2] ==
            ["io.containerd.snapshotter.v1", PLUGIN]]
    assert rows and rows[0][-1] == "ok", "\n".join(plugins)


def test_import(stack: Stack) -> None:
    out = stack.ctr("image", "import", "--snapshotter", PLUGIN, str(stack.tar)).stdout
    assert IMAGE in out, out
    assert IMAGE in stack.ctr("images", "ls", "-q").stdout.split()
    # One committed snapshot per layer, named by chain id, each on the one below.
    expected = {c: (p, "Committed") for c, p in zip(stack.chain, ["", *stack.chain[:-1]],
                                                      strict=True)}
    assert stack.snapshots() == expected
    layers = stack.layers()
    assert len(layers) == len(stack.chain), f"one lamina layer per image layer: {layers}"
    for chain_id in stack.chain:
        size, inodes = stack.usage(chain_id)
        assert size > 0 and inodes > 0, (chain_id, size, inodes)


def test_run_reads_the_image(stack: Stack) -> None:
    proc = stack.ctr("run", "--rm", "--snapshotter", PLUGIN, IMAGE, "reader",
                     "python3", "-c", READ)
    assert json.loads(proc.stdout) == EXPECTED_READ
    # --rm removed the container: its snapshot is gone from containerd's view.
    assert "reader" not in stack.snapshots()


def test_container_writes_show_in_usage(stack: Stack) -> None:
    stack.ctr("run", "--snapshotter", PLUGIN, IMAGE, WRITER, "sh", "-c", WRITE)
    info = stack.info(WRITER)
    assert info["Kind"] == "Active" and info["Parent"] == stack.chain[-1], info
    size, inodes = stack.usage(WRITER)
    # The 3 MiB file, /newfile, /newdir and whatever the runtime made (mount points).
    assert 3 * MB <= size < 4 * MB, size
    assert 3 <= inodes < 50, inodes
    stack.writer_usage = (size, inodes)
    # The image's layers, the writer's, and the --rm reader's until containerd's next gc.
    assert len(stack.layers()) in (len(stack.chain) + 1, len(stack.chain) + 2), stack.layers()
    check_writes_mounted(stack)


def test_restarts_lose_nothing(stack: Stack) -> None:
    before = stack.snapshots()
    layers = {json.dumps(layer, sort_keys=True) for layer in stack.layers()}
    assert stack.snapshotter.stop() == 0, "the snapshotter did not stop cleanly on SIGTERM"
    stack.snapshotter.start()
    # containerd redials a proxy plugin with a backoff: the first calls may fail.
    stack.until_ok("snapshots", "--snapshotter", PLUGIN, "usage", "--b", WRITER)
    assert stack.usage(WRITER) == stack.writer_usage
    assert stack.snapshots() == before
    assert {json.dumps(layer, sort_keys=True) for layer in stack.layers()} == layers
    # containerd collects garbage when it starts: at most the --rm reader's layer goes.
    stack.containerd.restart()
    assert stack.snapshots() == before
    assert stack.usage(WRITER) == stack.writer_usage
    after = {json.dumps(layer, sort_keys=True) for layer in stack.layers()}
    assert after <= layers and len(after) >= len(stack.chain) + 1, (layers, after)
    check_writes_mounted(stack)
    proc = stack.ctr("run", "--rm", "--snapshotter", PLUGIN, IMAGE, "reader2",
                     "python3", "-c", READ)
    assert json.loads(proc.stdout) == EXPECTED_READ


def test_second_namespace_reuses_the_layers(stack: Stack) -> None:
    # containerd asks with Prepare(label containerd.io/snapshot.ref=CHAIN); lamina holds
    # the layer, answers AlreadyExists, and containerd applies nothing.
    # Compared as sets of ids: containerd's garbage collection may still be removing the
    # previous test's --rm reader, so a layer may go meanwhile, but none may come.
    before = {layer["id"] for layer in stack.layers()}
    stack.ctr("image", "import", "--snapshotter", PLUGIN, str(stack.tar), ns=NS2)
    assert sorted(stack.snapshots(ns=NS2)) == sorted(stack.chain)
    made = {layer["id"] for layer in stack.layers()} - before
    assert not made, f"a second import made new layers: {made}"
    proc = stack.ctr("run", "--rm", "--snapshotter", PLUGIN, IMAGE, "reader3",
                     "python3", "-c", READ, ns=NS2)
    assert json.loads(proc.stdout) == EXPECTED_READ
    stack.ctr("images", "rm", "--sync", IMAGE, ns=NS2)
    assert stack.snapshots(ns=NS2) == {}
    # The first namespace still uses every layer (the --rm readers' are collected now).
    assert len(stack.layers()) == len(stack.chain) + 1, stack.layers()
    assert sorted(stack.snapshots()) == sorted([*stack.chain, WRITER])


def test_remove_and_gc(stack: Stack) -> None:
    stack.ctr("containers", "rm", WRITER)
    stack.ctr("images", "rm", "--sync", IMAGE, ns=NS2, check=False)  # if that test failed
    stack.ctr("images", "rm", "--sync", IMAGE)
    assert stack.ctr("images", "ls", "-q").stdout.split() == []
    assert stack.snapshots() == {}
    assert stack.layers() == [], "containerd's garbage collection left layers in lamina"


def test_check(stack: Stack) -> None:
    assert stack.snapshotter.stop() == 0, "the snapshotter did not stop cleanly on SIGTERM"
    proc = stack.snapshotter.lamina("check", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert mounts_under(stack.snapshotter.home) == [], "mounts left under the store"
    stack.snapshotter.start()
    assert stack.layers() == []
