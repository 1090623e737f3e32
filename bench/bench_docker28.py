"""Docker 28 (containerd image store) pulling and running on lamina, containerd's overlayfs
and containerd's erofs snapshotters (issues 24 and 25).

    sudo .venv/bin/python bench/bench_docker28.py [--runs N] [--work DIR]

One ``lamina snapshotter`` on the host (backend overlay, EROFS layers, its differ
serving ``--containerd-address``), one containerd 2.1 of the engines' lab (pivoted, as
:class:`tests.engines.daemons.LabContainerd`) whose config is lamina's printed one
plus containerd's own ``erofs`` snapshotter and ``erofs`` differ (mkfs.erofs is the
lab's) with the diff service's order ``lamina-diff, erofs, walking`` (each differ answers
NotImplemented for mounts not its own), and the metadata store's
``content_sharing_policy = "isolated"``.  Three dockerd 28 of the lab's on that one
containerd, kept running, one a snapshotter (daemon.json's ``storage-driver``: ``lamina``,
``overlayfs``, ``erofs``; ``features.containerd-snapshotter``), each in a containerd
namespace of its own (``--containerd-namespace``).  The corpus image is pushed once by
skopeo (gzip) into a local ``docker-registry`` on 127.0.0.1.

Each round, the three daemons taking turns (the first one changes each round), timed
from the outside with the host's docker CLI (28.2): ``docker pull -q
127.0.0.1:PORT/corpus/app:1`` then ``docker run --rm --network none IMAGE true`` (5
times, their median); then, untimed, ``docker rmi`` and ``docker builder prune -af``, and
the bench waits until the daemon's namespace has no image, no content and no snapshot
left (``ctr content ls``, ``ctr snapshots ls``), and checks that none of the image's
blobs is in containerd's content store on disk: every pull fetches every blob from the
registry and unpacks it again (the registry's access log is checked: each pull GETs
the 3 layer blobs).
One untimed round first (warm-up); medians and ratios of the rounds' own ratios.
Goals: pull on lamina <= 0.70x overlayfs and <= 1.0x erofs; run <= 1.0x overlayfs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' harnesses

from bench.bench_docker import machine
from tests import lab
from tests.conftest import unmount_layer_images
from tests.containerd.daemon import Snapshotter
from tests.engines.daemons import LabContainerd, shared_dir
from tests.engines.docker import LabDockerd
from tests.integration.engine import unmount_below
from tests.registry.harness import DistRegistry

SNAPSHOTTERS = ("lamina", "overlayfs", "erofs")
EXTRA_CONFIG = """
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"

[plugins."io.containerd.snapshotter.v1.erofs"]
  root_path = {erofs_root}

[plugins."io.containerd.differ.v1.erofs"]
  mkfs_options = []
"""


class BenchContainerd(LabContainerd):
    """lamina's printed config, plus containerd's erofs snapshotter and differ."""

    def config_text(self) -> str:
        text = super().config_text()
        text = text.replace('default = ["lamina-diff", "walking"]',
                            'default = ["lamina-diff", "erofs", "walking"]')
        assert '"lamina-diff", "erofs", "walking"' in text, text
        return text + EXTRA_CONFIG.format(
            erofs_root=json.dumps(str(self.root / "erofs")))


class NamedDockerd(LabDockerd):
    """A LabDockerd of its own name: its files, socket and containerd namespace."""

    def __init__(self, containerd: LabContainerd, snapshotter: str) -> None:
        super().__init__(containerd, snapshotter)
        self.namespace = f"moby-{snapshotter}"
        self.root = containerd.work / f"docker-{snapshotter}"
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.config = self.root / "daemon.json"
        self.cli_config = self.root / "cli"
        self.sock = containerd.work / f"docker-{snapshotter}.sock"
        self.log = containerd.work / f"dockerd-{snapshotter}.log"

    def argv(self) -> list[str]:
        return [*super().argv(), "--containerd-namespace", self.namespace,
                "--containerd-plugins-namespace", f"plugins.{self.namespace}"]

    def host_docker(self, *args: str) -> str:
        """The host's docker CLI on this daemon (no lab call's overhead in the time)."""
        proc = subprocess.run(["docker", "--host", f"unix://{self.sock}", *args],
                              capture_output=True, text=True,
                              env={**os.environ, "DOCKER_CONFIG": str(self.cli_config),
                                   "DOCKER_CLI_HINTS": "false"})
        if proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} ({self.snapshotter}) failed:\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}\n--- dockerd ---\n"
                               + self.log.read_text(errors="replace")[-3000:])
        return proc.stdout


def sh(*argv: str | Path) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {proc.returncode}\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return proc.stdout


def timed(action: object) -> float:
    os.sync()
    t0 = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - t0


def blobs_on_disk(ctd: LabContainerd) -> set[str]:
    d = ctd.root / "root" / "io.containerd.content.v1.content" / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in d.iterdir()} if d.is_dir() else set()


def clean(ctd: LabContainerd, d: NamedDockerd, image: str, layers: list[str],
          timeout: float = 120) -> None:
    """rmi, builder prune; wait until the namespace holds nothing and no layer blob is
    on disk."""
    d.host_docker("rmi", "-f", image)
    d.host_docker("builder", "prune", "-af")
    deadline = time.monotonic() + timeout
    while True:
        content = ctd.ctr("-n", d.namespace, "content", "ls", "-q").stdout.split()
        snaps = ctd.ctr("-n", d.namespace, "snapshots", "--snapshotter", d.snapshotter,
                        "ls").stdout.splitlines()[1:]
        images = ctd.ctr("-n", d.namespace, "images", "ls", "-q").stdout.split()
        left = set(layers) & blobs_on_disk(ctd)
        if not content and not snaps and not images and not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{d.snapshotter}: left after rmi: content {content}, "
                               f"snapshots {snaps}, images {images}, blobs {left}")
        if time.monotonic() > deadline - timeout / 2:  # containerd's GC is lazy: nudge it
            for ref in content:
                ctd.ctr("-n", d.namespace, "content", "rm", ref, check=False)
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--only", default=",".join(SNAPSHOTTERS),
                        help="comma-separated snapshotters (default all three)")
    parser.add_argument("--run-repeats", type=int, default=5,
                        help="docker runs per daemon and round, their median (default 5)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="lamina snapshotter -v: every call in its log (for profiling)")
    parser.add_argument("--logs", type=Path, help="copy the daemons' logs here at the end")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    corpus = Path(os.environ.get("LAMINA_CORPUS") or "/var/tmp/lamina-corpus")
    tar = corpus / "app-docker-save.tar"
    lab.lab_root()
    work = Path(tempfile.mkdtemp(prefix="b28-", dir=args.work))
    print(f"machine: {machine(work)}")
    shared_dir(work)
    reg = DistRegistry(work / "registry")
    sn = Snapshotter(work / "home", work / "snapshotter.log", backend="overlay",
                     socket_path=work / "lamina.sock",
                     args=["--containerd-address", str(work / "containerd.sock"),
                           *(["-v"] if args.verbose else [])])
    ctd = BenchContainerd(work, sn)
    daemons = {n: NamedDockerd(ctd, n) for n in names}
    try:
        reg.start()
        source = f"{reg.address}/corpus/app:1"
        sh("skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
           f"docker-archive:{tar}", f"docker://{source}")
        info = json.loads(sh("skopeo", "inspect", "--tls-verify=false", f"docker://{source}"))
        layers = info["Layers"]
        sn.start()
        ctd.start()
        for d in daemons.values():
            d.start()
        one = next(iter(daemons.values()))
        print(f"lab: {one.version()}; {ctd.version()}; "
              f"host CLI {sh('docker', '--version').strip()}")
        plugins = ctd.ctr("plugins", "ls").stdout
        for line in plugins.splitlines():
            if "erofs" in line or "lamina" in line:
                print(f"  plugin: {' '.join(line.split())}")
        for n, d in daemons.items():
            drv = d.host_docker("info", "--format", "{{.Driver}} {{json .DriverStatus}}")
            print(f"  dockerd[{n}]: {drv.strip()}")
        steps = [f"pull {n}" for n in names] + [f"run {n}" for n in names]
        times: dict[str, list[float]] = {s: [] for s in steps}
        for i in range(args.runs + 1):
            order = names[i % len(names):] + names[:i % len(names)]
            took: dict[str, float] = {}
            for n in order:
                d = daemons[n]
                before = len(reg.requests())
                took[f"pull {n}"] = timed(lambda d=d: d.host_docker("pull", "-q", source))
                got = [r for r in reg.requests()[before:] if "/blobs/sha256:" in r
                       and r.startswith('"GET')]
                fetched = {dg for dg in layers if any(dg in r for r in got)}
                assert fetched == set(layers), (n, got)
                if n == "erofs":  # erofs's differ made the layers, not walking's
                    made = list((ctd.root / "erofs").rglob("layer.erofs"))
                    assert len(made) == len(layers), made
                took[f"run {n}"] = statistics.median(  # short and noisy: the median of 5
                    timed(lambda d=d: d.host_docker("run", "--rm", "--network", "none",
                                                    source, "true"))
                    for _ in range(args.run_repeats))
                clean(ctd, d, source, layers)
            label = "warm-up (untimed)" if i == 0 else f"run {i}/{args.runs}"
            print(f"{label} (order {', '.join(order)}): "
                  + ", ".join(f"{s} {took[s]:.2f} s" for s in steps), flush=True)
            if i:
                for s, v in took.items():
                    times[s].append(v)
        med = {s: statistics.median(v) for s, v in times.items()}
        print(f"\nmedians of {args.runs} rounds: "
              + ", ".join(f"{s} {med[s]:.2f} s" for s in steps))

        def ratio(a: str, b: str) -> str:
            if a not in times or b not in times:
                return "n/a"
            rs = [x / y for x, y in zip(times[a], times[b], strict=True)]
            return (f"{statistics.median(rs):.2f}x (rounds {min(rs):.2f}-{max(rs):.2f}; "
                    f"of medians {med[a] / med[b]:.2f}x)")

        print(f"pull lamina/overlayfs {ratio('pull lamina', 'pull overlayfs')} (goal <= 0.70x)")
        print(f"pull lamina/erofs {ratio('pull lamina', 'pull erofs')} (goal <= 1.0x)")
        print(f"pull erofs/overlayfs {ratio('pull erofs', 'pull overlayfs')}")
        print(f"run lamina/overlayfs {ratio('run lamina', 'run overlayfs')} (goal <= 1.0x)")
        print(f"run lamina/erofs {ratio('run lamina', 'run erofs')}")
        applied = sn.log.read_text(errors="replace").count("lamina differ: applied")
        walking = ctd.log.read_text(errors="replace").count('msg="diff applied"')
        print(f"lamina's differ applied {applied} layers; containerd's walking and erofs "
              f"differs logged {walking} applies")
    finally:
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in [sn.log, ctd.log, *(d.log for d in daemons.values())]:
                if log.exists():
                    shutil.copy(log, args.logs / log.name)
        for d in daemons.values():
            d.stop()
        ctd.close()
        sn.close()
        reg.stop()
        unmount_layer_images(work)
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
