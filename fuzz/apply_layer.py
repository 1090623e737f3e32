"""An atheris (libFuzzer) target for lamina's tar engine writing a layer (needs root).

Each input is decompressed as ``apply_diff`` does and applied in-process
(:class:`~lamina.archive.apply.Applier`) into a fresh directory on a tmpfs, over a
lower layer whose symlinks point out of it (the first byte picks plain or
overlay-style whiteouts); then the directory is removed.  Allowed: a ``LaminaError``.
A finding: any other exception, or a change to anything outside the directory (a
sentinel beside it, the lower layer), checked after every input.

    .venv/bin/python fuzz/apply_layer.py -seeds fuzz/corpus-apply
    .venv/bin/python fuzz/apply_layer.py fuzz/corpus-apply -max_total_time=600 \\
        -max_len=65536 -rss_limit_mb=2048 -timeout=20 -print_final_stats=1
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["lamina"]):
    from lamina.archive import codecs
    from lamina.archive.apply import Applier
    from lamina.errors import LaminaError

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fuzz.tar_reader import write_seeds

# libFuzzer ends the process with exit(): nothing of Python's runs after it, so each run
# sweeps the work directories of runs that are gone ($LAMINA_FUZZ_WORK, else /dev/shm).
_WORK_IN = os.environ.get("LAMINA_FUZZ_WORK") or (
    "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
_work = os.path.join(_WORK_IN, f"lamina-fuzz-{os.getpid()}")
SENTINEL = os.path.join(_work, "outside")
LOWER = os.path.join(_work, "lower")


def _sweep() -> None:
    for name in os.listdir(_WORK_IN):
        pid = name.removeprefix("lamina-fuzz-")
        if name.startswith("lamina-fuzz-") and pid.isdigit() and not os.path.exists(
                f"/proc/{pid}"):
            shutil.rmtree(os.path.join(_WORK_IN, name), ignore_errors=True)


def _setup() -> None:
    shutil.rmtree(_work, ignore_errors=True)
    os.makedirs(os.path.join(SENTINEL, "dir"))
    with open(os.path.join(SENTINEL, "file"), "w") as f:
        f.write("sentinel")
    os.makedirs(os.path.join(LOWER, "usr/lib"))
    with open(os.path.join(LOWER, "usr/lib/libc.so"), "w") as f:
        f.write("libc")
    os.symlink("usr/lib", os.path.join(LOWER, "lib"))
    os.symlink(SENTINEL, os.path.join(LOWER, "evil"))
    os.symlink("../../../../../../../../" + SENTINEL.lstrip("/"), os.path.join(LOWER, "up"))


def _picture() -> list[tuple[str, int, int, int]]:
    out = []
    for top in (SENTINEL, LOWER):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [".", *dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                out.append((path, st.st_mode, st.st_ctime_ns, st.st_mtime_ns))
    return sorted(out)


_BEFORE: list[tuple[str, int, int, int]] = []
_count = 0


def TestOneInput(data: bytes) -> None:
    global _count
    if not data:
        return
    _count += 1
    root = os.path.join(_work, f"layer{_count}")
    os.mkdir(root)
    overlay = bool(data[0] & 1)
    try:
        stream, _ = codecs.decompressed(io.BytesIO(data[1:]))
        Applier(root, layer="fuzz", overlay_whiteouts=overlay, lowers=[LOWER],
                max_path=3000).apply(stream)
    except LaminaError:
        pass
    finally:
        shutil.rmtree(root)
    if _picture() != _BEFORE:
        raise AssertionError("something outside the layer changed")


def _hostile_seeds(where: str) -> None:
    """Tars that go for the lower layer's symlinks, the sentinel and the root."""
    from tests import tarbuild as tb

    seeds = {
        "through-lower-symlinks": [tb.file("evil/file", b"x"), tb.file("up/file", b"x"),
                                   tb.file("lib/new.so", b"n"), tb.directory("evil/d")],
        "links-out": [tb.hardlink("h1", "evil/file"), tb.hardlink("h2", "usr/lib/libc.so"),
                      tb.hardlink("h3", "../outside/file")],
        "whiteouts-through": [tb.whiteout("evil/file"), tb.opaque("up"),
                              tb.whiteout("lib/libc.so"), tb.opaque("usr")],
        "swap": [tb.directory("d"), tb.file("d/a", b"a"), tb.symlink("d", "/evil"),
                 tb.file("d/file", b"x")],
        "root-symlink": [tb.symlink(".", "/evil"), tb.file("file", b"x")],
        "link-to-symlink": [tb.symlink("s", "/evil/file"), tb.hardlink("hl", "s"),
                            tb.file("hl", b"x", mode=0o777)],
    }
    for name, entries in seeds.items():
        data = tb.build(entries)
        for style in (b"\0", b"\1"):
            with open(os.path.join(where, f"{name}.{style[0]}"), "wb") as f:
                f.write(style + data)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "-seeds":
        write_seeds(sys.argv[2])
        for name in os.listdir(sys.argv[2]):  # the first byte picks the whiteout style
            path = os.path.join(sys.argv[2], name)
            with open(path, "rb") as f:
                data = f.read()
            for style in (b"\0", b"\1"):
                with open(f"{path}.{style[0]}", "wb") as f:
                    f.write(style + data)
            os.unlink(path)
        _hostile_seeds(sys.argv[2])
        return
    _sweep()
    _setup()
    _BEFORE.extend(_picture())
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
