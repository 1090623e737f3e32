"""Layer writes in an isolated child process (contract §2, "Safety").

:func:`apply_layer` is how the backends write a layer tar.  The caller's
process decompresses the stream and parses the tar (pure computation: no name
reaches the filesystem there); a child process, which alone writes the layer,
gets the members through a pipe as pre-parsed records (:mod:`lamina.archive.records`)
and sends back one JSON line: the size, or the error, which is raised here again
as the same :class:`~lamina.errors.LaminaError` (same class, same message; a bad
tar's error comes from the caller's parse once the child has applied every member
before it).  So the parse and the apply run on two cores.  The tar engine's applier
(:mod:`lamina.archive.apply`) resolves every name from a directory fd of the layer
and never leaves it; the child is the second wall,
as Docker's chrooted extraction is: if the engine had a bug, the name would
still find nothing of the host.  This module is the caller's side;
:mod:`lamina.archive.forkserver` is the fork server's and the child's, and
:mod:`lamina.host.jail` the switch of the child's root.

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

Process model, and why.  Measured on the development machine (2 cores, shared
and loaded; Python 3.11): a fresh interpreter that imports the tar engine
costs ~180 ms of CPU (~330 ms wall); ``fork`` of the caller costs little, but
forking a threaded process (the plugin server serves requests on threads)
copies locks that other threads hold, a known way to deadlock the child.  So
lamina runs a fork server, as :mod:`multiprocessing` does: the first isolated
apply of a process re-executes the interpreter once (``python -I -S``, given
only the caller's ``sys.path``), that helper imports the engine, stays
single-threaded, and forks one child per apply.  Per apply that costs ~10 ms
of CPU (caller ~1, fork server ~2, child ~8: its namespace, mounts, pivot,
copy-on-write faults and exit) and 15 to 30 ms wall on that machine
(``tests/security/test_isolation.py`` prints it).  A request is one
``SCM_RIGHTS`` message carrying the data pipe, the result pipe and a socket of
its own, on which the server says the child's pid and, once reaped, its exit
status; the caller closing that socket (or dying) kills the child, and the
server exits when the caller's end of its control socket closes.

The data path is one pipe grown to 1 MiB, written in blocking writes (small
members batched, large files' data straight from the reader's buffer); the child
closes it once it has its answer (the caller's next write fails and it stops),
then writes the answer.  Between writes the caller reads the child's entry
counts (for the progress bar), which the child never blocks on.  The pipe costs
two copies of the data.

Windows layers.  The windowsfilter backend's import (:func:`import_windows_layer`) runs
in the same kind of child (the spec's action ``wclayer``): the staged layer directory is
``/layer``, the parent layers' directories are the read-only ``/lower/N`` (for
tombstones and the hard links it copies up).  Its importer keeps every member's header
blocks as read, for a ``diff`` byte for byte, so there the child parses the tar: the
caller sends the decompressed stream as it is, framed (:mod:`lamina.archive.frames`),
and a damaged compressed stream's error is raised in the child where the stream failed,
which makes it the inline import's error, offset and all.

``LAMINA_NOREEXEC=1`` applies in the calling process instead, as the seed
driver's variable did: for debugging, or where namespaces are not available.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from lamina import errors, progress
from lamina.archive import frames, records, wclayer
from lamina.archive.apply import Applier
from lamina.archive.digests import MAX_DIGESTS, Digests
from lamina.archive.reader import TarReader
from lamina.archive.writers import writers_requested
from lamina.host.idmap import IdMapper

NOREEXEC = "LAMINA_NOREEXEC"
"""The environment variable that makes :func:`apply_layer` apply in-process."""

PATH_MAX = 4096
PIPE_SIZE = 1 << 20
MAX_RESULT = 16 << 20  # a result line longer than this is a broken child

_F_SETPIPE_SZ = 1031
_local = threading.local()


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
    digests: Digests | None = None,
) -> int:
    """Apply the uncompressed tar ``stream`` into the directory ``root``; its file data size.

    The arguments are :class:`~lamina.archive.apply.Applier`'s; ``digests`` receives the
    CRC-32s of the files written (for :func:`lamina.store.manifest.record`).  The apply runs in
    an isolated child (see the module docstring) unless ``LAMINA_NOREEXEC=1``.
    """
    ids = ids or IdMapper()
    _local.usage = None
    # Paths in the layer must fit PATH_MAX on the host, below the layer's directory.
    max_path = PATH_MAX - 2 - len(os.fsencode(os.path.abspath(root)))
    if inline_requested():
        return Applier(root, layer=layer, ids=ids, overlay_whiteouts=overlay_whiteouts,
                       max_entries=max_entries, max_size=max_size, lowers=lowers,
                       max_path=max_path, digests=digests).apply(stream)
    spec = {
        "action": "apply",
        "root": os.path.abspath(root),
        "lowers": [os.path.abspath(p) for p in lowers],
        "layer": layer,
        "uids": list(ids.uids),
        "gids": list(ids.gids),
        "squash": ids.squash,
        "overlay_whiteouts": overlay_whiteouts,
        "max_entries": max_entries,
        "max_size": max_size,
        "max_path": max_path,
        "progress": progress.current() is not None,
        "writers": writers_requested(),
    }
    result = _Run(spec, layer, digests).run(stream)
    return int(result["size"])


def import_windows_layer(
    root: str | os.PathLike[str],
    stream: BinaryIO,
    *,
    parents: Sequence[str | os.PathLike[str]] = (),
    layer: str | None = None,
) -> int:
    """Import the uncompressed Windows layer tar ``stream`` into the layer directory
    ``root`` (:class:`~lamina.archive.wclayer.WindowsImporter`; ``parents``: the parent
    layers' directories, nearest first); its file data size.

    In an isolated child as :func:`apply_layer`'s, with ``root`` as ``/layer`` and the
    parents read-only as ``/lower/N``, unless ``LAMINA_NOREEXEC=1``.  The child reads the
    raw tar (:mod:`lamina.archive.frames`): the importer records its header blocks as read.
    """
    _local.usage = None
    if inline_requested():
        return wclayer.WindowsImporter(Path(root), [Path(p) for p in parents],
                                       layer=layer).apply(stream)
    spec = {
        "action": "wclayer",
        "root": os.path.abspath(root),
        "lowers": [os.path.abspath(p) for p in parents],
        "layer": layer,
        "progress": progress.current() is not None,
    }
    result = _Run(spec, layer).run(stream)
    return int(result["size"])


def last_child_usage() -> dict[str, float] | None:
    """The peak RSS (``maxrss_kb``) and CPU time (``cpu_s``) of this thread's last isolated
    apply's child, for tests and benchmarks (None before one, or after an inline apply)."""
    return getattr(_local, "usage", None)


def probe(root: str | os.PathLike[str], lowers: Sequence[str] = (),
          paths: Sequence[str] = (), module: str | None = None) -> dict[str, Any]:
    """What an isolated child for ``root`` sees (for the tests of this module).

    Its root's listing, whether it can write below ``/`` and into each lower,
    which of ``paths`` exist for it, and whether an import of ``module`` (one the
    fork server has not imported) still works (``"allowed"``, ``"refused"``; None:
    not tried).
    """
    spec = {"action": "probe", "root": os.path.abspath(root),
            "lowers": [os.path.abspath(p) for p in lowers], "paths": list(paths),
            "module": module, "layer": None, "progress": False}
    return _Run(spec, None).run(None)


# --- the caller's side ------------------------------------------------------------------


class IsolationError(RuntimeError):
    """The isolated child failed in a way that is lamina's bug, not the archive's."""


class _Run:
    """One request to the fork server: pipes, the pump, the result."""

    def __init__(self, spec: dict[str, Any], layer: str | None,
                 digests: Digests | None = None) -> None:
        self.spec = spec
        self.layer = layer
        self.digests = digests
        self.report = progress.current()
        self.final: dict[str, Any] | None = None
        self._pending = b""

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
        broken: Exception | None = None
        done = False
        try:
            # The data pipe blocks: the child reads it until it has its answer, and then
            # closes it (EPIPE here) before it writes that answer, which may be long.
            os.set_blocking(res_r, False)
            header = json.dumps(self.spec).encode()
            self._send(data_w, len(header).to_bytes(8, "big") + header)
            if tar is not None and self.spec["action"] == "wclayer":
                broken = self._pump_raw(tar, data_w, res_r)
            elif tar is not None:
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
        if broken is not None and (self.final is None or "aborted" in self.final):
            raise broken  # the tar is bad there, and the child applied all before it
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
            raise errors.Unsupported(f"cannot fork the isolated apply: {said[6:].decode()}",
                                     layer=self.layer)
        return None

    def _pump(self, tar: BinaryIO, data_w: int, res_r: int) -> errors.LaminaError | None:
        """Read the tar here and send the child its members as records (see
        :mod:`lamina.archive.records`); the tar's error, if it is bad."""
        reader = TarReader(tar, layer=self.layer)
        seen = 0

        def between() -> None:
            nonlocal seen
            if self.report is not None:
                self.report(reader.consumed - seen, 0)
                seen = reader.consumed
                self._drain(res_r)  # the child's entry counts

        try:
            records.send(reader, data_w, between)
            reader.finish()  # the rest of the stream, after the tar's end marker
        except BrokenPipeError:
            return None  # the child stopped reading: it has its answer
        except errors.LaminaError as e:
            return e
        between()
        return None

    def _pump_raw(self, tar: BinaryIO, data_w: int, res_r: int) -> Exception | None:
        """Send the child the tar as it is, in frames (see :mod:`lamina.archive.frames`);
        what reading it raised, if the child is to stop there."""

        def between(nbytes: int) -> None:
            if self.report is not None:
                self.report(nbytes, 0)
                self._drain(res_r)  # the child's entry counts

        try:
            return frames.send(tar, data_w, between)
        except BrokenPipeError:
            return None  # the child stopped reading: it has its answer

    @staticmethod
    def _send(data_w: int, data: bytes) -> bool:
        """Write ``data`` to the child; False once it has stopped reading."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(data_w, view):]
        except BrokenPipeError:
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
            elif "digests" in record and len(record) == 1:
                self._take_digests(record["digests"])
            else:
                self.final = record
        if len(self._pending) > MAX_RESULT:
            raise IsolationError("the isolated apply sent an overlong result")

    def _take_digests(self, flat: Any) -> None:
        """Keep a batch of the child's digests: inode, size, mtime_ns, crc, … in one list."""
        if not (isinstance(flat, list) and len(flat) % 4 == 0
                and all(type(v) is int for v in flat)):
            raise IsolationError("the isolated apply sent malformed digests")
        if self.digests is None:
            return
        it = iter(flat)
        for ino, size, mtime, crc in zip(it, it, it, it, strict=True):
            if len(self.digests) >= MAX_DIGESTS:
                return
            self.digests[ino] = (size, mtime, crc)

    def _result(self, status: int) -> dict[str, Any]:
        final = self.final
        if final is not None and "maxrss_kb" in final:
            _local.usage = {key: final[key] for key in ("maxrss_kb", "cpu_s")}
        if final is None:
            how = _describe(status)
            raise errors.Unsupported(f"the isolated apply died without an answer ({how})",
                                     layer=self.layer)
        if "error" in final:
            raise _rebuild(final)
        if "oserror" in final:
            number, text, name = final["oserror"]
            name = self._host_path(name)
            raise OSError(number, text, name) if name is not None else OSError(number, text)
        if "setup" in final:
            raise errors.Unsupported(f"cannot isolate the apply: {final['setup']} (set "
                                     f"{NOREEXEC}=1 to apply in-process)", layer=self.layer)
        if "bug" in final:
            raise IsolationError(f"{final['bug']}\n--- in the isolated child:\n"
                                 f"{final['traceback']}")
        return final

    def _host_path(self, name: str | None) -> str | None:
        """A path of the child's as the caller knows it (``/layer/…`` below the root)."""
        if name is None:
            return None
        places = [("/layer", self.spec["root"]),
                  *((f"/lower/{i}", low) for i, low in enumerate(self.spec["lowers"]))]
        for inside, outside in places:
            if name == inside or name.startswith(inside + "/"):
                return str(outside) + name[len(inside):]
        return name


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
         "from lamina.archive.forkserver import serve; serve(int(sys.argv[2]))")
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
