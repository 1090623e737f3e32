"""Layer writes in an isolated child process (contract §2, "Safety").

:func:`apply_layer` is how the backends write a layer tar.  The caller's
process decompresses the stream (and would hash it); a child process, which
alone writes the layer, gets the plain tar through a pipe and sends back one
JSON line: the size, or the error, which is raised here again as the same
:class:`~lamina.errors.LaminaError` (same class, same message).  The tar
engine (:mod:`lamina.archive.apply`) already resolves every name from a
directory fd of the layer and never leaves it; the child is the second wall,
as Docker's chrooted extraction is: if the engine had a bug, the name would
still find nothing of the host.

What the child sees.  Its own mount namespace (private: nothing propagates
back) whose root is a small read-only tmpfs holding only::

    /layer           the directory being written (a bind mount: nosuid, nodev, noexec)
    /lower/0 …       overlay's lower layers, nearest first (read-only bind mounts),
                     which the union-aware apply consults for parent symlinks and
                     copies hard link targets up from
    /proc/self/fd    its own fd table (the engine reaches a file by fd there for the
                     l*xattr calls, which have no *at form); not the rest of /proc

The host's root is gone (``pivot_root``, then a lazy unmount of the old root;
``chroot`` after moving the new root onto ``/`` where ``pivot_root`` cannot
work, as on an initramfs).  As root the child unshares the mount namespace; as
another user it first makes a user namespace that maps only its own ids.

Nothing is loaded after the switch (CVE-2014-9357: Docker ran ``xz`` inside
the chroot; CVE-2019-14271: ``docker cp`` loaded ``libnss`` from the
container): every module the child runs is imported before it, an import hook
refuses any import after it, decompressors run in the caller, and the engine
looks up no names (owners are numeric).

Process model, and why.  Measured on the development machine (2 cores,
Python 3.11; ``tests/security/test_isolation.py`` prints it again): a fresh
interpreter that imports the tar engine costs ~90 ms; ``fork`` of the caller
~1.5 ms, but forking a threaded process (the plugin server serves requests on
threads) copies locks that other threads hold, a known way to deadlock the
child.  So lamina runs a fork server, as :mod:`multiprocessing` does: the
first isolated apply of a process re-executes the interpreter once
(``python -I -S``, given only the caller's ``sys.path``), that helper imports
the engine, stays single-threaded, and forks one child per apply.  Per apply
that costs ~4 ms (fork, namespace, mounts, pivot, pipes).  A request is one
``SCM_RIGHTS`` message carrying the data pipe, the result pipe and a socket of
its own, on which the server says the child's pid and, once reaped, its exit
status; the caller closing that socket (or dying) kills the child, and the
server exits when the caller's end of its control socket closes.

The data path is one pipe grown to 1 MiB, written in 1 MiB chunks; the caller
polls it together with the result pipe, over which the child also reports how
many entries it has applied (for the progress bar).

``LAMINA_NOREEXEC=1`` applies in the calling process instead, as the seed
driver's variable did: for debugging, or where namespaces are not available.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import gc
import json
import os
import platform
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any, BinaryIO

from lamina import errors, progress
from lamina.archive.apply import Applier
from lamina.archive.codecs import DECODE_ERRORS
from lamina.idmap import IdMapper

NOREEXEC = "LAMINA_NOREEXEC"
"""The environment variable that makes :func:`apply_layer` apply in-process."""

CHUNK = 1 << 20
PATH_MAX = 4096
PIPE_SIZE = 1 << 20
MAX_RESULT = 16 << 20  # a result line longer than this is a broken child
PROGRESS_EVERY = 0.1  # seconds between the child's entry counts

_F_SETPIPE_SZ = 1031
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC = 32, 4096, 8192, 16384
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MS_PRIVATE = 1 << 18
_LOCKDOWN = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
_ST_NOATIME, _ST_NODIRATIME, _ST_RELATIME = 1024, 2048, 4096
_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41,
               "ppc64le": 203, "ppc64": 203, "s390x": 217, "i686": 217, "i386": 217,
               "armv7l": 218, "armv6l": 218}.get(platform.machine())

_local = threading.local()
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


def inline_requested() -> bool:
    """Whether ``LAMINA_NOREEXEC`` asks for in-process applies."""
    return os.environ.get(NOREEXEC, "").lower() in ("1", "true", "yes")


def apply_layer(
    root: str | os.PathLike[str],
    stream: BinaryIO,
    *,
    layer: str | None = None,
    ids: IdMapper | None = None,
    overlay_whiteouts: bool = False,
    max_entries: int | None = None,
    max_size: int | None = None,
    lowers: Sequence[str] = (),
) -> int:
    """Apply the uncompressed tar ``stream`` into the directory ``root``; its file data size.

    The arguments are :class:`~lamina.archive.apply.Applier`'s.  The apply runs in
    an isolated child (see the module docstring) unless ``LAMINA_NOREEXEC=1``.
    """
    ids = ids or IdMapper()
    _local.usage = None
    # Paths in the layer must fit PATH_MAX on the host, below the layer's directory.
    max_path = PATH_MAX - 2 - len(os.fsencode(os.path.abspath(root)))
    if inline_requested():
        return Applier(root, layer=layer, ids=ids, overlay_whiteouts=overlay_whiteouts,
                       max_entries=max_entries, max_size=max_size, lowers=lowers,
                       max_path=max_path).apply(stream)
    spec = {
        "action": "apply",
        "root": os.path.abspath(root),
        "lowers": [os.path.abspath(p) for p in lowers],
        "layer": layer,
        "uids": list(ids.uids),
        "gids": list(ids.gids),
        "overlay_whiteouts": overlay_whiteouts,
        "max_entries": max_entries,
        "max_size": max_size,
        "max_path": max_path,
        "progress": progress.current() is not None,
    }
    result = _Run(spec, layer).run(stream)
    return int(result["size"])


def last_child_usage() -> dict[str, float] | None:
    """The peak RSS (``maxrss_kb``) and CPU time (``cpu_s``) of this thread's last isolated
    apply's child, for tests and benchmarks (None before one, or after an inline apply)."""
    return getattr(_local, "usage", None)


def probe(root: str | os.PathLike[str], lowers: Sequence[str] = (),
          paths: Sequence[str] = ()) -> dict[str, Any]:
    """What an isolated child for ``root`` sees (for the tests of this module).

    Its root's listing, whether it can write below ``/`` and into each lower,
    which of ``paths`` exist for it, and whether an import still works.
    """
    spec = {"action": "probe", "root": os.path.abspath(root),
            "lowers": [os.path.abspath(p) for p in lowers], "paths": list(paths),
            "layer": None, "progress": False}
    return _Run(spec, None).run(None)


# --- the caller's side ------------------------------------------------------------------


class IsolationError(RuntimeError):
    """The isolated child failed in a way that is lamina's bug, not the archive's."""


class _Run:
    """One request to the fork server: pipes, the pump, the result."""

    def __init__(self, spec: dict[str, Any], layer: str | None) -> None:
        self.spec = spec
        self.layer = layer
        self.report = progress.current()
        self.final: dict[str, Any] | None = None
        self._pending = b""
        self._poller = select.poll()

    def run(self, tar: BinaryIO | None) -> dict[str, Any]:
        for attempt in (1, 2):
            started = self._start(fresh=attempt == 2)
            if started is not None:
                break
        else:
            raise errors.Unsupported("cannot start the isolated apply: the fork server "
                                     f"keeps dying (set {NOREEXEC}=1 to apply in-process)",
                                     layer=self.layer)
        req, data_w, res_r = started
        broken: tuple[int, BaseException] | None = None
        done = False
        try:
            os.set_blocking(data_w, False)
            os.set_blocking(res_r, False)
            self._poller.register(data_w, select.POLLOUT)
            self._poller.register(res_r, select.POLLIN)
            header = json.dumps(self.spec).encode()
            self._send(data_w, res_r, len(header).to_bytes(8, "big") + header)
            if tar is not None:
                broken = self._pump(tar, data_w, res_r)
            os.close(data_w)
            data_w = -1
            os.set_blocking(res_r, True)
            while chunk := os.read(res_r, 1 << 16):
                self._take(chunk)
            status = _status(req)
            done = True
        finally:
            if data_w >= 0:
                os.close(data_w)
            os.close(res_r)
            if not done:
                _abandon(req)
            req.close()
        if broken is not None:
            offset, cause = broken
            raise errors.UnsafeArchive(f"unreadable archive stream at offset {offset}: {cause}",
                                       layer=self.layer) from cause
        return self._result(status)

    def _start(self, fresh: bool) -> tuple[socket.socket, int, int] | None:
        """Pipes and a forked child; None when the fork server died under us."""
        data_r, data_w = os.pipe2(os.O_CLOEXEC)
        res_r, res_w = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe only costs speed
            fcntl.fcntl(data_w, _F_SETPIPE_SZ, PIPE_SIZE)
        req = None
        try:
            req = _fork_server(fresh).submit([data_r, res_w])
            said = req.recv(64)
        except OSError:
            said = b""
        finally:
            os.close(data_r)
            os.close(res_w)
        if said.startswith(b"pid "):
            assert req is not None
            return req, data_w, res_r
        if req is not None:
            req.close()
        os.close(data_w)
        os.close(res_r)
        if said.startswith(b"error "):
            raise errors.LaminaError(f"cannot fork the isolated apply: {said[6:].decode()}",
                                     layer=self.layer)
        return None

    def _pump(self, tar: BinaryIO, data_w: int, res_r: int) -> tuple[int, BaseException] | None:
        """Copy the tar into the data pipe; (offset, error) if the stream could not be read."""
        pumped = 0
        while self.final is None:
            try:
                chunk = tar.read(CHUNK)
            except DECODE_ERRORS as e:
                return pumped, e
            if not chunk:
                break
            if not self._send(data_w, res_r, chunk):
                break  # the child stopped reading: it has its answer
            pumped += len(chunk)
            if self.report is not None:
                self.report(len(chunk), 0)
        return None

    def _send(self, data_w: int, res_r: int, data: bytes) -> bool:
        """Write ``data`` to the child, reading its reports while the pipe is full."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(data_w, view):]
                continue
            except BlockingIOError:
                pass
            except BrokenPipeError:
                return False
            for fd, events in self._poller.poll():
                if fd == res_r and events & (select.POLLIN | select.POLLHUP):
                    self._drain(res_r)
                    if self.final is not None:
                        return False
                if fd == data_w and events & (select.POLLERR | select.POLLHUP):
                    return False
        return True

    def _drain(self, res_r: int) -> None:
        while True:
            try:
                chunk = os.read(res_r, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        self._pending += chunk
        while b"\n" in self._pending:
            line, _, self._pending = self._pending.partition(b"\n")
            record = json.loads(line)
            if "entries" in record and len(record) == 1:
                if self.report is not None:
                    self.report(0, int(record["entries"]))
            else:
                self.final = record
        if len(self._pending) > MAX_RESULT:
            raise IsolationError("the isolated apply sent an overlong result")

    def _result(self, status: int) -> dict[str, Any]:
        final = self.final
        if final is not None and "maxrss_kb" in final:
            _local.usage = {key: final[key] for key in ("maxrss_kb", "cpu_s")}
        if final is None:
            how = _describe(status)
            raise errors.LaminaError(f"the isolated apply died without an answer ({how})",
                                     layer=self.layer)
        if "error" in final:
            raise _rebuild(final)
        if "oserror" in final:
            number, text, name = final["oserror"]
            raise OSError(number, text, name) if name is not None else OSError(number, text)
        if "setup" in final:
            raise errors.Unsupported(f"cannot isolate the apply: {final['setup']} (set "
                                     f"{NOREEXEC}=1 to apply in-process)", layer=self.layer)
        if "bug" in final:
            raise IsolationError(f"{final['bug']}\n--- in the isolated child:\n"
                                 f"{final['traceback']}")
        return final


def _rebuild(final: dict[str, Any]) -> errors.LaminaError:
    """The child's LaminaError, as it was: same class, same message, layer and path."""
    cls = getattr(errors, str(final["error"]), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.LaminaError)):
        cls = errors.LaminaError
    err = cls.__new__(cls)
    Exception.__init__(err, str(final["message"]))
    err.layer = final.get("layer")
    err.path = final.get("path")
    return err


def _status(req: socket.socket) -> int:
    """The child's wait status, as the fork server reports it after reaping it."""
    said = req.recv(64)
    if said.startswith(b"status "):
        return int(said[7:])
    return -1  # the fork server died: the child went with it


def _abandon(req: socket.socket) -> None:
    """Kill the child (the caller gave up) and wait until it is gone."""
    with contextlib.suppress(OSError):
        req.send(b"kill")
        _status(req)


def _describe(status: int) -> str:
    if status < 0:
        return "the fork server died"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


class _ForkServer:
    """The caller's handle on its fork server process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, json.dumps(_import_path()),
                 str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, close_fds=True,
            )
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc.poll() is None

    def submit(self, fds: list[int]) -> socket.socket:
        """Ask for a child applying with ``fds`` (data, result); the request's socket."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self.lock:
                socket.send_fds(self.ctl, [b"apply"], [*fds, theirs.fileno()])
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        return mine

    def close(self) -> None:
        self.ctl.close()
        if self.pid == os.getpid():
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_BOOT = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
         "from lamina.archive.isolate import serve; serve(int(sys.argv[2]))")
_server: _ForkServer | None = None
_server_lock = threading.Lock()


def _fork_server(fresh: bool = False) -> _ForkServer:
    global _server
    with _server_lock:
        if _server is None or fresh or not _server.alive():
            if _server is not None and _server.pid == os.getpid():
                _server.close()
            _server = _ForkServer()
        return _server


def shutdown() -> None:
    """Stop this process's fork server, if it runs (at exit; tests use it too)."""
    global _server
    with _server_lock:
        if _server is not None and _server.pid == os.getpid():
            _server.close()
        _server = None


atexit.register(shutdown)


def _import_path() -> list[str]:
    # lamina's own directory first (a source checkout or an install), then the rest.
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rest = [p for p in sys.path if p and os.path.isabs(p) and os.path.exists(p)]
    return [here, *(p for p in rest if p != here)]


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
            self._write({"entries": self.entries})
            self.entries = 0

    def final(self, record: dict[str, Any]) -> None:
        if self.entries:
            self._write({"entries": self.entries})
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        view = memoryview(json.dumps(record).encode() + b"\n")
        with contextlib.suppress(BrokenPipeError):  # the caller is gone: nobody to tell
            while view:
                view = view[os.write(self.fd, view):]


def _child(data_fd: int, res_fd: int, server: int) -> int:
    """A forked child: read the spec, switch roots, apply, report.  Its exit code."""
    # No collection here: garbage of the server's could close an fd number reused below.
    gc.disable()
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:
        return 1  # the fork server died before the line above
    for low, high in _gaps(sorted((data_fd, res_fd))):
        os.closerange(low, high)
    out = _Reporter(res_fd)
    spec = _read_spec(data_fd)
    try:
        root, lowers = _enter_jail(spec["root"], spec["lowers"])
    except OSError as e:
        out.final({"setup": str(e)})
        return 0
    _seal()
    if spec["action"] == "probe":
        out.final(_probe_here(root, lowers, spec["paths"]))
        return 0
    out.final(_apply_here(spec, root, lowers, data_fd, out))
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


def _apply_here(spec: dict[str, Any], root: str, lowers: list[str], data_fd: int,
                out: _Reporter) -> dict[str, Any]:
    stream = os.fdopen(data_fd, "rb", buffering=0)
    try:
        applier = Applier(
            root, layer=spec["layer"],
            ids=IdMapper([tuple(r) for r in spec["uids"]], [tuple(r) for r in spec["gids"]]),
            overlay_whiteouts=spec["overlay_whiteouts"], max_entries=spec["max_entries"],
            max_size=spec["max_size"], lowers=lowers, max_path=spec["max_path"],
        )
        if spec["progress"]:
            with progress.reporting(out.progress):
                size = applier.apply(stream)
        else:
            size = applier.apply(stream)
        return {"size": size, **_usage()}
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


def _probe_here(root: str, lowers: list[str], paths: list[str]) -> dict[str, Any]:
    def writable(where: str) -> bool:
        try:
            os.mkdir(f"{where}/.lamina-probe")
        except OSError:
            return False
        os.rmdir(f"{where}/.lamina-probe")
        return True

    try:
        import lamina.cli  # noqa: F401  (not imported before the switch: must be refused)
        imports = "allowed"
    except ImportError:
        imports = "refused"
    return {"root": sorted(os.listdir("/")), "layer": root, "lowers": lowers,
            "root_writable": writable(""), "layer_writable": writable(root),
            "lowers_writable": [writable(p) for p in lowers],
            "visible": [p for p in paths if os.path.lexists(p)], "imports": imports}


# --- the switch -------------------------------------------------------------------------


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def _bind(fd: int, target: str, flags: int) -> None:
    """Bind the directory open as ``fd`` at ``target``, with ``flags`` (nosuid, rdonly…)."""
    _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND)
    # A remount in a user namespace must keep the locked atime flags of the source.
    have = os.fstatvfs(fd).f_flag
    atime = ((_MS_NOATIME if have & _ST_NOATIME else 0)
             | (_MS_NODIRATIME if have & _ST_NODIRATIME else 0)
             | (_MS_RELATIME if have & _ST_RELATIME else 0))
    _mount(None, target, None, _MS_BIND | _MS_REMOUNT | flags | atime)


def _unshare() -> None:
    if os.geteuid() == 0:
        _check(_libc.unshare(_CLONE_NEWNS), "unshare")
        return
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS), "unshare (user namespace)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _enter_jail(root: str, lowers: list[str]) -> tuple[str, list[str]]:
    """Make this process's root a fresh one holding only the layer (see the docstring)."""
    base = os.path.dirname(root)
    if base in ("", "/"):
        raise OSError(errno.EINVAL, f"no place to build a root beside {root}")
    _unshare()
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates to the host
    held = [os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            for p in [root, *lowers, "/proc/self/fd"]]
    try:
        # The new root hides the layer's own parent; the fds above still reach everything.
        _mount("lamina", base, "tmpfs", _LOCKDOWN, "size=64k,nr_inodes=4096,mode=0755")
        names = ["layer", *(f"lower/{i}" for i in range(len(lowers))), "proc/self/fd"]
        for name in names:
            os.makedirs(f"{base}/{name}")
        _bind(held[0], f"{base}/layer", _LOCKDOWN)
        for i, fd in enumerate(held[1:-1]):
            _bind(fd, f"{base}/lower/{i}", _LOCKDOWN | _MS_RDONLY)
        _bind(held[-1], f"{base}/proc/self/fd", _LOCKDOWN | _MS_RDONLY)
        _mount(None, base, None, _MS_REMOUNT | _MS_BIND | _LOCKDOWN | _MS_RDONLY)
    finally:
        for fd in held:
            os.close(fd)
    os.chdir(base)
    _switch_root()
    os.chdir("/")
    return "/layer", [f"/lower/{i}" for i in range(len(lowers))]


def _switch_root() -> None:
    """Make the current directory the root and drop the old one (pivot_root, else chroot)."""
    if _PIVOT_ROOT is not None:
        if _libc.syscall(ctypes.c_long(_PIVOT_ROOT), b".", b".") == 0:
            _check(_libc.umount2(b".", _MNT_DETACH), "umount the old root")
            return
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: the root is rootfs (an initramfs)
            _check(-1, "pivot_root")
    _mount(".", "/", None, _MS_MOVE)
    os.chroot(".")


class _NoImports:
    """An import hook that refuses every import (installed once the root is switched)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        raise ImportError(f"lamina: no import after the switch to the layer's root ({name})")


def _seal() -> None:
    """Refuse imports from here on: whatever they found would come from the new root."""
    sys.meta_path.insert(0, _NoImports())
    sys.path[:] = []
    sys.path_importer_cache.clear()
