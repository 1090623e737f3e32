"""A real containerd on a ``lamina snapshotter``, started for a test and always stopped.

:class:`Snapshotter` runs ``python -m lamina --home H --backend B snapshotter --socket S``
(contract §6); :class:`Containerd` runs Debian's ``containerd`` (1.6) with a config of
its own (``version = 2``; root, state, sockets and ``/opt`` under its directory; the CRI
plugin and the snapshotters that cannot work here disabled) that loads each given
snapshotter socket as a proxy plugin (``[proxy_plugins.NAME] type = "snapshot"``), and
:meth:`Containerd.ctr` runs ``ctr --address SOCK …`` on it.  Both stop on SIGTERM and are
killed if they do not; :meth:`Containerd.stop` then kills the shims it left.

The snapshotter's command comes from ``$LAMINA_SNAPSHOTTER_CMD`` (a JSON array or a
space-separated command line), else ``sys.executable -m lamina``: the same convention as
the Go conformance suite (``tests/containerd/suite``), which gets it from the pytest run.
Unix socket paths are at most 107 bytes, so the sockets live in short directories of
their own under /tmp (:func:`short_dir`), not in pytest's long temporary paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.integration.engine import REPO, _processes_naming, _stop, _tail, unmount_below

SOCKET_MAX = 107
"""The longest unix socket path (``sun_path`` is 108 bytes with its NUL)."""
DISABLED_PLUGINS = (
    # Kubernetes' CRI: wants CNI, a sandbox image, and is not what is under test.
    "io.containerd.grpc.v1.cri",
    # Snapshotters that need a filesystem or a kernel module this machine lacks; they would
    # only log why they skipped.  overlayfs and native stay, for comparison.
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    # Pushes metrics and traces nowhere.
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)
TOOLS = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")


def snapshotter_command() -> list[str]:
    """The command that runs lamina, before its options (``$LAMINA_SNAPSHOTTER_CMD``)."""
    raw = os.environ.get("LAMINA_SNAPSHOTTER_CMD", "").strip()
    if not raw:
        return [sys.executable, "-m", "lamina"]
    if raw.startswith("["):
        argv = json.loads(raw)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"LAMINA_SNAPSHOTTER_CMD is not a JSON array of strings: {raw}")
        return list(argv)
    return shlex.split(raw)


def containerd_missing() -> str | None:
    """Why containerd cannot run here (Debian's containerd and runc packages), or None."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"no {tool} (Debian's containerd and runc packages)"
    return None


def short_dir(prefix: str) -> Path:
    """A new directory under /tmp with a path short enough for sockets in it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _listening(path: Path) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(path))
        return True
    return False


class Snapshotter:
    """``LAMINA --home H --backend B snapshotter --socket S``, logging to ``log``.

    ``socket`` defaults to ``lamina.sock`` in a short directory of its own (removed by
    :meth:`close`).  :meth:`lamina` runs the CLI on the same home (``ls``, ``check``).
    """

    def __init__(self, home: Path, log: Path, *, backend: str = "auto",
                 socket_path: Path | None = None, args: Sequence[str] = (),
                 options: Sequence[str] = ()) -> None:
        self.home = home
        self.log = log
        self.backend = backend
        self.options = list(options)  # driver options (``--opt KEY=VALUE``)
        self.args = list(args)  # after ``snapshotter --socket S`` (--containerd-address)
        self._own_dir: Path | None = None
        if socket_path is None:
            self._own_dir = short_dir("lsn-")
            socket_path = self._own_dir / "lamina.sock"
        if len(str(socket_path)) > SOCKET_MAX:
            raise ValueError(f"socket path too long for a unix socket: {socket_path}")
        self.socket = socket_path
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, *args: str) -> list[str]:
        """The command line of ``lamina --home H --backend B ARGS…``."""
        opts = [a for o in self.options for a in ("--opt", o)]
        return [*snapshotter_command(), "--home", str(self.home), "--backend", self.backend,
                *opts, *args]

    def start(self, timeout: float = 60) -> None:
        """Start it and wait until its socket answers."""
        if self.proc is not None:
            raise RuntimeError("the snapshotter is already running")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv("snapshotter", "--socket", str(self.socket), *self.args)
        with open(self.log, "ab") as log:
            log.write(f"# {shlex.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"lamina snapshotter exited with {code}:\n" + _tail(self.log))
            if _listening(self.socket):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("lamina snapshotter did not listen in time:\n" + _tail(self.log))

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (killed after ``timeout``); its exit status, None if it had to be killed."""
        code = _stop(self.proc, timeout)
        self.proc = None
        return code

    def restart(self, timeout: float = 60) -> int | None:
        """:meth:`stop` then :meth:`start`; the status it stopped with."""
        code = self.stop()
        self.start(timeout)
        return code

    def lamina(self, *args: str, check: bool = True,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``lamina --home H --backend B ARGS…`` (the CLI, on the snapshotter's store)."""
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"lamina {shlex.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def layers(self) -> list[dict[str, object]]:
        """``lamina ls --json``'s layers."""
        layers: list[dict[str, object]] = json.loads(self.lamina("--json", "ls").stdout)["layers"]
        return layers

    def close(self) -> None:
        """Stop it and remove its socket's directory (when it made one)."""
        self.stop()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)


class Containerd:
    """A ``containerd`` of its own under ``root``, with ``proxies`` as snapshotter plugins.

    ``proxies`` maps a plugin name (what ``ctr --snapshotter NAME`` says) to the socket
    its snapshotter serves on.  Its sockets are in a short directory of its own.
    """

    def __init__(self, root: Path, proxies: Mapping[str, Path] | None = None, *,
                 debug: bool = True) -> None:
        self.root = root
        self.proxies = dict(proxies or {})
        self.debug = debug
        self.sockets = short_dir("ctd-")
        self.address = self.sockets / "containerd.sock"
        self.config = root / "config.toml"
        self.log = root / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        """The ``config.toml`` it runs with."""
        q = json.dumps  # a TOML basic string is a JSON string, for these paths and names
        lines = [
            "version = 2",
            f"root = {q(str(self.root / 'root'))}",
            f"state = {q(str(self.root / 'state'))}",
            f"disabled_plugins = [{', '.join(q(p) for p in DISABLED_PLUGINS)}]",
            "",
            "[grpc]",
            f"  address = {q(str(self.address))}",
            "",
            "[ttrpc]",
            f"  address = {q(str(self.address) + '.ttrpc')}",
            "",
            "[debug]",
            f"  address = {q(str(self.sockets / 'debug.sock'))}",
            f"  level = {q('debug' if self.debug else 'info')}",
            "",
            "[metrics]",
            '  address = ""',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {q(str(self.root / 'opt'))}",
            "",
        ]
        for name, path in self.proxies.items():
            lines += [
                f"[proxy_plugins.{q(name)}]",
                '  type = "snapshot"',
                f"  address = {q(str(path))}",
                "",
            ]
        return "\n".join(lines)

    def start(self, timeout: float = 90) -> None:
        """Write the config, start it and wait until ``ctr version`` answers."""
        if self.proc is not None:
            raise RuntimeError("containerd is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text())
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)],
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"containerd exited with {code}:\n" + _tail(self.log))
            if (_listening(self.address)
                    and self.ctr("version", check=False, timeout=10).returncode == 0):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("containerd did not answer in time:\n" + _tail(self.log))

    def ctr(self, *args: str, check: bool = True, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``ctr --address SOCK ARGS…``; output as text; fails on error if ``check``."""
        proc = subprocess.run(["ctr", "--address", str(self.address), *args],
                              capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {shlex.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr}\n"
                                 f"--- containerd log ---\n{_tail(self.log)}")
        return proc

    def lines(self, *args: str) -> list[str]:
        """The output lines of ``ctr ARGS…``."""
        return self.ctr(*args).stdout.splitlines()

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (killed after ``timeout``); its exit status, None if it had to be killed.

        Running containers' shims outlive containerd by design; a stop that is not a
        :meth:`restart` should follow :meth:`kill_shims`.
        """
        code = _stop(self.proc, timeout)
        self.proc = None
        return code

    def restart(self, timeout: float = 90) -> int | None:
        """:meth:`stop` then :meth:`start` (same root, config and sockets)."""
        code = self.stop()
        self.start(timeout)
        return code

    def kill_shims(self) -> None:
        """Kill the shims (and their containers' processes) that name this containerd."""
        for pid in _processes_naming(self.sockets):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop it, kill its shims, unmount what it left under its root, drop its sockets."""
        self.stop()
        self.kill_shims()
        unmount_below(self.root)
        shutil.rmtree(self.sockets, ignore_errors=True)
