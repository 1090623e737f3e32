"""The ``lamina`` command line (contract §3): a thin layer over :mod:`lamina`.

Every command opens the store with :func:`lamina.open_driver`, makes one or two
:class:`~lamina.driver.Driver` calls and prints their result, as text for people
or, with ``--json``, as exactly one JSON document on standard output.  Exit
status: 0 on success, 1 for a :class:`~lamina.errors.LaminaError` (one line
``lamina: <message>`` on standard error), 2 for a usage error.  ``exists``
exits 1, silently, when the layer is absent.

Long work (``apply``, ``diff``) shows a progress bar when standard error is a
terminal and ``--json`` is not given; otherwise it prints nothing extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import lamina
import lamina.progress
from lamina import errors
from lamina.driver import Driver
from lamina.frontends import image_cli
from lamina.frontends.output import (
    CHUNK,
    Result,
    _columns,
    _one_line,
    _output_file,
    _printable,
    _regular_size,
    _write,
    human_size,
    progress_bar,
)
from lamina.host import userns

USAGE_EXIT = 2


def default_home() -> Path:
    """The store used without ``--home``: ``$LAMINA_HOME``, else system-wide for root,
    per-user (``$XDG_DATA_HOME/lamina``) for root of a user namespace (rootless)."""
    env = os.environ.get("LAMINA_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0 and not userns.IN_USER_NAMESPACE:
        return Path("/var/lib/lamina")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "lamina"


def default_snapshotter_socket() -> Path:
    """``lamina snapshotter``'s socket without ``--socket``: in a user namespace, under
    ``$XDG_RUNTIME_DIR`` (as rootless containerd keeps its own), else in ``/run/lamina``."""
    from lamina.frontends.containerd import server

    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if userns.IN_USER_NAMESPACE and runtime:
        return Path(runtime) / "lamina" / "snapshotter.sock"
    return Path(server.DEFAULT_SOCKET)


# --- progress ----------------------------------------------------------------------


# --- commands ----------------------------------------------------------------------

Command = Callable[[Driver, argparse.Namespace], Result]


def cmd_status(drv: Driver, args: argparse.Namespace) -> Result:
    """``status``: the backend and its status pairs."""
    pairs = drv.status()
    lines = [f"Backend: {drv.name}"] + [f"{key}: {value}" for key, value in pairs]
    if not any(key == "Home" for key, _ in pairs):
        lines.insert(0, f"Home: {args.home}")
    snaps = _snapshots_by_layer(drv)
    if snaps:
        count = sum(len(v) for v in snaps.values())
        pairs = [*pairs, ("Snapshots", f"{count} (containerd's, through `lamina snapshotter`)")]
        lines.append(f"Snapshots: {count}")
    doc = {"home": str(args.home), "backend": drv.name, "status": [list(p) for p in pairs]}
    return Result(doc, lines)


def cmd_create(drv: Driver, args: argparse.Namespace) -> Result:
    """``create``: a read-only layer, or with ``--rw`` a writable one."""
    opts = dict(args.storage_opts) or None
    if args.rw:
        drv.create_rw(args.id, args.parent, mount_label=args.mount_label, storage_opts=opts)
    else:
        drv.create(args.id, args.parent, storage_opts=opts)
    return Result({"id": args.id, "parent": args.parent, "rw": args.rw}, [args.id])


def cmd_apply(drv: Driver, args: argparse.Namespace) -> Result:
    """``apply``: apply a layer tar (plain, gzip or zstd) into a layer; print its size."""
    with contextlib.ExitStack() as stack:
        if args.file == "-":
            stream: BinaryIO = sys.stdin.buffer
        else:
            try:
                stream = stack.enter_context(open(args.file, "rb"))
            except OSError as e:
                raise errors.InvalidArgument(
                    f"cannot read it: {e.strerror or e}", path=args.file
                ) from e
        total = _regular_size(stream)
        with progress_bar(args.show_progress, f"apply {args.id}", total, stream) as counted:
            assert counted is not None
            size = drv.apply_diff(args.id, args.parent, counted)
    return Result({"id": args.id, "parent": args.parent, "size": size}, [str(size)])


def cmd_diff(drv: Driver, args: argparse.Namespace) -> Result:
    """``diff``: the layer's changes as a tar, to ``-o FILE`` or standard output."""
    written = 0
    with contextlib.ExitStack() as stack:
        if args.output is None:
            sys.stdout.flush()
            out: BinaryIO = sys.stdout.buffer
        else:
            out = stack.enter_context(_output_file(args.output))
        where = args.output or "standard output"
        with (
            progress_bar(args.show_progress, f"diff {args.id}", None),
            drv.diff(args.id, args.parent) as tar,
        ):
            while chunk := tar.read(CHUNK):
                _write(out, chunk, args.id, where)
                written += len(chunk)
        _write(out, b"", args.id, where)
    return Result({"id": args.id, "output": args.output, "bytes": written})


def cmd_changes(drv: Driver, args: argparse.Namespace) -> Result:
    """``changes``: one line a change, as ``docker diff`` prints them."""
    changes = drv.changes(args.id, args.parent)
    doc = {"changes": [{"path": c.path, "kind": c.kind.letter} for c in changes]}
    return Result(doc, [f"{c.kind.letter} {c.path}" for c in changes])


def cmd_diff_size(drv: Driver, args: argparse.Namespace) -> Result:
    """``diff-size``: bytes of the layer's changes."""
    size = drv.diff_size(args.id, args.parent)
    return Result({"size": size}, [str(size)])


def cmd_metadata(drv: Driver, args: argparse.Namespace) -> Result:
    """``metadata``: the backend's details of a layer (``dir``, overlay's dirs)."""
    meta = drv.metadata(args.id)
    return Result({"metadata": meta}, [f"{key}: {value}" for key, value in meta.items()])


def cmd_exists(drv: Driver, args: argparse.Namespace) -> Result:
    """``exists``: exit 0 when the layer exists, 1 when not."""
    found = drv.exists(args.id)
    return Result({"exists": found}, status=0 if found else 1)


def cmd_mount(drv: Driver, args: argparse.Namespace) -> Result:
    """``mount``: mount the layer's union view (it outlives the command); print its path."""
    path = drv.get(args.id, args.mount_label)
    return Result({"path": str(path)}, [str(path)])


def cmd_unmount(drv: Driver, args: argparse.Namespace) -> Result:
    """``unmount``: give one ``mount`` back; the last one unmounts."""
    drv.put(args.id)
    return Result({"id": args.id})


def cmd_rm(drv: Driver, args: argparse.Namespace) -> Result:
    """``rm``: remove a layer (not one that others use as parent)."""
    drv.remove(args.id)
    return Result({"id": args.id})


def cmd_resize(drv: Driver, args: argparse.Namespace) -> Result:
    """``resize``: change a writable layer's size quota (never below what it uses)."""
    drv.resize(args.id, args.size)
    return Result({"id": args.id, "size": args.size})


def cmd_check(drv: Driver, args: argparse.Namespace) -> Result:
    """``check``: verify the store (metadata, chains, mounts, content); ``--repair`` fixes it."""
    from lamina.backends import check

    report = check.check(drv, repair=args.repair)
    if (drv.home / "image").is_dir():
        from lamina.image.store import ImageStore

        problems, repairs = ImageStore(drv, recover=False).check(repair=args.repair)
        report.problems += problems
        report.repairs += repairs
    lines = [f"problem: {p}" for p in report.problems]
    lines += [f"repaired: {r}" for r in report.repairs]
    ok = report.consistent
    if args.repair and not ok:
        ok = check.check(drv).consistent  # what is left after the repair
        if ok and (drv.home / "image").is_dir():
            from lamina.image.store import ImageStore

            ok = not ImageStore(drv, recover=False).check()[0]
    lines.append(f"{report.layers} layers, {len(report.problems)} problems"
                 + (f", {len(report.repairs)} repairs" if args.repair else "")
                 + ("" if ok else " (store inconsistent)"))
    data = {"layers": report.layers, "problems": report.problems, "repairs": report.repairs,
            "consistent": ok}
    return Result(data, lines, status=0 if ok else 1)


def cmd_df(drv: Driver, args: argparse.Namespace) -> Result:
    """``df``: each layer's own bytes, disk use and inodes (counters kept at apply time)."""
    from lamina.backends import df as store_usage

    usage, orphans = store_usage.df(drv)
    table = [["ID", "PARENT", "BYTES", "DISK", "INODES", "SOURCE"]]
    broken = []
    for u in usage:
        if u.broken is not None:
            table.append([u.id, "?", "?", "?", "?", "broken"])
            broken.append(f"broken: {_printable(_one_line(u.broken))} (lamina check says more)")
            continue
        table.append([u.id, u.parent or "-", human_size(u.bytes), human_size(u.disk),
                      str(u.inodes), "walked (writable)" if u.live else "counters"])
    lines = _columns(table) + broken + [f"orphan: {_printable(o)}" for o in orphans]
    rows = [{k: v for k, v in vars(u).items() if k != "broken" or v is not None}
            for u in usage]
    data = {"layers": rows, "orphans": orphans,
            "total_bytes": sum(u.bytes for u in usage), "total_disk": sum(u.disk for u in usage)}
    return Result(data, lines)


def _identity_fields(drv: Driver, layer: str) -> dict[str, Any]:
    """What a lamina store records of a layer's content (for ``ls --json``): its format
    and diff id, and ``sealed`` for a containerd snapshot written through its mounts (a
    layer lamina applied, by any front end or its differ, has a diff id instead)."""
    from lamina.backends.contract import Backend

    if not isinstance(drv, Backend):
        return {}
    try:
        meta = drv.record(layer)
    except errors.LaminaError:
        return {}  # removed since it was listed, or damaged: shown as ls shows it
    return {"format": meta.format.value, "diff_id": meta.identity.diff_id,
            "sealed": meta.sealed}


def cmd_ls(drv: Driver, args: argparse.Namespace) -> Result:
    """``ls``: every layer with its parent, size and mount count, and the containerd
    snapshots (keys and names) that use it."""
    rows: list[dict[str, Any]] = []
    named = _snapshots_by_layer(drv)
    table = [["ID", "PARENT", "SIZE", "MOUNTS", *(["SNAPSHOTS"] if named else [])]]
    broken: list[str] = []
    for layer in sorted(drv.layers()):
        try:
            parent, size, mounts = drv.parent(layer), drv.size(layer), drv.mount_count(layer)
        except errors.NotFound:
            continue  # removed since it was listed
        except errors.LaminaError as e:  # a damaged layer: shown as such, the others listed
            why = _one_line(str(e))
            rows.append({"id": layer, "parent": None, "size": None, "mounts": None,
                         "broken": why})
            table.append([layer, "?", "?", "?", *(["-"] if len(table[0]) > 4 else [])])
            broken.append(f"broken: {_printable(why)} (lamina check says more)")
            continue
        snaps = named.pop(layer, [])
        row: dict[str, Any] = {"id": layer, "parent": parent, "size": size, "mounts": mounts}
        row.update(_identity_fields(drv, layer))
        if snaps:
            row["snapshots"] = [{"name": n, "kind": k} for n, k in snaps]
        rows.append(row)
        shown = ", ".join(f"{_printable(n)} ({k})" for n, k in snaps) or "-"
        table.append([layer, parent or "-", human_size(size), str(mounts),
                      *([shown] if len(table[0]) > 4 else [])])
    views = [{"name": n, "kind": k} for n, k in named.pop(None, [])]
    lines = _columns(table) + broken
    if views:
        lines.append("views without a layer of their own: "
                     + ", ".join(_printable(v["name"]) for v in views))
    doc: dict[str, Any] = {"layers": rows}
    if views:
        doc["views"] = views
    return Result(doc, lines)


def _snapshots_by_layer(drv: Driver) -> dict[str | None, list[tuple[str, str]]]:
    """The containerd snapshots of the home, by the layer each uses (None: a view)."""
    from lamina.frontends.containerd import records as snapshots

    if not (drv.home / "snapshots" / "records").is_dir():
        return {}
    out: dict[str | None, list[tuple[str, str]]] = {}
    records = snapshots.SnapshotRecords(drv.home, serve=False)
    for rec in sorted(records.by_name.values(), key=lambda r: r.name):
        out.setdefault(rec.layer, []).append((rec.name, rec.kind))
    return out


def cmd_cleanup(drv: Driver, args: argparse.Namespace) -> Result:
    """``cleanup``: unmount what this store mounted and sweep leftovers."""
    drv.cleanup()
    return Result({"cleanup": True})


def cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: Docker's graph driver plugin on a unix socket
    (:mod:`lamina.frontends.docker.plugin`).

    It opens its store when Docker calls ``Init`` (the home Docker names, unless
    ``--home`` was given) and runs until SIGTERM or SIGINT.
    """
    from lamina.frontends.docker import plugin

    return plugin.serve(args.socket or plugin.DEFAULT_SOCKET, home=args.home, backend=args.backend,
                        options=args.driver_opts, verbose=args.verbose)


def cmd_snapshotter(drv: Driver, args: argparse.Namespace) -> Result:
    """``snapshotter``: containerd's snapshot API on a unix socket, until SIGTERM or SIGINT
    (:mod:`lamina.frontends.containerd.server`)."""
    from lamina.backends.contract import Backend
    from lamina.frontends.containerd import server

    if not isinstance(drv, Backend):
        raise errors.Unsupported(f"backend {drv.name} cannot serve containerd snapshots")
    socket = str((args.socket or default_snapshotter_socket()).absolute())
    if args.print_containerd_config:
        from lamina.frontends.containerd import config

        major = config.containerd_major()
        text = config.config_text(major or 2, socket, str(drv.home), config.host_platform(),
                                  remap_ids=not userns.IN_USER_NAMESPACE)
        head = (f"# for containerd {major}.x (containerd --version)" if major else
                "# for containerd 2.x (no containerd found on PATH)")
        return Result({"containerd_major": major or 2, "config": text},
                      [head, *text.splitlines()])
    status = server.serve(drv, socket, verbose=args.verbose,
                          containerd_address=str(args.containerd_address))
    return Result({"snapshotter": "stopped"}, status=status)


# --- parsing -----------------------------------------------------------------------


def _key_value(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _storage_opt(text: str) -> tuple[str, str]:
    key, _, value = _key_value(text).partition("=")
    return key, value


class _CommandParser(argparse.ArgumentParser):
    """A command's parser that lets options and operands mix in any order.

    Plain argparse cannot parse ``apply ID --parent P FILE``: an optional operand
    (``FILE``) after an option is refused.  Intermixed parsing takes it.
    """

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing:  # parse_known_intermixed_args calls back here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lamina`` and its commands."""
    parser = argparse.ArgumentParser(
        prog="lamina",
        description="A container-layer storage driver (Docker's graph driver contract).",
    )
    parser.add_argument(
        "--home",
        metavar="DIR",
        default=None,
        help="the store's directory (default: $LAMINA_HOME, else /var/lib/lamina for root, "
        "else $XDG_DATA_HOME/lamina)",
    )
    parser.add_argument(
        "--backend", metavar="NAME", default="auto", help="overlay, vfs, … (default: auto)"
    )
    parser.add_argument(
        "--opt",
        dest="driver_opts",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        default=[],
        help="a driver option, e.g. vfs.copy=copy (repeatable)",
    )
    # --json is accepted before or after the command; SUPPRESS keeps the
    # subcommand's default from overwriting a --json given before it.
    json_flag = _CommandParser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--version", action="version", version=f"lamina {lamina.__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    def command(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[json_flag])
        p.set_defaults(func=func)
        return p

    def layer(p: argparse.ArgumentParser, parent: bool = False) -> None:
        p.add_argument("id", metavar="ID", help="the layer's id")
        if parent:
            p.add_argument("--parent", metavar="P", default=None, help="the parent layer")

    command("status", cmd_status, "show the backend and its status")

    p = command("create", cmd_create, "create a layer (read-only, or writable with --rw)")
    layer(p, parent=True)
    p.add_argument("--rw", action="store_true", help="a writable (container) layer")
    p.add_argument(
        "--opt",
        dest="storage_opts",
        metavar="KEY=VALUE",
        type=_storage_opt,
        action="append",
        default=[],
        help="a storage option, e.g. size=50M with --rw (repeatable)",
    )
    p.add_argument("--mount-label", default="", metavar="L", help="SELinux label (with --rw)")

    p = command("apply", cmd_apply, "apply a layer tar (plain, gzip or zstd); print its size")
    layer(p, parent=True)
    p.add_argument("file", metavar="FILE", nargs="?", default="-", help="the tar (- for stdin)")

    p = command("diff", cmd_diff, "write the layer's changes as a tar")
    layer(p, parent=True)
    p.add_argument("-o", "--output", metavar="FILE", default=None, help="(default: stdout)")

    p = command("changes", cmd_changes, "list the layer's changes (A, C, D) like docker diff")
    layer(p, parent=True)
    p = command("diff-size", cmd_diff_size, "print the size of the layer's changes in bytes")
    layer(p, parent=True)
    layer(command("metadata", cmd_metadata, "print the backend's details of the layer"))
    layer(command("exists", cmd_exists, "exit 0 if the layer exists, 1 if not"))

    p = command("mount", cmd_mount, "mount the layer's union view and print its path")
    layer(p)
    p.add_argument("--mount-label", default="", metavar="L", help="SELinux label")
    layer(command("unmount", cmd_unmount, "give back one mount; the last one unmounts"))
    layer(command("rm", cmd_rm, "remove the layer"))
    p = command("check", cmd_check, "verify the store; exit 1 if it is inconsistent")
    p.add_argument("--repair", action="store_true", help="remove or fix what is broken")
    command("df", cmd_df, "each layer's bytes, disk use and inodes, and the orphans")
    p = command("resize", cmd_resize, "change a writable layer's size quota (e.g. 100M)")
    layer(p)
    p.add_argument("size", metavar="SIZE", help="the new quota, in Docker's units (50M, 1.5GB)")
    command("ls", cmd_ls, "list every layer with its parent, size and mount count")
    command("cleanup", cmd_cleanup, "unmount everything and sweep leftovers")

    p = command("snapshotter", cmd_snapshotter,
                "serve containerd's snapshot API (a proxy plugin) on a unix socket")
    p.add_argument("--socket", metavar="PATH", type=Path, default=None,
                   help="the unix socket (default: /run/lamina/snapshotter.sock; in a user "
                        "namespace $XDG_RUNTIME_DIR/lamina/snapshotter.sock)")
    p.add_argument("--containerd-address", metavar="PATH", type=Path,
                   default=Path("/run/containerd/containerd.sock"),
                   help="containerd's socket, whose content store the differ reads blobs "
                        "from (default: /run/containerd/containerd.sock)")
    p.add_argument("--print-containerd-config", action="store_true",
                   help="print the config.toml lines the containerd on PATH needs, and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log every call")

    image_cli.add_commands(sub, json_flag)

    # serve opens its store itself (when Docker calls Init): main() runs it apart.
    about = "answer Docker's graph driver plugin protocol on a unix socket"
    p = sub.add_parser("serve", help=about, description=about)
    p.add_argument("--socket", metavar="PATH", type=Path, default=None,
                   help="the unix socket (default: /run/docker/plugins/lamina.sock; Docker "
                   "knows the plugin by the socket's name)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every call")
    return parser


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What makes a parsed command line unusable, checked before the store is opened."""
    if args.command == "image":
        return image_cli.usage_problem(args)
    if args.command == "create" and args.mount_label and not args.rw:
        return "create: --mount-label needs --rw"
    if (args.command == "apply" and args.file == "-" and sys.stdin is not None
            and sys.stdin.isatty()):
        return "apply: refusing to read a layer tar from a terminal; give FILE or pipe one in"
    if args.command == "diff" and args.output is None:
        if args.json:
            return "diff: --json needs -o FILE (standard output holds the JSON document)"
        if sys.stdout is not None and sys.stdout.isatty():
            return "diff: refusing to write a tar to a terminal; use -o FILE or redirect"
    return None


QUIET = frozenset({"exists", "unmount", "rm", "cleanup", "serve", "snapshotter"})
"""The commands that print nothing on standard output (without ``--json``)."""


def _refusal(args: argparse.Namespace) -> errors.LaminaError | None:
    """Why the command cannot run here (an argument or a closed standard stream), before
    anything is read or written; a ``lamina: …`` line, exit 1."""
    problem = userns.why_not_privileged()  # every command keeps or reads a store
    if problem is not None:
        return errors.Unsupported(problem)
    if args.home is not None and not str(args.home).strip():
        return errors.InvalidArgument("--home: an empty path names no store (give a "
                                      "directory, or leave --home out for the default)")
    if args.command == "apply" and args.file == "-" and sys.stdin is None:
        return errors.InvalidArgument("standard input is closed; give FILE or pipe a "
                                      "layer tar in", layer=args.id)
    if sys.stdout is None and (args.json or args.command not in QUIET) and not (
            args.command == "diff" and args.output is not None):
        return errors.InvalidArgument(f"{args.command}: standard output is closed; it "
                                      "prints its result there")
    return None


def _open_std_streams() -> None:
    """Put ``/dev/null`` on standard descriptors the caller closed (``<&-``, ``>&-``), so
    that no file the store opens lands on them (and reaches a child as its stdout)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # pragma: no cover - the lowest free descriptor is fd
                os.dup2(null, fd)
                os.close(null)


def _emit(text: str) -> None:
    """Print ``text`` on standard output; a failed write (a full disk) is one error."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise errors.InvalidArgument(
            f"cannot write to standard output: {e.strerror or e}") from None


def _fail(args: argparse.Namespace, message: str, kind: str, *, named: bool) -> None:
    """Report a failed command: one line ``lamina: …`` on standard error (control
    characters escaped), and with ``--json`` the document ``{"error", "kind"}`` on
    standard output.  ``named``: the message names its layer already, or is about no
    layer (else the command's layer is named)."""
    message = _one_line(message)
    command_layer = getattr(args, "id", None)
    if not named and isinstance(command_layer, str) and command_layer:
        sep = "," if message.startswith("path ") else ":"  # as LaminaError puts them
        message = f"layer {command_layer}{sep} {message}"
    if getattr(args, "json", False) and sys.stdout is not None:
        with contextlib.suppress(OSError, ValueError):
            print(json.dumps({"error": message, "kind": kind}))
            sys.stdout.flush()
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(f"lamina: {_printable(message)}", file=sys.stderr)
            sys.stderr.flush()
    _discard_stdout()


def _discard_stdout() -> None:
    """After a failure: drop what standard output still buffers and cannot take (a
    full disk, a reader gone), so that the interpreter's last flush fails no more."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)


def _os_message(e: OSError) -> str:
    """An ``OSError`` the environment caused (a full disk, an unwritable directory) as
    one line: what failed and on what."""
    text = e.strerror or str(e)
    # A path, or (for a file opened from a descriptor) an int that names nothing.
    if isinstance(e.filename, (str, bytes, os.PathLike)):
        text = f"{text}: {os.fsdecode(e.filename)}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lamina`` with ``argv`` (default: the process's arguments); return the exit status."""
    _open_std_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _usage_problem(args)
    if problem:
        parser.error(problem)
    serving = args.command == "serve"  # it opens its store when Docker calls Init
    args.show_progress = (not args.json and sys.stderr is not None and sys.stderr.isatty())
    try:
        refused = _refusal(args)
        if refused is not None:
            _fail(args, str(refused), type(refused).__name__, named=True)
            return refused.exit_code
        if args.home is not None:
            args.home = Path(args.home)
        if serving:
            return cmd_serve(args)
        if args.home is None:
            args.home = default_home()
        with lamina.open_driver(args.home, backend=args.backend, options=args.driver_opts) as drv:
            image_cli.recover(drv)
            result: Result = args.func(drv, args)
        if args.json:
            _emit(json.dumps(result.doc))
        elif result.lines:
            _emit("\n".join(result.lines))
    except errors.LaminaError as e:
        _fail(args, str(e), type(e).__name__, named=e.layer is not None)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``lamina diff x | head``): say nothing more to it, and
        # keep the interpreter's final flush from failing again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        # The environment, not lamina's input (a full disk, an unwritable directory of
        # the home): one line all the same, naming the layer.
        _fail(args, _os_message(e), type(e).__name__, named=False)
        return 1
    return result.status
