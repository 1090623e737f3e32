"""containerd's content store, read over containerd's socket: a blob as a checked stream.

A proxy differ is given a descriptor, not the blob: the blob is in containerd's content
store (``containerd.services.content.v1.Content``), in the namespace the call came from
(the ``containerd-namespace`` metadata, passed on as it came).  :meth:`ContentStore.open`
asks ``Info`` for the blob's size (a blob of another size than its descriptor's is
refused before a byte is read), then streams ``Read``: each response's offset must be
where the last one ended, and the bytes pass through
:class:`~lamina.image.content.VerifyingReader` (the image store's: the size and the
digest are checked as the bytes pass and at their end, ``Corrupt`` otherwise).  Nothing
is held in memory but the response being read (containerd sends 1 MiB at a time; a
message over :data:`MAX_MESSAGE` is refused by gRPC).

Errors: a blob containerd does not hold is ``NotFound``; any other failure of a call
(containerd gone, the deadline passed, the call cancelled) is :class:`ContentUnavailable`
with containerd's gRPC status, raised from the read that met it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, cast

import grpc

from lamina import errors
from lamina.frontends.containerd.api import content_pb2, content_pb2_grpc
from lamina.image.content import VerifyingReader

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
NAMESPACE_KEY = "containerd-namespace"
"""The gRPC metadata key that carries containerd's namespace."""
MAX_MESSAGE = 8 << 20
"""The largest message taken from the content store (its Read chunks are 1 MiB)."""


class ContentUnavailable(errors.LaminaError):
    """containerd's content store could not be read (its gRPC status is :attr:`code`)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


def _failure(e: grpc.RpcError, what: str) -> errors.LaminaError:
    call = cast(grpc.Call, e)
    code, details = call.code(), call.details()
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.NotFound(f"{what} is not in containerd's content store: {details}")
    return ContentUnavailable(f"{what}: containerd's content store: {code.name}: {details}",
                              code)


class _Chunks:
    """The data of a ``Read`` stream as a file to read (each response's offset checked)."""

    def __init__(self, responses: Iterator[content_pb2.ReadContentResponse], what: str) -> None:
        self._responses = responses
        self._what = what
        self._buf = memoryview(b"")
        self._offset = 0
        self._ended = False

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._ended:
            try:
                resp = next(self._responses)
            except StopIteration:
                self._ended = True
                break
            except grpc.RpcError as e:
                raise _failure(e, self._what) from None
            if resp.offset != self._offset:
                raise errors.Corrupt(f"{self._what}: containerd's content store sent offset "
                                     f"{resp.offset} where {self._offset} was next")
            self._offset += len(resp.data)
            self._buf = memoryview(resp.data)
        if n is None or n < 0 or n >= len(self._buf):
            data, self._buf = bytes(self._buf), memoryview(b"")
        else:
            data, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return data

    def close(self) -> None:
        cancel = getattr(self._responses, "cancel", None)
        if cancel is not None:
            cancel()


class BlobReader(VerifyingReader):
    """A blob being read from containerd: checked as it passes, and at its end not
    followed by more than its descriptor's size."""

    def finish(self) -> None:
        """Read what is left, check the digest and that nothing follows."""
        super().finish()
        if self._stream.read(1):
            raise errors.Corrupt(f"{self._what}: longer than its {self._size} bytes")


class ContentStore:
    """A client of containerd's content store on the unix socket ``address``."""

    def __init__(self, address: str = DEFAULT_ADDRESS) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def _client(self) -> Any:
        with self._lock:  # connected on first use: containerd may start after lamina
            if self._stub is None:
                self._channel = grpc.insecure_channel(
                    f"unix:{self.address}",
                    options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                             ("grpc.max_send_message_length", 1 << 20)])
                self._stub = content_pb2_grpc.ContentStub(self._channel)  # type: ignore[no-untyped-call]
            return self._stub

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def open(self, digest: str, size: int, *, namespace: str | None,
             timeout: float | None,
             on_cancel: Callable[[Callable[[], None]], object] | None = None,
             ) -> BlobReader:
        """Blob ``digest`` (``size`` bytes by its descriptor) to read, checked as it is
        read (:meth:`BlobReader.finish` reads what is left and checks the whole);
        ``on_cancel`` is given what cancels the read (for a caller that goes away)."""
        stub = self._client()
        what = f"blob {digest}"
        metadata = [(NAMESPACE_KEY, namespace)] if namespace else None
        try:
            info = stub.Info(content_pb2.InfoRequest(digest=digest), metadata=metadata,
                             timeout=timeout).info
        except grpc.RpcError as e:
            raise _failure(e, what) from None
        if info.size != size:
            raise errors.Corrupt(f"{what}: containerd's content store holds {info.size} bytes "
                                 f"of it, its descriptor says {size}")
        responses = stub.Read(content_pb2.ReadContentRequest(digest=digest),
                              metadata=metadata, timeout=timeout)
        if on_cancel is not None:
            on_cancel(responses.cancel)
        chunks = _Chunks(responses, what)
        return BlobReader(cast(BinaryIO, chunks), digest, size,
                          f"{what} in containerd's content store")
