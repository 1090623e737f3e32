"""``python -m lamina`` for the snapshotter's kills, as the server process they start.

Run as ``python -m tests.crash.snapshotter_child LAMINA-ARGS…`` (what
``tests/crash/test_snapshotter_kills.py`` sets as ``$LAMINA_SNAPSHOTTER_CMD``, the
command :class:`tests.containerd.daemon.Snapshotter` runs).  With
``$LAMINA_CRASH_LOG`` set, :func:`lamina.crashpoints.reached` itself appends each
point's name to that file (one a line, before the point may kill): the survey of what a
call reaches.  ``$LAMINA_CRASH_AT`` kills as it always does.
"""

from __future__ import annotations

if __name__ == "__main__":
    from lamina.frontends.cli import main

    raise SystemExit(main())
