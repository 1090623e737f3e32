"""The C library, loaded once, and the one check of what its calls return.

Python 3.11 has no ``syncfs``, ``renameat2``, ``mount``, ``unshare``, ``prctl`` or
``capset``: lamina calls them through ctypes.  :func:`load` loads the library the first
time it is asked (keeping each call's errno for :func:`check`) and declares, in this one
place, the prototypes that ctypes cannot guess (pointers and ``unsigned long`` flags);
every module of :mod:`lamina.host` shares that one object, so no two can disagree.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.cache
def load() -> ctypes.CDLL:
    """The C library, with ``use_errno`` (loaded on the first call, the same after)."""
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.syscall.restype = ctypes.c_long
    lib.syncfs.argtypes = [ctypes.c_int]
    lib.renameat2.argtypes = [
        ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint,
    ]
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                          ctypes.c_char_p]
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.unshare.argtypes = [ctypes.c_int]
    lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                          ctypes.c_ulong]
    return lib


def check(ret: int, what: str, path: str | os.PathLike[str] | None = None) -> int:
    """``ret`` when the call succeeded (not negative); else raise the call's errno as an
    ``OSError`` saying ``what`` failed (and on ``path``, when given)."""
    if ret >= 0:
        return ret
    err = ctypes.get_errno()
    if path is None:
        raise OSError(err, f"{what}: {os.strerror(err)}")
    raise OSError(err, f"{what}: {os.strerror(err)}", os.fspath(path))
