"""The wire of ``lamina serve``: Docker's plugin HTTP/1.1 as :mod:`lamina.frontends.docker.http`
serves it, parsed strictly — request heads (:func:`parse_head`), bodies of a known
length or chunked (:class:`RequestBody`, streamed to the driver), depth-limited JSON
(:func:`parse_json`) — and the server's :class:`Limits`.  Pure parsing over bytes and
a socket's reads: no thread, no driver."""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
import os
import re
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from lamina import errors

if TYPE_CHECKING:
    pass


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
