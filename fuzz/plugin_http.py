"""An atheris (libFuzzer) target for ``lamina serve``'s HTTP layer (no root, no store).

Each input is the byte stream of one client connection (after a first byte of flags): it
goes through what the server does with a connection —
:func:`~lamina.frontends.docker.wire.take_head` as the connection loop calls it, then
each call run by a worker (:class:`~lamina.frontends.docker.http._Call`) on a stand-in
socket, over the real :class:`~lamina.frontends.docker.plugin.Plugin` with a stand-in
driver (its ``apply_diff`` reads the body to its end, as the tar engine would), pipelined
calls one after the other — and ends in EOF or, by the flags, a read timeout.

A finding: an exception out of the server's code, or anything it writes that is not a
sequence of well-formed HTTP/1.1 responses, each (but a ``Diff``'s tar and ``100
Continue``) with a JSON object as its body; one with an error status and no ``Err``; an
``Err`` that says "internal error" (a bug of lamina, not of the request).

    .venv/bin/python fuzz/plugin_http.py -seeds fuzz/corpus-http      # write the seeds
    .venv/bin/python fuzz/plugin_http.py fuzz/corpus-http -max_total_time=600 \\
        -max_len=65536 -rss_limit_mb=2048 -timeout=20 -print_final_stats=1

``tests/integration/test_plugin_hardening.py`` runs it for a bounded number of inputs in CI.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["lamina"]):
    from lamina import errors
    from lamina.driver import check_id
    from lamina.frontends.docker import http, wire
    from lamina.frontends.docker.plugin import Plugin


class Socket:
    """A connection whose client sent ``data`` and then closed, or stalled (``stall``)."""

    def __init__(self, data: bytes, *, stall: bool, trickle: int) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.stall = stall
        self.trickle = trickle  # at most this many bytes a recv (1: byte by byte)
        self.out = bytearray()
        self.shut = False

    def recv(self, n: int, /) -> bytes:
        if self.pos >= len(self.data):
            if self.stall:
                raise TimeoutError("timed out")
            return b""
        n = min(n, self.trickle)
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += len(out)
        return out

    def recv_into(self, buffer: memoryview, /) -> int:
        data = self.recv(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def sendall(self, data: bytes, /) -> None:
        if self.shut:
            raise BrokenPipeError("shut down")
        self.out += data

    def settimeout(self, value: float | None, /) -> None:
        pass

    def shutdown(self, how: int, /) -> None:
        self.shut = True


class Driver:
    """What the plugin's calls reach: checks the ids as the real driver does."""

    name = "fuzz"
    home = Path("/nonexistent")

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            for arg in args[:2]:
                if isinstance(arg, str) and arg:
                    check_id(arg)
            if name == "exists":
                return args[0] == "base"
            if name == "get":
                return Path("/mnt") / args[0]
            if name in ("status", "changes"):
                return []
            if name == "metadata":
                return {"dir": "/x"}
            if name == "diff_size":
                return 0
            if args and args[0] == "missing":
                raise errors.NotFound("no such layer", layer="missing")
            return None

        return call

    def diff(self, id: str, parent: str | None) -> BinaryIO:
        check_id(id)
        if id == "missing":
            raise errors.NotFound("no such layer", layer=id)
        return io.BytesIO(b"tar" * 1000)

    def apply_diff(self, id: str, parent: str | None, stream: BinaryIO) -> int:
        check_id(id)
        total = 0
        buf = bytearray(4096)
        while True:  # as the tar engine reads: read() and readinto(), sizes that vary
            n = stream.readinto(buf) if total % 2 else len(  # type: ignore[attr-defined]
                stream.read(1 + total % 7000))
            if not n:
                return total
            total += n


class Server:
    """What a call needs of :class:`~lamina.frontends.docker.http.PluginServer`."""

    def __init__(self) -> None:
        self.limits = wire.Limits()
        self.closing = False
        self.plugin = Plugin()
        self.plugin._driver = Driver()  # type: ignore[assignment]
        del self.plugin.calls["GraphDriver.Init"]  # it would open a store


SERVER = Server()


def serve(sock: Socket) -> None:
    """What the loop and the workers do with one connection."""
    buf = bytearray()
    while True:
        try:
            req = wire.take_head(buf)
        except wire.HTTPError as e:
            sock.sendall(http._answer_bytes(e.status, {"Err": str(e)}, close=True))
            return
        if req is None:
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                return  # the loop's header timeout: answered 408 (not fuzzed here)
            if not data:
                return
            buf += data
            continue
        conn = http._Conn(sock, 0.0)  # type: ignore[arg-type]
        conn.buf = buf
        call = http._Call(SERVER, conn, req)  # type: ignore[arg-type]
        if not call.run():
            return
        buf = bytearray(call.reader.rest())


def check_output(out: bytes) -> None:
    """``out`` is a sequence of well-formed responses (the last of a Diff may be cut)."""
    f = io.BytesIO(out)
    while True:
        line = f.readline()
        if not line:
            return
        assert line.startswith(b"HTTP/1.1 ") and line.endswith(b"\r\n"), line
        status = int(line[9:12])
        headers: dict[str, str] = {}
        while (line := f.readline()) != b"\r\n":
            assert line.endswith(b"\r\n"), line
            name, colon, value = line.decode("latin-1").partition(":")
            assert colon, line
            headers[name.lower()] = value.strip()
        if status == 100:
            continue
        if headers.get("transfer-encoding") == "chunked":  # a Diff's tar
            assert status == 200 and headers["content-type"] == wire.TAR_TYPE, headers
            return  # the rest is its tar (the connection's last answer)
        assert headers["content-type"] == wire.JSON_TYPE, headers
        body = f.read(int(headers["content-length"]))
        doc = json.loads(body)
        assert isinstance(doc, dict), doc
        if status != 200:
            assert isinstance(doc.get("Err"), str), (status, doc)
            assert "internal error" not in doc["Err"], doc["Err"]


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    flags = data[0]
    trickle = (1, 7, 512, 1 << 20)[flags >> 1 & 3]
    sock = Socket(data[1:], stall=bool(flags & 1), trickle=trickle)
    serve(sock)
    check_output(bytes(sock.out))


def write_seeds(where: str) -> None:
    """Requests as Docker sends them, and the malformed ones the issue found."""

    def post(path: str, body: bytes = b"{}", *headers: str, chunked: bool = False) -> bytes:
        head = "".join(f"{h}\r\n" for h in headers)
        if chunked:
            framed = b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 5]), body[i:i + 5])
                              for i in range(0, len(body), 5)) + b"0\r\n\r\n"
            return (f"POST /{path} HTTP/1.1\r\nHost: plugin\r\n{head}"
                    "Transfer-Encoding: chunked\r\n\r\n").encode() + framed
        return (f"POST /{path} HTTP/1.1\r\nHost: plugin\r\n{head}"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    tar = b"x" * 700
    seeds = {
        "activate": post("Plugin.Activate", b""),
        "create": post("GraphDriver.Create", b'{"ID":"a","Parent":"base","StorageOpt":{}}'),
        "create-rw": post("GraphDriver.CreateReadWrite",
                          b'{"ID":"c","Parent":"a","MountLabel":"","StorageOpt":{"size":"1G"}}'),
        "get": post("GraphDriver.Get", b'{"ID":"c","MountLabel":""}'),
        "exists": post("GraphDriver.Exists", b'{"ID":"base"}', "Accept: application/json"),
        "status": post("GraphDriver.Status"),
        "changes": post("GraphDriver.Changes", b'{"ID":"c","Parent":"a"}'),
        "diff": post("GraphDriver.Diff", b'{"ID":"c","Parent":""}'),
        "diff-missing": post("GraphDriver.Diff", b'{"ID":"missing"}'),
        "apply-chunked": post("GraphDriver.ApplyDiff?id=l&parent=base", tar, chunked=True),
        "apply-length": post("GraphDriver.ApplyDiff?id=l&parent=", tar),
        "pipelined": post("GraphDriver.Status") + post("GraphDriver.Exists", b'{"ID":"x"}')
        + post("GraphDriver.Remove", b'{"ID":"missing"}'),
        "chunked-json": post("GraphDriver.Exists", b'{"ID":"base"}', chunked=True),
        "expect": post("GraphDriver.Status", b"{}", "Expect: 100-continue"),
        "two-lengths": post("GraphDriver.Status", b"{}", "Content-Length: 2"),
        "minus-two": b"POST /GraphDriver.ApplyDiff?id=n HTTP/1.1\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n-2\r\nab\r\n0\r\n\r\n",
        "zz": b"POST /GraphDriver.ApplyDiff?id=z HTTP/1.1\r\nTransfer-Encoding: chunked"
        b"\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        "get-method": b"GET /Plugin.Activate HTTP/1.1\r\n\r\n",
        "deep": post("GraphDriver.Status", b"[" * 200 + b"]" * 200),
        "init-maps": post("GraphDriver.Init", b'{"Home":"/h","UIDMaps":[{"container_id":0,'
                          b'"host_id":1000,"size":1}]}'),
    }
    os.makedirs(where, exist_ok=True)
    for name, data in seeds.items():
        for flags in (0, 1, 2, 4):
            with open(os.path.join(where, f"{name}.{flags}"), "wb") as f:
                f.write(bytes([flags]) + data)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "-seeds":
        write_seeds(sys.argv[2])
        return
    logging.disable(logging.CRITICAL)  # every refused request logs a warning
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
