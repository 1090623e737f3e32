"""``lamina snapshotter``: containerd's snapshot API on a unix socket (a proxy plugin).

containerd loads it with::

    [proxy_plugins.lamina]
      type = "snapshot"
      address = "/run/lamina/snapshotter.sock"

and every call of ``containerd.services.snapshots.v1.Snapshots`` becomes one call of
:class:`~lamina.frontends.containerd.snapshotter.Snapshotter`.  The same socket serves
containerd's differ, ``containerd.services.diff.v1.Diff``
(:mod:`~lamina.frontends.containerd.differ`; ``[proxy_plugins.lamina-diff] type =
"diff"``, containerd >= 2.0), which reads blobs from containerd's content store at
``--containerd-address``.  Errors go back as the
gRPC status codes containerd's ``errdefs`` maps to its own: ``NotFound``,
``AlreadyExists``, ``InvalidArgument``, ``FailedPrecondition`` (lamina's ``Busy``),
``Unimplemented`` (``Unsupported``); anything else is ``Unknown`` with the message.

Limits: a fixed pool of :data:`WORKERS` threads runs the calls; at most
:data:`MAX_CONCURRENT` calls are in progress or waiting at once, and a message (either
way) is at most :data:`MAX_RECEIVE` / :data:`MAX_SEND` bytes: beyond either, a call is
refused with ``RESOURCE_EXHAUSTED`` before any of it runs.  A call whose deadline has
passed while it waited for a worker is not started (``DEADLINE_EXCEEDED``); a connection
that does not finish its HTTP/2 handshake in :data:`HANDSHAKE_TIMEOUT_MS` is closed.

SIGTERM or SIGINT stops it cleanly: the socket stops taking calls, the calls in
progress finish (up to :data:`GRACE` seconds), the store is closed, exit status 0.
Nothing is mounted by the server, so nothing is left mounted; a restarted server finds
every snapshot (:mod:`lamina.frontends.containerd.records`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from lamina import errors
from lamina.backends.contract import Backend, SnapshotMount
from lamina.frontends.containerd.api import (
    diff_pb2_grpc,
    mount_pb2,
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from lamina.frontends.containerd.content import DEFAULT_ADDRESS, ContentStore
from lamina.frontends.containerd.differ import DiffServicer, check_deadline
from lamina.frontends.containerd.records import ACTIVE, COMMITTED, VIEW, Record
from lamina.frontends.containerd.snapshotter import Snapshotter
from lamina.host.signals import stop_signals

log = logging.getLogger("lamina")

DEFAULT_SOCKET = "/run/lamina/snapshotter.sock"
GRACE = 20.0
"""Seconds the calls in progress get to finish after SIGTERM."""
WORKERS = 16
"""Threads that run calls."""
MAX_CONCURRENT = 64
"""Calls in progress or waiting for a worker; one more is ``RESOURCE_EXHAUSTED``."""
MAX_RECEIVE = 4 << 20
"""The largest request (containerd's are a few KiB: a key, a parent, labels of <= 4 KiB)."""
MAX_SEND = 16 << 20
"""The largest response (gRPC's default; a List batch stays far below it)."""
HANDSHAKE_TIMEOUT_MS = 10_000
LIST_BATCH = 100
"""Snapshots a List response carries at most (containerd's own server sends 100)."""
LIST_BATCH_BYTES = 4 << 20
"""Bytes a List response carries at most (less with a smaller send limit): a batch of
100 is cut short by size, since 100 snapshots of 64 KiB of labels (the most
:mod:`~lamina.frontends.containerd.labels` allows; an older home may hold more) would
not fit gRPC's 16 MiB."""

_KIND = {VIEW: snapshots_pb2.VIEW, ACTIVE: snapshots_pb2.ACTIVE,
         COMMITTED: snapshots_pb2.COMMITTED}
_CODES: list[tuple[type[errors.LaminaError], grpc.StatusCode]] = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Busy, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unsupported, grpc.StatusCode.UNIMPLEMENTED),
]

T = TypeVar("T")


def status_code(e: errors.LaminaError) -> grpc.StatusCode:
    """The gRPC status containerd's errdefs turns back into the same kind of error."""
    for kind, code in _CODES:
        if isinstance(e, kind):
            return code
    return grpc.StatusCode.UNKNOWN


def _timestamp(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_of(rec: Record) -> snapshots_pb2.Info:
    """A snapshot as containerd's ``Info`` message."""
    return snapshots_pb2.Info(name=rec.name, parent=rec.parent, kind=_KIND[rec.kind],
                              created_at=_timestamp(rec.created),
                              updated_at=_timestamp(rec.updated), labels=rec.labels)


def mounts_of(specs: Sequence[SnapshotMount]) -> list[mount_pb2.Mount]:
    """Mount specs as containerd's ``Mount`` messages."""
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in specs]


def list_batches(found: Sequence[Record],
                 max_bytes: int) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
    """``found`` as List responses of at most :data:`LIST_BATCH` snapshots and, but for
    a snapshot larger alone, ``max_bytes`` bytes."""
    batch: list[snapshots_pb2.Info] = []
    size = 0
    for rec in found:
        info = info_of(rec)
        # An Info's bytes, plus its tag and length in the response (at most 6 bytes).
        n = info.ByteSize() + 6
        if batch and (len(batch) == LIST_BATCH or size + n > max_bytes):
            yield snapshots_pb2.ListSnapshotsResponse(info=batch)
            batch, size = [], 0
        batch.append(info)
        size += n
    if batch:
        yield snapshots_pb2.ListSnapshotsResponse(info=batch)


def _call(fn: Callable[..., T]) -> Callable[..., T]:
    """A servicer method whose lamina errors become gRPC statuses."""

    @functools.wraps(fn)
    def wrapper(self: Servicer, request: Any, context: grpc.ServicerContext) -> T:
        if self.verbose:
            log.info("lamina snapshotter: %s %s", fn.__name__,
                     str(request).replace("\n", " ")[:300])
        check_deadline(context)
        try:
            return fn(self, request, context)
        except errors.LaminaError as e:
            context.abort(status_code(e), str(e))
        except OSError as e:
            log.exception("lamina snapshotter: %s failed", fn.__name__)
            context.abort(grpc.StatusCode.UNKNOWN, f"{fn.__name__}: {e}")

    return wrapper


class Servicer(snapshots_pb2_grpc.SnapshotsServicer):
    """The Snapshots service over one :class:`Snapshotter`."""

    def __init__(self, sn: Snapshotter, *, verbose: bool = False,
                 batch_bytes: int = LIST_BATCH_BYTES) -> None:
        self.sn = sn
        self.verbose = verbose
        self.batch_bytes = batch_bytes

    @_call
    def Prepare(self, request: snapshots_pb2.PrepareSnapshotRequest,
                context: grpc.ServicerContext) -> snapshots_pb2.PrepareSnapshotResponse:
        specs = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts_of(specs))

    @_call
    def View(self, request: snapshots_pb2.ViewSnapshotRequest,
             context: grpc.ServicerContext) -> snapshots_pb2.ViewSnapshotResponse:
        specs = self.sn.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=mounts_of(specs))

    @_call
    def Mounts(self, request: snapshots_pb2.MountsRequest,
               context: grpc.ServicerContext) -> snapshots_pb2.MountsResponse:
        return snapshots_pb2.MountsResponse(mounts=mounts_of(self.sn.mounts(request.key)))

    @_call
    def Commit(self, request: snapshots_pb2.CommitSnapshotRequest,
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_call
    def Remove(self, request: snapshots_pb2.RemoveSnapshotRequest,
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_call
    def Stat(self, request: snapshots_pb2.StatSnapshotRequest,
             context: grpc.ServicerContext) -> snapshots_pb2.StatSnapshotResponse:
        return snapshots_pb2.StatSnapshotResponse(info=info_of(self.sn.stat(request.key)))

    @_call
    def Update(self, request: snapshots_pb2.UpdateSnapshotRequest,
               context: grpc.ServicerContext) -> snapshots_pb2.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        rec = self.sn.update(request.info.name, dict(request.info.labels), paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=info_of(rec))

    def List(self, request: snapshots_pb2.ListSnapshotsRequest,
             context: grpc.ServicerContext) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        check_deadline(context)
        try:
            found = self.sn.list(list(request.filters))
        except errors.LaminaError as e:
            context.abort(status_code(e), str(e))
        yield from list_batches(found, self.batch_bytes)

    @_call
    def Usage(self, request: snapshots_pb2.UsageRequest,
              context: grpc.ServicerContext) -> snapshots_pb2.UsageResponse:
        totals = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=totals.disk, inodes=totals.inodes)

    @_call
    def Cleanup(self, request: snapshots_pb2.CleanupRequest,
                context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.sn.cleanup()
        return empty_pb2.Empty()


def _claim_socket(path: Path) -> None:
    """Make room for the socket at ``path``: its directory, and no live socket there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise errors.InvalidArgument("not a socket: refusing to replace it", path=str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # a stale socket of a server that died
    else:
        raise errors.Busy("another server listens on this socket", path=str(path))
    finally:
        probe.close()


def new_server(*, workers: int = WORKERS, max_concurrent: int = MAX_CONCURRENT,
               max_receive: int = MAX_RECEIVE, max_send: int = MAX_SEND) -> grpc.Server:
    """An empty gRPC server as lamina's (:func:`start`): its thread pool, limits and
    options, no service yet (the benchmark's floor is one, with a servicer that answers
    at once)."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshotter"),
        maximum_concurrent_rpcs=max_concurrent,
        options=[("grpc.max_receive_message_length", max_receive),
                 ("grpc.max_send_message_length", max_send),
                 ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS)])


def start(sn: Snapshotter, socket_path: Path, *, verbose: bool = False,
          workers: int = WORKERS, max_concurrent: int = MAX_CONCURRENT,
          max_receive: int = MAX_RECEIVE, max_send: int = MAX_SEND,
          differ: DiffServicer | None = None) -> grpc.Server:
    """A started gRPC server of ``sn`` on ``socket_path`` (for tests and :func:`serve`),
    with the limits given (the module's text), serving ``differ`` too (by default one
    reading containerd's content store at its default address)."""
    _claim_socket(socket_path)
    server = new_server(workers=workers, max_concurrent=max_concurrent,
                        max_receive=max_receive, max_send=max_send)
    # Half the send limit per List batch: the rest is room for the framing, and a
    # smaller limit (a test's) still sees its List cut into batches that fit it.
    batch_bytes = min(LIST_BATCH_BYTES, max_send // 2)
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(  # type: ignore[no-untyped-call]
        Servicer(sn, verbose=verbose, batch_bytes=batch_bytes), server)
    if differ is None:
        differ = DiffServicer(sn, ContentStore(DEFAULT_ADDRESS), verbose=verbose)
    diff_pb2_grpc.add_DiffServicer_to_server(differ, server)  # type: ignore[no-untyped-call]
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        raise errors.InvalidArgument("cannot listen on the socket", path=str(socket_path))
    os.chmod(socket_path, 0o660)
    server.start()
    return server


def serve(driver: Backend, socket_path: str | Path = DEFAULT_SOCKET, *,
          verbose: bool = False, containerd_address: str = DEFAULT_ADDRESS) -> int:
    """Serve ``driver``'s store on ``socket_path`` until SIGTERM or SIGINT, the differ
    reading blobs from containerd at ``containerd_address``; exit status."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    else:  # one line per layer the differ applies: what an operator (or a test) counts
        applies = logging.getLogger("lamina.differ")
        if not applies.handlers:
            to_stderr = logging.StreamHandler()
            to_stderr.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            applies.addHandler(to_stderr)
            applies.setLevel(logging.INFO)
            applies.propagate = False
    path = Path(socket_path).absolute()
    with stop_signals() as wait_for_stop:
        sn = Snapshotter(driver)
        content = ContentStore(containerd_address)
        try:
            server = start(sn, path, verbose=verbose,
                           differ=DiffServicer(sn, content, verbose=verbose))
            log.info("lamina snapshotter: serving %s (%s) on %s", driver.home, driver.name, path)
            try:
                wait_for_stop()
            finally:
                server.stop(GRACE).wait()
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            content.close()
            sn.close()
    return 0
