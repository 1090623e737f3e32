"""HTTP/1.1 over a unix socket for :mod:`lamina.frontends.docker.plugin`, as Docker's plugin
client speaks it.

Every call is a ``POST /Method``: a JSON body answered with a JSON body, on
connections Docker keeps alive between calls.  Two calls stream: ``ApplyDiff``'s
body (Docker sends it chunked) reaches the driver as a :class:`RequestBody`, which
decodes the framing as the tar engine reads; ``Diff``'s tar goes out with chunked
framing as the engine writes it.  Neither is ever held whole in memory.  An error
is status 500 with ``{"Err": …}`` (Docker reads ``Err`` from any status; a ``Diff``
must not answer 200 with an error, or Docker would read it as a tar); a ``Diff``
that fails once its tar has started is cut short, which Docker's chunked reader
reports as an error rather than taking a shorter tar.

Concurrency: Docker calls in parallel, on several connections; each connection has
its own thread, all on the one :class:`~lamina.frontends.docker.plugin.Plugin`, whose driver's locks
(flocks, per layer and per store) serialize what must be.

:meth:`PluginServer.stop` is the graceful half of a shutdown: no new connections,
no new calls on the open ones (they are closed unanswered, so that Docker calls
again), and a wait for the calls in progress.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import io
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import urllib.parse
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from lamina import errors

if TYPE_CHECKING:
    from lamina.frontends.docker.plugin import Plugin

log = logging.getLogger("lamina.serve")

JsonDoc = dict[str, Any]
JSON_TYPE = "application/vnd.docker.plugins.v1.2+json"
TAR_TYPE = "application/x-tar"
CHUNK = 1 << 20
"""How much of a diff is sent, or of a body drained, at a time."""
MAX_JSON = 1 << 20
"""The largest JSON request body read (Docker's are a few hundred bytes)."""


class HTTPError(Exception):
    """A request lamina cannot read as HTTP (answered with ``status`` and closed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequestBody(io.RawIOBase):
    """A request's body as a stream, decoding ``Content-Length`` or chunked framing."""

    def __init__(self, rfile: io.BufferedIOBase, headers: Message) -> None:
        self._rfile = rfile
        coding = (headers.get("Transfer-Encoding") or "").strip().lower()
        self._chunked = bool(coding)
        self._first = True
        self._left = 0  # bytes left in the body (Content-Length) or in this chunk
        if coding and coding != "chunked":
            raise HTTPError(501, f"transfer coding {coding!r} is not supported")
        if not coding:
            length = headers.get("Content-Length") or "0"
            if not length.isdigit():
                raise HTTPError(400, f"bad Content-Length {length!r}")
            self._left = int(length)
        self._done = not coding and self._left == 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes of the body (fewer at a chunk's end), ``b""`` at its end."""
        if size is None or size < 0:
            return self.readall()
        if not self._more() or size == 0:
            return b""
        # read1, not RawIOBase.read: that one allocates (and zeroes) ``size`` bytes for
        # every call, and the tar engine asks for a megabyte where a chunk holds 32 KiB.
        data = self._rfile.read1(min(size, self._left))
        self._took(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        if not self._more():
            return 0
        view = memoryview(buffer).cast("B")
        n = self._rfile.readinto1(view[: min(len(view), self._left)])
        self._took(n)
        return n

    def _more(self) -> bool:
        if self._chunked and self._left == 0 and not self._done:
            self._next_chunk()
        return not self._done

    def _took(self, n: int) -> None:
        if not n:
            raise ConnectionAbortedError(errno.ECONNABORTED, "the request body was cut short")
        self._left -= n
        if not self._chunked and self._left == 0:
            self._done = True

    def _line(self) -> bytes:
        line = self._rfile.readline(1024)
        if not line.endswith(b"\n"):
            raise ConnectionAbortedError(errno.ECONNABORTED, "bad chunked framing")
        return line

    def _next_chunk(self) -> None:
        if not self._first and self._line().strip():
            raise ConnectionAbortedError(errno.ECONNABORTED, "bad chunked framing")
        self._first = False
        size = self._line().split(b";", 1)[0].strip()
        try:
            self._left = int(size, 16)
        except ValueError:
            raise ConnectionAbortedError(errno.ECONNABORTED, "bad chunk size") from None
        if self._left == 0:
            while self._line().strip():  # trailers, ignored
                pass
            self._done = True

    def read_json(self) -> JsonDoc:
        """The whole body as a JSON object (an empty body is ``{}``)."""
        data = bytearray()
        while chunk := self.read(1 << 16):
            data += chunk
            if len(data) > MAX_JSON:
                raise HTTPError(413, f"request body over {MAX_JSON} bytes")
        if not data.strip():
            return {}
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise errors.InvalidArgument(f"request body is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise errors.InvalidArgument("request body is not a JSON object")
        return doc

    def drain(self) -> bool:
        """Read what is left of the body; whether the connection can serve another call."""
        try:
            while self.read(CHUNK):
                pass
        except OSError:
            return False
        return True


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection from Docker: calls one after the other (HTTP keep-alive)."""

    server: PluginServer
    protocol_version = "HTTP/1.1"
    server_version = "lamina"
    rbufsize = 1 << 16

    def setup(self) -> None:
        super().setup()
        self.server.track(self.request, True)

    def finish(self) -> None:
        self.server.track(self.request, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def do_POST(self) -> None:
        if not self.server.begin_call():
            # Shutting down: no answer, so Docker calls again on a new connection.
            self.close_connection = True
            return
        try:
            self._call()
        finally:
            self.server.end_call()

    def _call(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        method = url.path.lstrip("/")
        try:
            body = RequestBody(self.rfile, self.headers)
        except HTTPError as e:
            self.close_connection = True
            self._answer(e.status, {"Err": str(e)})
            return
        try:
            if method == "GraphDriver.ApplyDiff":
                query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
                id, parent = query.get("id", [""])[0], query.get("parent", [""])[0]
                log.debug("ApplyDiff %s on %s", id, parent or "nothing")
                doc = self.server.plugin.apply_diff(id, parent, cast(BinaryIO, body))
                self._finish_body(body)
                self._answer(200, doc)
            elif method == "GraphDriver.Diff":
                self._send_diff(body.read_json())
            elif method in self.server.plugin.calls:
                req = body.read_json()
                log.debug("%s %s", method, req)
                self._answer(200, self.server.plugin.calls[method](req))
            else:
                self._finish_body(body)
                self._answer(404, {"Err": f"lamina has no call {method!r}"})
        except HTTPError as e:
            self.close_connection = True
            self._answer(e.status, {"Err": str(e)})
        except errors.LaminaError as e:
            log.warning("%s: %s", method, e)
            self._finish_body(body)
            self._answer(500, {"Err": str(e)})
        except (BrokenPipeError, ConnectionError) as e:
            log.warning("%s: connection lost: %s", method, e)
            self.close_connection = True
        except Exception as e:  # a bug: say so to Docker, keep serving the others
            log.exception("%s failed", method)
            self._finish_body(body)
            self._answer(500, {"Err": f"lamina: internal error in {method}: {e!r}"})

    def _finish_body(self, body: RequestBody) -> None:
        if not body.drain():
            self.close_connection = True

    def _answer(self, status: int, doc: JsonDoc) -> None:
        data = json.dumps(doc).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", JSON_TYPE)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError as e:
            log.warning("cannot answer: %s", e)
            self.close_connection = True

    def _send_diff(self, req: JsonDoc) -> None:
        log.debug("Diff %s", req)
        with contextlib.ExitStack() as stack:
            tar = stack.enter_context(self.server.plugin.diff(req))
            # The first read happens before the status line, so that a diff that
            # cannot start (an unmountable parent) is still an {"Err": …} answer.
            chunk = tar.read(CHUNK)
            self.send_response(200)
            self.send_header("Content-Type", TAR_TYPE)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while chunk:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    chunk = tar.read(CHUNK)
                stack.close()  # before the last chunk: a failure to close still cuts it short
            except Exception as e:
                # The status is sent: all that is left is to cut the stream short, which
                # Docker's chunked reader reports as an error rather than a shorter tar.
                log.warning("Diff %s cut short: %s", req.get("ID"), e)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.request.shutdown(socket.SHUT_RDWR)
                return
        self.wfile.write(b"0\r\n\r\n")


class PluginServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The unix socket server: a thread a connection, all on one :class:`Plugin`."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, path: Path, plugin: Plugin) -> None:
        self.path = path
        self.plugin = plugin
        self._cond = threading.Condition()
        self._calls = 0
        self._closing = False
        self._connections: set[socket.socket] = set()
        self._accepting: threading.Thread | None = None
        _claim(path)
        old = os.umask(0o117)  # the socket is the daemon's (root's) and its group's
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)
        self._inode = os.stat(path).st_ino

    def start(self) -> None:
        """Accept connections, on a thread of their own."""
        self._accepting = threading.Thread(target=self.serve_forever, name="accept", daemon=True)
        self._accepting.start()

    def track(self, conn: socket.socket, open: bool) -> None:
        """Keep the set of open connections (closed at shutdown)."""
        with self._cond:
            if open:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def begin_call(self) -> bool:
        """Count a call in; false once shutting down."""
        with self._cond:
            if self._closing:
                return False
            self._calls += 1
            return True

    def end_call(self) -> None:
        """Count a call out."""
        with self._cond:
            self._calls -= 1
            self._cond.notify_all()

    def stop(self, grace: float) -> bool:
        """Stop accepting, remove the socket, let calls in progress finish; whether all did."""
        # The socket goes first: from then on, Docker's calls fail to connect and are retried.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:  # not a newer serve's socket
                os.unlink(self.path)
        with self._cond:
            self._closing = True
        if self._accepting is not None:
            self.shutdown()  # the accept loop (it polls: up to half a second)
        self.server_close()
        with self._cond:
            finished = self._cond.wait_for(lambda: self._calls == 0, timeout=grace)
            idle = list(self._connections)
        for conn in idle:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        return finished


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
