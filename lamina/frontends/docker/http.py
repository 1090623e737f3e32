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
import json
import logging
import os
import queue
import resource
import selectors
import socket
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from lamina import errors
from lamina.frontends.docker.wire import (
    CHUNK,
    JSON_TYPE,
    LISTEN_BACKLOG,
    REASONS,
    TAR_TYPE,
    HTTPError,
    Limits,
    Reader,
    Request,
    RequestBody,
    take_head,
)

if TYPE_CHECKING:
    from lamina.frontends.docker.plugin import Plugin

log = logging.getLogger("lamina.serve")

JsonDoc = dict[str, Any]
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
