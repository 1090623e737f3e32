"""Run inside the VM only: ``lamina status`` of a store on each scratch filesystem, in one
Python (each one costs seconds over 9p under TCG), each line prefixed for the runner.

    python -m tests.vm.guest_status FS=HOME...
"""

from __future__ import annotations

import contextlib
import io
import sys

from lamina.frontends.cli import main


def status(fs: str, home: str) -> None:
    out = io.StringIO()
    with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(out),
          contextlib.suppress(SystemExit)):
        main(["--home", home, "status"])
    for line in out.getvalue().splitlines():
        print(f"@@vm status {fs} {line}", flush=True)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        name, _, path = arg.partition("=")
        status(name, path)
