"""HTTP/1.1 over a unix socket for :mod:`lamina.frontends.docker.plugin`, as Docker's plugin
client speaks it, and nothing more.

Every call is a ``POST /Method``: a JSON body answered with a JSON body, on
connections Docker keeps alive between calls.  Two calls stream: ``ApplyDiff``'s
body (Docker sends it chunked) reaches the driver as a :class:`RequestBody`, which
decodes the framing as the tar engine reads; ``Diff``'s tar goes out with chunked
framing as the engine writes it.  Neither is ever held whole in memory.  Every error
is ``{"Err": …}`` as JSON, whatever the request (a malformed one, a ``GET``, a body
that stops coming): status 500 for a failed call (Docker reads ``Err`` from any
status), 4xx/5xx for a request that is not one.  A ``Diff`` must not answer 200
with an error, or Docker would read it as a tar; one that fails once its tar has
started is cut short, which Docker's chunked reader reports as an error rather than
taking a shorter tar.

How connections are served (no client can starve the others):

- One thread, the *loop*, owns every connection between calls: it accepts, and it
  reads request heads without blocking (``epoll``), so a connection costs a socket
  and a buffer, never a thread.  A head must arrive whole within
  :attr:`Limits.header_timeout` of its first byte and fit :data:`MAX_HEAD` bytes; a
  connection with no call is closed after :attr:`Limits.idle_timeout`.  At
  :attr:`Limits.max_connections` open connections the oldest waiting one is closed to
  make room for each new one: a flood of clients that connect and send nothing, or
  half a head, is shed as fast as it comes, and a client that sends a call at once is
  served.
- A parsed call goes to a fixed pool of :attr:`Limits.workers` threads through a queue
  of :attr:`Limits.backlog` places; when the queue is full it is answered at once with
  503 and ``{"Err"}``.  A worker reads the body and answers; a body that stops for
  :attr:`Limits.body_timeout` (or an answer the client stops taking) ends the call:
  an ``ApplyDiff`` is aborted as any failed apply is (its staging goes, its layer lock
  is released) and answered 408 ``{"Err"}``.  The connection then goes back to the loop.
- The parsing is strict (:func:`parse_head`): one request line, ``HTTP/1.0`` or
  ``HTTP/1.1``, header names that are tokens, no folded lines, exactly one
  ``Content-Length`` or one ``Transfer-Encoding: chunked`` (not both), chunk sizes of
  hex digits only; JSON bodies of at most :data:`MAX_JSON` bytes nested at most
  :data:`MAX_DEPTH` deep.

:meth:`PluginServer.stop` is the graceful half of a shutdown: no new connections,
no new calls on the open ones (they are closed unanswered, so that Docker calls
again), and a wait for the calls in progress.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import itertools
import json
import logging
import os
import queue
import re
import resource
import selectors
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar, cast

from lamina import errors

if TYPE_CHECKING:
    from lamina.frontends.docker.plugin import Plugin

log = logging.getLogger("lamina.serve")

JsonDoc = dict[str, Any]
T = TypeVar("T")
JSON_TYPE = "application/vnd.docker.plugins.v1.2+json"
TAR_TYPE = "application/x-tar"
CHUNK = 1 << 20
"""How much of a diff is sent, or of a body read or drained, at a time."""
MAX_JSON = 1 << 20
"""The largest JSON request body read (Docker's are a few hundred bytes)."""
MAX_DEPTH = 64
"""The deepest nesting of a JSON request body (Docker's are 3 deep)."""
MAX_HEAD = 16 << 10
"""The largest request head (request line and headers; Docker's are ~300 bytes)."""
MAX_HEADERS = 100
MAX_LINE = 4096
"""The longest chunk-size or trailer line."""
LISTEN_BACKLOG = 1024
"""Connections the kernel holds for the loop to accept; beyond, a connect is refused
(``EAGAIN``) or waits.  Small, so that a call is never queued behind a long flood."""
ENV_PREFIX = "LAMINA_SERVE_"
"""``Limits.from_env`` reads ``LAMINA_SERVE_BODY_TIMEOUT`` and the like."""

REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
    417: "Expectation Failed", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclasses.dataclass(frozen=True)
class Limits:
    """How long a client may take and how many it may be (see the module's text)."""

    header_timeout: float = 10.0
    """Seconds from a request head's first byte to its end."""
    body_timeout: float = 60.0
    """Seconds a body may pause (or a client take to accept the next bytes of an answer)."""
    idle_timeout: float = 600.0
    """Seconds a kept-alive connection may wait for its next call."""
    workers: int = 16
    """Threads that run calls (Docker makes a few at a time)."""
    backlog: int = 64
    """Calls read and waiting for a worker; one more is answered 503."""
    max_connections: int = 1024
    """Connections held between calls; a new one beyond closes the oldest."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Limits:
        """The defaults, each overridden by ``LAMINA_SERVE_<FIELD>`` if set."""
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is None:
                continue
            try:
                value: float = float(raw) if field.type in ("float", float) else int(raw)
            except ValueError:
                raise errors.InvalidArgument(
                    f"{ENV_PREFIX}{field.name.upper()}={raw!r} is not a number") from None
            if not 0 < value < 1e9:
                raise errors.InvalidArgument(
                    f"{ENV_PREFIX}{field.name.upper()}={raw!r} is out of range")
            values[field.name] = value
        return cls(**values)


class HTTPError(Exception):
    """A request lamina cannot take (answered with ``status`` and ``{"Err"}``, then closed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- parsing -------------------------------------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")


@dataclasses.dataclass
class Request:
    """A parsed request head."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    """Lower-cased names; a name given twice has its values joined with ``", "``."""
    length: int | None
    """The ``Content-Length``; None for a chunked body."""
    keep_alive: bool
    expect_continue: bool

    @property
    def call(self) -> str:
        """The call's name: the path without its ``/`` (``GraphDriver.Create``)."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.target).path).lstrip("/")

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query,
                                     keep_blank_values=True)

    @property
    def chunked(self) -> bool:
        return self.length is None


def head_end(buf: bytes | bytearray) -> int:
    """Where the request head in ``buf`` ends (after its blank line); -1 if it does not yet."""
    m = _HEAD_END.search(buf)
    return -1 if m is None else m.end()


def take_head(buf: bytearray) -> Request | None:
    """The request whose head ``buf`` holds, taken out of it (what follows stays); None
    while the head is not whole.  Blank lines before a request line are skipped (RFC 9112
    §2.2); a head over :data:`MAX_HEAD` bytes, or a bad one, is an :class:`HTTPError`."""
    while buf.startswith((b"\r", b"\n")):
        del buf[:1]
    end = head_end(buf)
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise HTTPError(431, f"request head over {MAX_HEAD} bytes")
        return None
    head = bytes(buf[:end])
    del buf[:end]
    return parse_head(head)


def parse_head(head: bytes) -> Request:
    """A request head (request line, header lines, blank line) as a :class:`Request`.

    Anything but what RFC 9112 allows, and a body framing that could be read two ways,
    is an :class:`HTTPError`.
    """
    if len(head) > MAX_HEAD:
        raise HTTPError(431, f"request head over {MAX_HEAD} bytes")
    lines = head.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HTTPError(400, "empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, f"bad request line {_show(lines[0])}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, f"bad method {_show(method)}")
    if not _TARGET.fullmatch(target):
        raise HTTPError(400, f"bad request target {_show(target)}")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):
            raise HTTPError(505, f"HTTP version {_show(version)} is not supported")
        raise HTTPError(400, f"bad HTTP version {_show(version)}")
    if len(lines) - 1 > MAX_HEADERS:
        raise HTTPError(431, f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    counts: collections.Counter[str] = collections.Counter()
    for line in lines[1:]:
        if not line or line[:1] in (b" ", b"\t"):
            raise HTTPError(400, "folded or empty header line")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HTTPError(400, f"bad header line {_show(line)}")
        value = value.strip(b" \t")
        if _VALUE_BAD.search(value):
            raise HTTPError(400, f"control character in header {_show(name)}")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        counts[key] += 1
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if counts["content-length"] > 1:
        raise HTTPError(400, "more than one Content-Length")
    if counts["transfer-encoding"] > 1:
        raise HTTPError(400, "more than one Transfer-Encoding")
    length: int | None = 0
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        coding = headers["transfer-encoding"].lower()
        if coding != "chunked":
            raise HTTPError(501, f"transfer coding {coding[:40]!r} is not supported")
        if version == b"HTTP/1.0":
            raise HTTPError(400, "chunked framing in an HTTP/1.0 request")
        length = None
    elif "content-length" in headers:
        raw = headers["content-length"].encode("latin-1")
        if not _DIGITS.fullmatch(raw):
            raise HTTPError(400, f"bad Content-Length {_show(raw)}")
        length = int(raw)
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if version == b"HTTP/1.1" else "keep-alive" in tokens
    expect = headers.get("expect", "").lower()
    if expect and expect != "100-continue":
        raise HTTPError(417, f"expectation {expect[:40]!r} is not supported")
    return Request(method=method.decode("ascii"), target=target.decode("ascii"),
                   version=version.decode("ascii"), headers=headers, length=length,
                   keep_alive=keep_alive, expect_continue=bool(expect))


def _show(data: bytes) -> str:
    """Bytes of a request, quoted and cut short, for a message."""
    text = repr(data[:60])[2:-1]
    return f"'{text}…'" if len(data) > 60 else f"'{text}'"


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of JSON text ``data`` nest (its strings skipped)."""
    brackets = _STRINGS.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(itertools.accumulate(b - 1 for b in brackets.translate(_DEPTH_STEP)))


def parse_json(data: bytes) -> JsonDoc:
    """A request body as a JSON object (an empty one is ``{}``); else ``InvalidArgument``."""
    if not data.strip():
        return {}
    depth = json_depth(data)
    if depth > MAX_DEPTH:
        raise errors.InvalidArgument(
            f"request body is not acceptable JSON: nested {depth} deep (at most {MAX_DEPTH})")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise errors.InvalidArgument(f"request body is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise errors.InvalidArgument("request body is not a JSON object")
    return doc


# --- reading a body --------------------------------------------------------------------------


class Source(Protocol):
    """Where a connection's bytes come from: a socket (or, fuzzing, a stand-in)."""

    def recv(self, n: int, /) -> bytes: ...
    def recv_into(self, buffer: memoryview, /) -> int: ...


class Reader:
    """Bytes of one connection: what the loop read past a head, then the source's."""

    def __init__(self, source: Source, data: bytes = b"") -> None:
        self._source = source
        self._buf = bytearray(data)

    def read1(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one unless at the end), with one ``recv`` at most."""
        if self._buf:
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out
        return self._source.recv(n)

    def readinto1(self, view: memoryview) -> int:
        """:meth:`read1` into ``view``."""
        if self._buf:
            n = min(len(view), len(self._buf))
            view[:n] = self._buf[:n]
            del self._buf[:n]
            return n
        return self._source.recv_into(view)

    def readline(self, limit: int) -> bytes:
        """Up to and including the next ``\\n``, or ``limit`` bytes, or what is left."""
        start = 0
        while True:
            at = self._buf.find(b"\n", start, limit)
            if at >= 0:
                line = bytes(self._buf[:at + 1])
                del self._buf[:at + 1]
                return line
            if len(self._buf) >= limit:
                line = bytes(self._buf[:limit])
                del self._buf[:limit]
                return line
            start = len(self._buf)
            data = self._source.recv(1 << 16)
            if not data:
                line = bytes(self._buf)
                self._buf.clear()
                return line
            self._buf += data

    def rest(self) -> bytes:
        """What was read and not yet taken (the start of a next, pipelined, request)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out


class RequestBody(io.RawIOBase):
    """A request's body as a stream, decoding ``Content-Length`` or chunked framing.

    A body that is cut short, badly framed or too slow raises :class:`HTTPError` from
    ``read`` and every later ``read`` (``error`` keeps it): the caller — the tar engine
    of an apply — fails, and the request is answered with that error.
    """

    def __init__(self, reader: Reader, request: Request) -> None:
        self._reader = reader
        self._chunked = request.chunked
        self._first = True
        self._left = request.length or 0  # bytes left in the body, or in this chunk
        self._done = not self._chunked and self._left == 0
        self.error: HTTPError | None = None

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes of the body (fewer at a chunk's end), ``b""`` at its end."""
        if size is None or size < 0:
            return self.readall()
        if not self._more() or size == 0:
            return b""
        data = self._take(lambda: self._reader.read1(min(size, self._left, CHUNK)))
        self._took(len(data))
        return data

    def readall(self) -> bytes:
        out = bytearray()
        while chunk := self.read(CHUNK):
            out += chunk
        return bytes(out)

    def readinto(self, buffer: Any) -> int:
        if not self._more():
            return 0
        view = memoryview(buffer).cast("B")
        n = self._take(lambda: self._reader.readinto1(view[:min(len(view), self._left)]))
        self._took(n)
        return n

    def _take(self, fn: Callable[[], T]) -> T:
        """``fn()``, a read of the connection; its failure is the body's, kept in ``error``."""
        if self.error is not None:
            raise self.error
        try:
            return fn()
        except HTTPError as e:
            self.error = e
            raise
        except TimeoutError:
            self.error = HTTPError(408, "the request body stopped coming: call abandoned")
            raise self.error from None
        except OSError as e:
            self.error = HTTPError(400, f"cannot read the request body: {e.strerror or e}")
            raise self.error from None

    def _fail(self, status: int, message: str) -> HTTPError:
        self.error = HTTPError(status, message)
        return self.error

    def _more(self) -> bool:
        if self.error is not None:
            raise self.error
        if self._chunked and self._left == 0 and not self._done:
            self._next_chunk()
        return not self._done

    def _took(self, n: int) -> None:
        if not n:
            raise self._fail(400, "the request body was cut short")
        self._left -= n
        if not self._chunked and self._left == 0:
            self._done = True

    def _line(self, what: str) -> bytes:
        line = self._take(lambda: self._reader.readline(MAX_LINE))
        if not line:
            raise self._fail(400, f"the request body was cut short before {what}")
        if not line.endswith(b"\n"):
            raise self._fail(400, f"bad chunked framing: {what} over {MAX_LINE} bytes")
        return line.removesuffix(b"\n").removesuffix(b"\r")

    def _next_chunk(self) -> None:
        if not self._first and self._line("the end of a chunk"):
            raise self._fail(400, "bad chunked framing: no CRLF after a chunk's data")
        self._first = False
        line = self._line("a chunk size")
        size = line.split(b";", 1)[0].strip(b" \t")
        if not _HEX.fullmatch(size):
            raise self._fail(400, f"bad chunk size {_show(size)}")
        self._left = int(size, 16)
        if self._left == 0:
            for _ in range(MAX_HEADERS + 1):  # trailers, ignored
                if not self._line("the end of the trailers"):
                    self._done = True
                    return
            raise self._fail(431, f"more than {MAX_HEADERS} trailer lines")

    def read_json(self) -> JsonDoc:
        """The whole body as a JSON object (an empty body is ``{}``)."""
        data = bytearray()
        while chunk := self.read(1 << 16):
            data += chunk
            if len(data) > MAX_JSON:
                raise self._fail(413, f"request body over {MAX_JSON} bytes")
        return parse_json(bytes(data))

    def drain(self) -> bool:
        """Read what is left of the body; whether the connection can serve another call."""
        if self.error is not None:
            return False
        try:
            while self.read(CHUNK):
                pass
        except HTTPError:
            return False
        return True


# --- serving ---------------------------------------------------------------------------------


class _Conn:
    """A client connection (between calls it is the loop's, during one a worker's)."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.since = now  # when it began to wait for a call
        self.head_started: float | None = None  # the first byte of the head being read

    def reset(self, leftover: bytes, now: float) -> None:
        self.buf = bytearray(leftover)
        self.since = now
        self.head_started = now if leftover else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _answer_bytes(status: int, doc: JsonDoc, *, close: bool,
                  extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    data = json.dumps(doc).encode()
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
             "Server: lamina", f"Content-Type: {JSON_TYPE}", f"Content-Length: {len(data)}"]
    lines += [f"{k}: {v}" for k, v in extra]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


class _Call:
    """One call on one connection, run by a worker."""

    def __init__(self, server: PluginServer, conn: _Conn, req: Request) -> None:
        self.server = server
        self.conn = conn
        self.req = req
        self.sock = conn.sock
        self.keep = req.keep_alive
        self.reader = Reader(self.sock, bytes(conn.buf))
        self.body = RequestBody(self.reader, req)

    def run(self) -> bool:
        """Answer the call; whether the connection can take another."""
        self.sock.settimeout(self.server.limits.body_timeout)
        if self.req.expect_continue:
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        method = self.req.call
        try:
            self._dispatch(method)
        except HTTPError as e:
            self._error(e)
        except errors.LaminaError as e:
            if self.body.error is not None:
                self._error(self.body.error)
            else:
                log.warning("%s: %s", method, e)
                self._finish_body()
                self._answer(500, {"Err": str(e)})
        except (BrokenPipeError, ConnectionError) as e:
            log.warning("%s: connection lost: %s", method, e)
            self.keep = False
        except TimeoutError:
            log.warning("%s: the client stopped taking the answer", method)
            self.keep = False
        except Exception as e:
            if self.body.error is not None:  # the body failed under the engine
                self._error(self.body.error)
            else:
                self._unexpected(method, e)
        return self.keep

    def _dispatch(self, method: str) -> None:
        plugin = self.server.plugin
        if self.req.method != "POST":
            self.keep = False
            self._answer(405, {"Err": f"lamina answers POST only, not {self.req.method}"},
                         extra=(("Allow", "POST"),))
        elif method == "GraphDriver.ApplyDiff":
            query = self.req.query
            id, parent = query.get("id", [""])[0], query.get("parent", [""])[0]
            log.debug("ApplyDiff %s on %s", id, parent or "nothing")
            doc = plugin.apply_diff(id, parent, cast(BinaryIO, self.body))
            if self.body.error is not None:  # the engine took the error for the end
                raise self.body.error
            self._finish_body()
            self._answer(200, doc)
        elif method == "GraphDriver.Diff":
            self._send_diff(self.body.read_json())
        elif method in plugin.calls:
            req = self.body.read_json()
            log.debug("%s %s", method, req)
            self._answer(200, plugin.calls[method](req))
        else:
            self._finish_body()
            self._answer(404, {"Err": f"lamina has no call {method[:80]!r}"})

    def _unexpected(self, method: str, e: Exception) -> None:
        """A failure that is no LaminaError: named (the call, the error), not a traceback."""
        if isinstance(e, OSError):
            what = e.strerror or str(e)
            where = f" ({e.filename})" if e.filename else ""
            log.warning("%s failed: %s%s", method, what, where)
            message = f"lamina: {method}: {what}{where}"
        elif isinstance(e, (OverflowError, ValueError)):
            log.warning("%s failed: %s", method, e)
            message = f"lamina: {method}: invalid argument: {e}"
        else:  # a bug: say so to Docker, keep serving the others
            log.exception("%s failed", method)
            message = f"lamina: internal error in {method}: {e!r}"
        self._finish_body()
        self._answer(500, {"Err": message})

    def _error(self, e: HTTPError) -> None:
        log.warning("%s: %s", self.req.call[:80], e)
        self.keep = False
        self._answer(e.status, {"Err": str(e)})

    def _finish_body(self) -> None:
        if not self.body.drain():
            self.keep = False

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            log.warning("cannot answer: %s", e)
            self.keep = False

    def _answer(self, status: int, doc: JsonDoc, extra: tuple[tuple[str, str], ...] = ()) -> None:
        close = not self.keep or self.server.closing
        self._send(_answer_bytes(status, doc, close=close, extra=extra))

    def _send_diff(self, req: JsonDoc) -> None:
        log.debug("Diff %s", req)
        with contextlib.ExitStack() as stack:
            tar = stack.enter_context(self.server.plugin.diff(req))
            # The first read happens before the status line, so that a diff that
            # cannot start (an unmountable parent) is still an {"Err": …} answer.
            chunk = tar.read(CHUNK)
            head = (f"HTTP/1.1 200 OK\r\nServer: lamina\r\nContent-Type: {TAR_TYPE}\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n")
            try:
                self.sock.sendall(head.encode())
                while chunk:
                    self.sock.sendall(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")))
                    chunk = tar.read(CHUNK)
                stack.close()  # before the last chunk: a failure to close still cuts it short
            except Exception as e:
                # The status is sent: all that is left is to cut the stream short, which
                # Docker's chunked reader reports as an error rather than a shorter tar.
                log.warning("Diff %s cut short: %s", req.get("ID"), e)
                self.keep = False
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                return
        self._send(b"0\r\n\r\n")


class PluginServer:
    """The unix socket server: one loop for the connections, a pool of workers for calls."""

    def __init__(self, path: Path, plugin: Plugin, limits: Limits | None = None) -> None:
        self.path = path
        self.plugin = plugin
        limits = limits or Limits()
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and limits.max_connections > soft - 256:
            # Room for the driver's own files and the calls in progress.
            limits = dataclasses.replace(limits, max_connections=max(16, soft - 256))
        self.limits = limits
        self.closing = False
        self._cond = threading.Condition()
        self._calls = 0
        self._queue: queue.Queue[tuple[_Conn, Request] | None] = queue.Queue(self.limits.backlog)
        self._returned: collections.deque[_Conn] = collections.deque()
        self._busy: set[_Conn] = set()
        self._conns: collections.OrderedDict[int, _Conn] = collections.OrderedDict()
        self._threads: list[threading.Thread] = []
        self.refused = 0
        """Connections closed to make room, and calls answered 503 (for tests, logs)."""
        _claim(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # the socket is the daemon's (root's) and its group's
        try:
            self._listener.bind(str(path))
        except OSError:
            self._listener.close()
            raise
        finally:
            os.umask(old)
        self._listener.listen(LISTEN_BACKLOG)
        self._listener.setblocking(False)
        self._inode = os.stat(path).st_ino
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop and the workers."""
        self._threads.append(threading.Thread(target=self._loop, name="serve-loop",
                                              daemon=True))
        self._threads += [threading.Thread(target=self._work, name=f"serve-worker-{i}",
                                           daemon=True) for i in range(self.limits.workers)]
        for t in self._threads:
            t.start()

    def stop(self, grace: float) -> bool:
        """Stop accepting, remove the socket, let calls in progress finish; whether all did."""
        # The socket goes first: from then on, Docker's calls fail to connect and are retried.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:  # not a newer serve's socket
                os.unlink(self.path)
        with self._cond:
            self.closing = True
        self._wake()
        loop = self._threads[0] if self._threads else None
        if loop is not None:
            loop.join(10)
        else:
            self._close_all()
        with self._cond:
            finished = self._cond.wait_for(lambda: self._calls == 0, timeout=grace)
        for _ in self._threads[1:]:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1)
        return finished

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._sel.register(self._listener, selectors.EVENT_READ, None)
            self._sel.register(self._wake_r, selectors.EVENT_READ, None)
            last_sweep = time.monotonic()
            while not self.closing:
                for key, _ in self._sel.select(timeout=0.5):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._take_back()
                    else:
                        self._readable(cast(_Conn, key.data))
                now = time.monotonic()
                if now - last_sweep >= 0.25:
                    self._sweep(now)
                    last_sweep = now
        except Exception:  # a bug in the loop: nothing could be served any more
            log.exception("the connection loop failed")
            raise
        finally:
            self._close_all()

    def _close_all(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
        with self._cond:  # ``closing`` is set: no worker gives a connection back after this
            while self._returned:
                self._returned.popleft().close()
        # calls queued but not begun: closed unanswered, so that Docker calls again
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].close()
        with contextlib.suppress(OSError):
            self._sel.close()

    def _accept(self) -> None:
        for _ in range(256):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: shed the oldest, try again later
                log.warning("cannot accept a connection: %s", e)
                self._evict()
                return
            sock.setblocking(False)
            while len(self._conns) >= self.limits.max_connections:
                self._evict()
            self._hold(_Conn(sock, time.monotonic()))

    def _hold(self, conn: _Conn) -> None:
        """Wait for the next call on ``conn``."""
        if conn.buf and self._maybe_dispatch(conn):
            return
        try:
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):
            conn.close()
            return
        self._conns[conn.sock.fileno()] = conn

    def _evict(self) -> None:
        if not self._conns:
            return
        _, conn = self._conns.popitem(last=False)
        self.refused += 1
        self._drop(conn, registered=True)

    def _drop(self, conn: _Conn, *, registered: bool) -> None:
        if registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
        conn.close()

    def _take_back(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while self._returned:
            conn = self._returned.popleft()
            if self.closing:
                conn.close()
            else:
                while len(self._conns) >= self.limits.max_connections:
                    self._evict()
                self._hold(conn)

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._forget(conn)
            self._drop(conn, registered=True)
            return
        if conn.head_started is None:
            conn.head_started = time.monotonic()
        conn.buf += data
        fd = conn.sock.fileno()
        if self._maybe_dispatch(conn):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
            self._conns.pop(fd, None)

    def _forget(self, conn: _Conn) -> None:
        with contextlib.suppress(OSError):
            self._conns.pop(conn.sock.fileno(), None)

    def _maybe_dispatch(self, conn: _Conn) -> bool:
        """Hand a whole head to a worker (or answer it); whether ``conn`` left the loop."""
        try:
            req = take_head(conn.buf)
        except HTTPError as e:
            self._refuse(conn, e)
            return True
        if req is None:
            if not conn.buf:
                conn.head_started = None
            return False
        with self._cond:
            if self.closing:
                conn.close()
                return True
        try:
            self._queue.put_nowait((conn, req))
        except queue.Full:
            self.refused += 1
            self._refuse(conn, HTTPError(
                503, f"lamina serve is busy: {self.limits.backlog} calls wait already"))
        return True

    def _refuse(self, conn: _Conn, e: HTTPError) -> None:
        """Answer ``e`` as well as a non-blocking send can, and close."""
        log.warning("refused a request: %s", e)
        with contextlib.suppress(OSError):
            conn.sock.send(_answer_bytes(e.status, {"Err": str(e)}, close=True))
        conn.close()

    def _sweep(self, now: float) -> None:
        limits = self.limits
        for fd, conn in list(self._conns.items()):
            if conn.head_started is not None:
                late = now - conn.head_started > limits.header_timeout
            else:
                late = now - conn.since > limits.idle_timeout
            if late:
                del self._conns[fd]
                if conn.head_started is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._sel.unregister(conn.sock)
                    self._refuse(conn, HTTPError(
                        408, f"no whole request head in {limits.header_timeout:g} s"))
                else:
                    self._drop(conn, registered=True)

    # -- the workers --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            conn, req = item
            with self._cond:
                if self.closing:
                    conn.close()  # unanswered: Docker calls again
                    continue
                self._calls += 1
            keep = False
            try:
                conn.sock.setblocking(True)
                call = _Call(self, conn, req)
                keep = call.run()
                if keep:
                    conn.reset(call.reader.rest(), time.monotonic())
                    conn.sock.setblocking(False)
            except Exception:
                log.exception("a call failed outside its handler")
                keep = False
            finally:
                with self._cond:
                    self._calls -= 1
                    self._cond.notify_all()
                    closing = self.closing
                    if keep and not closing:
                        self._returned.append(conn)  # under the lock: see _close_all
            if keep and not closing:
                self._wake()
            else:
                conn.close()

    # -- figures --------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections waiting for a call (the loop's)."""
        return len(self._conns)


def _claim(path: Path) -> None:
    """Make ``path`` free for a new socket: a stale socket goes, a live one is ``Busy``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as e:
            raise errors.InvalidArgument(f"cannot create the socket's directory: {e.strerror}",
                                         path=str(path.parent)) from e
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise errors.InvalidArgument("exists and is not a socket", path=str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left by a serve that was killed
        return
    except OSError as e:
        raise errors.InvalidArgument(f"cannot use the socket: {e.strerror}", path=str(path)) from e
    finally:
        probe.close()
    raise errors.Busy("another server is listening on this socket", path=str(path))
