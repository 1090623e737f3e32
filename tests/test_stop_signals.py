"""The servers stop on SIGTERM whichever of their threads the kernel gives it to.

A signal sent to a process goes to any one of its threads; ``kill`` from containerd's
test drivers, systemd or Docker gives it, as often as not, to one of the gRPC server's
threads.  The snapshotter once slept in ``Event.wait`` and so missed about one SIGTERM
in a hundred (containerd's suite: "did not stop within 30s of SIGTERM").  Here the
signal is sent to each thread that is not the main one, with ``tgkill``, which is what
the kernel does at random.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.containerd.daemon import short_dir

REPO = Path(__file__).resolve().parent.parent
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[platform.machine()]
_libc = ctypes.CDLL(None, use_errno=True)


def tgkill(pid: int, tid: int, sig: int) -> None:
    if _libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def threads(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def started(argv: list[str], sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(sock))
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("did not listen in time:\n" + log.read_text())


def server_argv(kind: str, home: Path, sock: Path) -> list[str]:
    lamina = [sys.executable, "-m", "lamina", "--home", str(home), "--backend", "vfs"]
    if kind == "snapshotter":
        return [*lamina, "snapshotter", "--socket", str(sock)]
    return [*lamina, "serve", "--socket", str(sock)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("kind", ["snapshotter", "serve"])
def test_a_stop_signal_to_any_thread_stops_the_server(kind: str, sig: int,
                                                      tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the servers keep layers as root here")
    scratch = short_dir("lss-")
    try:
        sock = scratch / "s.sock"
        proc = started(server_argv(kind, tmp_path / "home", sock), sock, tmp_path / "log")
        try:
            # gRPC's threads; the plugin's loop and workers (started after its socket)
            deadline = time.monotonic() + 30
            while not (others := [t for t in threads(proc.pid) if t != proc.pid]):
                assert time.monotonic() < deadline, f"lamina {kind} runs one thread only"
                time.sleep(0.02)
            tgkill(proc.pid, others[-1], sig)
            status = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"lamina {kind} did not stop within 15 s of a signal "
                                 f"to one of its threads:\n{(tmp_path / 'log').read_text()}"
                                 ) from None
        assert status == 0, (tmp_path / "log").read_text()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            for leftover in scratch.iterdir():
                leftover.unlink()
            scratch.rmdir()
