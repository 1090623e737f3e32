"""containerd's differ (``containerd.services.diff.v1.Diff``), served beside the snapshots.

containerd (>= 2.0) loads it as a proxy plugin on the snapshotter's own socket::

    [proxy_plugins.lamina-diff]
      type = "diff"
      address = "/run/lamina/snapshotter.sock"

and tries the differs of its diff service's ``default`` list in order, going on to the
next one while a differ answers ``Unimplemented`` (its proxy differ turns that status
into ``errdefs.ErrNotImplemented``, on which the diff service's loop continues; any
other error ends the loop).  So ``default = ["lamina-diff", "walking"]`` is safe: what
lamina does not do, containerd's walking differ does.

``Apply(diff, mounts)``:

- *Whose mounts.*  Only mounts that are exactly those lamina gave for one of its own
  active snapshots are lamina's: the backend names the layer they write into (a bind's
  source, an overlay's ``upperdir``, below the home's ``layers/``), a record says which
  active snapshot uses that layer, and the backend's mounts of it must equal the ones
  given, type, source and every option in order, overlay's ``redirect_dir=`` aside
  (BuildKit drops or moves it; it names no directory)
  (:meth:`~lamina.frontends.containerd.snapshotter.Snapshotter.active_for`).  Nothing
  is parsed beyond that.  Other mounts: ``Unimplemented`` (walking applies them).
- *The blob* is read from containerd's content store over containerd's socket
  (:mod:`~lamina.frontends.containerd.content`; a proxy differ is given no content
  store), in the namespace of the call's ``containerd-namespace`` metadata, streamed,
  its size and digest checked as it passes, decompressed by its media type (docker's
  and OCI's uncompressed, gzip and zstd layers, the non-distributable ones too).
- *The layer* is written the lamina way: into the snapshot's empty layer, built beside
  it and swapped in whole once the blob's digest held (on overlay with
  ``overlay.layers=erofs`` an EROFS layer: its tar and an image over it; else
  lamina's isolated applier into a directory, the path of ``apply_diff``).  Its record
  carries the diff id and format; containerd's ``Commit`` then seals it and it gets its
  chain id, so the image store and the remote-snapshotter protocol find it like any
  layer lamina applied.  Each apply is logged (``lamina differ: applied …``, on the
  server's standard error even without ``-v``; :attr:`DiffServicer.applied` counts
  them), and a layer lamina filled is told from one containerd wrote through the
  mounts by its record (``lamina ls --json``): a diff id, not ``sealed``.
- *The answer*: ``applied`` = the uncompressed tar (``application/vnd.oci.image.layer
  .v1.tar``, the diff id, its size).  ``sync_fs`` changes nothing: every layer lamina
  writes is made durable (one ``syncfs``) before it is swapped in.

Statuses: not lamina's mounts, a media type lamina does not decode (an encrypted layer:
containerd's stream processors are walking's), stream processor payloads (but
the decryption processors' on a layer that is not encrypted: :data:`OCICRYPT_PAYLOADS`), a digest of
another algorithm than sha256, a snapshot with a size quota or with changes of its own
(written through its mounts: the next differ applies onto them): ``Unimplemented`` (the
next differ does it).  A malformed descriptor (digest syntax, negative size, no media type)
or a blob that is not a tar of its media type: ``InvalidArgument``.  A blob of another
size or digest than its descriptor's, or a content store that sends other offsets or
more bytes: ``DataLoss``.  A blob containerd does not hold: ``NotFound``.  The content
store unreachable, the call's deadline passed, the caller gone: containerd's status
(``Unavailable``, ``DeadlineExceeded``, ``Cancelled``).  A snapshot being committed or
filled already: ``FailedPrecondition``.  In every failure the snapshot's layer is left
as it was (empty): its new content was only ever in a staging directory.

``Diff(left, right)``: ``Unimplemented``, by choice.  Computing a layer's diff is
``lamina diff``'s (exact, native on overlay); but containerd wants it written into its
content store under a ref, with labels, leases and its ``source_date_epoch`` rules for
timestamps (whiteouts at the epoch 0), through the content ``Write`` protocol: the
walking differ does all that over the same mounts, correctly, and commit and BuildKit
gain little from lamina doing it again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar, cast

import grpc

from lamina import errors
from lamina.archive import codecs
from lamina.backends.contract import SnapshotMount
from lamina.frontends.containerd.api import descriptor_pb2, diff_pb2, diff_pb2_grpc
from lamina.frontends.containerd.content import NAMESPACE_KEY, ContentStore, ContentUnavailable
from lamina.frontends.containerd.snapshotter import Snapshotter
from lamina.image import spec
from lamina.image.reference import check_digest

log = logging.getLogger("lamina.differ")

T = TypeVar("T")

CODECS = {
    spec.OCI_LAYER: "", spec.DOCKER_LAYER: "", spec.OCI_NONDIST: "",
    spec.OCI_LAYER_GZIP: "gzip", spec.DOCKER_LAYER_GZIP: "gzip", spec.DOCKER_FOREIGN: "gzip",
    spec.OCI_NONDIST + "+gzip": "gzip",
    spec.OCI_LAYER_ZSTD: "zstd", spec.OCI_NONDIST + "+zstd": "zstd",
}
"""The layer media types lamina applies, with their compression."""
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
"""OCI's digest grammar (an algorithm lamina may not know)."""

_PASSED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                     grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT})
"""The content store's statuses passed on as they came (others are ``Unavailable``: an
``Unimplemented`` from the content store must not send containerd to the next differ)."""


OCICRYPT_PAYLOADS = frozenset({"io.containerd.ocicrypt.decoder.v1.tar",
                               "io.containerd.ocicrypt.decoder.v1.tar.gzip"})
"""The payloads of containerd's decryption stream processors (imgcrypt's
``PayloadToolIDs``), which a differ may pass by.  Those processors take only
``…+encrypted`` media types, which lamina does not decode (``Unimplemented`` anyway), and
containerd's CRI sends these payloads with every layer it unpacks itself
(``image_decryption.key_model = "node"``, the default, on its local pull path), encrypted
or not: refusing them would leave every such layer to the walking differ."""


def status_of(e: errors.LaminaError) -> grpc.StatusCode:
    """The status an Apply failing with ``e`` answers (the module's text)."""
    if isinstance(e, ContentUnavailable):
        return e.code if e.code in _PASSED else grpc.StatusCode.UNAVAILABLE
    if isinstance(e, errors.Corrupt):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(e, errors.UnsafeArchive):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, errors.NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, errors.InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, errors.Unsupported):
        return grpc.StatusCode.UNIMPLEMENTED
    if isinstance(e, errors.Busy):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.UNKNOWN


def check_descriptor(desc: descriptor_pb2.Descriptor) -> tuple[str, int, str]:
    """The blob's digest, size and compression (``InvalidArgument`` for a malformed
    descriptor, ``Unsupported`` for one lamina does not apply)."""
    if not desc.media_type:
        raise errors.InvalidArgument("the diff's descriptor has no media type")
    if desc.size < 0:
        raise errors.InvalidArgument(f"the diff's descriptor has a negative size ({desc.size})")
    if not _ANY_DIGEST.fullmatch(desc.digest):
        raise errors.InvalidArgument(f"the diff's digest {desc.digest[:100]!r} is not a digest")
    if not desc.digest.startswith("sha256:"):
        raise errors.Unsupported(f"lamina checks sha256 digests, not {desc.digest[:100]!r}")
    check_digest(desc.digest, "the diff's digest")
    kind = CODECS.get(desc.media_type)
    if kind is None:
        raise errors.Unsupported(f"lamina does not apply layers of media type "
                                 f"{desc.media_type[:200]!r}")
    return desc.digest, desc.size, kind


def namespace_of(context: grpc.ServicerContext) -> str | None:
    """containerd's namespace, from the call's metadata."""
    for key, value in context.invocation_metadata():
        if key == NAMESPACE_KEY and isinstance(value, str):
            return value
    return None


class _Decoding:
    """A decompressed stream whose decoding errors are the blob's (``UnsafeArchive``), not
    the disk's: they surface from the applier as a bad archive, never as an I/O error."""

    def __init__(self, stream: BinaryIO, what: str) -> None:
        self._stream = stream
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._stream.read(n)
        except codecs.DECODE_ERRORS as e:
            raise errors.UnsafeArchive(f"{self._what}: cannot be decompressed: {e}") from e

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._stream.close()


NO_DEADLINE = 1e6
"""Seconds past which a call's time remaining is no deadline at all: a caller that sets
none (containerd's unpacker) gets gRPC's infinite future, whose remaining time, passed on
as a timeout, would overflow into a deadline already past."""


def remaining(context: grpc.ServicerContext) -> float | None:
    """The call's time remaining, None where it has no deadline."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE else left


def check_deadline(context: grpc.ServicerContext) -> None:
    """Refuse a call that waited past its deadline, or whose client went away (before
    a worker took it: both services' calls, the snapshots' and the differ's)."""
    left = context.time_remaining()
    if left is not None and left <= 0:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                      "the call's deadline passed before a worker was free")
    if not context.is_active():
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled before it started")


def _answered(fn: Callable[..., T]) -> Callable[..., T]:
    """A servicer method whose lamina errors become the statuses of :func:`status_of`."""

    def wrapper(self: DiffServicer, request: Any, context: grpc.ServicerContext) -> T:
        if self.verbose:
            log.info("lamina differ: %s %s", fn.__name__, str(request).replace("\n", " ")[:300])
        check_deadline(context)
        try:
            return fn(self, request, context)
        except errors.LaminaError as e:
            context.abort(status_of(e), str(e))
        except OSError as e:
            log.exception("lamina differ: %s failed", fn.__name__)
            context.abort(grpc.StatusCode.UNKNOWN, f"{fn.__name__}: {e}")

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class DiffServicer(diff_pb2_grpc.DiffServicer):
    """The Diff service over one :class:`Snapshotter` and containerd's content store."""

    def __init__(self, sn: Snapshotter, content: ContentStore, *, verbose: bool = False) -> None:
        self.sn = sn
        self.content = content
        self.verbose = verbose
        self.applied = 0
        """Applies done since the server started."""
        self._count = threading.Lock()

    @_answered
    def Apply(self, request: diff_pb2.ApplyRequest,
              context: grpc.ServicerContext) -> diff_pb2.ApplyResponse:
        """Apply the blob onto lamina's own active snapshot (the module's text)."""
        mounts = [SnapshotMount(m.type, m.source, tuple(m.options)) for m in request.mounts]
        key = self.sn.active_for(mounts)
        if key is None:
            raise errors.Unsupported("the mounts are not an active snapshot of lamina's "
                                     "(the next differ applies them)")
        digest, size, kind = check_descriptor(request.diff)
        if set(request.payloads) - OCICRYPT_PAYLOADS:
            raise errors.Unsupported("stream processor payloads are the walking differ's")
        started = time.monotonic()
        blob = self.content.open(digest, size, namespace=namespace_of(context),
                                 timeout=remaining(context),
                                 on_cancel=context.add_callback)
        with blob:
            plain = _Decoding(codecs.decoded(blob.as_stream(), kind), f"blob {digest}")
            try:
                diff_id, length = self.sn.fill(key, cast(BinaryIO, plain), blob.finish)
            except errors.UnsafeArchive as e:
                # Not a tar, or not of its media type: or the wrong bytes, which the
                # blob's own check tells (read to its end, as the apply did not).
                try:
                    blob.finish()
                except errors.Corrupt as bad:
                    raise bad from e
                except errors.LaminaError:
                    pass
                raise
        with self._count:
            self.applied += 1
        log.info("lamina differ: applied %s (%s, %d bytes) into snapshot %r: diff id %s, "
                 "%d bytes, %.2fs", digest, request.diff.media_type, size, key, diff_id,
                 length, time.monotonic() - started)
        return diff_pb2.ApplyResponse(applied=descriptor_pb2.Descriptor(
            media_type=spec.OCI_LAYER, digest=diff_id, size=length))

    @_answered
    def Diff(self, request: diff_pb2.DiffRequest,
             context: grpc.ServicerContext) -> diff_pb2.DiffResponse:
        """``Unimplemented``: the walking differ computes diffs (the module's text)."""
        raise errors.Unsupported("lamina's differ applies layers only: the next differ "
                                 "(walking) computes diffs")
