"""A Docker engine on ``lamina serve`` beside the same engine on its built-in overlay2 (issue 4).

    sudo .venv/bin/python bench/bench_docker.py [--runs N] [--work DIR]

For each run and each storage driver (lamina's plugin, then overlay2), a fresh
``dockerd`` with its own data-root does the same workload, each step timed from the
outside (the ``docker`` command's wall time):

1. ``docker load`` of the corpus image (``app-docker-save.tar``: 3 layers, 355 MB);
2. ``docker run --rm IMAGE true``, 20 times;
3. ``docker commit`` of a container that changed 10 files (appended to 10 of the
   image's Python modules, so each one is copied up);
4. ``docker save`` of the committed image (4 layers), to /dev/null.

Prints the median of each step for each driver and their ratio (lamina/overlay2),
and the peak resident memory of ``lamina serve`` while it loaded the image: its
own, and that of the process tree it applies layers in (sampled every 50 ms).  Needs
root, Debian's docker.io and the corpus ($LAMINA_CORPUS, default /var/tmp/lamina-corpus).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' engine harness

from tests.integration.engine import (
    PLUGINS_DIR,
    Dockerd,
    Serve,
    TreeRss,
    docker_missing,
    plugin_name,
    teardown,
)

IMAGE = "corpus/app:1"
RUNS_OF_TRUE = 20
CHANGE_10_FILES = (
    "ls /usr/lib/python3.11/*.py | head -10 | while read f; do echo '# changed' >> \"$f\"; done"
)
STEPS = ("load", "run --rm true", "commit (10 files)", "save")


def timed(action: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def workload(dockerd: Dockerd, corpus: Path, times: dict[str, list[float]]) -> None:
    """One pass of the workload on a fresh engine; appends each step's seconds to ``times``."""
    tar = str(corpus / "app-docker-save.tar")
    times["load"].append(timed(lambda: dockerd.docker("load", "-i", tar)))
    for _ in range(RUNS_OF_TRUE):
        times["run --rm true"].append(timed(lambda: dockerd.docker("run", "--rm", IMAGE, "true")))
    dockerd.docker("run", "--name", "changed", IMAGE, "sh", "-c", CHANGE_10_FILES)
    times["commit (10 files)"].append(
        timed(lambda: dockerd.docker("commit", "changed", "bench/committed:1")))
    times["save"].append(timed(lambda: dockerd.docker(
        "save", "bench/committed:1", stdout=subprocess.DEVNULL)))


def run_lamina(work: Path, corpus: Path, times: dict[str, list[float]],
               rss: list[tuple[int, int]]) -> None:
    name = plugin_name("lamina-bench")
    serve = Serve(PLUGINS_DIR / f"{name}.sock", work / "serve.log")
    dockerd = Dockerd(work / "engine", name)
    try:
        serve.start()
        dockerd.start()
        tar = str(corpus / "app-docker-save.tar")
        with TreeRss(serve.pid) as tree:
            times["load"].append(timed(lambda: dockerd.docker("load", "-i", tar)))
        rss.append((serve.peak_rss(), tree.peak))
        dockerd.docker("rmi", IMAGE)
        workload(dockerd, corpus, times)
        del times["load"][-2]  # the first load warmed the page cache; keep the second
    finally:
        teardown(dockerd, [serve], work)


def run_overlay2(work: Path, corpus: Path, times: dict[str, list[float]]) -> None:
    dockerd = Dockerd(work / "engine", "overlay2")
    try:
        dockerd.start()
        tar = str(corpus / "app-docker-save.tar")
        times["load"].append(timed(lambda: dockerd.docker("load", "-i", tar)))
        dockerd.docker("rmi", IMAGE)
        workload(dockerd, corpus, times)
        del times["load"][-2]
    finally:
        teardown(dockerd, [], work)


def machine(work: Path) -> str:
    docker = subprocess.run(["dockerd", "--version"], capture_output=True, text=True).stdout
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True,
                        text=True).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, kernel "
            f"{platform.release()}, Python {platform.python_version()}, {docker.strip()}, "
            f"work dir on {fs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="passes per driver (default 3)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"),
                        help="where the engines' data-roots go (default /var/tmp)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_docker: needs root", file=sys.stderr)
        return 2
    reason = docker_missing()
    if reason:
        print(f"bench_docker: {reason}", file=sys.stderr)
        return 2
    corpus = Path(os.environ.get("LAMINA_CORPUS") or "/var/tmp/lamina-corpus")
    if not (corpus / "app-docker-save.tar").is_file():
        print(f"bench_docker: no corpus at {corpus}", file=sys.stderr)
        return 2
    PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    times: dict[str, dict[str, list[float]]] = {
        d: {s: [] for s in STEPS} for d in ("lamina", "overlay2")}
    rss: list[tuple[int, int]] = []
    print(f"machine: {machine(args.work)}")
    for i in range(args.runs):
        # Alternate the drivers, so that drift on a shared machine hits both alike.
        for driver in ("lamina", "overlay2"):
            work = Path(tempfile.mkdtemp(prefix=f"lamina-bench-{driver}-", dir=args.work))
            try:
                if driver == "lamina":
                    run_lamina(work, corpus, times[driver], rss)
                else:
                    run_overlay2(work, corpus, times[driver])
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"run {i + 1}/{args.runs} {driver}: "
                  + ", ".join(f"{s} {times[driver][s][-1]:.2f} s" for s in STEPS), flush=True)
    print()
    print(f"| step | lamina | overlay2 | lamina/overlay2 |   ({args.runs} runs; medians)")
    print("|---|---|---|---|")
    for step in STEPS:
        lam = statistics.median(times["lamina"][step])
        ovl = statistics.median(times["overlay2"][step])
        print(f"| {step} | {lam:.3f} s | {ovl:.3f} s | {lam / ovl:.2f}x |")
    mib = 1 << 20
    print(f"\nlamina serve's peak RSS while loading: {max(r for r, _ in rss) / mib:.0f} MiB; "
          f"with its fork server and apply children (sampled): "
          f"{max(t for _, t in rss) / mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
