"""A private Docker engine on a ``lamina serve``, started for a test and always stopped.

:class:`Serve` runs ``python -m lamina serve`` on a socket; :class:`Dockerd` runs a
``dockerd`` with its own data-root, exec-root, pidfile and API socket (no iptables, no
bridge), on a storage driver given by name: a lamina plugin (Docker finds it by
its socket's name in ``/run/docker/plugins``) or a built-in one such as overlay2.
Both stop on SIGTERM and are killed if they do not; :func:`unmount_below` and
:func:`remove_plugin_files` take away whatever is left.  The integration test and
``bench/bench_docker.py`` share them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

PLUGINS_DIR = Path("/run/docker/plugins")
"""Where Docker looks for legacy plugins' sockets (fixed in Docker)."""
REPO = Path(__file__).resolve().parents[2]
STATE_SUFFIX = ".init.json"  # plugin.STATE_SUFFIX: what serve records beside its socket


def plugin_name(prefix: str = "lamina-test") -> str:
    """A plugin name no other run uses (Docker knows plugins by name, machine-wide)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def docker_missing() -> str | None:
    """Why a Docker engine cannot run here, after installing Debian's docker.io if needed."""
    missing = shutil.which("dockerd") is None or shutil.which("docker") is None
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "docker.io"],
            env=env, capture_output=True,
        )
    for tool in ("dockerd", "docker", "containerd", "runc"):
        if shutil.which(tool) is None:
            return f"no {tool} (Debian's docker.io package)"
    return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if killed)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        if _wait(proc, timeout) is None:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


class Serve:
    """``python -m lamina [--home H] serve --socket S``, logging to ``log``."""

    def __init__(self, socket_path: Path, log: Path, *, home: Path | None = None,
                 backend: str = "auto") -> None:
        self.socket = socket_path
        self.log = log
        self.home = home
        self.backend = backend
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        """Start it and wait until its socket answers."""
        args = [sys.executable, "-m", "lamina", "--backend", self.backend]
        if self.home is not None:
            args += ["--home", str(self.home)]
        args += ["serve", "--socket", str(self.socket)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lamina serve exited with {self.proc.returncode}:\n"
                                   + _tail(self.log))
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(self.socket))
                return
            time.sleep(0.05)
        raise RuntimeError("lamina serve did not listen in time:\n" + _tail(self.log))

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    def peak_rss(self) -> int:
        """The server process's own peak resident set so far, in bytes (``VmHWM``)."""
        return _status_kb(self.pid, "VmHWM:") * 1024

    def stop(self, timeout: float = 90) -> int | None:
        """SIGTERM (killed after ``timeout``); its exit status, None if it had to be killed."""
        code = _stop(self.proc, timeout)
        self.proc = None
        return code


def _status_kb(pid: int, field: str) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (serve's fork server and its apply children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


class TreeRss:
    """Samples the resident memory of a process and all below it, for the ``with`` block.

    ``peak`` is the largest sum seen (sampled every ``interval`` seconds), in bytes.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = sum(_status_kb(p, "VmRSS:") for p in process_tree(self.pid)) * 1024
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Dockerd:
    """A ``dockerd`` of its own under ``root``, on ``storage_driver``."""

    def __init__(self, root: Path, storage_driver: str) -> None:
        self.root = root
        self.storage_driver = storage_driver
        self.data_root = root / "data"
        self.exec_root = root / "exec"
        self.sock = root / "docker.sock"
        self.log = root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def driver_home(self) -> Path:
        """Where Docker asks a graph driver plugin to keep its store (``Init``'s Home)."""
        return self.data_root / self.storage_driver

    def start(self, timeout: float = 90) -> None:
        """Start it and wait until its API answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        args = [
            "dockerd", "--experimental", "--storage-driver", self.storage_driver,
            "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
            "--pidfile", str(self.root / "docker.pid"), "--host", f"unix://{self.sock}",
            "--iptables=false", "--ip-forward=false", "--bridge=none",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n"
                                   + _tail(self.log))
            if self.docker("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError("dockerd did not answer in time:\n" + _tail(self.log))

    def docker(self, *args: str, check: bool = True, timeout: float = 600,
               stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
        """``docker --host unix://SOCK ARGS…``; output as text; fails on error if ``check``."""
        proc = subprocess.run(["docker", "--host", f"unix://{self.sock}", *args],
                              stdout=stdout, stderr=subprocess.PIPE, text=True,
                              timeout=timeout, env={**os.environ, "DOCKER_CLI_HINTS": "false"})
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stderr}\n--- dockerd log ---\n{_tail(self.log)}")
        return proc

    def lines(self, *args: str) -> list[str]:
        """The output lines of ``docker ARGS…``."""
        return self.docker(*args).stdout.splitlines()

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (dockerd stops its containers and calls Cleanup); killed after ``timeout``."""
        had = self.proc is not None
        code = _stop(self.proc, timeout)
        self.proc = None
        if had and code is None:
            # Killed before it stopped its containerd and shims: those name our root.
            for pid in _processes_naming(self.root):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        return code


def _processes_naming(path: Path) -> list[int]:
    """Processes whose command line names ``path`` (a daemon's containerd and shims)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            if str(path) in cmdline:
                found.append(int(entry))
    return found


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_below(path: Path) -> None:
    """Detach every mount at or below ``path`` (what a failed run may leave)."""
    for point in mounts_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True)


def remove_plugin_files(socket_path: Path) -> None:
    """The plugin's socket and what serve records beside it."""
    for path in (socket_path, socket_path.with_name(socket_path.name + STATE_SUFFIX)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def teardown(dockerd: Dockerd | None, serves: Sequence[Serve], work: Path) -> None:
    """Stop everything a run started and remove what it made, whatever state it is in."""
    if dockerd is not None:
        dockerd.stop()
    for serve in serves:
        serve.stop()
        remove_plugin_files(serve.socket)
    unmount_below(work)
    shutil.rmtree(work, ignore_errors=True)
