"""Layer throughput against the reference tools, side by side in one run.

    sudo .venv/bin/python bench/bench_throughput.py [--runs 3] [--work /var/tmp]
        [--skip-docker] [--only plain,gz,zst,small,export,docker,rss]
        [--formats erofs,dir] [--no-serial]

Each line is a median over ``--runs`` runs (after one warm-up round; lamina's and the
reference's runs take turns), on the same disk, with the same options (numeric
owners, xattrs, modes), each run into a new directory after a ``sync``:

- apply_diff of rootfs.tar              vs  tar --numeric-owner --xattrs -xpf
- apply_diff of rootfs.tar.gz           vs  pigz -dc | tar -xpf -
- apply_diff of rootfs.tar.zst          vs  tar --zstd -xpf
- apply_diff of a 50k-small-files tar   vs  tar -xpf
- diff (export) of the base layer       vs  tar -cf - . | cat >/dev/null
- the 3 layers of app-docker-save.tar   vs  docker load (Docker's overlay2, own dockerd)
- peak RSS applying / exporting a 1 GB layer

lamina's apply is durable when it returns (one syncfs); GNU tar's is not, so each
apply line also shows GNU tar followed by ``sync -f`` of the same filesystem, and
lamina's serial applier (``LAMINA_APPLY_WRITERS=0``, no writer threads) in the same
rounds (``--no-serial`` leaves it out).  ``--formats erofs,dir`` applies with each of
overlay's read-only layer formats (``overlay.layers=erofs``: the tar kept with an EROFS
image over it; ``dir``: a directory) in the same rounds, one lamina column each;
without it, the driver's default.
Needs root and the corpus ($LAMINA_CORPUS, default /var/tmp/lamina-corpus).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lamina

CORPUS = Path(os.environ.get("LAMINA_CORPUS", "/var/tmp/lamina-corpus"))
TAR = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
WRITERS = "LAMINA_APPLY_WRITERS"  # lamina.archive.writers.ENV


def median_times(runs: int, setup: Callable[[], None],
                 bodies: list[Callable[[], None]]) -> list[float]:
    """Median seconds of each of ``bodies`` over ``runs`` rounds, after one warm-up round.

    The bodies take turns within a round (ours, theirs, ours, …) so that both see the
    machine in the same state; ``setup`` (untimed) runs before each.
    """
    times: list[list[float]] = [[] for _ in bodies]
    for i in range(runs + 1):
        for k, body in enumerate(bodies):
            setup()
            t0 = time.perf_counter()
            body()
            if i:
                times[k].append(time.perf_counter() - t0)
    RAW[:] = times
    return [statistics.median(t) for t in times]


RAW: list[list[float]] = []
"""Every timed run of the last :func:`median_times`, by body (printed beside medians)."""


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)


class Bench:
    """The runs of one invocation, in ``work``.

    Nothing is deleted between timed runs: each run writes into a new directory, and
    all of them go at the end.  This machine's ext4 has no journal, and there the
    inode allocator skips every inode freed in the last 60 to 360 seconds with a
    lookup each: right after a 7k-file tree is deleted, creating files costs several
    times more (perf: 60% of GNU tar's time in ``recently_deleted``), and by how much
    depends on where the allocator lands — noise larger than any difference measured.
    """

    def __init__(self, work: Path, runs: int, backend: str,
                 formats: list[str] | None = None, serial: bool = True) -> None:
        self.work = work
        self.runs = runs
        self.backend = backend
        self.formats: list[str | None] = list(formats) if formats else [None]
        self.serial = serial
        self.count = 0
        self.home = work / "home0"
        self.out = work / "gnu0"
        self.rows: list[tuple[str, float, float, str]] = []

    def fresh(self) -> None:
        """New directories for the next run; earlier runs' data written out (untimed)."""
        self.count += 1
        self.home = self.work / f"home{self.count}"
        self.out = self.work / f"gnu{self.count}"
        self.out.mkdir()
        sh(f"sync -f {self.work}")

    def apply(self, path: Path, id: str = "l", parent: str | None = None,
              writers: str | None = None, fmt: str | None = None) -> None:
        saved = os.environ.get(WRITERS)
        if writers is not None:
            os.environ[WRITERS] = writers
        try:
            self._apply(path, id, parent, fmt)
        finally:
            if writers is not None and saved is None:
                del os.environ[WRITERS]
            elif writers is not None and saved is not None:
                os.environ[WRITERS] = saved

    def _apply(self, path: Path, id: str = "l", parent: str | None = None,
               fmt: str | None = None) -> None:
        options = [f"overlay.layers={fmt}"] if fmt else []
        with lamina.open_driver(self.home, backend=self.backend, options=options) as drv, \
                open(path, "rb") as f:
            drv.apply_diff(id, parent, f)

    def row(self, name: str, ours: float, theirs: float, ref: str) -> None:
        self.rows.append((name, ours, theirs, ref))
        print(f"{name:<44} lamina {ours:7.3f} s  {ref} {theirs:7.3f} s  "
              f"ratio {ours / theirs:5.2f}", flush=True)

    def apply_vs(self, name: str, path: Path, gnu: str, size: int, entries: int) -> None:
        """``gnu``: the reference command, with ``{out}`` for the directory it extracts to.

        One lamina body per layer format, then GNU tar, GNU tar + ``sync -f`` and (unless
        ``--no-serial``) the serial applier, all taking turns in the same rounds."""
        def ours_in(fmt: str | None) -> Callable[[], None]:
            return lambda: self.apply(path, fmt=fmt)

        bodies = [ours_in(fmt) for fmt in self.formats]
        bodies += [lambda: sh(gnu.format(out=self.out)),
                   lambda: sh(gnu.format(out=self.out) + f" && sync -f {self.out}")]
        if self.serial:
            bodies.append(lambda: self.apply(path, writers="0", fmt=self.formats[0]))
        times = median_times(self.runs, self.fresh, bodies)
        print(f"{'':<44} runs (s): " + "; ".join(
            " ".join(f"{t:.3f}" for t in body) for body in RAW), flush=True)
        n = len(self.formats)
        ours, (theirs, synced) = times[:n], times[n:n + 2]
        for fmt, mine in zip(self.formats, ours, strict=True):
            label = f"{name} [{fmt}]" if fmt else name
            self.row(label, mine, theirs, "GNU")
            mine_runs = RAW[self.formats.index(fmt)]
            paired = statistics.median(
                a / b for a, b in zip(mine_runs, RAW[n], strict=True))  # RAW[n]: GNU tar's
            print(f"{'':<44} {size / mine / 1e6:7.0f} MB/s, {entries / mine:8.0f} files/s; "
                  f"vs GNU tar + sync -f: ratio {mine / synced:5.2f}; median of the rounds' "
                  f"own ratios to GNU tar {paired:5.2f}", flush=True)
        if n > 1:
            print(f"{'':<44} {self.formats[0]}/{self.formats[1]}: {ours[0] / ours[1]:5.2f}",
                  flush=True)
        if self.serial:
            serial = times[-1]
            print(f"{'':<44} serial lamina [{self.formats[0] or 'default'}] {serial:7.3f} s "
                  f"(ratio {serial / theirs:5.2f}, writers gain {serial / ours[0]:4.2f}x)",
                  flush=True)

    def export(self, rootfs: Path, size: int, entries: int) -> None:
        """diff of the base layer to /dev/null, against ``tar -c`` of the same tree."""
        self.fresh()
        self.apply(rootfs, "base")
        with lamina.open_driver(self.home) as drv:
            tree = drv.get("base")

            def export() -> None:
                with drv.diff("base") as tar, open(os.devnull, "wb") as null:
                    while chunk := tar.read(1 << 20):
                        null.write(chunk)

            ours, theirs = median_times(self.runs, lambda: None, [
                export,
                lambda: sh(f"cd {tree} && {' '.join(TAR)} -cf - . | cat >/dev/null"),
            ])
            drv.put("base")
        self.row("diff (export) of the base layer", ours, theirs, "GNU")
        print(f"{'':<44} {size / ours / 1e6:7.0f} MB/s, {entries / ours:8.0f} files/s",
              flush=True)

    def docker_chain(self) -> None:
        """The corpus image's 3 layers applied as a chain, against ``docker load``."""
        with tarfile.open(CORPUS / "app-docker-save.tar") as outer:
            manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
            layers = manifest[0]["Layers"]

        def chain() -> None:
            with lamina.open_driver(self.home, backend=self.backend) as drv, \
                    tarfile.open(CORPUS / "app-docker-save.tar") as outer:
                parent = None
                for i, name in enumerate(layers):
                    member = outer.extractfile(name)
                    assert member is not None
                    drv.apply_diff(f"img{i}", parent, member)  # type: ignore[arg-type]
                    parent = f"img{i}"

        load = DockerLoad(self.work)
        try:
            ours, theirs = median_times(self.runs, self.fresh, [chain, load])
        finally:
            load.stop()
        self.row("3 corpus layers as a chain", ours, theirs, "docker load")

    def rss(self, cache: Path) -> None:
        """Peak RSS applying and exporting a 1 GB layer."""
        big = cache / "big-layer.tar"
        big_layer_tar(big)
        home = self.work / "rss-home"
        code = (f"import lamina\nd = lamina.open_driver({str(home)!r}, backend={self.backend!r})"
                f"\nd.apply_diff('big', None, open({str(big)!r}, 'rb'))")
        say_rss("applying a 1 GB layer", peak_rss(code))
        code = (f"import lamina\nd = lamina.open_driver({str(home)!r})\n"
                "with d.diff('big') as t:\n    while t.read(1 << 20): pass")
        say_rss("exporting a 1 GB layer", peak_rss(code))


def small_files_tar(path: Path, count: int = 50_000) -> None:
    """A layer of ``count`` small files in 500 directories (built once, cached)."""
    if path.exists():
        return
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(count // 100):
            info = tarfile.TarInfo(f"d{d:04}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
            for f in range(100):
                data = f"file {d}/{f}\n".encode() * 8
                info = tarfile.TarInfo(f"d{d:04}/f{f:03}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 1_700_000_000
                tf.addfile(info, io.BytesIO(data))


def big_layer_tar(path: Path, size: int = 1 << 30) -> None:
    """A 1 GB layer (ten 100 MB files and 2,000 small ones), built once."""
    if path.exists():
        return
    chunk = os.urandom(1 << 20)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(10):
            info = tarfile.TarInfo(f"big/{i}")
            info.size = size // 10
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                with os.fdopen(w, "wb") as out:
                    for _ in range(info.size // len(chunk)):
                        out.write(chunk)
                    out.write(chunk[: info.size % len(chunk)])
                os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as src:
                tf.addfile(info, src)
            os.waitpid(pid, 0)
        for i in range(2000):
            info = tarfile.TarInfo(f"small/{i}")
            info.size = 100
            tf.addfile(info, io.BytesIO(b"x" * 100))


_RSS_REPORT = """
import json, resource
from lamina.archive import isolate
def hwm(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    except OSError:
        return 0
server = isolate._server.proc.pid if isolate._server is not None else None
out = {"caller": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
       "fork server": hwm(server) if server else 0,
       "child": int((isolate.last_child_usage() or {}).get("maxrss_kb", 0))}
print(json.dumps(out))
"""


def peak_rss(code: str) -> dict[str, int]:
    """Peak RSS in MB of each process of a fresh Python running ``code``: the caller,
    its fork server and the isolated child that applied (0 where there was none)."""
    done = subprocess.run([sys.executable, "-c", code + _RSS_REPORT],
                          check=True, capture_output=True, text=True)
    return {k: v // 1024 for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def say_rss(what: str, peaks: dict[str, int]) -> None:
    parts = ", ".join(f"{k} {v} MB" for k, v in peaks.items() if v)
    print(f"peak RSS {what}: {sum(peaks.values())} MB in all ({parts})", flush=True)


class DockerLoad:
    """``docker load`` of the corpus image, each call into a new dockerd (overlay2) whose
    data-root is new too, so that no deletion comes before it (see :class:`Bench`); the
    daemon's start and stop are not timed."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.count = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}

    def __call__(self) -> None:
        self.start()
        subprocess.run(["docker", "load", "-q", "-i", str(CORPUS / "app-docker-save.tar")],
                       env=self.env, check=True, capture_output=True)
        self.stop()

    def start(self) -> None:
        self.count += 1
        root = self.work / f"docker{self.count}"
        sock = root / "docker.sock"
        root.mkdir()
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
             "--pidfile", str(root / "docker.pid"), "--host", f"unix://{sock}",
             "--storage-driver", "overlay2", "--iptables=false", "--bridge=none"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
        for _ in range(120):
            if subprocess.run(["docker", "info"], env=self.env,
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        sh(f"sync -f {self.work}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.proc = None
        subprocess.run(f"grep -o '{self.work}[^ ]*' /proc/mounts | sort -r | "
                       "xargs -r -n1 umount -l", shell=True, check=False)


ROWS = ("plain", "gz", "zst", "small", "export", "docker", "rss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="/var/tmp")
    parser.add_argument("--backend", default="overlay")
    parser.add_argument("--skip-docker", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="leave the work directory (its layers unmounted) for a later "
                        "run to find the disk undisturbed by its deletion (see Bench)")
    parser.add_argument("--formats", default="",
                        help="overlay.layers formats to apply with, side by side, e.g. "
                        "erofs,dir (default: the driver's default only)")
    parser.add_argument("--no-serial", action="store_true",
                        help="leave out the serial applier's column")
    parser.add_argument("--only", default=",".join(ROWS),
                        help=f"comma-separated rows to run, of: {','.join(ROWS)}")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if args.skip_docker:
        only.discard("docker")
    cache = Path(args.work) / "lamina-bench-data"
    cache.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lamina-bench-", dir=args.work))
    formats = [f for f in args.formats.split(",") if f]
    b = Bench(work, args.runs, args.backend, formats, serial=not args.no_serial)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, kernel "
          f"{platform.release()}, python {platform.python_version()}, backend {args.backend}, "
          f"formats {','.join(formats) or 'default'}, "
          f"{'isolated child' if os.environ.get('LAMINA_NOREEXEC') != '1' else 'inline'}")
    try:
        rootfs = CORPUS / "rootfs.tar"
        with tarfile.open(rootfs) as tf:
            entries = sum(1 for _ in tf)
        size = rootfs.stat().st_size
        if "plain" in only:
            b.apply_vs("apply rootfs.tar (plain)", rootfs,
                       f"{' '.join(TAR)} -xpf {rootfs} -C {{out}}", size, entries)
        if "gz" in only:
            b.apply_vs("apply rootfs.tar.gz", CORPUS / "rootfs.tar.gz",
                       f"pigz -dc {CORPUS}/rootfs.tar.gz | {' '.join(TAR)} -xpf - -C {{out}}",
                       size, entries)
        if "zst" in only:
            b.apply_vs("apply rootfs.tar.zst", CORPUS / "rootfs.tar.zst",
                       f"{' '.join(TAR)} --zstd -xpf {CORPUS}/rootfs.tar.zst -C {{out}}", size,
                       entries)
        if "small" in only:
            small = cache / "small-files.tar"
            small_files_tar(small)
            b.apply_vs("apply 50k small files (plain)", small,
                       f"{' '.join(TAR)} -xpf {small} -C {{out}}", small.stat().st_size, 50_500)
        if "export" in only:
            b.export(rootfs, size, entries)
        if "docker" in only:
            b.docker_chain()
        if "rss" in only:
            b.rss(cache)
    finally:
        for home in work.iterdir():
            if home.is_dir() and (home / "lamina.json").exists():
                with lamina.open_driver(home) as drv:
                    drv.cleanup()
        # cleanup leaves EROFS layers mounted at their diff/ (they are the layers'
        # content, mounted again at every open): detach them before the tree goes.
        subprocess.run(f"awk '{{print $2}}' /proc/mounts | grep '^{work}/' | sort -ru | "
                       "xargs -r -n1 umount -l",
                       shell=True, check=False)
        if args.keep:
            print(f"work directory left in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
