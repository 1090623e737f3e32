"""A content store of the tests' own (containerd's ``Content`` service, ``Info`` and
``Read``) on a unix socket, which can lie, for the differ's hostile tests."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from lamina.frontends.containerd.api import content_pb2, content_pb2_grpc

CHUNK = 64 << 10


class Blobs(content_pb2_grpc.ContentServicer):
    """A content store that holds ``blobs`` and reads them back as :attr:`mode` says."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.mode = "honest"
        self.namespaces: list[str | None] = []

    def put(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def Info(self, request: Any, context: grpc.ServicerContext) -> Any:
        data = self.blobs.get(request.digest)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: not found")
        ns = dict(context.invocation_metadata()).get("containerd-namespace")
        self.namespaces.append(ns if isinstance(ns, str) else None)
        size = len(data) + (1 if self.mode == "info-lies" else 0)
        return content_pb2.InfoResponse(info=content_pb2.Info(digest=request.digest, size=size))

    def Read(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        data = self.blobs[request.digest]
        mode = self.mode
        if mode == "wrong":
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
        elif mode == "more":
            data += b"\0" * 100
        elif mode == "less":
            data = data[:-100]
        elif mode == "huge":  # one message past the client's limit (8 MiB)
            yield content_pb2.ReadContentResponse(offset=0, data=data + bytes(9 << 20))
            return
        for i, off in enumerate(range(0, len(data), CHUNK)):
            if i == 2 and mode == "cut":
                context.abort(grpc.StatusCode.UNAVAILABLE, "the content store went away")
            if i == 2 and mode == "stall":
                while context.is_active():
                    time.sleep(0.05)
                return
            shift = CHUNK if mode == "offsets" and i == 1 else 0
            yield content_pb2.ReadContentResponse(offset=off + shift, data=data[off:off + CHUNK])


@contextlib.contextmanager
def serving(sock: Path) -> Iterator[Blobs]:
    """A :class:`Blobs` served on ``sock`` while within."""
    store = Blobs()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    content_pb2_grpc.add_ContentServicer_to_server(store, srv)  # type: ignore[no-untyped-call]
    srv.add_insecure_port(f"unix:{sock}")
    srv.start()
    try:
        yield store
    finally:
        srv.stop(1).wait()
