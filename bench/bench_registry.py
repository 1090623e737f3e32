"""``lamina image pull``/``push`` against Docker, skopeo + umoci and containerd (issue 17).

    sudo .venv/bin/python bench/bench_registry.py [--runs N] [--rate MBPS] [--work DIR]
        [--formats erofs,dir] [--skip skopeo,ctr,push,overlap]

The corpus image (``app-docker-save.tar``, 3 layers, 355 MB as tars) is pushed once by
``skopeo`` into a local ``docker-registry`` (distribution 2.8, on 127.0.0.1, storage
on ``--work``; skopeo gzips the layers: 161 MB).  Then, each round into new
directories, the tools taking turns (the first tool changes each round), each timed
from the outside:

- pull: ``lamina image pull`` into a fresh home (backend overlay) vs Docker 20.10's
  ``docker pull`` on a fresh ``dockerd`` (overlay2, private data-root, started untimed)
  vs ``skopeo copy docker://… oci:…`` then ``umoci unpack`` vs ``ctr image pull`` on a
  fresh private containerd (its overlayfs snapshotter; started untimed);
- push, each into a fresh registry of its own (so nothing can be mounted):
  ``lamina image push`` of what it pulled vs ``skopeo copy oci:… docker://…`` of what
  skopeo pulled (the same gzip layer blobs, sent as they are).

``--formats erofs,dir``: one ``lamina image pull`` per overlay read-only layer format
(``--opt overlay.layers=FORMAT``) in each round, each into its own home (pushes and
the overlap use the first); ``--skip`` leaves out the named tools or parts.

One untimed round first warms the page cache; then ``--runs`` timed rounds; medians
and the ratios (goals: pull <= 0.5x docker, push <= 1.0x skopeo).  Digests are checked:
every pull's manifest digest is the registry's, every push's is the image's.

Then the overlap: the registry behind a proxy that sends at most ``--rate`` MB/s over
all connections together, and per round (taking turns) the download alone (every
layer blob fetched through the proxy, 3 at once, to /dev/null), ``lamina image pull``
through it, and ``lamina image pull`` straight from the registry (about the apply's
time).  A pull that applies while it downloads takes about the longer of the two, not
their sum.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' harnesses

from bench.bench_docker import machine
from tests.containerd.daemon import Containerd
from tests.integration.engine import Dockerd, docker_missing, unmount_below
from tests.registry.harness import DistRegistry, FaultProxy

REPO = Path(__file__).resolve().parents[1]
PULLS = ("lamina image pull", "docker pull", "skopeo copy + umoci unpack", "ctr image pull")
PUSHES = ("lamina image push", "skopeo copy (push)")


def sh(*argv: str | Path, cwd: Path | None = None) -> str:
    """Run a command that must succeed; its standard output."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {proc.returncode}\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return proc.stdout


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action`` took, after a ``sync`` (so that no earlier writeback counts)."""
    os.sync()
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def lamina(home: Path, *args: str | Path, fmt: str = "") -> str:
    opts = ["--opt", f"overlay.layers={fmt}"] if fmt else []
    return sh(sys.executable, "-m", "lamina", "--home", home, "--backend", "overlay", *opts,
              *args, cwd=REPO)


def pull_label(fmt: str) -> str:
    """The step name of lamina's pull with layer format ``fmt`` ("": the default)."""
    return f"lamina image pull [{fmt}]" if fmt else "lamina image pull"


class Round:
    """One round's directories (kept until the end: no deletion's writeback lands on a
    later tool's time)."""

    def __init__(self, work: Path, source: str, digest: str, layers: list[str],
                 n: int, fmt: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="round-", dir=work))
        self.source = source  # host:port/corpus/app:1
        self.digest = digest
        self.layers = layers
        self.oci_digest = ""
        self.n = n
        self.fmt = fmt  # the format of the home that pushes
        self.home = self.dir / f"lamina-home{fmt}"
        self.layout = self.dir / "oci"

    def lamina_pull(self, fmt: str = "") -> dict[str, float]:
        doc: dict[str, object] = {}
        home = self.dir / f"lamina-home{fmt}"

        def pull() -> None:
            doc.update(json.loads(lamina(home, "--json", "image", "pull", self.source,
                                         fmt=fmt)))

        took = {pull_label(fmt): timed(pull)}
        assert doc["digest"] == self.digest, doc
        return took

    def docker_pull(self) -> dict[str, float]:
        dockerd = Dockerd(self.dir / "docker", "overlay2")
        try:
            dockerd.start()
            took = {"docker pull": timed(lambda: dockerd.docker("pull", "-q", self.source))}
            got = dockerd.docker("image", "inspect", "--format", "{{json .RepoDigests}}",
                                 self.source).stdout
            assert self.digest in got, got
        finally:
            dockerd.stop()
            unmount_below(dockerd.root)
        return took

    def skopeo_umoci(self) -> dict[str, float]:
        bundle = self.dir / "bundle"

        def both() -> None:
            sh("skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
               f"docker://{self.source}", f"oci:{self.layout}:x")
            sh("umoci", "unpack", "--image", f"{self.layout}:x", bundle)

        took = {"skopeo copy + umoci unpack": timed(both)}
        # skopeo makes the manifest and config OCI ones (umoci takes no other): new
        # digests for those two over the same layer blobs.
        index = json.loads((self.layout / "index.json").read_text())
        self.oci_digest = index["manifests"][0]["digest"]
        blobs = self.layout / "blobs" / "sha256"
        manifest = json.loads((blobs / self.oci_digest.removeprefix("sha256:")).read_text())
        assert [d["digest"] for d in manifest["layers"]] == self.layers, manifest
        return took

    def ctr_pull(self) -> dict[str, float]:
        ctd = Containerd(self.dir / "containerd", debug=False)
        try:
            ctd.start()
            took = {"ctr image pull": timed(lambda: ctd.ctr("image", "pull", "--plain-http",
                                                            self.source))}
            out = ctd.ctr("image", "ls").stdout
            assert self.digest in out, out
            assert len(ctd.lines("snapshots", "ls")) == 4  # a header and 3 layers unpacked
        finally:
            ctd.close()
        return took

    def pushes(self) -> dict[str, float]:
        """Both pushes (in the round's order), once both pulls are done, each into a
        registry of its own started for it (skopeo's blob cache remembers where it saw
        a blob, and would mount it from there)."""
        regs = [DistRegistry(self.dir / "push-lamina"), DistRegistry(self.dir / "push-skopeo")]
        for reg in regs:
            reg.start()
        try:
            return self._pushes(regs[0].address, regs[1].address)
        finally:
            for reg in regs:
                reg.stop()

    def _pushes(self, lamina_dest: str, skopeo_dest: str) -> dict[str, float]:
        mine = f"{lamina_dest}/lamina-{self.n}/app:1"
        theirs = f"{skopeo_dest}/skopeo-{self.n}/app:1"
        doc: dict[str, object] = {}

        def push() -> None:
            doc.update(json.loads(lamina(self.home, "--json", "image", "push", self.source,
                                         mine, fmt=self.fmt)))

        took = {}
        steps = [("lamina image push", push),
                 ("skopeo copy (push)", lambda: sh(
                     "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                     f"oci:{self.layout}:x", f"docker://{theirs}"))]
        if self.n % 2:
            steps.reverse()
        for name, step in steps:
            took[name] = timed(step)
        assert doc["digest"] == self.digest and doc["blobs_uploaded"] == 4, doc
        seen = json.loads(sh("skopeo", "inspect", "--tls-verify=false", f"docker://{theirs}"))
        assert seen["Digest"] == self.oci_digest, seen
        return took


def download_only(proxy: str, repo: str, layers: list[str], jobs: int = 3) -> None:
    """Every layer blob through the proxy, ``jobs`` at once, to nowhere."""
    import urllib3

    pool = urllib3.PoolManager(maxsize=jobs)

    def one(digest: str) -> None:
        resp = pool.request("GET", f"http://{proxy}/v2/{repo}/blobs/{digest}",
                            preload_content=False, headers={"Accept-Encoding": "identity"})
        while resp.read(1 << 20):
            pass
        resp.release_conn()

    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(one, layers))


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    reason = docker_missing()
    if reason:
        return reason
    for tool in ("skopeo", "umoci", "ctr", "containerd", "/usr/bin/docker-registry"):
        if shutil.which(tool) is None:
            return f"no {tool} (scripts/bootstrap.sh installs it)"
    return None


def table(title: str, cols: tuple[str, ...], times: dict[str, list[float]]) -> dict[str, float]:
    med = {s: statistics.median(v) for s, v in times.items() if v}
    print(f"\n{title}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    print("| " + " | ".join(f"{med[c]:.2f} s" for c in cols) + " |")
    return med


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="the throttled proxy's MB/s (default 50)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"),
                        help="where every tool writes (default /var/tmp)")
    parser.add_argument("--overlap-only", action="store_true",
                        help="only the bandwidth-limited runs")
    parser.add_argument("--formats", default="",
                        help="overlay.layers formats, one lamina pull each (e.g. erofs,dir)")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to leave out: skopeo, ctr, push, overlap")
    args = parser.parse_args()
    args.formats = [f for f in args.formats.split(",") if f] or [""]
    args.skip = set(filter(None, args.skip.split(",")))
    reason = missing()
    if reason:
        print(f"bench_registry: {reason}", file=sys.stderr)
        return 2
    corpus = Path(os.environ.get("LAMINA_CORPUS") or "/var/tmp/lamina-corpus")
    tar = corpus / "app-docker-save.tar"
    work = Path(tempfile.mkdtemp(prefix="lamina-bench-registry-", dir=args.work))
    print(f"machine: {machine(work)}")
    registry = DistRegistry(work / "registry")
    try:
        registry.start()
        source = f"{registry.address}/corpus/app:1"
        sh("skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
           f"docker-archive:{tar}", f"docker://{source}")
        info = json.loads(sh("skopeo", "inspect", "--tls-verify=false", f"docker://{source}"))
        digest, layers = info["Digest"], info["Layers"]
        if not args.overlap_only:
            transfers(args, work, source, digest, layers)
        if "overlap" not in args.skip:
            overlap(args, work, registry, source, layers)
    finally:
        registry.stop()
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def transfers(args: argparse.Namespace, work: Path, source: str, digest: str,
              layers: list[str]) -> None:
    """The pull and push rounds, and their table."""
    ours = [pull_label(fmt) for fmt in args.formats]
    pulls = ours + [p for p, part in zip(PULLS[1:], ("", "skopeo", "ctr"), strict=True)
                    if part not in args.skip]
    pushes = list(PUSHES) if {"push", "skopeo"}.isdisjoint(args.skip) else []
    times: dict[str, list[float]] = {s: [] for s in pulls + pushes}
    tools: list[tuple[str, tuple[str, ...]]] = [("lamina_pull", (f,)) for f in args.formats]
    tools += [(t, ()) for t, part in (("docker_pull", ""), ("skopeo_umoci", "skopeo"),
                                       ("ctr_pull", "ctr")) if part not in args.skip]
    for i in range(args.runs + 1):
        rnd = Round(work, source, digest, layers, i, args.formats[0])
        k = i % len(tools)
        took: dict[str, float] = {}
        for tool, targs in tools[k:] + tools[:k]:
            took.update(getattr(rnd, tool)(*targs))
        if pushes:
            took.update(rnd.pushes())
        label = "warm-up (untimed)" if i == 0 else f"run {i}/{args.runs}"
        print(f"{label}: " + ", ".join(f"{s} {took[s]:.2f} s" for s in pulls + pushes),
              flush=True)
        if i:
            for step, seconds in took.items():
                times[step].append(seconds)
    med = table(f"pull and push ({args.runs} runs; medians)", tuple(pulls + pushes), times)
    dpull = med["docker pull"]
    for name in ours:
        pull = med[name]
        extra = "".join(f", lamina/{ref} {pull / med[step]:.2f}x"
                        for ref, step in (("(skopeo + umoci)", PULLS[2]), ("ctr", PULLS[3]))
                        if step in med)
        print(f"\n{name}: lamina/docker {pull / dpull:.2f}x (goal <= 0.4x){extra}")
    if len(ours) > 1:
        print(f"{ours[0]} / {ours[1]}: {med[ours[0]] / med[ours[1]]:.2f}x")
    if pushes:
        push, spush = med["lamina image push"], med["skopeo copy (push)"]
        print(f"push: lamina/skopeo {push / spush:.2f}x (goal <= 1.0x)")


def overlap(args: argparse.Namespace, work: Path, registry: DistRegistry, source: str,
            layers: list[str]) -> None:
    """The bandwidth-limited rounds, and their table."""
    proxy = FaultProxy(registry.address, rate=args.rate * 1e6)
    try:
        through = f"{proxy.address}/corpus/app:1"
        kinds = ("download only", "throttled pull", "throttled pull --jobs 1",
                 "unthrottled pull")
        over: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(args.runs + 1):
            base = Path(tempfile.mkdtemp(prefix="throttled-", dir=work))
            steps: dict[str, Callable[[], object]] = {
                "download only": lambda: download_only(proxy.address, "corpus/app", layers),
                "throttled pull": lambda base=base: lamina(base / "slow", "image", "pull",
                                                           through),
                "throttled pull --jobs 1": lambda base=base: lamina(
                    base / "slow1", "image", "pull", "--jobs", "1", through),
                "unthrottled pull": lambda base=base: lamina(base / "fast", "image", "pull",
                                                             source)}
            order = kinds[i % 4:] + kinds[:i % 4]
            took = {name: timed(steps[name]) for name in order}
            label = "warm-up (untimed)" if i == 0 else f"run {i}/{args.runs}"
            print(f"overlap {label}: " + ", ".join(f"{k} {took[k]:.2f} s" for k in kinds),
                  flush=True)
            if i:
                for k, v in took.items():
                    over[k].append(v)
        omed = table(f"through a {args.rate:.0f} MB/s proxy ({args.runs} runs; medians)",
                     kinds, over)
        down, slow, slow1, fast = (omed[k] for k in kinds)
        for label, took_s in (("--jobs 3", slow), ("--jobs 1", slow1)):
            print(f"overlap ({label}): the throttled pull took {took_s:.2f} s = "
                  f"{took_s / down:.2f}x the download alone ({down:.2f} s); download then "
                  f"apply would be about download + unthrottled pull = {down + fast:.2f} s: "
                  f"{(down + fast - took_s) / fast * 100:.0f}% of the unthrottled pull's time "
                  "hidden under the download")
    finally:
        proxy.stop()


if __name__ == "__main__":
    raise SystemExit(main())
