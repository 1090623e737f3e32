"""Deleting retired layers: at once, or behind the caller's back.

A removal's commit point is its rename to ``ID-removing`` (:meth:`Store.retire`); the
tree is deleted after.  The API's ``remove`` deletes it before it returns.
containerd's snapshot ``Remove`` does not wait for it: containerd's garbage collector
removes a batch of snapshots in one pass, and a removal asked for while that pass runs
is picked up only by a later one (its scheduler drops a deletion event older than the
end of the last collection), so a pass that spends seconds deleting a container's
tree leaves other snapshots behind for as long.  Their trees go to :class:`Reaper`, one
thread deleting them in order.

A retired tree is locked (``flock`` on the directory, taken before its rename and held
until it is gone): another process's ``check`` or sweep sees it being deleted and
leaves it alone, and only a tree nobody deletes (its remover died) is a leftover.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("lamina")


class Retired:
    """A layer directory taken out of the store, held (locked) until it is deleted."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def hold(cls, layer_dir: Path, doomed: Path) -> Retired:
        """Lock ``layer_dir`` (about to be renamed to ``doomed``): the lock follows the
        directory, not its name.  Without a lock (a missing directory, whose rename
        fails; no file descriptor left) it holds nothing, and is deleted at once."""
        try:
            fd = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return cls(None, doomed)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return cls(fd, doomed)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def being_deleted(path: Path) -> bool:
    """Whether a live remover holds the retired tree ``path`` (False: it is a leftover,
    or gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # a lock taken goes with it
    return False


@contextlib.contextmanager
def waiting_for(path: Path) -> Iterator[None]:
    """Within: no live remover deletes ``path`` (one that did has finished)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


MAX_PENDING = 256
"""Trees waiting for the reaper at most (each holds a file descriptor); beyond, the
remover deletes its own."""


class Reaper:
    """One daemon thread deleting retired trees with ``delete``, in the order given;
    started with the first."""

    def __init__(self, delete: Callable[[Path], None]) -> None:
        self._delete = delete
        self._queue: queue.Queue[Retired] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, retired: Retired) -> bool:
        """Queue ``retired`` (held); False when :data:`MAX_PENDING` wait already."""
        with self._lock:
            if self._queue.qsize() >= MAX_PENDING:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lamina-reaper",
                                                daemon=True)
                self._thread.start()
            self._queue.put(retired)
        return True

    def _run(self) -> None:
        while True:
            retired = self._queue.get()
            try:
                self._delete(retired.path)
            except Exception as e:  # a leftover, swept at the next open
                log.warning("lamina: cannot delete %s: %s", retired.path, e)
            finally:
                retired.release()
                self._queue.task_done()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every tree given to be deleted; whether
        they are (what is left is swept when the store is opened next)."""
        done = threading.Event()

        def join() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=join, name="lamina-reaper-wait", daemon=True).start()
        return done.wait(timeout)
