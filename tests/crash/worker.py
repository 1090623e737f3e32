"""One process of the concurrency test: threads doing random operations on one home.

Run as ``python -m tests.crash.worker HOME BACKEND WORKER SEED THREADS OPS TARS``.
The process opens one driver that its threads share (as ``lamina serve`` does),
and each thread runs ``OPS`` random operations: applies (new layers on shared and
on its own layers, into shared layers that others apply into and remove too),
removals, ``get``/``put`` (of the stable layers every process uses and of its own),
writes into a mounted writable layer, ``diff`` (against the own parent and against
another layer), ``changes``, and opening a second driver on the same home (which
runs recovery while the others work).

Errors that racing processes cause each other — ``NotFound`` (removed meanwhile),
``AlreadyExists``, ``Busy`` — are counted; anything else is a failure.  When every
thread is done the process prints one JSON line: operations, errors, failures and
the ``get`` calls it still holds (gets minus puts, per layer); then it waits for a
line on standard input, puts everything back, prints ``released`` and exits.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import lamina
from lamina import errors

STABLE = ("base", "s0", "s1", "s2")  # never removed: every process gets and puts them
SHARED = tuple(f"shared{i}" for i in range(3))  # applied into and removed by everyone
EXPECTED = (errors.NotFound, errors.AlreadyExists, errors.Busy)
MAX_HOLDS = 6


class RacedRead(Exception):
    """A read of a shared layer failed as another process removed or replaced it."""


@contextlib.contextmanager
def raced(id: str) -> Iterator[None]:
    """Reads of a shared layer: a vanishing file is a race with its removal, counted apart.

    Reads take no lock (contract §4 serializes mutations only), so a ``diff`` or
    ``changes`` that meets ``remove``/``apply_diff`` of the same layer in another
    process may find its files gone; lamina lets that ``FileNotFoundError`` out as it
    is.  Any other layer's read must never fail.
    """
    try:
        yield
    except FileNotFoundError as e:
        if id not in SHARED:
            raise
        raise RacedRead("FileNotFoundError (raced with a removal)") from e


class Worker(threading.Thread):
    """One thread's random operations (see the module docstring)."""

    def __init__(self, drv: lamina.Driver, home: str, backend: str, name: str, seed: int,
                 ops: int, tars: Path) -> None:
        super().__init__(name=name)
        self.drv, self.home, self.backend = drv, home, backend
        self.rng = random.Random(seed)
        self.ops = ops
        self.tars = tars
        self.own: dict[str, str] = {}  # own layer → its parent
        self.rw: set[str] = set()
        self.holds: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.done = 0
        self.serial = 0

    def run(self) -> None:
        verbs = [
            (self.apply_own, 14), (self.remove_own, 10), (self.get, 14), (self.put, 14),
            (self.apply_shared, 6), (self.remove_shared, 4), (self.diff, 8),
            (self.diff_other, 3), (self.changes, 8), (self.write_rw, 5), (self.reopen, 3),
        ]
        funcs, weights = zip(*verbs, strict=True)
        for _ in range(self.ops):
            verb = self.rng.choices(funcs, weights)[0]
            try:
                verb()
            except EXPECTED as e:
                self.errors[f"{verb.__name__}: {type(e).__name__}"] += 1
            except RacedRead as e:
                self.errors[f"{verb.__name__}: {e}"] += 1
            except Exception:
                self.failures.append(f"{self.name} {verb.__name__}:\n{traceback.format_exc()}")
            self.done += 1

    # -- verbs ------------------------------------------------------------------

    def _tar(self) -> str:
        return str(self.tars / f"t{self.rng.randrange(4)}.tar")

    def _any_layer(self) -> str:
        return self.rng.choice([*STABLE, *self.own])

    def apply_own(self) -> None:
        self.serial += 1
        id = f"{self.name}-{self.serial}"
        ro = [o for o in self.own if o not in self.rw]
        parent = self.rng.choice([*STABLE[1:], *ro])
        with open(self._tar(), "rb") as f:
            self.drv.apply_diff(id, parent, f)
        self.own[id] = parent

    def remove_own(self) -> None:
        leaves = [o for o in self.own if o not in self.own.values() and not self.holds[o]]
        if leaves:
            id = self.rng.choice(leaves)
            self.drv.remove(id)
            del self.own[id]
            self.rw.discard(id)

    def get(self) -> None:
        if sum(self.holds.values()) < MAX_HOLDS:
            id = self._any_layer()
            path = self.drv.get(id)
            self.holds[id] += 1
            if not Path(path, "etc").is_dir():
                self.failures.append(f"{self.name}: the view of {id} has no /etc")

    def put(self) -> None:
        held = [id for id, n in self.holds.items() if n]
        if held:
            id = self.rng.choice(held)
            self.drv.put(id)
            self.holds[id] -= 1

    def apply_shared(self) -> None:
        with open(self._tar(), "rb") as f:
            self.drv.apply_diff(self.rng.choice(SHARED), "base", f)

    def remove_shared(self) -> None:
        self.drv.remove(self.rng.choice(SHARED))

    def _read(self, id: str, parent: str | None = None) -> None:
        with self.drv.diff(id, parent) as stream:
            while stream.read(1 << 16):
                pass

    def diff(self) -> None:
        id = self.rng.choice([*STABLE, *self.own, *SHARED])
        with raced(id):
            self._read(id)

    def diff_other(self) -> None:
        self._read(self._any_layer(), self.rng.choice(STABLE))

    def changes(self) -> None:
        id = self.rng.choice([*STABLE, *self.own, *SHARED])
        with raced(id):
            self.drv.changes(id)

    def write_rw(self) -> None:
        # A container's life: a writable layer, mounted, written, looked at, put.
        self.serial += 1
        id = f"{self.name}-{self.serial}"
        self.drv.create_rw(id, self.rng.choice(STABLE[1:]))
        self.own[id] = "?"
        self.rw.add(id)
        root = self.drv.get(id)
        try:
            Path(root, f"written-by-{self.name}").write_bytes(self.rng.randbytes(2000))
            if not any(c.path == f"/written-by-{self.name}" for c in self.drv.changes(id)):
                self.failures.append(f"{self.name}: {id} does not show what was written")
        finally:
            self.drv.put(id)

    def reopen(self) -> None:
        # Another user of the home starts (the CLI beside serve): it recovers the store.
        lamina.open_driver(self.home, backend=self.backend).close()


def main(argv: list[str]) -> int:
    """Run the threads, report, wait, release (see the module docstring)."""
    home, backend, worker, seed, threads, ops, tars = argv[:7]
    drv = lamina.open_driver(home, backend=backend)
    pool = [Worker(drv, home, backend, f"w{worker}t{i}", int(seed) * 100 + i, int(ops),
                   Path(tars)) for i in range(int(threads))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    holds: collections.Counter[str] = collections.Counter()
    errs: collections.Counter[str] = collections.Counter()
    for t in pool:
        holds.update(t.holds)
        errs.update(t.errors)
    print(json.dumps({
        "ops": sum(t.done for t in pool),
        "errors": dict(errs),
        "failures": [f for t in pool for f in t.failures],
        "holds": {id: n for id, n in holds.items() if n},
    }), flush=True)
    sys.stdin.readline()
    for id, n in holds.items():
        for _ in range(n):
            drv.put(id)
    print("released", flush=True)
    drv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
