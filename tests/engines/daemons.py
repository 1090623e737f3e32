"""Today's engines, run in the lab (:mod:`tests.lab`) against ``lamina snapshotter`` on the host.

:class:`LabContainerd` is a containerd 2.x of the lab's (Debian sid's) under a work
directory of the host's: its config is what ``lamina snapshotter
--print-containerd-config`` prints for it (the snapshotter ``lamina`` and the differ
``lamina-diff`` as proxy plugins, the diff service's order, the transfer service's
unpack configuration, CRI's images snapshotter) with its own root, state and sockets;
``ctr`` is the lab's too, one lab call a command.

containerd runs under a small supervisor, the first process of the lab's PID namespace
but one: :meth:`LabContainerd.restart` ends containerd alone (SIGTERM) and the supervisor
starts it again in the same namespaces, so that the shims (their containers) it left
running are still there for the new one to find, as under systemd.

The work directory is bound into the lab at the same path, and made a shared mount
first: lamina mounts each new EROFS layer's image on the host while containerd runs,
and containerd, in the lab's (slave) mount namespace, must see it there to mount the
layer as a lower.  containerd's lab is entered with ``pivot_root``
(:func:`tests.lab.spawn`), so that ``runc exec`` lands in its containers.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from lamina.host import mount
from tests import lab
from tests.conftest import LAYER_FORMATS, unmount_layer_images
from tests.containerd.daemon import Snapshotter, _listening, _tail
from tests.integration.engine import unmount_below
from tests.registry.harness import DistRegistry

__all__ = ["LabContainerd", "host_snapshotter", "push_corpus", "remove_work", "shared_dir"]


def host_snapshotter(work: Path, variant: str) -> Snapshotter:
    """``lamina snapshotter`` on the host for the engines of ``work`` (not started): its
    home, socket and log in ``work``, for ``variant`` (a backend, or ``BACKEND+FORMAT``:
    :data:`tests.conftest.LAYER_FORMATS`), its differ reading the content store of the
    containerd at ``work/containerd.sock`` (:class:`LabContainerd`'s)."""
    name, _, kind = variant.partition("+")
    return Snapshotter(work / "home", work / "snapshotter.log", backend=name,
                       socket_path=work / "lamina.sock",
                       options=LAYER_FORMATS[name][kind] if kind else (),
                       args=["--containerd-address", str(work / "containerd.sock")])


def push_corpus(registry: DistRegistry, tar: Path) -> str:
    """The corpus image ``tar`` (a ``docker save``) pushed to ``registry``, its layers
    gzip-compressed by skopeo; its name there."""
    name = f"{registry.address}/corpus/app:1"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    "--dest-compress-format", "gzip", f"docker-archive:{tar}",
                    f"docker://{name}"], check=True)
    return name


def remove_work(work: Path) -> None:
    """What the engines left in ``work`` (stopped first): the EROFS layers' mounts, the
    work directory's own shared bind mount (last), then the files."""
    unmount_layer_images(work)
    unmount_below(work)
    shutil.rmtree(work, ignore_errors=True)


# containerd's supervisor: runs it again when it ended on restart()'s request (the
# flag file, $1), else exits with its status.
_SUPERVISE = r"""
flag=$1; shift
while :; do
  status=0
  "$@" || status=$?
  [ -e "$flag" ] || exit "$status"
  rm -f "$flag"
done
"""


def _descendants(pid: int) -> list[int]:
    """``pid``'s processes below it, nearest first."""
    found: list[int] = []
    todo = [pid]
    while todo:
        at = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{at}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{at}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def shared_dir(path: Path) -> None:
    """Make ``path`` a mount point of its own whose mounts propagate (shared): what is
    mounted below it on the host shows in the lab's namespaces too."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-rshared", str(path)], check=True)


class LabContainerd:
    """containerd 2.x from the lab, under ``work`` (which the lab sees at the same path),
    with ``snapshotter`` as its snapshotter and differ plugins."""

    def __init__(self, work: Path, snapshotter: Snapshotter,
                 binds: Sequence[Path] = ()) -> None:
        self.work = work
        self.snapshotter = snapshotter
        self.binds = [work, snapshotter.socket.parent, *binds]
        self.root = work / "containerd"
        self.address = work / "containerd.sock"
        self.config = work / "containerd.toml"
        self.log = work / "containerd.log"
        self.restart_flag = work / "containerd.restart"
        self.proc: subprocess.Popen[str] | None = None

    def config_text(self) -> str:
        """lamina's printed config for the lab's containerd, with this one's paths."""
        printed = subprocess.run(
            [*self.snapshotter.argv("snapshotter", "--socket", str(self.snapshotter.socket),
                                    "--print-containerd-config")],
            check=True, capture_output=True, text=True,
            env={**os.environ, "PATH": f"{lab.location()}/usr/bin:{os.environ['PATH']}"},
        ).stdout
        q = json.dumps  # a TOML basic string is a JSON string, for these paths
        own = [
            f"root = {q(str(self.root / 'root'))}",
            f"state = {q(str(self.root / 'state'))}",
            "",
            "[grpc]",
            f"  address = {q(str(self.address))}",
            "[ttrpc]",
            f"  address = {q(str(self.address) + '.ttrpc')}",
            "[debug]",
            '  level = "debug"',
            "[metrics]",
            '  address = ""',
            "",
        ]
        head, _, rest = printed.partition("\n\n")  # "# …" and "version = 3" first
        return f"{head}\n{chr(10).join(own)}\n{rest}"

    def start(self, timeout: float = 90) -> None:
        """Write the config, start containerd in the lab, wait until ``ctr version``
        answers."""
        if self.proc is not None:
            raise RuntimeError("containerd is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text())
        self.restart_flag.unlink(missing_ok=True)
        self.proc = lab.spawn(["/bin/sh", "-c", _SUPERVISE, "supervise", str(self.restart_flag),
                               "containerd", "--config", str(self.config)], log=self.log,
                              binds=self.binds)
        self._wait(timeout)

    def pid(self) -> int | None:
        """containerd's process id (the host's), if it is running."""
        if self.proc is None:
            return None
        for pid in _descendants(self.proc.pid):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "containerd":
                        return pid
            except OSError:
                continue
        return None

    def restart(self, timeout: float = 90) -> None:
        """containerd alone stopped (SIGTERM, as ``systemctl restart`` does) and started
        again in the same namespaces; its shims and their containers keep running."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError("containerd is not running")
        self.restart_flag.touch()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        self._wait(max(1.0, deadline - time.monotonic()))

    def _wait(self, timeout: float) -> None:
        """Until ``ctr version`` answers; containerd's log in the error if it ended."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"containerd exited with {code}:\n" + _tail(self.log))
            if (_listening(self.address)
                    and self.ctr("version", check=False, timeout=30).returncode == 0):
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("containerd did not answer in time:\n" + _tail(self.log))

    def ctr(self, *args: str, check: bool = True, timeout: float = 600,
            binds: Sequence[Path] = ()) -> subprocess.CompletedProcess[str]:
        """The lab's ``ctr --address SOCK ARGS…``; fails on error if ``check``."""
        proc = lab.run(["ctr", "--address", str(self.address), *args], check=False,
                       timeout=timeout, binds=[*self.binds, *binds])
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {shlex.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr}\n"
                                 f"--- containerd log ---\n{_tail(self.log)}")
        return proc

    def version(self) -> str:
        """containerd's own version line."""
        return lab.run(["containerd", "--version"]).stdout.strip()

    def stop(self) -> None:
        """End containerd and everything it started (its shims, their containers): the
        lab's PID namespace goes; what it mounted went with its mount namespace."""
        if self.proc is not None:
            lab.stop(self.proc)
            self.proc = None

    def close(self) -> None:
        """Stop it; nothing of it is left mounted on the host."""
        self.stop()
        for point in reversed(mount.mounted_below(str(self.root))):
            mount.unmount(point)
