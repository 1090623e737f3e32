"""``lamina image pull`` and ``lamina image push`` (contract §7), thin over
:mod:`lamina.image.pull` and :mod:`lamina.image.push`.

On a terminal a pull shows two bars a layer, its download and its apply, each with its
rate and the time left; a push one bar a blob.  ``--json`` prints one document.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from lamina.driver import Driver
from lamina.frontends.output import Result, byte_progress, human_size
from lamina.image import spec

Command = Callable[[Driver, argparse.Namespace], Result]


def _options(args: argparse.Namespace) -> Any:
    from lamina.image.auth import parse_creds
    from lamina.image.registry import Options

    return Options(creds=parse_creds(args.creds) if args.creds else None,
                   insecure=args.insecure, plain_http=args.plain_http)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    with byte_progress(elapsed=False) as bar:
        yield bar


class _PullBars:
    """:class:`lamina.image.pull.Progress` on rich bars: a download and an apply a layer."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.down: dict[int, Any] = {}
        self.apply: dict[int, Any] = {}

    def begin(self, layers: list[spec.Descriptor], fetch: list[bool],
              apply: list[bool]) -> None:
        for i, layer in enumerate(layers):
            short = layer.digest[7:19]
            if fetch[i]:
                self.down[i] = self.bar.add_task(f"{short} download", total=layer.size)
            if apply[i]:
                self.apply[i] = self.bar.add_task(f"{short} apply   ", total=layer.size)
            if not fetch[i] and not apply[i]:
                self.bar.add_task(f"{short} held     ", total=layer.size,
                                  completed=layer.size)

    def downloaded(self, index: int, nbytes: int) -> None:
        self.bar.update(self.down[index], advance=nbytes)

    def applied(self, index: int, nbytes: int) -> None:
        if index in self.apply:
            self.bar.update(self.apply[index], advance=nbytes)


def cmd_pull(drv: Driver, args: argparse.Namespace) -> Result:
    """``image pull``: an image from a registry, applied as it downloads."""
    from lamina.image import pull, store

    platform = store.parse_platform(args.platform) if args.platform else None
    images = store.ImageStore(drv)
    with _progress(args.show_progress) as bar:
        done = pull.pull(images, args.ref, platform=platform, jobs=args.jobs,
                         options=_options(args),
                         progress=_PullBars(bar) if bar is not None else None)
    img = done.image
    from lamina.image import reference

    familiar = reference.parse(done.name).familiar
    lines = [f"Digest: {img.digest}",
             f"Status: pulled {familiar} ({done.applied} layers applied, {done.reused} "
             f"held, {human_size(done.downloaded)} downloaded)", familiar]
    doc = {"name": done.name, "digest": img.digest, "id": img.id,
           "platform": str(img.config.platform), "layers_applied": done.applied,
           "layers_reused": done.reused, "bytes_downloaded": done.downloaded}
    return Result(doc, lines)


def cmd_push(drv: Driver, args: argparse.Namespace) -> Result:
    """``image push``: an image to a registry (DEST: another name; default REF)."""
    from lamina.image import push, store

    images = store.ImageStore(drv)
    with _progress(args.show_progress) as bar:
        progress = None
        if bar is not None:
            task = bar.add_task("push", total=None)
            img = images.resolve(args.ref)
            total = sum({d.digest: d.size for d in (img.manifest.config,
                                                    *img.manifest.layers)}.values())
            bar.update(task, total=total)

            def progress(digest: str, n: int) -> None:
                bar.update(task, advance=n)
        done = push.push(images, args.ref, args.dest, jobs=args.jobs, options=_options(args),
                         progress=progress)
    counts = {f: sum(1 for v in done.blobs.values() if v == f)
              for f in ("uploaded", "mounted", "exists")}
    lines = [f"{digest[7:19]}: {fate}" for digest, fate in done.blobs.items()]
    lines.append(f"{done.name}: digest: {done.digest} ({counts['uploaded']} blobs uploaded, "
                 f"{counts['mounted']} mounted, {counts['exists']} there already; "
                 f"{human_size(done.sent)} sent)")
    doc = {"name": done.name, "digest": done.digest, "blobs": done.blobs,
           "bytes_sent": done.sent, **{f"blobs_{k}": v for k, v in counts.items()}}
    return Result(doc, lines)


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= n <= 32:
        raise argparse.ArgumentTypeError("from 1 to 32")
    return n


def _transport(c: argparse.ArgumentParser) -> None:
    c.add_argument("--creds", metavar="USER:PASS", default=None,
                   help="credentials (default: Docker's ~/.docker/config.json, else none)")
    c.add_argument("--insecure", action="store_true",
                   help="do not verify the registry's TLS certificate (and let credentials "
                        "go to a token service on another host over plain HTTP)")
    c.add_argument("--plain-http", action="store_true",
                   help="HTTP, not HTTPS (always so for localhost and 127.0.0.1)")
    c.add_argument("--jobs", type=_jobs, default=3, metavar="N",
                   help="blobs transferred at once (default 3)")


def add_commands(command: Callable[[str, Command, str], argparse.ArgumentParser]) -> None:
    """``image pull`` and ``image push``, made with ``image``'s own ``command`` factory."""
    c = command("pull", cmd_pull, "pull an image from a registry")
    c.add_argument("ref", metavar="REF", help="an image name: [REGISTRY/]REPO[:TAG|@DIGEST]")
    c.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", default=None,
                   help="the platform of a multi-platform image (default: this machine's)")
    _transport(c)
    c = command("push", cmd_push, "push an image to a registry")
    c.add_argument("ref", metavar="REF", help="an image of the store (a name or an id)")
    c.add_argument("dest", metavar="DEST", nargs="?", default=None,
                   help="the name to push it as (default: REF)")
    _transport(c)
