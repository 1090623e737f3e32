"""Benchmarks of the overlay backend (issue: deep chains and native diff).

    .venv/bin/python bench/bench_overlay.py [--runs N] [--work DIR]

1. ``get`` of the top of a 500-layer chain (every layer adds one file): the time
   of one mount of 500 lowers, and of reading every layer's file through it.
2. ``changes`` of a writable layer with 10 changed files on top of the corpus
   image (the 3 layers of app-docker-save.tar), on overlay and on vfs side by side.

Prints medians over ``--runs`` runs and the vfs/overlay ratio.  Needs root and the
corpus ($LAMINA_CORPUS, default /var/tmp/lamina-corpus).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import lamina


def _one_file_tar(i: int) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        data = f"layer {i}\n".encode()
        info = tarfile.TarInfo(f"layers/f{i}")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def bench_deep_chain(work: Path, runs: int, depth: int = 500) -> dict[str, float]:
    home = work / "deep"
    with lamina.open_driver(home, backend="overlay") as drv:
        parent = None
        for i in range(depth):
            drv.apply_diff(f"l{i}", parent, _one_file_tar(i))
            parent = f"l{i}"
        assert parent is not None
        mounts, reads = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            top = drv.get(parent)
            t1 = time.perf_counter()
            for i in range(depth):
                (top / f"layers/f{i}").read_bytes()
            t2 = time.perf_counter()
            drv.put(parent)
            mounts.append(t1 - t0)
            reads.append(t2 - t1)
    return {
        "get_ms": 1000 * statistics.median(mounts),
        "read_all_ms": 1000 * statistics.median(reads),
    }


def _load_corpus(drv: lamina.Driver, corpus: Path) -> str:
    with tarfile.open(corpus / "app-docker-save.tar") as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        parent = None
        for i, name in enumerate(manifest[0]["Layers"]):
            member = outer.extractfile(name)
            assert member is not None
            drv.apply_diff(f"img{i}", parent, member)
            parent = f"img{i}"
    assert parent is not None
    return parent


def bench_changes(work: Path, corpus: Path, backend: str, runs: int) -> float:
    with lamina.open_driver(work / backend, backend=backend) as drv:
        top = _load_corpus(drv, corpus)
        drv.create_rw("ctr", top)
        root = drv.get("ctr")
        for name in sorted(os.listdir(root / "etc"))[:10]:
            path = root / "etc" / name
            if path.is_file() and not path.is_symlink():
                with open(path, "ab") as f:
                    f.write(b"# changed\n")
            else:
                (root / "etc" / f"new-{name}").write_text("new\n")
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            found = drv.changes("ctr")
            times.append(time.perf_counter() - t0)
        assert len(found) >= 10, found
        drv.put("ctr")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", default="/var/tmp")
    args = parser.parse_args()
    corpus = Path(os.environ.get("LAMINA_CORPUS", "/var/tmp/lamina-corpus"))
    work = Path(tempfile.mkdtemp(prefix="lamina-bench-", dir=args.work))
    try:
        print(
            f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
            f"kernel {platform.release()}, python {platform.python_version()}"
        )
        deep = bench_deep_chain(work, args.runs)
        print(
            f"500-layer chain: get (mount of 500 lowers) {deep['get_ms']:.1f} ms, "
            f"read of all 500 files through the top {deep['read_all_ms']:.1f} ms"
        )
        overlay = bench_changes(work, corpus, "overlay", args.runs)
        vfs = bench_changes(work, corpus, "vfs", args.runs)
        print("changes of a writable layer with 10 changed files on the corpus image:")
        print(
            f"  overlay (native) {1000 * overlay:.1f} ms, vfs (naive) {1000 * vfs:.1f} ms, "
            f"vfs/overlay = {vfs / overlay:.0f}x"
        )
    finally:
        for home in work.iterdir():
            with lamina.open_driver(home) as drv:
                drv.cleanup()
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
