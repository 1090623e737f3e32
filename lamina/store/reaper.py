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

import collections
import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from lamina.host import fsutil

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
        fd = _open_dir(layer_dir)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        return cls(fd, doomed)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_dir(path: Path) -> int | None:
    """A descriptor of directory ``path`` to lock, None if there is none to open."""
    try:
        return os.open(path, fsutil.DIR_FLAGS)
    except OSError:
        return None


def being_deleted(path: Path) -> bool:
    """Whether a live remover holds the retired tree ``path`` (False: it is a leftover,
    or gone)."""
    fd = _open_dir(path)
    if fd is None:
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
    fd = _open_dir(path)
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


MAX_PENDING = 256
"""Trees given to the reaper at most, the one being deleted among them (each holds a
file descriptor); beyond, the remover deletes its own."""


class Reaper:
    """One daemon thread deleting retired trees with ``delete``, in the order given;
    started with the first."""

    def __init__(self, delete: Callable[[Path], None]) -> None:
        self._delete = delete
        self._changed = threading.Condition()
        self._trees: collections.deque[Retired] = collections.deque()
        """Given and not yet deleted, the first being deleted."""
        self._thread: threading.Thread | None = None

    def put(self, retired: Retired) -> bool:
        """Queue ``retired`` (held); False when :data:`MAX_PENDING` are given already."""
        with self._changed:
            if len(self._trees) >= MAX_PENDING:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lamina-reaper",
                                                daemon=True)
                self._thread.start()
            self._trees.append(retired)
            self._changed.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._trees)
                retired = self._trees[0]
            try:
                self._delete(retired.path)
            except Exception as e:  # a leftover, swept at the next open
                log.warning("lamina: cannot delete %s: %s", retired.path, e)
            finally:
                retired.release()
                with self._changed:
                    self._trees.popleft()
                    self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every tree given to be deleted; whether
        they are (what is left is swept when the store is opened next)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._trees, timeout)
