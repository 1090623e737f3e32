"""A lamina store served as containerd's snapshotter on a unix socket, with a real
client (the generated stub), for the snapshotter's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

import lamina
from lamina.backends.contract import Backend
from lamina.frontends.containerd import server
from lamina.frontends.containerd.api import diff_pb2_grpc, snapshots_pb2_grpc
from lamina.frontends.containerd.content import DEFAULT_ADDRESS, ContentStore
from lamina.frontends.containerd.differ import DiffServicer
from lamina.frontends.containerd.snapshotter import Snapshotter


class Served:
    """A store served on a socket, with a client; ``restart()`` starts it anew.  The
    differ (:attr:`differ`, its client :attr:`diff`) reads containerd's content store at
    ``containerd_address``."""

    def __init__(self, home: Path, sock: Path, backend: str = "vfs", *,
                 options: tuple[str, ...] = (),
                 containerd_address: str = DEFAULT_ADDRESS) -> None:
        self.home, self.backend, self.sock = home, backend, sock
        self.options = options
        self.containerd_address = containerd_address
        self._start()

    def _start(self) -> None:
        drv = lamina.open_driver(self.home, backend=self.backend, options=list(self.options))
        assert isinstance(drv, Backend)
        self.drv = drv
        self.sn = Snapshotter(drv)
        self.content = ContentStore(self.containerd_address)
        self.differ = DiffServicer(self.sn, self.content)
        self.server = server.start(self.sn, self.sock, differ=self.differ)
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        self.stub: Any = snapshots_pb2_grpc.SnapshotsStub(self.channel)  # type: ignore[no-untyped-call]
        self.diff: Any = diff_pb2_grpc.DiffStub(self.channel)  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        self.content.close()
        self.channel.close()
        self.server.stop(5).wait()
        self.sn.close()
        self.drv.close()

    def restart(self) -> None:
        self.stop()
        self._start()
