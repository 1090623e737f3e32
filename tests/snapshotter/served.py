"""A lamina store served as containerd's snapshotter on a unix socket, with a real
client (the generated stub), for the snapshotter's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

import lamina
from lamina.backends.contract import Backend
from lamina.frontends.containerd import server
from lamina.frontends.containerd.api import snapshots_pb2_grpc
from lamina.frontends.containerd.snapshotter import Snapshotter


class Served:
    """A store served on a socket, with a client; ``restart()`` starts it anew."""

    def __init__(self, home: Path, sock: Path, backend: str = "vfs") -> None:
        self.home, self.backend, self.sock = home, backend, sock
        self._start()

    def _start(self) -> None:
        drv = lamina.open_driver(self.home, backend=self.backend)
        assert isinstance(drv, Backend)
        self.drv = drv
        self.sn = Snapshotter(drv)
        self.server = server.start(self.sn, self.sock)
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        self.stub: Any = snapshots_pb2_grpc.SnapshotsStub(self.channel)  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(5).wait()
        self.sn.close()
        self.drv.close()

    def restart(self) -> None:
        self.stop()
        self._start()
