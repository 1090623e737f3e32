"""Starting a user-namespaced container on lamina against containerd's overlayfs, and
against the chowned copy containerd makes without ``remap-ids`` (issue 26).

    sudo .venv/bin/python bench/bench_userns.py [--runs N] [--work DIR] [--layers dir|erofs]

One ``lamina snapshotter`` on the host (backend overlay, EROFS layers unless ``--layers
dir``), one containerd 2.1 of the engines' lab (pivoted, as
:class:`tests.engines.daemons.LabContainerd`) configured from lamina's printed config
(``capabilities = ["remap-ids"]``) plus a second proxy plugin ``lamina-nocap``, another
``lamina snapshotter`` (a home of its own) declared without the capability (what a
snapshotter that cannot map ids gets: containerd's fallback).  The corpus image
(``app-docker-save.tar``: 3 layers, 355 MB) imported once into each of ``lamina``,
``overlayfs`` and ``lamina-nocap``.

Each round, timed from the outside (the lab's ``ctr``, entered pivoted, as a user
namespace needs; the same entry cost on each side): ``ctr run --rm --remap-labels
--uidmap 0:H:65536 --gidmap 0:H:65536 --snapshotter S IMAGE cN true``,

- ``lamina`` and ``overlayfs`` (both declare ``remap-ids``: the map as labels, idmapped
  lowers, nothing copied), the order alternating by round;
- ``lamina-nocap``: containerd prepares ``<digest>-remap`` over the image, chowns every
  file through its mount (a copy-up of each into the upper) and commits it, then runs
  on that; each round with a host id of its own (a map seen before reuses its copy),
  the copy removed afterwards, untimed.

One untimed round first; medians of the rounds.  Goal: lamina <= 1.1x overlayfs, and
far below the chowned copy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' harnesses

from bench.bench_docker import machine
from lamina.frontends.containerd.config import host_platform
from tests import lab
from tests.containerd.daemon import Snapshotter
from tests.engines.daemons import LabContainerd, remove_work, shared_dir

IMAGE = "docker.io/corpus/app:1"
NOCAP = "lamina-nocap"


class BenchContainerd(LabContainerd):
    """lamina's printed config, plus ``lamina-nocap``: another lamina snapshotter (a
    home of its own), declared without the capability."""

    def __init__(self, work: Path, snapshotter: Snapshotter, nocap: Snapshotter,
                 binds: list[Path]) -> None:
        super().__init__(work, snapshotter, binds=[nocap.socket.parent, *binds])
        self.nocap = nocap

    def config_text(self) -> str:
        text = super().config_text()
        assert 'capabilities = ["remap-ids"]' in text, text
        return text + "\n".join([
            "", f"[proxy_plugins.{NOCAP}]", '  type = "snapshot"',
            f'  address = "{self.nocap.socket}"',
            '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
            f'  platform = "{host_platform()}"', f'  snapshotter = "{NOCAP}"',
            '  differ = "walking"', ""])

    def ctr_pivoted(self, *args: str) -> str:
        """The lab's ctr, entered with pivot_root (a chrooted process gets no user
        namespace: ``clone(2)``, EPERM)."""
        argv = lab.command(["ctr", "--address", str(self.address), *args],
                           binds=self.binds, pivot=True)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: exit {proc.returncode}\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc.stdout


def start_run(ctd: BenchContainerd, snapshotter: str, host_id: int, name: str) -> float:
    """Seconds for ``ctr run --rm`` of ``true`` with the map ``0:host_id:65536``."""
    m = f"0:{host_id}:65536"
    t0 = time.perf_counter()
    ctd.ctr_pivoted("run", "--rm", "--snapshotter", snapshotter, "--remap-labels",
                    "--uidmap", m, "--gidmap", m, IMAGE, name, "true")
    return time.perf_counter() - t0


def snapshots(ctd: BenchContainerd, snapshotter: str) -> list[str]:
    rows = ctd.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.splitlines()[1:]
    return [row.split()[0] for row in rows if row.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--layers", choices=("erofs", "dir"), default="erofs",
                        help="lamina's layer format (default erofs)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not lab.present():
        print("bench_userns: needs root and the engines' lab (make lab)", file=sys.stderr)
        return 2
    corpus = Path(os.environ.get("LAMINA_CORPUS") or "/var/tmp/lamina-corpus")
    tar = corpus / "app-docker-save.tar"
    if not tar.is_file():
        print(f"bench_userns: no corpus at {corpus}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-userns-", dir=args.work))
    work.chmod(0o711)  # runc, as the mapped root, goes through it to the rootfs
    shared_dir(work)
    sn = Snapshotter(work / "home", work / "snapshotter.log", backend="overlay",
                     socket_path=work / "lamina.sock",
                     options=("overlay.layers=dir",) if args.layers == "dir" else (),
                     args=["--containerd-address", str(work / "containerd.sock")])
    # A server of its own: two proxy plugins on one socket are one store to containerd's
    # garbage collector twice over: the collection of "lamina" removed "lamina-nocap"'s
    # snapshots (its -remap copy half-chowned: lchown ENOENT/EPERM in ctr).
    nocap = Snapshotter(work / "home-nocap", work / "nocap.log", backend="overlay",
                        socket_path=work / "nocap.sock",
                        options=("overlay.layers=dir",) if args.layers == "dir" else ())
    ctd = BenchContainerd(work, sn, nocap, binds=[tar.parent])
    try:
        sn.start()
        nocap.start()
        ctd.start()
        print(f"machine: {machine(work)}")
        print(f"lab: {ctd.version()}; runc {lab.versions().get('runc', '')}; "
              f"lamina layers: {args.layers}")
        for s in ("lamina", "overlayfs", NOCAP):
            ctd.ctr("-n", "default", "image", "import", "--snapshotter", s, str(tar),
                    binds=[tar.parent])
        image_snaps = set(snapshots(ctd, NOCAP))
        times: dict[str, list[float]] = {"lamina": [], "overlayfs": [], NOCAP: []}
        for r in range(args.runs + 1):
            order = ["lamina", "overlayfs"] if r % 2 == 0 else ["overlayfs", "lamina"]
            got = {s: start_run(ctd, s, 100000, f"c{r}-{s}") for s in order}
            got[NOCAP] = start_run(ctd, NOCAP, 200000 + r * 65536, f"c{r}-nocap")
            copies = [k for k in snapshots(ctd, NOCAP) if k not in image_snaps]
            for key in copies:  # the chowned copy, unless containerd collected it first
                ctd.ctr("snapshots", "--snapshotter", NOCAP, "rm", key, check=False)  # or GC
            label = "warm-up" if r == 0 else f"round {r}"
            print(f"{label}: " + ", ".join(f"{s} {t:.3f} s" for s, t in got.items())
                  + f"; containerd's chowned copies left to remove: {len(copies)}")
            if r:
                for s, t in got.items():
                    times[s].append(t)
        med = {s: statistics.median(ts) for s, ts in times.items()}
        print(f"\nmedians of {args.runs} rounds (ctr run --rm --remap-labels --uidmap/--gidmap "
              f"0:H:65536 IMAGE true):")
        print(f"  lamina (remap-ids)         {med['lamina']:.3f} s")
        print(f"  overlayfs (remap-ids)      {med['overlayfs']:.3f} s")
        print(f"  lamina without remap-ids   {med[NOCAP]:.3f} s (containerd's chowned copy)")
        print(f"lamina/overlayfs {med['lamina'] / med['overlayfs']:.2f}x (goal <= 1.1x); "
              f"chowned copy/lamina {med[NOCAP] / med['lamina']:.1f}x")
        return 0
    finally:
        ctd.close()
        sn.close()
        nocap.close()
        remove_work(work)


if __name__ == "__main__":
    raise SystemExit(main())
