"""What comes over the wire from a registry, taken with bounds: bodies, URLs, time.

Everything here distrusts the other end (a registry, a token service, a CDN a redirect
points at), because a hostile or broken one must cost lamina a clear one-line error,
not memory, time or a traceback:

- **bodies** (:func:`read_body`) are read in small pieces (:data:`READ`) and at most a
  limit of them, decoded as they come (urllib3 ≥ 2.6 inflates a ``Content-Encoding:
  gzip`` piece by piece too: a 2 MB gzip bomb is a few MiB of memory, never its 2 GB);
  an error body is read for its message only, at most :data:`ERROR_BODY` bytes
  (:func:`error_detail`);
- **deadlines** (:class:`Deadline`): the timeout of the transport bounds the wait for
  one read; a server that answers a byte at a time never trips it, so every request also
  has an overall deadline, checked between reads of a body and before every retry, and
  while the response's head comes, by a timer that cuts the connection when it passes
  (:func:`watched`; the pools of :func:`pool_manager` hand their sockets to it);
- **URLs** a server hands over (a redirect's or an upload's ``Location``, a token
  realm) are checked before use (:func:`check_url`): ``http``/``https`` only, a host
  that parses, no control characters: anything else is refused at once, never retried;
- **header values** from outside (a token) must be visible ASCII (:func:`header_value`);
- **numbers** from the environment (:func:`env_number`) must be finite and in range.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.util
from urllib3.response import BaseHTTPResponse, HTTPResponse

from lamina import errors

READ = 1 << 16
"""The most one read of a document's body asks for (decoded bytes)."""
ERROR_BODY = 1 << 16
"""The most of an error's body read for its message."""

_VISIBLE = re.compile(r"[\x21-\x7e]+")
_BAD_URL_CHAR = re.compile(r"[\x00-\x20\x7f]")


def env_number(name: str, default: float, *, most: float, unit: str = "seconds") -> float:
    """``$name`` as a number more than 0 and at most ``most`` (``default`` when unset);
    ``nan``, ``inf`` or ``1e309`` are ``InvalidArgument``, as is anything else."""
    text = os.environ.get(name)
    if not text:
        return default
    shown = repr(text[:40])
    try:
        value = float(text)
    except ValueError:
        raise errors.InvalidArgument(f"{name}={shown} is not a number of {unit}") from None
    if not math.isfinite(value) or not 0 < value <= most:
        raise errors.InvalidArgument(f"{name}={shown}: give a number of {unit} more than 0 "
                                     f"and at most {most:g}")
    return value


class Deadline:
    """The moment by which one request (its retries, redirects and body included) must
    be done; :meth:`check` raises once it has passed."""

    def __init__(self, seconds: float, subject: str, why: str) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.subject = subject
        """What is asked for, as errors name it (``registry HOST: manifest …``)."""
        self.why = why
        """Where the deadline comes from (the variables that set it)."""

    def left(self) -> float:
        return self.at - time.monotonic()

    def error(self) -> errors.LaminaError:
        return errors.LaminaError(f"{self.subject}: not done within {self.seconds:g} s "
                                  f"({self.why})")

    def check(self) -> None:
        if self.left() <= 0:
            raise self.error()

    def timeout(self, per_read: float) -> urllib3.Timeout:
        """The transport's timeouts for a request now: ``per_read``, and never past the
        deadline."""
        self.check()
        wait = max(min(per_read, self.left()), 0.001)
        return urllib3.Timeout(connect=wait, read=wait)

    def sleep(self, seconds: float, cause: str) -> None:
        """Wait before a retry, unless the retry would come after the deadline."""
        if seconds >= self.left():
            raise errors.LaminaError(f"{self.subject}: {cause}; no time left to try again "
                                     f"within {self.seconds:g} s ({self.why})")
        time.sleep(seconds)


class _Watch:
    """The sockets one request's head is awaited on, cut when its deadline passes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.fired = False

    def add(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._socks.append(sock)
            fired = self.fired
        if fired:
            _cut(sock)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            socks = list(self._socks)
        for sock in socks:
            _cut(sock)


def _cut(sock: socket.socket) -> None:
    # shutdown, not close: the blocked read returns at once, and the socket stays its
    # connection's to close (a closed fd could be reused by another thread meanwhile).
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_current = threading.local()


@contextlib.contextmanager
def watched(deadline: Deadline) -> Iterator[None]:
    """While a request is sent and its response's head read (in this thread): cut its
    connection if the deadline passes first (a head sent a byte at a time trips no
    timeout)."""
    watch = _Watch()
    timer = threading.Timer(max(deadline.left(), 0.0), watch.fire)
    timer.daemon = True
    _current.watch = watch
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        _current.watch = None


def _watch_this(sock: socket.socket | None) -> None:
    watch = getattr(_current, "watch", None)
    if watch is not None:
        watch.add(sock)


# A new connection's socket is watched from its TCP connect on (a TLS handshake can be
# sent a byte at a time too), a reused one's when its response is awaited.


class _HTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch_this(sock)
        return sock

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        _watch_this(self.sock)
        return super().getresponse()


class _HTTPSConnection(_HTTPConnection, urllib3.connection.HTTPSConnection):
    """The same watch over TLS (the MRO puts HTTPSConnection after the watch)."""


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def pool_manager(**kwargs: Any) -> urllib3.PoolManager:
    """A ``urllib3.PoolManager`` whose connections :func:`watched` can cut."""
    manager = urllib3.PoolManager(**kwargs)
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager


def check_url(url: str, what: str) -> str:
    """``url`` if lamina may request it: ``http`` or ``https``, a host that parses, no
    whitespace or control characters; else ``InvalidArgument`` naming ``what``."""
    shown = ascii(url[:200])
    if _BAD_URL_CHAR.search(url):
        raise errors.InvalidArgument(f"{what}: {shown} is not a usable URL (whitespace or "
                                     "control characters)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # parses it: a bad one is a ValueError
        parsed = urllib3.util.parse_url(url)
    except (ValueError, urllib3.exceptions.LocationParseError) as e:
        raise errors.InvalidArgument(f"{what}: {shown} is not a usable URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise errors.InvalidArgument(f"{what}: {shown}: only http and https URLs are "
                                     "followed")
    if not parts.hostname or not parsed.host or port == 0:
        raise errors.InvalidArgument(f"{what}: {shown} is not a usable URL (no host)")
    return url


def join_url(base: str, location: str, what: str) -> str:
    """``location`` (a header's, maybe relative) against ``base``, checked."""
    try:
        url = urllib.parse.urljoin(base, location)
    except ValueError as e:
        raise errors.InvalidArgument(f"{what}: {location[:200]!a} is not a usable URL "
                                     f"({e})") from None
    return check_url(url, what)


def origin(url: str) -> tuple[str, str, int]:
    """A checked URL's scheme, host (lower case) and port (the scheme's by default)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def header_value(value: str, what: str) -> str:
    """``value`` if it can go in a request header as it is (visible ASCII: no CR/LF that
    would end the header, no spaces); else ``LaminaError``."""
    if not _VISIBLE.fullmatch(value):
        raise errors.LaminaError(f"{what}: not a usable header value (control characters, "
                                 "spaces or non-ASCII)")
    return value


def read_body(resp: BaseHTTPResponse, limit: int, what: str, deadline: Deadline) -> bytes:
    """The body of ``resp``, decoded, if it is at most ``limit`` bytes and comes before
    the deadline: read a piece at a time, the limit checked as it grows."""
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise errors.Corrupt(f"{what}: {int(length)} bytes, over the {_size(limit)} a "
                             "document may have")
    parts: list[bytes] = []
    total = 0
    try:
        while True:
            deadline.check()
            # read1: what has come, at most READ decoded bytes; read() would wait for
            # the whole READ, a byte at a time from a slow server.
            chunk = resp.read1(READ, decode_content=True)
            if not chunk:
                return b"".join(parts)
            total += len(chunk)
            if total > limit:
                raise errors.Corrupt(f"{what}: over the {_size(limit)} a document may have")
            parts.append(chunk)
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise errors.LaminaError(f"{what}: {reason(e)}") from None


def error_body(resp: BaseHTTPResponse, deadline: Deadline) -> bytes:
    """At most :data:`ERROR_BODY` bytes of an error's body (what came by the deadline)."""
    parts: list[bytes] = []
    total = 0
    with contextlib.suppress(Exception):  # a message is a courtesy: never an error itself
        while total < ERROR_BODY and deadline.left() > 0:
            chunk = resp.read1(ERROR_BODY - total, decode_content=True)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    return b"".join(parts)


def discard(resp: BaseHTTPResponse) -> None:
    """Give the connection back: for reuse when its body was read to the end, else
    closed (reading an unknown rest could take any time and memory)."""
    with contextlib.suppress(Exception):
        if not (resp.length_remaining == 0 or resp.closed):
            resp.close()
        resp.release_conn()


def short(url: str) -> str:
    """A URL without its query (upload states and signed URLs are long and secret)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return ascii(url[:100])
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else parts.path


def reason(e: BaseException) -> str:
    """A transport error as a few words."""
    if isinstance(e, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError too
        return f"cannot connect ({e.__context__ or e})" if e.__context__ else "cannot connect"
    if isinstance(e, urllib3.exceptions.ReadTimeoutError | urllib3.exceptions.ConnectTimeoutError):
        return "timed out"
    if isinstance(e, urllib3.exceptions.SSLError):
        return f"TLS: {e} (--insecure to skip verification)"
    if isinstance(e, urllib3.exceptions.ProtocolError):
        return "the connection broke"
    if isinstance(e, urllib3.exceptions.DecodeError):
        return "its Content-Encoding does not decode"
    return str(e) or type(e).__name__


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
