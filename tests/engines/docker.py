"""Docker 28 from the lab with its containerd image store, on a :class:`LabContainerd`.

:class:`LabDockerd` is the lab's ``dockerd`` on an existing containerd of the lab
(``--containerd SOCK``: it starts none of its own) with ``daemon.json``'s
``{"features": {"containerd-snapshotter": true}, "storage-driver": SNAPSHOTTER}``: with
the containerd image store, ``storage-driver`` names the containerd snapshotter that
keeps images and containers (``docker info``: ``driver-type:
io.containerd.snapshotter.v1``), so ``lamina`` is the proxy plugin of containerd's
config.  It has its own data-root, exec-root, pidfile and API socket under the work
directory, and no networking of its own (no iptables, no bridge: containers run with
``--network none``).

dockerd runs in containerd's mount and PID namespaces (``nsenter`` into the process
:meth:`LabContainerd.start` started, with its root, the lab's), not in a lab namespace
of its own: with the containerd image store dockerd mounts a container's root
filesystem itself (under its data-root) and hands runc, through containerd's shim, the
path, which must show that mount.  Each lab namespace is a slave of the host's, so a
mount made in one never reaches another; in containerd's they are one.  Stopping
containerd (its PID namespace) ends dockerd too: stop dockerd first.

containerd's lab is entered with ``pivot_root`` (:func:`tests.lab.spawn`), not
``chroot``: runc's containers get mount namespaces copied from containerd's, and ``runc
exec`` (``docker exec``, BuildKit's) joins one with ``setns``, which sets the process's
root to the namespace's root: under a chroot that would be the host's ``/``.

``docker`` is the lab's CLI (with its buildx plugin), one lab call a command.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests import lab
from tests.containerd.daemon import _listening, _tail
from tests.engines.daemons import LabContainerd

__all__ = ["LabDockerd"]

LAB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError), os.scandir(f"/proc/{pid}/task") as tasks:
        for task in tasks:
            with contextlib.suppress(OSError), open(f"{task.path}/children") as f:
                found += [int(p) for p in f.read().split()]
    return found


def _descendant(pid: int, comm: str) -> int | None:
    """The first process below ``pid`` whose command name is ``comm`` (host PIDs)."""
    todo = _children(pid)
    while todo:
        child = todo.pop(0)
        with contextlib.suppress(OSError), open(f"/proc/{child}/comm") as f:
            if f.read().strip() == comm:
                return child
        todo += _children(child)
    return None


class LabDockerd:
    """The lab's ``dockerd`` on ``containerd`` (running), its image store containerd's
    with the snapshotter ``snapshotter``, its files under ``containerd.work/docker``."""

    def __init__(self, containerd: LabContainerd, snapshotter: str = "lamina",
                 binds: Sequence[Path] = ()) -> None:
        self.containerd = containerd
        self.snapshotter = snapshotter
        self.root = containerd.work / "docker"
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.config = self.root / "daemon.json"
        self.cli_config = self.root / "cli"
        self.sock = containerd.work / "docker.sock"
        self.log = containerd.work / "dockerd.log"
        self.binds = [*containerd.binds, *binds]
        self.proc: subprocess.Popen[str] | None = None

    def argv(self) -> list[str]:
        """dockerd's command line (in the lab)."""
        return [
            "dockerd", "--config-file", str(self.config),
            "--containerd", str(self.containerd.address),
            "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
            "--pidfile", str(self.root / "docker.pid"), "--host", f"unix://{self.sock}",
            "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--bridge=none",
            "--debug",
        ]

    def start(self, timeout: float = 90) -> None:
        """Write daemon.json, start dockerd in containerd's namespaces, wait until
        ``docker version`` answers."""
        if self.proc is not None:
            raise RuntimeError("dockerd is already running")
        ctd = self.containerd.proc
        target = _descendant(ctd.pid, "containerd") if ctd is not None else None
        if target is None:
            raise RuntimeError("containerd is not running")
        self.root.mkdir(parents=True, exist_ok=True)
        self.cli_config.mkdir(exist_ok=True)
        self.config.write_text(json.dumps({
            "storage-driver": self.snapshotter,
            "features": {"containerd-snapshotter": True},
        }, indent=2) + "\n")
        # --root/--wd: containerd's (the lab's) root; env -i: the lab's plain environment.
        argv = ["nsenter", "--target", str(target), "--mount", "--pid", "--root", "--wd",
                "--", "/usr/bin/env", "-i", f"PATH={LAB_PATH}", "HOME=/root",
                "LC_ALL=C.UTF-8", *self.argv()]
        with open(self.log, "a") as out:
            out.write(f"# {shlex.join(argv)}\n")
            out.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"dockerd exited with {code}:\n" + _tail(self.log))
            if (_listening(self.sock)
                    and self.docker("version", check=False, timeout=30).returncode == 0):
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("dockerd did not answer in time:\n" + _tail(self.log))

    def docker(self, *args: str, check: bool = True, timeout: float = 600,
               binds: Sequence[Path] = (), cwd: str | None = None,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        """The lab's ``docker --host unix://SOCK ARGS…``; fails on error if ``check``."""
        proc = lab.run(["docker", "--host", f"unix://{self.sock}", *args], check=False,
                       timeout=timeout, binds=[*self.binds, *binds], cwd=cwd, input=input,
                       env={"DOCKER_CONFIG": str(self.cli_config), "DOCKER_CLI_HINTS": "false",
                            "BUILDX_NO_DEFAULT_ATTESTATIONS": "1"})
        if check and proc.returncode != 0:
            gone = self.proc is not None and self.proc.poll() is not None
            raise AssertionError(
                f"docker {shlex.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}\n"
                + (f"dockerd exited ({self.proc.returncode})\n" if gone and self.proc else "")
                + f"--- dockerd log ---\n{_tail(self.log)}\n"
                f"--- containerd log ---\n{_tail(self.containerd.log)}")
        return proc

    def version(self) -> str:
        """``Docker VERSION (client), VERSION (engine)``."""
        fmt = "Docker {{.Client.Version}} (client), {{.Server.Version}} (engine)"
        return self.docker("version", "--format", fmt).stdout.strip()

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM to dockerd (it stops its containers), SIGKILL after ``timeout``; its
        exit status, None if it had to be killed."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        pid = _descendant(proc.pid, "dockerd")
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            return None
