"""``python -m lamina`` that also logs every crash point it reaches, for the snapshotter's kills.

Run as ``python -m tests.crash.snapshotter_child LAMINA-ARGS…`` (what
``tests/crash/test_snapshotter_kills.py`` sets as ``$LAMINA_SNAPSHOTTER_CMD``, the
command :class:`tests.containerd.daemon.Snapshotter` runs).  With
``$LAMINA_CRASH_LOG`` set, each :func:`lamina.crashpoints.reached` appends the point's
name to that file (one a line, before the point may kill): the survey of what a call
reaches.  ``$LAMINA_CRASH_AT`` kills as it always does.
"""

from __future__ import annotations

import os

from lamina import crashpoints

_LOG = os.environ.get("LAMINA_CRASH_LOG")

if _LOG:
    _original = crashpoints.reached

    def _logging(name: str) -> None:
        with open(_LOG, "a") as f:
            f.write(name + "\n")
        _original(name)

    crashpoints.reached = _logging  # every caller goes through the module attribute

if __name__ == "__main__":
    from lamina.frontends.cli import main

    raise SystemExit(main())
