"""The servers stop on SIGTERM whichever of their threads the kernel gives it to.

A signal sent to a process goes to any one of its threads; ``kill`` from containerd's
test drivers, systemd or Docker gives it, as often as not, to one of the gRPC server's
threads.  The snapshotter once slept in ``Event.wait`` and so missed about one SIGTERM
in a hundred (containerd's suite: "did not stop within 30s of SIGTERM").  Here the
signal is sent, with ``tgkill``, to a thread that is not the main one, which is what the
kernel does at random.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.containerd.daemon import Snapshotter
from tests.integration.engine import Serve, remove_plugin_files

pytestmark = pytest.mark.root

SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[platform.machine()]
_libc = ctypes.CDLL(None, use_errno=True)


def tgkill(pid: int, tid: int, sig: int) -> None:
    if _libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def threads(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("kind", ["snapshotter", "serve"])
def test_a_stop_signal_to_any_thread_stops_the_server(kind: str, sig: int,
                                                      tmp_path: Path) -> None:
    log = tmp_path / "log"
    server = (Snapshotter(tmp_path / "home", log, backend="vfs") if kind == "snapshotter"
              else Serve(tmp_path / "s.sock", log, home=tmp_path / "home", backend="vfs"))
    server.start()
    proc = server.proc
    assert proc is not None
    try:
        # gRPC's threads; the plugin's loop and workers (started after its socket)
        deadline = time.monotonic() + 30
        while not (others := [t for t in threads(proc.pid) if t != proc.pid]):
            assert time.monotonic() < deadline, f"lamina {kind} runs one thread only"
            time.sleep(0.02)
        tgkill(proc.pid, others[-1], sig)
        try:
            status = proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lamina {kind} did not stop within 15 s of a signal "
                                 f"to one of its threads:\n{log.read_text()}") from None
        assert status == 0, log.read_text()
        assert not server.socket.exists()
    finally:
        if isinstance(server, Snapshotter):
            server.close()
        else:
            server.stop()
            remove_plugin_files(server.socket)
