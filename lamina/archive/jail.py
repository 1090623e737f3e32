"""The isolated side of ``apply_diff``: the fork server, its children, and the switch
of a child's root to one that holds only the layer (:mod:`lamina.archive.isolate` says
why and how; this module is what runs in the helper process).

The fork server (:func:`serve`) imports everything a child will run before it forks
any: after the switch a child imports nothing (an import hook refuses it), loads no
library and runs no program.  Its loop is single-threaded: one forked child per
request, reaped through a pidfd, killed when its caller gives up or goes away.

A child (:func:`_child`) reads the spec from the head of the data pipe, enters its
jail (:func:`enter_jail`), seals imports and does the spec's action with the rest of
the pipe — ``apply``: the records (:class:`~lamina.archive.records.RecordReader`) with
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
import ctypes
import ctypes.util
import errno
import gc
import json
import os
import platform
import resource
import select
import signal
import socket
import sys
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
from lamina.host.idmap import IdMapper

PROGRESS_EVERY = 0.1  # seconds between the child's entry counts
DIGESTS_PER_LINE = 4096  # files per digests line: each well below isolate.MAX_RESULT

_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC = 32, 4096, 8192, 16384
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MS_PRIVATE = 1 << 18
_LOCKDOWN = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
_ST_NOATIME, _ST_NODIRATIME, _ST_RELATIME = 1024, 2048, 4096
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 24, 38
_CAP_VERSION_3 = 0x20080522
KEPT_CAPABILITIES = frozenset({
    0, 1, 2, 3, 4,  # chown, dac_override, dac_read_search, fowner, fsetid
    21,  # sys_admin: trusted.* xattrs (overlay's opaque marker)
    24,  # sys_resource: the root-reserved blocks and quotas, as for an inline apply
    27, 31,  # mknod, setfcap (security.capability)
    32, 33,  # mac_override, mac_admin: security.* xattrs under an LSM
})
"""What a child keeps of root's capabilities once its root is switched: what writing a
layer needs, as root writes it inline.  Gone: kill, ptrace, setuid, module loading, raw
I/O, the network, time, BPF… ; and no exec could give any back (no_new_privs)."""
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41,
               "ppc64le": 203, "ppc64": 203, "s390x": 217, "i686": 217, "i386": 217,
               "armv7l": 218, "armv6l": 218}.get(platform.machine())

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


# Codecs are modules loaded on first use: the Windows importer's record is ASCII.
codecs.lookup("ascii")

try:
    with open("/proc/sys/kernel/cap_last_cap") as _f:
        _LAST_CAP = int(_f.read())
except (OSError, ValueError):  # pragma: no cover - no such file before Linux 3.2
    _LAST_CAP = 40


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
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
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
        root, lowers = enter_jail(spec["root"], spec["lowers"])
        drop_capabilities()
    except OSError as e:
        out.final({"setup": str(e)})
        return 0
    seal()
    if spec["action"] == "probe":
        out.final(_probe_here(root, lowers, spec["paths"]))
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
            ids=IdMapper([tuple(r) for r in spec["uids"]], [tuple(r) for r in spec["gids"]]),
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


def _probe_here(root: str, lowers: list[str], paths: list[str]) -> dict[str, Any]:
    def writable(where: str) -> bool:
        try:
            os.mkdir(f"{where}/.lamina-probe")
        except OSError:
            return False
        os.rmdir(f"{where}/.lamina-probe")
        return True

    try:
        import lamina.frontends.cli  # noqa: F401  (not imported before the switch: must be refused)
        imports = "allowed"
    except ImportError:
        imports = "refused"
    return {"root": sorted(os.listdir("/")), "layer": root, "lowers": lowers,
            "root_writable": writable(""), "layer_writable": writable(root),
            "lowers_writable": [writable(p) for p in lowers],
            "visible": [p for p in paths if os.path.lexists(p)], "imports": imports,
            "capabilities": capabilities()}


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


def enter_jail(root: str, lowers: list[str]) -> tuple[str, list[str]]:
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


def drop_capabilities() -> None:
    """Keep only :data:`KEPT_CAPABILITIES` (of those this process has), for good: the
    bounding set too, and no_new_privs."""
    keep = sum(1 << cap for cap in KEPT_CAPABILITIES) & capabilities(permitted=True)
    for cap in range(_LAST_CAP + 1):
        if not keep >> cap & 1:
            _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "drop a capability")
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = keep & 0xFFFFFFFF
    data[1].effective = data[1].permitted = keep >> 32
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def capabilities(*, permitted: bool = False) -> int:
    """This process's effective (or permitted) capabilities, as a bit mask."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    field = "permitted" if permitted else "effective"
    return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32


class _NoImports:
    """An import hook that refuses every import (installed once the root is switched)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        raise ImportError(f"lamina: no import after the switch to the layer's root ({name})")


def seal() -> None:
    """Refuse imports from here on: whatever they found would come from the new root."""
    sys.meta_path.insert(0, _NoImports())
    sys.path[:] = []
    sys.path_importer_cache.clear()
