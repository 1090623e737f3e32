"""A server's stop: SIGTERM or SIGINT, whichever of the process's threads takes it.

The kernel gives a signal sent to a process to any one of its threads that does not
block it, as often as not one of a gRPC server's pollers.  The interpreter's C-level
handler runs in that thread and only marks the signal pending: the Python handler runs
in the main thread when that thread next wakes, and a main thread asleep on a lock
(``threading.Event.wait``) does not wake for it.  A server stopped that way missed about
one SIGTERM in a hundred and hung until it was killed.

So the handlers here do nothing, and the main thread waits on the interpreter's wakeup
fd, which the C-level handler writes to in whichever thread took the signal.  The
signals stay deliverable: a mask blocking them would be inherited by every child
process the server starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals() -> Iterator[Callable[[], int]]:
    """In the main thread: a wait that returns the number of the first SIGTERM or SIGINT
    that comes (at once if one came since the block was entered).  The handlers and the
    wakeup fd before it are put back on leaving."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C-level handler must never block
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in STOP_SIGNALS}
    old_fd = signal.set_wakeup_fd(write_fd)

    def wait() -> int:
        while True:
            # One byte per signal; an interrupted read is retried (PEP 475) once the
            # Python handler, which does nothing, has run.
            (number,) = os.read(read_fd, 1)
            if number in STOP_SIGNALS:
                return number

    try:
        yield wait
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, old in previous.items():
            signal.signal(sig, old)
        os.close(read_fd)
        os.close(write_fd)
