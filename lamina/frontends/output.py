"""What the ``lamina`` command shows: a command's :class:`Result` as text or JSON,
tables, sizes, names made safe for a terminal, the progress bar, and output files
written so that a full disk is one clear error."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import lamina
import lamina.progress
from lamina import errors

CHUNK = 1 << 20
"""How much of a diff stream is copied at a time."""

@dataclass
class Result:
    """What a command hands back to :func:`main` to print."""

    doc: Any = field(default_factory=dict)
    """The ``--json`` document."""
    lines: list[str] = field(default_factory=list)
    """The text printed without ``--json``."""
    status: int = 0


def byte_progress(*texts: str, elapsed: bool = True, remaining: bool = True) -> Any:
    """A rich ``Progress`` on standard error for a transfer of bytes: the description, a
    bar, bytes done against the total and the rate, then ``texts`` (``TextColumn``
    formats), the time elapsed and the time left."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn(),
                                     DownloadColumn(), TransferSpeedColumn(),
                                     *(TextColumn(t) for t in texts)]
    if elapsed:
        columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True))


@contextlib.contextmanager
def progress_bar(
    enabled: bool, label: str, total: int | None, source: BinaryIO | None = None
) -> Iterator[BinaryIO | None]:
    """Show progress on standard error: the bytes of ``source`` read (an apply's input
    file, compressed or not, against its size ``total``, with the time left), else the
    engine's tar bytes; and the tar entries done.  Yields ``source`` wrapped so that
    its reads are counted (``source`` itself when the bar is off)."""
    if not enabled:
        yield source
        return
    with byte_progress("{task.fields[entries]} entries", remaining=total is not None) as bar:
        task = bar.add_task(label, total=total, entries=0)
        entries = [0]
        tar_bytes = [0]

        def report(nbytes: int, nentries: int) -> None:
            entries[0] += nentries
            if source is None:  # no input file: the engine's bytes are the progress
                tar_bytes[0] += nbytes
                bar.update(task, completed=tar_bytes[0], entries=entries[0])
            else:
                bar.update(task, entries=entries[0])

        def read(nbytes: int) -> None:
            bar.update(task, advance=nbytes)

        counted = None if source is None else lamina.progress.counted(source, read)
        with lamina.progress.reporting(report):
            yield counted
        if total is not None:
            bar.update(task, completed=total)


def _regular_size(stream: BinaryIO) -> int | None:
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _write(out: BinaryIO, data: bytes, layer: str, where: str) -> None:
    """Write ``data`` to ``out`` (flush it, for no data); a failed write (a full disk,
    a closed pipe's reader aside) is an ``InvalidArgument`` naming the layer and where."""
    try:
        if data:
            out.write(data)
        else:
            out.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise errors.InvalidArgument(f"cannot write the tar to {where}: {e.strerror or e}",
                                     layer=layer) from None


@contextlib.contextmanager
def _output_file(path: str) -> Iterator[BinaryIO]:
    """``path`` opened for writing; removed again if the command fails, when it is a
    regular file (never a device such as ``/dev/full``, a pipe or a link to one)."""
    try:
        f = open(path, "wb")  # noqa: SIM115
    except OSError as e:
        raise errors.InvalidArgument(f"cannot write it: {e.strerror or e}", path=path) from e
    failed = True
    try:
        st = os.fstat(f.fileno())
        yield f
        try:
            f.close()
        except OSError as e:
            raise errors.InvalidArgument(f"cannot write it: {e.strerror or e}",
                                         path=path) from None
        failed = False
    finally:
        if failed:
            with contextlib.suppress(OSError):
                f.close()  # what it still buffers cannot be written either
            with contextlib.suppress(OSError):
                at = os.lstat(path)
                if stat.S_ISREG(at.st_mode) and (at.st_dev, at.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(path)


def _printable(text: str) -> str:
    """``text`` with control characters (and undecodable bytes) escaped, for a terminal;
    the rest as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _one_line(text: str) -> str:
    """``text`` on one line, whatever it holds."""
    return " ".join(text.split())


def human_size(size: int) -> str:
    """``size`` bytes with decimal units and three significant digits, as ``docker`` shows."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if float(f"{value:.3g}") < 1000:
            return f"{value:.3g}{unit}"
        value /= 1000
    return f"{value:.3g}PB"


def _columns(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
