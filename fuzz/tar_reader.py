"""An atheris (libFuzzer) target for lamina's tar reader and the decompressors in front of it.

Each input goes through what ``apply_diff`` does before writing anything: the
compression is sniffed (gzip, zstd, xz, bzip2 or none) and undone, and the tar is
read member by member, each member's data with it.  The only exception allowed
is :class:`~lamina.errors.UnsafeArchive`; anything else, a hang or a memory blow-up
is a finding.

    .venv/bin/python fuzz/tar_reader.py -seeds fuzz/corpus      # write the seed corpus
    .venv/bin/python fuzz/tar_reader.py fuzz/corpus -max_total_time=600 \\
        -max_len=65536 -rss_limit_mb=2048 -timeout=20 -print_final_stats=1

``tests/security/test_fuzz.py`` runs it for a bounded number of inputs in CI.
"""

from __future__ import annotations

import io
import os
import sys

import atheris

with atheris.instrument_imports(include=["lamina"]):
    from lamina.archive import codecs, reader
    from lamina.errors import UnsafeArchive

DATA_LIMIT = 1 << 20  # bytes of one member's data read into memory; the rest is skipped
_sink = os.open(os.devnull, os.O_WRONLY)


def TestOneInput(data: bytes) -> None:
    try:
        stream, _ = codecs.decompressed(io.BytesIO(data))
        tar = reader.TarReader(stream)
        for entry in tar:
            if entry.data_size <= DATA_LIMIT:
                tar.read_data(entry, DATA_LIMIT)
            elif entry.sparse is None:
                tar.copy_data(entry, _sink)
    except UnsafeArchive:
        pass


def write_seeds(where: str) -> None:
    """A seed corpus: small tars of every format the reader knows, plain and compressed."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gzip
    import lzma
    import tarfile

    import zstandard

    from tests import tarbuild as tb

    entries = [
        tb.directory("etc"), tb.file("etc/motd", b"hello\n", uid=1000, mtime=1.5),
        tb.symlink("lib", "usr/lib"), tb.hardlink("etc/motd2", "etc/motd"),
        tb.fifo("fifo"), tb.chardev("null", 1, 3), tb.whiteout("etc/old"), tb.opaque("var"),
        tb.file("cap", b"", xattrs={"security.capability": tb.CAP_NET_RAW}),
        tb.file("long/" + "n" * 120, b"long name"), tb.symlink("ll", "t" * 150),
    ]
    seeds = {
        "pax": tb.build(entries),
        "gnu": tb.build(entries, format=tarfile.GNU_FORMAT),
        "ustar": tb.build(entries[:6], format=tarfile.USTAR_FORMAT),
        "gnu-sparse": tb.raw_gnu_sparse("s", [(0, b"a" * 512), (4096, b"b")], 8192) + tb.END,
        "pax-sparse-1.0": tb.raw_pax_sparse_1_0("s", [(0, b"a" * 512), (8192, b"b")],
                                                9000) + tb.END,
        "pax-sparse-0.1": tb.raw_pax_sparse_0_1("s", [(512, b"c")], 4096) + tb.END,
        "gnu-long": tb.raw_gnu_long("x" * 300) + tb.raw_member("short", b"d") + tb.END,
        "pax-global": tb.raw_pax({"comment": "c"}, type=tarfile.XGLTYPE)
        + tb.raw_member("g", b"g") + tb.END,
        "empty": b"",
    }
    plain = seeds["pax"]
    seeds["gzip"] = gzip.compress(plain, mtime=0)
    seeds["gzip-members"] = tb.gzipped(plain, members=3)
    seeds["zstd"] = zstandard.ZstdCompressor().compress(plain)
    seeds["zstd-frames"] = tb.zstd_compressed(plain, frames=3)
    seeds["xz"] = lzma.compress(plain)
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
