"""An atheris (libFuzzer) target for the EROFS indexer (lamina.archive.erofstar).

Each input is taken as an uncompressed layer tar and indexed into an EROFS metadata
image (written to a memfd, nothing mounted: tests/archive/test_erofs.py mounts what
its fuzzing finds).  The only exceptions allowed are
:class:`~lamina.errors.UnsafeArchive` and :class:`~lamina.errors.Unsupported`;
anything else, a hang or a memory blow-up is a finding.

    .venv/bin/python fuzz/erofs_index.py -seeds fuzz/erofs-corpus      # the seed corpus
    .venv/bin/python fuzz/erofs_index.py fuzz/erofs-corpus -max_total_time=600 \\
        -max_len=65536 -rss_limit_mb=2048 -timeout=20 -print_final_stats=1
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import atheris

with atheris.instrument_imports(include=["lamina"]):
    from lamina.archive.erofstar import index_tar
    from lamina.errors import UnsafeArchive, Unsupported

_image = os.fdopen(os.memfd_create("erofs-fuzz"), "w+b")


def TestOneInput(data: bytes) -> None:
    _image.truncate(0)
    with contextlib.suppress(UnsafeArchive, Unsupported):
        index_tar(io.BytesIO(data), _image)


def write_seeds(where: str) -> None:
    """A seed corpus: layer tars of every kind of member the indexer takes."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tarfile

    from tests import tarbuild as tb

    entries = [
        tb.directory("etc"), tb.file("etc/motd", b"hello\n", uid=70000),
        tb.symlink("lib", "usr/lib"), tb.file("lib/x", b"via the link"),
        tb.hardlink("etc/motd2", "etc/motd"), tb.fifo("fifo"), tb.chardev("null", 1, 3),
        tb.whiteout("etc/old"), tb.opaque("var"), tb.file("var/a", b"a"),
        tb.file("cap", b"", xattrs={"security.capability": tb.CAP_NET_RAW, "user.x": b"y"}),
        tb.file("long/" + "n" * 120, b"long name"), tb.symlink("ll", "t" * 600),
        tb.file("etc", b"a file over a directory"), tb.directory("etc"),
    ]
    seeds = {
        "pax": tb.build(entries),
        "gnu": tb.build(entries, format=tarfile.GNU_FORMAT),
        "many": tb.build([tb.file(f"d/{i:04d}", b"") for i in range(200)]),
        "gnu-sparse": tb.raw_gnu_sparse("s", [(0, b"a" * 512), (4096, b"b")], 8192) + tb.END,
        "empty": b"",
    }
    os.makedirs(where, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(where, name), "wb") as f:
            f.write(data)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "-seeds":
        write_seeds(sys.argv[2])
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
