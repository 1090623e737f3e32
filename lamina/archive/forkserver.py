"""The isolated side of ``apply_diff``: the fork server and its children
(:mod:`lamina.archive.isolate` says why and how; this module is what runs in the helper
process; :mod:`lamina.host.jail` is the switch of a child's root to one that holds
only the layer).

The fork server (:func:`serve`) imports everything a child will run before it forks
any: after the switch a child imports nothing (an import hook refuses it), loads no
library and runs no program.  Its loop is single-threaded: one forked child per
request, reaped through a pidfd, killed when its caller gives up or goes away.

A child (:func:`_child`) reads the spec from the head of the data pipe, enters its
jail (:func:`lamina.host.jail.enter_jail`), seals imports and does the spec's action
with the rest of the pipe — ``apply``: the records
(:class:`~lamina.archive.records.RecordReader`) with
:class:`~lamina.archive.apply.Applier`; ``wclayer``: a Windows layer's raw tar, framed
(:class:`~lamina.archive.frames.FrameInput`), with
:class:`~lamina.archive.wclayer.WindowsImporter`, the parent layers as the lowers.
Then it closes the pipe (the caller stops sending) and writes one JSON line:
``{"size": …}`` (after the CRC-32s of the files it wrote, in lines of
``{"digests": [inode, size, mtime_ns, crc, …]}``),
``{"error": class, "message", "layer", "path"}``,
``{"oserror": [errno, strerror, filename]}``, ``{"aborted": true}`` (the records or
frames stopped before their end: the caller found the tar bad there), ``{"setup": why}``
(it could not isolate itself) or ``{"bug": …, "traceback": …}``; before that,
``{"entries": n}`` counts.
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import importlib
import json
import os
import resource
import select
import signal
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

from lamina import errors, progress
from lamina.archive.apply import Applier
from lamina.archive.digests import Digests
from lamina.archive.frames import FrameInput
from lamina.archive.records import Aborted, RecordReader
from lamina.archive.wclayer import WindowsImporter
from lamina.host import jail
from lamina.host.idmap import IdMapper

PROGRESS_EVERY = 0.1  # seconds between the child's entry counts
DIGESTS_PER_LINE = 4096  # files per digests line: each well below isolate.MAX_RESULT

# Codecs are modules loaded on first use: the Windows importer's record is ASCII.
codecs.lookup("ascii")


# --- the fork server --------------------------------------------------------------------


class _Child:
    __slots__ = ("pid", "pidfd", "req")

    def __init__(self, pid: int, pidfd: int, req: socket.socket) -> None:
        self.pid, self.pidfd, self.req = pid, pidfd, req


def serve(ctl_fd: int) -> None:
    """The fork server's loop: one forked child per request, until the caller goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller handles ^C and tells us
    os.chdir("/")
    gc.freeze()  # what is loaded now stays shared with every child (fewer pages to copy)
    ctl = socket.socket(fileno=ctl_fd)
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    by_pidfd: dict[int, _Child] = {}
    by_req: dict[int, _Child] = {}
    while True:
        for fd, _ in poller.poll():
            if fd == ctl.fileno():
                if not _accept(ctl, poller, by_pidfd, by_req):
                    for child in by_pidfd.values():
                        _kill(child.pid)
                        os.waitpid(child.pid, 0)
                    return
            elif fd in by_pidfd:
                child = by_pidfd.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                _, status = os.waitpid(child.pid, 0)
                with contextlib.suppress(OSError):
                    child.req.send(b"status %d" % status)
                if by_req.pop(child.req.fileno(), None) is not None:
                    poller.unregister(child.req)
                child.req.close()
            elif fd in by_req:
                child = by_req[fd]
                try:
                    said = child.req.recv(16)
                except OSError:
                    said = b""
                if not said or said == b"kill":  # the caller gave up, or died
                    _kill(child.pid)
                if not said:
                    poller.unregister(fd)
                    del by_req[fd]


def _accept(ctl: socket.socket, poller: select.poll, by_pidfd: dict[int, _Child],
            by_req: dict[int, _Child]) -> bool:
    """Fork a child for one request; False when the caller has gone."""
    msg, fds, _, _ = socket.recv_fds(ctl, 64, 3)
    if not msg and not fds:
        return False
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return True
    data_fd, res_fd, req_fd = fds
    req = socket.socket(fileno=req_fd)
    server = os.getpid()
    try:
        pid = os.fork()
    except OSError as e:
        with contextlib.suppress(OSError):
            req.send(b"error " + str(e).encode())
        req.close()
        os.close(data_fd)
        os.close(res_fd)
        return True
    if pid == 0:  # pragma: no cover - the child; it never returns into this loop
        code = 70
        try:
            code = _child(data_fd, res_fd, server)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(data_fd)
    os.close(res_fd)
    pidfd = os.pidfd_open(pid)
    child = _Child(pid, pidfd, req)
    by_pidfd[pidfd] = child
    poller.register(pidfd, select.POLLIN)
    try:
        req.send(b"pid %d" % pid)
    except OSError:
        _kill(pid)
        return True
    by_req[req.fileno()] = child
    poller.register(req, select.POLLIN)
    return True


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --- the child ----------------------------------------------------------------------------


class _Reporter:
    """The child's side of the result pipe: entry counts, then one final record."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.entries = 0
        self.last = time.monotonic()

    def progress(self, nbytes: int, nentries: int) -> None:
        self.entries += nentries
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            # Never blocks: the caller reads these between writes of its own, and a
            # count that does not fit now goes with the next one.
            os.set_blocking(self.fd, False)
            try:
                self._write({"entries": self.entries})
                self.entries = 0
            except BlockingIOError:
                pass
            finally:
                os.set_blocking(self.fd, True)

    def digests(self, digests: Digests) -> None:
        """The CRC-32s of the files written, in lines of :data:`DIGESTS_PER_LINE`."""
        flat: list[int] = []
        for ino, (size, mtime, crc) in digests.items():
            flat += (ino, size, mtime, crc)
            if len(flat) >= 4 * DIGESTS_PER_LINE:
                self._write({"digests": flat})
                flat = []
        if flat:
            self._write({"digests": flat})

    def final(self, record: dict[str, Any]) -> None:
        if self.entries:
            self._write({"entries": self.entries})
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        # A count is shorter than PIPE_BUF: written whole or not at all.
        view = memoryview(json.dumps(record).encode() + b"\n")
        with contextlib.suppress(BrokenPipeError):  # the caller is gone: nobody to tell
            while view:
                view = view[os.write(self.fd, view):]


def _child(data_fd: int, res_fd: int, server: int) -> int:
    """A forked child: read the spec, switch roots, apply, report.  Its exit code."""
    # No collection here: garbage of the server's could close an fd number reused below.
    gc.disable()
    jail.die_with_parent()
    if os.getppid() != server:
        return 1  # the fork server died before the line above
    for low, high in _gaps(sorted((data_fd, res_fd))):
        os.closerange(low, high)
    out = _Reporter(res_fd)
    try:
        spec = _read_spec(data_fd)
    except (EOFError, ValueError):
        return 1  # the caller gave up before it said what to do
    try:
        root, lowers = jail.enter_jail(spec["root"], spec["lowers"])
        jail.drop_capabilities()
    except OSError as e:
        out.final({"setup": str(e)})
        return 0
    jail.seal()
    if spec["action"] == "probe":
        out.final(_probe_here(root, lowers, spec["paths"], spec.get("module")))
        return 0
    digests: Digests = {}
    if spec["action"] == "wclayer":
        record = _answer(data_fd, out, spec["progress"], _import_windows(spec, root, lowers))
    else:
        record = _answer(data_fd, out, spec["progress"],
                         _apply_records(spec, root, lowers, digests))
    if "size" in record:  # the data pipe is closed by now: the caller reads these
        out.digests(digests)
    out.final(record)
    return 0


def _gaps(keep: list[int]) -> list[tuple[int, int]]:
    # fd ranges to close: everything from 3 up but ``keep``.
    out, low = [], 3
    for fd in keep:
        if fd > low:
            out.append((low, fd))
        low = max(low, fd + 1)
    out.append((low, os.sysconf("SC_OPEN_MAX")))
    return out


def _read_spec(fd: int) -> dict[str, Any]:
    def exactly(n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = os.read(fd, left)
            if not chunk:
                raise EOFError("the caller closed the pipe before the spec")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    spec: dict[str, Any] = json.loads(exactly(int.from_bytes(exactly(8), "big")))
    return spec


def _apply_records(spec: dict[str, Any], root: str, lowers: list[str],
                   digests: Digests) -> Callable[[int], int]:
    """The work of an ``apply``: the records of the pipe, by the tar engine's applier."""

    def work(data_fd: int) -> int:
        os.umask(0)  # every mode is the tar's (the applier then skips most fchmods)
        applier = Applier(
            root, layer=spec["layer"],
            ids=IdMapper([tuple(r) for r in spec["uids"]], [tuple(r) for r in spec["gids"]],
                         squash=bool(spec.get("squash"))),
            overlay_whiteouts=spec["overlay_whiteouts"], max_entries=spec["max_entries"],
            max_size=spec["max_size"], lowers=lowers, max_path=spec["max_path"],
            digests=digests, writers=spec.get("writers", 0), umask_zero=True,
        )
        return applier.apply_entries(RecordReader(data_fd))

    return work


def _import_windows(spec: dict[str, Any], root: str, lowers: list[str]) -> Callable[[int], int]:
    """The work of a ``wclayer``: the raw tar of the pipe (:mod:`lamina.archive.frames`),
    by the Windows importer, with the parent layers' directories as the lowers."""

    def work(data_fd: int) -> int:
        importer = WindowsImporter(Path(root), [Path(p) for p in lowers], layer=spec["layer"])
        return importer.apply(cast(BinaryIO, FrameInput(data_fd)))

    return work


def _answer(data_fd: int, out: _Reporter, report: bool,
            work: Callable[[int], int]) -> dict[str, Any]:
    """Run ``work`` on the data pipe; its final record (the size, or what went wrong)."""
    stream = os.fdopen(data_fd, "rb", buffering=0)
    try:
        if report:
            with progress.reporting(out.progress):
                size = work(stream.fileno())
        else:
            size = work(stream.fileno())
        return {"size": size, **_usage()}
    except Aborted:  # the caller found the tar bad there, and says why
        return {"aborted": True, **_usage()}
    except errors.LaminaError as e:
        return {"error": type(e).__name__, "message": str(e), "layer": e.layer, "path": e.path,
                **_usage()}
    except OSError as e:
        name = e.filename if isinstance(e.filename, str) else None
        return {"oserror": [e.errno, e.strerror, name]}
    except BaseException as e:  # a bug: the caller raises it with this traceback
        return {"bug": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        stream.close()  # from here the caller's writes fail: it stops sending


def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"maxrss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime}


def _probe_here(root: str, lowers: list[str], paths: list[str],
                module: str | None) -> dict[str, Any]:
    def writable(where: str) -> bool:
        try:
            os.mkdir(f"{where}/.lamina-probe")
        except OSError:
            return False
        os.rmdir(f"{where}/.lamina-probe")
        return True

    imports = None
    if module is not None:  # one the fork server has not imported: must be refused
        try:
            importlib.import_module(module)
            imports = "allowed"
        except ImportError:
            imports = "refused"
    return {"root": sorted(os.listdir("/")), "layer": root, "lowers": lowers,
            "root_writable": writable(""), "layer_writable": writable(root),
            "lowers_writable": [writable(p) for p in lowers],
            "visible": [p for p in paths if os.path.lexists(p)], "imports": imports,
            "capabilities": jail.capabilities()}
