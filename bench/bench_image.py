"""``lamina image load``/``save`` against ``docker load``/``save`` and skopeo + umoci (issue 16).

    sudo .venv/bin/python bench/bench_image.py [--runs N] [--work DIR]
        [--formats erofs,dir] [--skip-skopeo]

The corpus image (``app-docker-save.tar``: ``corpus/app:1``, 3 layers, 355 MB), each
tool timed from the outside (the command's wall time), each run into new directories
on the same disk (``--work``, default /var/tmp) after a ``sync``, the tools taking turns:

- load: ``lamina image load`` into a fresh home (backend overlay) vs ``docker load -i``
  on a fresh ``dockerd`` (its built-in overlay2, a private data-root; started untimed)
  vs ``skopeo copy docker-archive:… oci:…`` then ``umoci unpack`` (what people use to
  get an image's tree without an engine);
- save: ``lamina image save -o FILE`` vs ``docker save -o FILE``, from what each loaded.

``--formats erofs,dir``: one lamina column per overlay read-only layer format
(``--opt overlay.layers=FORMAT``), in the same rounds (without it, the driver's
default); ``--skip-skopeo`` leaves skopeo + umoci out.

One untimed round first warms the page cache; then ``--runs`` timed rounds, medians.
Digests are verified: each load's image id is the config's sha256, each saved file's
layers are the original's.  Nothing big is deleted between timed steps (a deletion's
writeback would land on the next tool's time): every tree stays until the end.

Prints each round, a table of medians and the ratios lamina/docker (goals: load <= 0.3x,
save <= 1.0x).  Needs root, Debian's docker.io, skopeo and umoci, and the corpus
($LAMINA_CORPUS, default /var/tmp/lamina-corpus).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' engine harness

from bench.bench_docker import machine
from tests.integration.engine import Dockerd, docker_missing, unmount_below

REPO = Path(__file__).resolve().parents[1]
IMAGE = "corpus/app:1"
LOADS = ("lamina image load", "docker load", "skopeo copy + umoci unpack")
SAVES = ("lamina image save", "docker save")


def sh(*argv: str | Path, cwd: Path | None = None) -> str:
    """Run a command that must succeed; its standard output."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {proc.returncode}\n{proc.stderr}")
    return proc.stdout


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action`` took, after a ``sync`` (so that no earlier writeback counts)."""
    os.sync()
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def lamina(home: Path, *args: str | Path, fmt: str = "") -> str:
    """``python -m lamina --home HOME --backend overlay [--opt overlay.layers=FMT] ARGS…``."""
    opts = ["--opt", f"overlay.layers={fmt}"] if fmt else []
    return sh(sys.executable, "-m", "lamina", "--home", home, "--backend", "overlay", *opts,
              *args, cwd=REPO)


def labels(fmt: str) -> tuple[str, str]:
    """The load and save step names of lamina with layer format ``fmt`` ("": default)."""
    tail = f" [{fmt}]" if fmt else ""
    return f"lamina image load{tail}", f"lamina image save{tail}"


def layer_digests(saved: Path) -> list[str]:
    """The sha256 of each layer ``manifest.json`` names in the archive at ``saved``."""
    with tarfile.open(saved) as tar:
        f = tar.extractfile("manifest.json")
        assert f is not None
        [entry] = json.load(f)
        digests = []
        for name in entry["Layers"]:
            member = tar.extractfile(name)
            assert member is not None
            h = hashlib.sha256()
            while chunk := member.read(1 << 20):
                h.update(chunk)
            digests.append(f"sha256:{h.hexdigest()}")
    return digests


class Round:
    """One round's directories (kept until the end) and the figures the original must give."""

    def __init__(self, work: Path, tar: Path, want_id: str, want_layers: list[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="round-", dir=work))
        self.tar = tar
        self.want_id = want_id
        self.want_layers = want_layers

    def lamina(self, fmt: str = "") -> dict[str, float]:
        home = self.dir / f"lamina-home{fmt}"
        out = self.dir / f"lamina-save{fmt}.tar"
        doc: dict[str, object] = {}
        load_step, save_step = labels(fmt)

        def load() -> None:
            doc.update(json.loads(lamina(home, "--json", "image", "load", self.tar, fmt=fmt)))

        took = {load_step: timed(load)}
        images = doc["images"]
        assert isinstance(images, list) and images[0]["id"] == self.want_id, doc
        took[save_step] = timed(lambda: lamina(home, "image", "save", "-o", out, IMAGE,
                                               fmt=fmt))
        assert layer_digests(out) == self.want_layers
        return took

    def docker(self) -> dict[str, float]:
        dockerd = Dockerd(self.dir / "docker", "overlay2")
        out = self.dir / "docker-save.tar"
        try:
            dockerd.start()
            took = {"docker load": timed(lambda: dockerd.docker("load", "-i", str(self.tar)))}
            got = dockerd.docker("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
            assert got == self.want_id, got
            took["docker save"] = timed(lambda: dockerd.docker("save", "-o", str(out), IMAGE))
        finally:
            dockerd.stop()
            unmount_below(dockerd.root)  # its data stays until the end, unmounted
        assert layer_digests(out) == self.want_layers
        return took

    def skopeo_umoci(self) -> dict[str, float]:
        layout, bundle = self.dir / "oci", self.dir / "bundle"

        def both() -> None:
            sh("skopeo", "--insecure-policy", "copy", "--quiet", f"docker-archive:{self.tar}",
               f"oci:{layout}:x")
            sh("umoci", "unpack", "--image", f"{layout}:x", bundle)

        took = {"skopeo copy + umoci unpack": timed(both)}
        def blob(digest: str) -> object:
            return json.loads((layout / "blobs/sha256" / digest.removeprefix("sha256:"))
                              .read_text())

        index = blob_doc(layout / "index.json")
        manifest = blob(index["manifests"][0]["digest"])
        assert isinstance(manifest, dict)
        config = blob(manifest["config"]["digest"])
        # skopeo gzips the layers and writes its own config: the diff ids are what it keeps
        assert isinstance(config, dict) and config["rootfs"]["diff_ids"] == self.want_layers
        return took


def blob_doc(path: Path) -> dict[str, Any]:
    """The JSON object in the file at ``path``."""
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def original(tar: Path) -> tuple[str, list[str]]:
    """The image id and the layer digests of the ``docker save`` archive at ``tar``."""
    with tarfile.open(tar) as t:
        f = t.extractfile("manifest.json")
        assert f is not None
        [entry] = json.load(f)
    return "sha256:" + entry["Config"].removesuffix(".json"), layer_digests(tar)


def missing() -> str | None:
    """Why the bench cannot run here, if it cannot."""
    if os.geteuid() != 0:
        return "needs root"
    reason = docker_missing()
    if reason:
        return reason
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            return f"no {tool} (Debian's {tool}; scripts/bootstrap.sh installs it)"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"),
                        help="where every tool writes (default /var/tmp)")
    parser.add_argument("--formats", default="",
                        help="overlay.layers formats, one lamina column each (e.g. erofs,dir)")
    parser.add_argument("--skip-skopeo", action="store_true", help="no skopeo + umoci")
    args = parser.parse_args()
    reason = missing()
    if reason:
        print(f"bench_image: {reason}", file=sys.stderr)
        return 2
    corpus = Path(os.environ.get("LAMINA_CORPUS") or "/var/tmp/lamina-corpus")
    tar = corpus / "app-docker-save.tar"
    if not tar.is_file():
        print(f"bench_image: no corpus at {corpus}", file=sys.stderr)
        return 2
    want_id, want_layers = original(tar)
    work = Path(tempfile.mkdtemp(prefix="lamina-bench-image-", dir=args.work))
    print(f"machine: {machine(work)}")
    formats = [f for f in args.formats.split(",") if f] or [""]
    ours = [labels(fmt) for fmt in formats]
    loads = [load for load, _ in ours] + list(LOADS[1:2 if args.skip_skopeo else 3])
    saves = [save for _, save in ours] + [SAVES[1]]
    times: dict[str, list[float]] = {s: [] for s in loads + saves}
    tools: list[tuple[str, tuple[str, ...]]] = [("lamina", (fmt,)) for fmt in formats]
    tools += [("docker", ())] + ([] if args.skip_skopeo else [("skopeo_umoci", ())])
    try:
        for i in range(args.runs + 1):
            rnd = Round(work, tar, want_id, want_layers)
            # Take turns, starting with another tool each round, so that drift on a
            # shared machine hits each alike.
            k = i % len(tools)
            took: dict[str, float] = {}
            for tool, targs in tools[k:] + tools[:k]:
                took.update(getattr(rnd, tool)(*targs))
            label = "warm-up (untimed)" if i == 0 else f"run {i}/{args.runs}"
            print(f"{label}: " + ", ".join(f"{s} {took[s]:.2f} s" for s in loads + saves),
                  flush=True)
            if i:
                for step, seconds in took.items():
                    times[step].append(seconds)
    finally:
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)
    med = {s: statistics.median(v) for s, v in times.items()}
    dload, dsave = med["docker load"], med["docker save"]
    sk = None if args.skip_skopeo else med[LOADS[2]]
    print(f"\n({args.runs} runs; medians)")
    print("| step | lamina | docker (overlay2) | skopeo + umoci | lamina/docker |")
    print("|---|---|---|---|---|")
    for fmt, (load_step, save_step) in zip(formats, ours, strict=True):
        load, save = med[load_step], med[save_step]
        tag = f" [{fmt}]" if fmt else ""
        print(f"| load{tag} | {load:.2f} s | {dload:.2f} s | "
              f"{f'{sk:.2f} s' if sk else '-'} | {load / dload:.2f}x |")
        print(f"| save{tag} | {save:.2f} s | {dsave:.2f} s | - | {save / dsave:.2f}x |")
    for fmt, (load_step, save_step) in zip(formats, ours, strict=True):
        load, save = med[load_step], med[save_step]
        print(f"\n{fmt or 'default'}: load: lamina/docker {load / dload:.2f}x (goal <= 0.3x)"
              + (f", lamina/(skopeo + umoci) {load / sk:.2f}x" if sk else "")
              + f"; save: lamina/docker {save / dsave:.2f}x (goal <= 1.0x)")
    if len(formats) > 1:
        a, b = formats[:2]
        print(f"load {a}/{b}: {med[labels(a)[0]] / med[labels(b)[0]]:.2f}x; "
              f"save {a}/{b}: {med[labels(a)[1]] / med[labels(b)[1]]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
