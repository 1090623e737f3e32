"""The applier's writer threads: the system calls that finish each file, on both cores.

GNU tar's time is nearly all the kernel's, and the kernel creates and fills files in
parallel; Python threads release the GIL in ``os.write``, ``os.fchown``, ``os.utime``
and the rest.  So the :class:`~lamina.archive.apply.Applier` keeps everything that
names a path on its own thread, in tar order — cleaning and resolving the name, the
``open(O_CREAT | O_EXCL)`` that creates the file (and clears a name already taken),
every directory, link, device, whiteout and removal — and hands each regular file's
fd, with its data (a view of the record buffer, no copy), to :class:`Writers`.  A
writer does what is left on that fd alone: write, owners, mode, xattrs, times,
``fstat`` for the digest, close.

Why that keeps every dependency of the tar.  A name exists from its create on, in tar
order, so a later entry on the same path, below it or linking to it meets it exactly
as it would serially (a taken name, a parent that is not a directory, a hard link
target); nothing a writer does is seen by a name's lookup (it changes only the
inode's data and metadata, never a directory); a file removed or replaced by a later
entry while a writer still holds it is an unlinked inode, gone from the layer as it
would be serially.  Directory times are set after the writers have finished.

Errors stay deterministic: each task carries its entry's place in the tar, a failure
is kept with it, no task after the first failure is done (its fd is only closed), and
the applier raises the failure of the earliest entry, its own or a writer's (the
layer is then discarded as after any failed apply).  The window of open files and of
buffered data is bounded (:data:`MAX_BATCHES` of at most :data:`BATCH` files or
:data:`BATCH_BYTES`).  Threads are started by the applier, which in the isolated child
runs after the switch of root and the drop of capabilities: they inherit both.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from lamina.archive.entry import Entry

ENV = "LAMINA_APPLY_WRITERS"
"""The environment variable that sets the writer threads of an apply (0: serial)."""
DEFAULT_WRITERS = 2
BATCH = 32  # files a writer takes at once: one queue operation for many files
BATCH_BYTES = 1 << 18
MAX_BATCHES = 8  # batches handed out and not yet done: at most 256 open files

Name = tuple[int, str]
"""A name in the layer: (the inode of its directory, the name there)."""
Task = tuple[int, int, int, Name | None, memoryview, Entry, bool]
"""(place in the tar, the file's fd or -1, the directory's fd and the file's name when
the writer creates it, its data, its entry, whether to digest it)."""
Finish = Callable[[int, int, Name | None, memoryview, Entry, bool], None]
"""Completes one file (creates it first when asked; closes it): the applier's part a
writer runs."""


def writers_requested() -> int:
    """The writer threads ``LAMINA_APPLY_WRITERS`` asks for (default 2; 0 is serial)."""
    value = os.environ.get(ENV, "")
    try:
        return max(0, min(int(value), 16)) if value else DEFAULT_WRITERS
    except ValueError:
        return DEFAULT_WRITERS


class Writers:
    """``count`` threads that finish files in batches; see the module docstring."""

    def __init__(self, count: int, finish: Finish) -> None:
        self._finish = finish
        self._queue: queue.SimpleQueue[list[Task] | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(MAX_BATCHES)
        self._batch: list[Task] = []
        self._bytes = 0
        self._lock = threading.Lock()
        # The earliest failure so far (place, error); the applier stops once it is set.
        self.failure: tuple[int, BaseException] | None = None
        self.creating: set[Name] = set()  # names handed to a writer to create, not yet made
        self._stop_after = 1 << 62  # no task after this place is done
        self._threads = [threading.Thread(target=self._run, name=f"lamina-writer-{i}",
                                          daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, seq: int, fd: int, data: memoryview, entry: Entry, checksum: bool,
               *, pfd: int = -1, name: Name | None = None) -> None:
        """Hand over the file ``fd`` (a writer closes it), entry number ``seq`` of the tar;
        with ``fd`` -1, the writer creates it as ``name`` in the directory ``pfd`` first
        (:attr:`creating` holds the name until then)."""
        if name is not None:
            self.creating.add(name)
        self._batch.append((seq, fd, pfd, name, data, entry, checksum))
        self._bytes += len(data)
        if len(self._batch) >= BATCH or self._bytes >= BATCH_BYTES:
            self._flush()

    def drain(self) -> None:
        """Wait until every file handed over is done (the threads go on)."""
        self._flush()
        for _ in range(MAX_BATCHES):  # all the slots back: no batch is out
            self._slots.acquire()
        for _ in range(MAX_BATCHES):
            self._slots.release()

    def close(self, failed_at: int | None = None) -> tuple[int, BaseException] | None:
        """Finish every file handed over and stop the threads; the earliest failure.

        ``failed_at``: the place of an entry the applier itself failed on; no task
        after it is done, and a writer's failure is returned only if it came before.
        """
        if failed_at is not None:
            self._stop(failed_at)
        self._flush()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        if self.failure is not None and failed_at is not None and self.failure[0] > failed_at:
            return None
        return self.failure

    def _flush(self) -> None:
        if not self._batch:
            return
        self._slots.acquire()  # waits while MAX_BATCHES are out: bounds fds and memory
        self._queue.put(self._batch)
        self._batch = []
        self._bytes = 0

    def _stop(self, seq: int) -> None:
        with self._lock:
            self._stop_after = min(self._stop_after, seq)

    def _run(self) -> None:
        finish = self._finish
        while (batch := self._queue.get()) is not None:
            try:
                for seq, fd, pfd, name, data, entry, checksum in batch:
                    if seq > self._stop_after:
                        if fd >= 0:
                            os.close(fd)
                        if name is not None:
                            self.creating.discard(name)
                        continue
                    try:
                        finish(fd, pfd, name, data, entry, checksum)
                    except BaseException as e:  # kept for the applier to raise, in order
                        with self._lock:
                            if self.failure is None or seq < self.failure[0]:
                                self.failure = (seq, e)
                            self._stop_after = min(self._stop_after, seq)
            finally:
                self._slots.release()
