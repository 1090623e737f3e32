"""overlay's EROFS layers (issue 24): reading a root filesystem, and an apply's memory.

    sudo .venv/bin/python bench/bench_erofs.py [--runs 3] [--work /var/tmp]
        [--only read,rss] [--cold] [--entries 1000000] [--rss-formats erofs]

- **read**: the corpus's ``rootfs.tar`` applied once into a home with
  ``overlay.layers=erofs`` (the tar kept, an EROFS image over it mounted at the
  layer's ``diff/``) and once into one with ``overlay.layers=dir``; a writable layer
  on each, mounted with ``get``; then ``tar -cf - . | wc -c`` of each mounted root
  taking turns (GNU tar reads no file data when it writes to /dev/null itself, hence
  the pipe), medians of ``--runs`` after a warm-up round, page cache warm.  With
  ``--cold`` the same again with the page cache dropped before each read (global:
  ``drop_caches``).  Both reads must give as many bytes, and, untimed, a
  ``tar --sort=name`` of what each root holds must give the same bytes.
- **rss**: a layer of ``--entries`` members (empty files, 1,000 to a directory),
  generated as a stream into a pipe by another process (never stored), applied with
  ``apply_diff`` by a fresh Python; the peak resident memory of every process of the
  apply: the caller's own ``ru_maxrss`` and, sampled every 50 ms from /proc, each
  of its descendants' ``VmHWM`` (lamina's fork server and its isolated child), and
  the highest sum of ``VmRSS`` over them at one moment.  ``--runs`` runs per format.

Needs root and the corpus ($LAMINA_CORPUS, default /var/tmp/lamina-corpus).  Nothing
is deleted until the end (see bench_throughput's note on this disk's allocator).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lamina

CORPUS = Path(os.environ.get("LAMINA_CORPUS", "/var/tmp/lamina-corpus"))
PER_DIR = 1000


def sh(cmd: str, cwd: Path | None = None) -> str:
    """Run a shell command that must succeed; its standard output."""
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True,
                          cwd=cwd).stdout


def drop_caches() -> None:
    """Write out and drop the page cache, dentries and inodes (the whole machine's)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_root(root: Path, cold: bool) -> tuple[float, int]:
    """Seconds and bytes of ``tar -cf - . | wc -c`` in ``root``."""
    if cold:
        drop_caches()
    else:
        os.sync()
    t0 = time.perf_counter()
    out = sh("tar --numeric-owner --xattrs --xattrs-include='*' -cf - . | wc -c", cwd=root)
    return time.perf_counter() - t0, int(out)


def read_bench(work: Path, runs: int, cold: bool) -> None:
    """The read rows: a mounted root over an EROFS layer against one over a directory."""
    rootfs = CORPUS / "rootfs.tar"
    roots: dict[str, Path] = {}
    drivers = []
    for fmt in ("erofs", "dir"):
        drv = lamina.open_driver(work / f"read-{fmt}", backend="overlay",
                                 options=[f"overlay.layers={fmt}"])
        drivers.append(drv)
        with open(rootfs, "rb") as f:
            drv.apply_diff("base", None, f)
        drv.create_rw("ctr", "base")
        roots[fmt] = Path(drv.get("ctr"))
        got = drv.metadata("base")
        print(f"read: {fmt} home: base layer {'EROFS' if 'Image' in got else 'directory'}, "
              f"root mounted at {roots[fmt]}", flush=True)
    try:
        # The roots' own times differ (each writable layer is new): every name below them,
        # in name order, without the pax headers' pid, atime and ctime.
        same = {fmt: sh("LC_ALL=C tar --numeric-owner --xattrs --xattrs-include='*' "
                        "--sort=name --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,"
                        "delete=ctime -cf - $(LC_ALL=C ls -A) | sha256sum", cwd=root).split()[0]
                for fmt, root in roots.items()}
        print(f"read: tar --sort=name of the two roots: "
              f"{'identical' if len(set(same.values())) == 1 else 'DIFFERENT'} {same}",
              flush=True)
        for kind in ("warm", "cold") if cold else ("warm",):
            times: dict[str, list[float]] = {fmt: [] for fmt in roots}
            sizes: dict[str, set[int]] = {fmt: set() for fmt in roots}
            order = list(roots)
            for i in range(runs + 1):
                for fmt in order:
                    took, size = read_root(roots[fmt], kind == "cold")
                    sizes[fmt].add(size)
                    if i:
                        times[fmt].append(took)
                print(f"read {kind} {'warm-up' if not i else f'run {i}/{runs}'}: " + ", ".join(
                    f"{fmt} {times[fmt][-1] if i else 0:.3f} s" for fmt in roots), flush=True)
                order.reverse()
            med = {fmt: statistics.median(v) for fmt, v in times.items()}
            print(f"read {kind} (page cache {kind}), {runs} runs, medians: "
                  f"erofs {med['erofs']:.3f} s, dir {med['dir']:.3f} s, "
                  f"erofs/dir {med['erofs'] / med['dir']:.2f} (goal <= 1.2); bytes "
                  f"{sorted(sizes['erofs'])} vs {sorted(sizes['dir'])}", flush=True)
    finally:
        for drv in drivers:
            drv.put("ctr")
            drv.close()


def headers(entries: int) -> Iterator[bytes]:
    """A ustar stream of ``entries`` members: directories of ``PER_DIR`` empty files."""

    def header(name: bytes, mode: int, typeflag: bytes) -> bytes:
        h = bytearray(512)
        h[0:len(name)] = name
        h[100:108] = b"%07o\0" % mode
        h[108:116] = b"0000000\0"
        h[116:124] = b"0000000\0"
        h[124:136] = b"00000000000\0"
        h[136:148] = b"%011o\0" % 1_700_000_000
        h[148:156] = b" " * 8
        h[156:157] = typeflag
        h[257:265] = b"ustar\x0000"
        h[148:156] = b"%06o\0 " % sum(h)
        return bytes(h)

    made = 0
    d = 0
    while made < entries:
        dname = b"d%05d" % d
        yield header(dname + b"/", 0o755, b"5")
        made += 1
        for f in range(min(PER_DIR, entries - made)):
            yield header(dname + b"/f%04d" % f, 0o644, b"0")
            made += 1
        d += 1
    yield b"\0" * 1024


def generate(entries: int, fd: int) -> None:
    """Write the stream of :func:`headers` to ``fd`` in 1 MiB writes."""
    buf: list[bytes] = []
    size = 0
    with os.fdopen(fd, "wb") as out:
        for h in headers(entries):
            buf.append(h)
            size += len(h)
            if size >= 1 << 20:
                out.write(b"".join(buf))
                buf, size = [], 0
        out.write(b"".join(buf))


_APPLY = """
import json, resource, sys, time
import lamina
t0 = time.perf_counter()
with lamina.open_driver(sys.argv[1], backend="overlay", options=sys.argv[2:]) as d:
    d.apply_diff("big", None, sys.stdin.buffer)
    fmt = "EROFS" if "Image" in d.metadata("big") else "directory"
took = time.perf_counter() - t0
print(json.dumps({"caller": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "seconds": took, "format": fmt}))
"""


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for kid in kids.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def status_kb(pid: int) -> tuple[str, int, int]:
    """A process's name, ``VmHWM`` and ``VmRSS`` in kB (0 when gone)."""
    name, hwm, rss = "?", 0, 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Name:"):
                    name = line.split()[1]
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return name, hwm, rss


class Sampler(threading.Thread):
    """Every 50 ms, each process of the tree under ``pid``: its peak and the sum now."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[int, tuple[str, int]] = {}
        self.sum_peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total = 0
            for pid in [self.pid, *descendants(self.pid)]:
                name, hwm, rss = status_kb(pid)
                if hwm:
                    old = self.peaks.get(pid, (name, 0))[1]
                    self.peaks[pid] = (name, max(old, hwm))
                total += rss
            self.sum_peak = max(self.sum_peak, total)
            self.done.wait(0.05)


def rss_run(work: Path, fmt: str, entries: int, n: int) -> dict[str, object]:
    """One apply of the generated layer through a pipe; the peaks, in MB."""
    home = work / f"rss-{fmt}-{n}"
    r, w = os.pipe()
    gen = subprocess.Popen([sys.executable, "-c",
                            "import sys; sys.path.insert(0, sys.argv[1]); import bench_erofs; "
                            "bench_erofs.generate(int(sys.argv[2]), 1)",
                            str(Path(__file__).parent), str(entries)],
                           stdout=w)
    os.close(w)
    app = subprocess.Popen([sys.executable, "-c", _APPLY, str(home), f"overlay.layers={fmt}"],
                           stdin=r, stdout=subprocess.PIPE, text=True)
    os.close(r)
    sampler = Sampler(app.pid)
    sampler.start()
    out, _ = app.communicate()
    sampler.done.set()
    sampler.join()
    if gen.wait() != 0 or app.returncode != 0:
        raise RuntimeError(f"rss run {fmt}: generator {gen.returncode}, apply {app.returncode}")
    doc = json.loads(out.splitlines()[-1])
    procs = {pid: (name, kb) for pid, (name, kb) in sampler.peaks.items() if pid != app.pid}
    caller = max(doc["caller"], sampler.peaks.get(app.pid, ("", 0))[1])
    # ru_maxrss of the waited-for children: the largest one's peak, in case a short-lived
    # one came and went between two samples
    every = caller + max(sum(kb for _, kb in procs.values()), doc["children"])
    return {"format": doc["format"], "seconds": doc["seconds"], "caller_mb": caller // 1024,
            "others_mb": {f"{name}[{pid}]": kb // 1024 for pid, (name, kb) in procs.items()},
            "children_maxrss_mb": doc["children"] // 1024,
            "sum_of_peaks_mb": every // 1024, "peak_of_sums_mb": sampler.sum_peak // 1024}


def rss_bench(work: Path, runs: int, entries: int, formats: list[str]) -> None:
    """The rss rows: ``runs`` applies per format, taking turns."""
    for i in range(runs):
        for fmt in formats if i % 2 == 0 else formats[::-1]:
            os.sync()
            got = rss_run(work, fmt, entries, i)
            print(f"rss {fmt} run {i + 1}/{runs}: {json.dumps(got)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="/var/tmp")
    parser.add_argument("--only", default="read,rss")
    parser.add_argument("--cold", action="store_true",
                        help="also read with the page cache dropped before each read")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rss-formats", default="erofs",
                        help="formats of the rss applies (e.g. erofs,dir)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="lamina-bench-erofs-", dir=args.work))
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, kernel "
          f"{platform.release()}, python {platform.python_version()}", flush=True)
    try:
        if "read" in only:
            read_bench(work, args.runs, args.cold)
        if "rss" in only:
            rss_bench(work, args.runs, args.entries, args.rss_formats.split(","))
    finally:
        for home in work.iterdir():
            if (home / "lamina.json").exists():
                with lamina.open_driver(home) as drv:
                    drv.cleanup()
        subprocess.run(f"awk '{{print $2}}' /proc/mounts | grep '^{work}/' | sort -ru | "
                       "xargs -r -n1 umount -l",
                       shell=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
