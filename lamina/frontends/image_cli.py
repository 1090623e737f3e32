"""``lamina image …``: the image commands (contract §7), thin over :mod:`lamina.image`.

They print as the other commands do (:mod:`lamina.frontends.cli`): text for people,
one JSON document with ``--json``, errors as one line.  ``load`` and ``save`` show
progress on a terminal: the bytes read and applied (or written) against the total,
with the time left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from lamina import errors
from lamina.driver import Driver
from lamina.frontends.output import (
    Result,
    _columns,
    _one_line,
    _output_file,
    _printable,
    byte_progress,
    human_size,
)

Command = Callable[[Driver, argparse.Namespace], Result]
log = logging.getLogger("lamina")


def _store(drv: Driver) -> Any:
    from lamina.image.store import ImageStore

    return ImageStore(drv)


@contextlib.contextmanager
def _bar(enabled: bool, label: str, total: int | None) -> Iterator[Any]:
    """A progress bar on standard error; yields ``advance(nbytes, total)`` (None: off)."""
    if not enabled:
        yield None
        return
    with byte_progress("{task.fields[layers]}") as bar:
        task = bar.add_task(label, total=total, layers="")

        def advance(n: int, new_total: int | None, layers: str | None = None) -> None:
            if new_total is not None:
                bar.update(task, total=new_total)
            if layers is not None:
                bar.update(task, layers=layers)
            bar.update(task, advance=n)

        yield advance


def recover(drv: Driver) -> None:
    """Sweep what an image load that died left (no image names it): only when one did.
    A sweep that cannot run (a damaged image home) is a warning: it must not stop every
    command of the store, the layer commands included."""
    if (drv.home / "image" / "dirty").exists():
        try:
            _store(drv)
        except (errors.LaminaError, OSError) as e:
            log.warning("lamina: the image store cannot be swept (%s); going on",
                        _printable(_one_line(str(e))))


def _file_size(path: str) -> int | None:
    import os
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def cmd_load(drv: Driver, args: argparse.Namespace) -> Result:
    """``image load``: the images of a docker save archive or an OCI layout."""
    from lamina.image import load

    if args.file == "-" and sys.stdin is None:
        raise errors.InvalidArgument("image load: standard input is closed; give FILE or "
                                     "pipe an archive in")
    store = _store(drv)
    size = None if args.file == "-" else _file_size(args.file)
    # The work is reading the archive, then reading its layers again to apply them:
    # the total is the archive's size twice (the layers are most of it), set exactly
    # once the layers are known.
    with _bar(args.show_progress, "load", 2 * size if size else None) as advance:
        progress = None
        if advance is not None:
            done = {"read": 0, "layer-done": 0, "plan": 0}

            def progress(what: str, n: int) -> None:
                if what == "plan":  # the layers' bytes are known now: the true total
                    done["plan"] = n
                    advance(0, done["read"] + n, "0 layers")
                elif what == "layer-done":
                    done["layer-done"] += 1
                    advance(0, None, f"{done['layer-done']} layers")
                else:
                    if what == "read":
                        done["read"] += n
                    advance(n, None)
        if args.file == "-":
            loaded = load.load(store, stream=sys.stdin.buffer, progress=progress)
        else:
            loaded = load.load(store, path=args.file, progress=progress)
    from lamina.image import reference

    lines = []
    images = []
    for item in loaded:
        img = item.image
        for name in item.names:
            lines.append(f"Loaded image: {reference.parse(name).familiar}")
        if not item.names:
            lines.append(f"Loaded image ID: {img.id}")
        images.append({"name": item.names[0] if item.names else None, "names": item.names,
                       "id": img.id, "digest": img.digest})
    doc = {"images": images, "layers_applied": sum(i.applied for i in loaded),
           "layers_reused": sum(i.reused for i in loaded)}
    return Result(doc, lines)


def cmd_save(drv: Driver, args: argparse.Namespace) -> Result:
    """``image save``: images as a tar (OCI layout with Docker's manifest.json)."""
    from lamina.image import save

    store = _store(drv)
    with contextlib.ExitStack() as stack:
        if args.output in (None, "-"):
            sys.stdout.flush()
            out: BinaryIO = sys.stdout.buffer
        else:
            out = stack.enter_context(_output_file(args.output))
        with _bar(args.show_progress, "save", None) as advance:
            progress = None
            if advance is not None:
                def progress(n: int, total: int) -> None:
                    advance(n, total)
            try:
                written = save.save(store, args.refs, out, progress)
                out.flush()
            except BrokenPipeError:
                raise
            except OSError as e:
                raise errors.InvalidArgument(
                    f"cannot write the archive to {args.output or 'standard output'}: "
                    f"{e.strerror or e}") from None
    return Result({"refs": args.refs, "output": args.output, "bytes": written})


def _created(img: Any) -> str:
    return img.config.created or ""


def _size(drv: Driver, img: Any) -> int:
    total = 0
    for chain in img.chains:
        from lamina.image.store import layer_id

        lid = layer_id(chain)
        try:
            total += drv.size(lid) or 0
        except errors.LaminaError:
            continue
    return total


def cmd_ls(drv: Driver, args: argparse.Namespace) -> Result:
    """``image ls``: every image, one row a name, as ``docker images``."""
    from lamina.image import reference

    store = _store(drv)
    rows: list[dict[str, Any]] = []
    table = [["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]]
    damaged: list[str] = []
    for img in store.images(damaged):
        size = _size(drv, img)
        for name in img.names or [None]:
            ref = reference.parse(name) if name else None
            rows.append({"name": name, "repository": ref.repository if ref else None,
                         "tag": ref.tag if ref else None, "id": img.id, "digest": img.digest,
                         "created": _created(img), "size": size})
            table.append([_printable(ref.familiar_repository) if ref else "<none>",
                          (ref.tag or "<none>") if ref else "<none>", img.id[7:19],
                          _printable(_created(img)[:19].replace("T", " ")) or "-",
                          human_size(size)])
    broken = [f"broken: {_printable(_one_line(d))}" for d in damaged]
    doc: dict[str, Any] = {"images": rows}
    if damaged:
        doc["broken"] = damaged
    return Result(doc, _columns(table) + broken)


def inspect_doc(drv: Driver, img: Any) -> dict[str, Any]:
    """What ``docker image inspect`` shows of an image, its main fields."""
    from lamina.image import reference

    cfg = img.config.doc
    repo_digests = []
    if img.pulled:
        repo_digests = sorted({f"{reference.parse(n).familiar_repository}@{img.digest}"
                               for n in img.names})
    return {
        "Id": img.id,
        "RepoTags": [reference.parse(n).familiar for n in img.names],
        "RepoDigests": repo_digests,
        "Parent": "",
        "Comment": cfg.get("comment", ""),
        "Created": cfg.get("created", ""),
        "DockerVersion": cfg.get("docker_version", ""),
        "Author": cfg.get("author", ""),
        "Config": cfg.get("config", {}),
        "Architecture": cfg.get("architecture", ""),
        "Variant": cfg.get("variant", "") or None,
        "Os": cfg.get("os", ""),
        "Size": _size(drv, img),
        "RootFS": {"Type": "layers", "Layers": list(img.config.diff_ids)},
        "Metadata": {"LastTagTime": img.created},
        "Descriptor": img.manifest_desc.to_json(),
    }


def cmd_inspect(drv: Driver, args: argparse.Namespace) -> Result:
    """``image inspect``: a JSON array, as ``docker image inspect`` prints."""
    store = _store(drv)
    docs = []
    for ref in args.refs:
        doc = inspect_doc(drv, store.resolve(ref))
        if doc["Variant"] is None:
            del doc["Variant"]
        docs.append(doc)
    return Result(docs, json.dumps(docs, indent=4).splitlines())


def cmd_tag(drv: Driver, args: argparse.Namespace) -> Result:
    ref = _store(drv).tag(args.source, args.target)
    return Result({"source": args.source, "target": str(ref)})


def cmd_rm(drv: Driver, args: argparse.Namespace) -> Result:
    from lamina.image import reference

    store = _store(drv)
    lines, untagged, deleted = [], [], []
    for ref in args.refs:
        names, gone = store.remove(ref)
        for n in names:
            lines.append(f"Untagged: {reference.parse(n).familiar}")
            untagged.append(n)
        if gone:
            lines.append(f"Deleted: {gone}")
            deleted.append(gone)
    return Result({"untagged": untagged, "deleted": deleted}, lines)


def cmd_mount(drv: Driver, args: argparse.Namespace) -> Result:
    path = _store(drv).mount(args.ref)
    return Result({"path": str(path)}, [str(path)])


def cmd_unmount(drv: Driver, args: argparse.Namespace) -> Result:
    _store(drv).unmount(args.ref)
    return Result({"ref": args.ref})


def cmd_prune(drv: Driver, args: argparse.Namespace) -> Result:
    blobs, freed = _store(drv).prune()
    return Result({"blobs": blobs, "bytes": freed},
                  [f"Deleted blobs: {len(blobs)}", f"Total reclaimed space: {human_size(freed)}"])


def add_commands(sub: Any, json_flag: argparse.ArgumentParser) -> None:
    """The ``image`` command and its subcommands, on ``lamina``'s subparsers ``sub``."""
    about = "load, save, list, inspect, tag, remove and mount images"
    leaf_class = sub._parser_class  # options and operands in any order (cli._CommandParser)
    sub._parser_class = argparse.ArgumentParser  # a parser of subcommands cannot intermix
    try:
        p = sub.add_parser("image", help=about, description=about, parents=[json_flag])
    finally:
        sub._parser_class = leaf_class
    isub = p.add_subparsers(dest="image_command", required=True, metavar="COMMAND",
                            parser_class=leaf_class)

    def command(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = isub.add_parser(name, help=help, description=help,
                                                     parents=[json_flag])
        c.set_defaults(func=func)
        return c

    c = command("load", cmd_load, "load images from a docker save archive or an OCI layout")
    c.add_argument("file", metavar="FILE", nargs="?", default=None,
                   help="a tar (plain or compressed) or a directory (- for stdin)")
    c.add_argument("-i", "--input", metavar="FILE", default=None,
                   help="the same as FILE (as docker load -i)")
    c = command("save", cmd_save, "write images as a tar (OCI layout with manifest.json)")
    c.add_argument("refs", metavar="REF", nargs="+", help="image names or ids")
    c.add_argument("-o", "--output", metavar="FILE", default=None, help="(default: stdout)")
    command("ls", cmd_ls, "list the images")
    c = command("inspect", cmd_inspect, "show images as JSON, as docker image inspect")
    c.add_argument("refs", metavar="REF", nargs="+")
    c = command("tag", cmd_tag, "give an image another name")
    c.add_argument("source", metavar="SOURCE")
    c.add_argument("target", metavar="TARGET")
    c = command("rm", cmd_rm, "untag or remove images (and the layers no other uses)")
    c.add_argument("refs", metavar="REF", nargs="+")
    c = command("mount", cmd_mount, "mount an image's read-only root filesystem; print it")
    c.add_argument("ref", metavar="REF")
    c = command("unmount", cmd_unmount, "give back one image mount")
    c.add_argument("ref", metavar="REF")
    command("prune", cmd_prune, "remove the blobs no image uses")
    from lamina.frontends import registry_cli
    registry_cli.add_commands(command)


def usage_problem(args: argparse.Namespace) -> str | None:
    """What makes an ``image`` command line unusable (before the store opens)."""
    sub = getattr(args, "image_command", None)
    if sub == "load":
        if args.file is not None and args.input is not None:
            return "image load: give the archive once (FILE or -i FILE)"
        args.file = args.file or args.input or "-"
    if sub == "load" and args.file == "-" and sys.stdin is not None and sys.stdin.isatty():
        return "image load: refusing to read an archive from a terminal; give FILE or pipe it"
    if sub == "save" and args.output in (None, "-"):
        if args.json:
            return "image save: --json needs -o FILE (standard output holds the JSON document)"
        if sys.stdout is not None and sys.stdout.isatty():
            return "image save: refusing to write a tar to a terminal; use -o FILE or redirect"
    return None
