"""Progress reporting from the tar engine to whoever shows it (the CLI's bar).

The engine calls :func:`advance` as it moves through a layer; a caller that wants
to see it sets a reporter with :func:`reporting`.  With no reporter set it costs
one context-variable read per call.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Reporter = Callable[[int, int], None]
"""``reporter(nbytes, nentries)``: that many more bytes and tar entries are done."""

_current: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "lamina_progress", default=None
)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Send the engine's progress to ``reporter`` inside the ``with`` block."""
    token = _current.set(reporter)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Reporter | None:
    """The reporter in force, if any (the engine fetches it once per layer)."""
    return _current.get()
