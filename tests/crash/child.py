"""The process the crash harness kills: one operation on a store, then exit.

Run as ``python -m tests.crash.child HOME BACKEND OP TARS [--wait]``.  It opens the
store, prints ``ready``, (with ``--wait``) reads one line from standard input — the
parent's "go", after which it may kill at a random instant — runs ``OP`` and prints
one JSON line: how long the operation took and, when ``LAMINA_CRASH_SURVEY`` is
set, every crash point it reached with how many times.  ``LAMINA_CRASH_AT`` makes
:mod:`lamina.crashpoints` kill it on the way.

The store holds, before every operation (see :mod:`tests.crash.harness`): ``base``
(no parent), ``sib`` and ``victim`` on ``base``.  ``TARS`` is the directory of the
layer tars (``new.tar``, ``more.tar``, …).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import lamina
from lamina import crashpoints, errors, progress
from tests.conftest import open_variant

Op = Callable[[lamina.Driver, Path], None]
FAILED = 3
"""The exit status when the operation failed with a lamina error (a helper was killed)."""


def _apply(drv: lamina.Driver, tars: Path) -> None:
    with open(tars / "new.tar", "rb") as f:
        drv.apply_diff("new", "base", f)


def _apply_into(drv: lamina.Driver, tars: Path) -> None:
    # An apply into a layer that exists already: built beside it, swapped in.
    with open(tars / "more.tar", "rb") as f:
        drv.apply_diff("victim", "base", f)


def _create(drv: lamina.Driver, tars: Path) -> None:
    drv.create("new", "base")


def _create_rw(drv: lamina.Driver, tars: Path) -> None:
    drv.create_rw("new", "victim")


def _remove(drv: lamina.Driver, tars: Path) -> None:
    drv.remove("victim")


def _remove_mounted(drv: lamina.Driver, tars: Path) -> None:
    drv.get("victim")
    drv.remove("victim")


def _get_put(drv: lamina.Driver, tars: Path) -> None:
    drv.get("victim")
    drv.get("victim")
    drv.get("sib")
    drv.put("victim")
    drv.put("sib")
    drv.put("victim")


def _drain(stream: BinaryIO) -> None:
    with stream:
        while stream.read(4096):
            pass


def _diff(drv: lamina.Driver, tars: Path) -> None:
    _drain(drv.diff("victim"))


def _diff_other(drv: lamina.Driver, tars: Path) -> None:
    # Against a layer that is not its parent: overlay mounts both views for it.
    _drain(drv.diff("victim", "sib"))


OPS: dict[str, Op] = {
    "apply": _apply,
    "apply-into": _apply_into,
    # The same with the tar engine in this process (LAMINA_NOREEXEC=1, see
    # lamina.archive.isolate): apply:entry then kills the process using lamina.
    "apply-inproc": _apply,
    "apply-into-inproc": _apply_into,
    "create": _create,
    "create_rw": _create_rw,
    "remove": _remove,
    "remove-mounted": _remove_mounted,
    "get-put": _get_put,
    "diff": _diff,
    "diff-other": _diff_other,
}


def main(argv: list[str]) -> int:
    """Open the store, run one operation (see the module docstring)."""
    home, backend, op, tars = argv[:4]
    reached: collections.Counter[str] = collections.Counter()
    survey = bool(os.environ.get("LAMINA_CRASH_SURVEY"))
    if survey:
        original = crashpoints.reached

        def counting(name: str) -> None:
            reached[name] += 1
            original(name)

        crashpoints.reached = counting  # every caller goes through the module attribute
    drv = open_variant(home, backend)
    opened = dict(reached)
    print("ready", flush=True)
    if "--wait" in argv[4:]:
        sys.stdin.readline()
    reached.clear()
    entries = 0

    def count_entries(nbytes: int, nentries: int) -> None:
        nonlocal entries
        entries += nentries

    start = time.monotonic()
    try:
        # The progress reporter counts tar entries wherever they are applied (an
        # isolated helper reaches apply:entry in its own process).
        with progress.reporting(count_entries):
            OPS[op](drv, Path(tars))
    except errors.LaminaError as e:
        print(f"lamina error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return FAILED
    took = time.monotonic() - start
    print(json.dumps({"took": took, "reached": dict(reached), "opening": opened,
                      "entries": entries}), flush=True)
    drv.close()  # no cleanup(): as a process that goes away would
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
