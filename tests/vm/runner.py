"""Boots Debian's kernels under qemu and runs suites of lamina's tests inside them.

    python -m tests.vm.runner [--kernel 6.1] [--kernel 6.12] [--suite quota] [-v]

For each kernel:

1. **Fetch.** ``apt-get download`` of ``linux-image-<abi>-amd64`` into the cache
   (``$LAMINA_VM_CACHE``, default ``/var/tmp/lamina-vm``), never installed.  apt runs on
   a private configuration and state in the cache (its own ``sources.list`` naming
   bookworm, bookworm-security and bookworm-backports from deb.debian.org, signed by
   the host's ``debian-archive-keyring``; its own lists and package cache), so the
   host's apt sources and state are not touched and backports need not be in them.
   The version is the newest ``linux-image-amd64`` of the series (6.1 from bookworm or
   its security updates, 6.12 from backports); the metadata is refreshed once a day,
   and with no network a kernel already in the cache is used.
2. **Extract.** ``dpkg-deb -x`` once per package: ``vmlinuz`` and the modules.
3. **Initramfs.** Busybox (static), the modules the tests need with what they depend on
   (read from each module's ``.modinfo``, since the package has no ``modules.dep``;
   ``.ko.xz`` decompressed), an ``/init`` that mounts the host's root read-only over 9p,
   tmpfs on ``/tmp``, ``/var/tmp`` and ``/run``, and ``switch_root``s into it to run the
   guest script (:func:`guest_script`) with the host's own bash, mkfs, Python and .venv.
4. **Boot.** qemu (TCG, one CPU: with two the 6.12 kernel sometimes hangs) with two
   raw scratch disks made on the host: xfs (mounted ``pquota``) and ext4
   ``-O project,quota`` (mounted ``prjquota``).  The guest prints ``lamina status`` of a
   store on each, runs the suites and powers off; everything comes back over the
   serial console, between ``@@vm`` marker lines that :func:`parse` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LAMINA_VM_CACHE") or "/var/tmp/lamina-vm")
MIRROR = "http://deb.debian.org"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SOURCES = [
    f"deb [signed-by={KEYRING}] {MIRROR}/debian bookworm main",
    f"deb [signed-by={KEYRING}] {MIRROR}/debian-security bookworm-security main",
    f"deb [signed-by={KEYRING}] {MIRROR}/debian bookworm-backports main",
]
LISTS_MAX_AGE = 24 * 3600

KERNELS: dict[str, re.Pattern[str]] = {
    # series: the versions of linux-image-amd64 that belong to it
    "6.1": re.compile(r"^6\.1\.\d+-\d+$"),  # bookworm and bookworm-security
    "6.12": re.compile(r"^6\.12\.\d+-\d+~bpo12\+\d+$"),  # bookworm-backports
}

MODULES = [
    # what the guest needs, in load order where it matters (crc32c before libcrc32c's
    # users, which ask the crypto API for it at load time); built-in ones are skipped
    "crc32c_intel", "crc32c_generic", "crc32_pclmul",
    "virtio_pci", "virtio_blk", "9pnet_virtio", "9p",
    "loop", "quota_tree", "quota_v2", "overlay", "xfs", "ext4",
    # overlay's EROFS layers (its default where the kernel mounts them: 512-byte blocks
    # since 6.4, file-backed mounts since 6.12; status says what each kernel does)
    "erofs",
]

PQUOTA_STATUS = "project quotas"
"""What ``lamina status``'s Quota line starts with on a filesystem with project quotas."""

GUEST = "/run/lamina-vm"
"""The guest's working directory (tmpfs): the scratch mounts, the pytest temp dirs."""


@dataclasses.dataclass(frozen=True)
class Suite:
    """A pytest run inside the guest."""

    name: str
    args: tuple[str, ...]
    disk: str  # the scratch filesystem its temp dir is on: "xfs" or "ext4"
    drop_sys_resource: bool = False  # run as a container would (ext4 quotas need it)
    env: tuple[tuple[str, str], ...] = ()


DEEP_CHAIN_500 = "tests/backends/test_overlay.py::test_deep_chain_mounts_and_reads_every_layer"
SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        # Project quotas on xfs and ext4 (the tests make loop-backed filesystems of their
        # own on the scratch disk).  ext4 lets CAP_SYS_RESOURCE write past a project
        # quota, so the suite runs without it, as a container does.
        # The loop-image fallback (ext4-plain) runs on the host too and is the slowest
        # here (a third of the suite's time), so the VM leaves it out.
        Suite("quota", ("tests/quota", "-k", "not ext4-plain"), "xfs", drop_sys_resource=True),
        # The overlay backend's own tests, a chain of the deepest (tests/vm/
        # guest_deep_chain.py: 500 creates, where tests/backends' 500 applies take minutes
        # under TCG) and the contract suite on overlay but its crash and streaming
        # modules and, of test_apply, all but the whiteouts and opaque directories seen
        # through the union (the tar engine is not the kernel's business; the host runs
        # all of it), to fit CI's few minutes: through mount(2) with a lowerdir= string
        # on 6.1 (no lowerdir+; --legacy-mount forces it on 6.12).  Applies run
        # in-process (LAMINA_NOREEXEC=1): a Python started over 9p under TCG costs
        # seconds, and the isolated child's own tests run on the host.
        # With them, containerd's remap-ids on the snapshotter (tests/snapshotter/
        # test_idmap.py: idmapped EROFS and directory lowers, made by lamina there).
        Suite("overlay", ("tests/backends/test_overlay.py", "tests/vm/guest_deep_chain.py",
                          "tests/snapshotter/test_idmap.py",
                          *(f"tests/contract/test_{m}.py"
                            for m in ("apply", "changes", "diff", "lifecycle")),
                          "-k", "overlay and (not test_apply.py or whiteout or opaque)",
                          "--deselect", DEEP_CHAIN_500), "xfs",
              env=(("LAMINA_NOREEXEC", "1"),)),
        # The 500 applies, with the isolated child: not run by default.
        Suite("overlay-deep", (DEEP_CHAIN_500,), "xfs"),
    ]
}
DEFAULT_SUITES = ("quota", "overlay")


def say(msg: str) -> None:
    print(f"vm: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (fetching and extracting are shared by runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- fetching the kernels ------------------------------------------------------------


class Apt:
    """apt-get and apt-cache on a private configuration and state in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc"

    def options(self) -> list[str]:
        opts = {
            "Dir::Etc": self.etc,
            "Dir::Etc::sourcelist": self.etc / "sources.list",
            "Dir::Etc::sourceparts": self.etc / "sources.list.d",
            "Dir::Etc::preferences": self.etc / "preferences",
            "Dir::Etc::preferencesparts": self.etc / "preferences.d",
            "Dir::Etc::parts": self.etc / "apt.conf.d",
            "Dir::State": self.root / "state",
            "Dir::State::Lists": self.root / "lists",
            "Dir::State::status": "/var/lib/dpkg/status",
            "Dir::Cache": self.root / "cache",
            "APT::Architecture": "amd64",
            "Acquire::Languages": "none",
            "APT::Sandbox::User": "root",
            "Debug::NoLocking": "true",
        }
        return [arg for key, value in opts.items() for arg in ("-o", f"{key}={value}")]

    def setup(self) -> None:
        for d in ("etc/sources.list.d", "etc/preferences.d", "etc/apt.conf.d", "state",
                  "lists/partial", "cache/archives/partial"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.etc / "sources.list").write_text("\n".join(SOURCES) + "\n")

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        done = subprocess.run([tool, *self.options(), *args], cwd=cwd, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def update(self) -> None:
        """Refresh the package lists when they are missing or older than a day."""
        stamp = self.root / "lists" / ".updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
            return
        say("apt-get update (private lists: bookworm, bookworm-security, bookworm-backports)")
        self.run("apt-get", "-q", "update")
        stamp.touch()

    def versions(self, package: str) -> list[str]:
        out = self.run("apt-cache", "madison", package)
        return [line.split("|")[1].strip() for line in out.splitlines() if "|" in line]

    def depends(self, package: str, version: str) -> str:
        out = self.run("apt-cache", "show", f"{package}={version}")
        for line in out.splitlines():
            if line.startswith("Depends:"):
                return line.split(":", 1)[1].split(",")[0].split()[0]
        raise RuntimeError(f"{package}={version} has no Depends")


def _version_key(version: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", version)]


def fetch(series: str) -> Path:
    """The .deb of the newest ``linux-image-*-amd64`` of ``series``, downloaded if need be."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    apt = Apt(CACHE / "apt")
    with locked(CACHE / "apt.lock"):
        apt.setup()
        try:
            apt.update()
            candidates = [v for v in apt.versions("linux-image-amd64") if KERNELS[series].match(v)]
            if not candidates:
                raise RuntimeError(f"no linux-image-amd64 of the {series} series in {SOURCES}")
            version = max(candidates, key=_version_key)
            package = apt.depends("linux-image-amd64", version)
        except RuntimeError as e:
            cached = _cached(debs, series)
            if cached is None:
                raise
            say(f"apt failed ({e}); using {cached.name} from the cache")
            return cached
        name = f"{package}_{version.replace(':', '%3a')}_amd64.deb"
        if not (debs / name).exists():
            say(f"apt-get download {package}={version}")
            apt.run("apt-get", "-q", "download", f"{package}={version}", cwd=debs)
        return debs / name


def _cached(debs: Path, series: str) -> Path | None:
    pattern = re.compile(rf"^linux-image-{re.escape(series)}\.\d.*_amd64\.deb$")
    found = [p for p in debs.iterdir() if pattern.match(p.name)]
    return max(found, key=lambda p: _version_key(p.name)) if found else None


@dataclasses.dataclass(frozen=True)
class Kernel:
    series: str
    package: str  # the .deb's file name
    release: str  # uname -r
    vmlinuz: Path
    modules: Path  # lib/modules/RELEASE


def extract(deb: Path, series: str) -> Kernel:
    """``dpkg-deb -x`` of the package (once) into the cache."""
    tree = CACHE / "kernels" / deb.stem
    with locked(CACHE / "extract.lock"):
        if not (tree / ".complete").exists():
            say(f"dpkg-deb -x {deb.name}")
            shutil.rmtree(tree, ignore_errors=True)
            tmp = tree.with_name(tree.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            (tmp / ".complete").touch()
            tmp.rename(tree)
    (release,) = os.listdir(tree / "lib/modules")
    return Kernel(series, deb.name, release, tree / "boot" / f"vmlinuz-{release}",
                  tree / "lib/modules" / release)


# -- modules and the initramfs -------------------------------------------------------


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    return _norm(path.name.split(".ko")[0])


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of an ELF64 little-endian module: key -> values."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        if elf[stroff + name:elf.index(b"\0", stroff + name)] == b".modinfo":
            for entry in elf[offset:offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


def resolve_modules(kernel: Kernel, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """The modules of ``wanted`` that are modules in this kernel and what they depend on,
    each after its dependencies: (file name, uncompressed contents)."""
    index = {_module_name(p): p for p in (kernel.modules / "kernel").rglob("*.ko*")}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in index:
            return  # built in (or absent from this kernel: qemu's devices need no more)
        seen.add(name)
        data = read_module(index[name])
        info = modinfo(data)
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(_norm(dep))
        for soft in info.get("softdep", []):
            pre = soft.split("post:")[0].removeprefix("pre:").split()
            for dep in pre:
                visit(_norm(dep))
        order.append((f"{name}.ko", data))

    for name in wanted:
        visit(_norm(name))
    return order


INIT = r"""#!/bin/busybox sh
# lamina's VM init: modules, the host's root over 9p (read-only), then the guest script.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m" 2>/dev/null || echo "@@vm warning: insmod $m failed"
done
mkdir -p /newroot
if ! mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=262144,ro \
    hostroot /newroot; then
  echo "@@vm error: cannot mount the host's root over 9p"
  poweroff -f
fi
# The checkout may lie below a directory the tmpfs mounts hide (CI clones into /tmp):
# hold it aside and put it back on its path above them.
mkdir -p /repo
mount --bind "/newroot$LAMINA_REPO" /repo
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp
mount -t tmpfs -o mode=755 tmpfs /newroot/run
if [ ! -d "/newroot$LAMINA_REPO/.venv" ]; then
  mkdir -p "/newroot$LAMINA_REPO" && mount --move /repo "/newroot$LAMINA_REPO"
else
  umount /repo
fi
mkdir -p /newroot/run/lamina-vm
cp /guest.sh /newroot/run/lamina-vm/guest.sh
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /bin/bash /run/lamina-vm/guest.sh
"""


def guest_script(suites: Sequence[Suite], *, ci: bool, legacy_mount: bool) -> str:
    """The script the guest runs (as PID 1, in the host's root) after ``switch_root``."""
    py = shlex.quote(str(REPO / ".venv/bin/python"))
    lines = [
        "#!/bin/bash",
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
        "export HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis LAMINA_VM_GUEST=1",
        f"export CI={'true' if ci else 'false'}",
        f"export LAMINA_VM_LEGACY_MOUNT={'1' if legacy_mount else '0'}",
        # sitecustomize there forces the legacy path in every Python the tests start
        *([f"export PYTHONPATH={shlex.quote(str(REPO / 'tests/vm/site'))}"]
          if legacy_mount else []),
        "finish() { sync; echo o > /proc/sysrq-trigger; sleep 30; }",
        "trap finish EXIT",
        "mkdir -p /dev/shm /dev/pts && mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
        "mount -t devpts devpts /dev/pts 2>/dev/null",
        "echo \"@@vm kernel $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s\"",
        f"cd {shlex.quote(str(REPO))} || exit 1",
    ]
    homes = []
    for fs, dev, opts in (("xfs", "/dev/vda", "pquota"), ("ext4", "/dev/vdb", "prjquota")):
        point = f"{GUEST}/{fs}"
        lines += [
            f"mkdir -p {point}",
            f"mount -o {opts} {dev} {point} || "
            f"echo '@@vm error: mount -o {opts} {dev} ({fs}) failed'",
        ]
        homes.append(f"{fs}={point}/home")
    # lamina status of a store on each (tests/vm/guest_status.py: the CLI, in one Python)
    lines.append(f"{py} -m tests.vm.guest_status {' '.join(homes)}")
    for suite in suites:
        tmp = f"{GUEST}/{suite.disk}/pytest-{suite.name}"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in suite.env)
        cmd = (f"exec env {env} {py} -m pytest -q -rfEs --color=no --durations=5 "
               f"-p no:cacheprovider -p tests.vm.guest_plugin --basetemp={tmp} "
               + " ".join(shlex.quote(a) for a in suite.args))
        if suite.drop_sys_resource:
            run = f"capsh --drop=cap_sys_resource -- -c {shlex.quote(cmd)}"
        else:
            run = f"bash -c {shlex.quote(cmd)}"
        lines += [
            f"echo '@@vm begin {suite.name}'",
            "start=$(cut -d' ' -f1 /proc/uptime)",
            f"{run} 2>&1",
            "rc=$?",
            f"echo \"@@vm end {suite.name} rc=$rc start=$start "
            "stop=$(cut -d' ' -f1 /proc/uptime)\"",
        ]
    lines += ["echo '@@vm done'"]
    return "\n".join(lines) + "\n"


def build_initramfs(kernel: Kernel, script: str, out: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy(busybox, root / "bin/busybox")
        (root / "init").write_text(INIT.replace(
            "#!/bin/busybox sh\n", f"#!/bin/busybox sh\nLAMINA_REPO={shlex.quote(str(REPO))}\n", 1))
        (root / "init").chmod(0o755)
        (root / "guest.sh").write_text(script)
        names = []
        for name, data in resolve_modules(kernel, MODULES):
            (root / "lib/modules" / name).write_bytes(data)
            names.append(name)
        (root / "modules.order").write_text("\n".join(names) + "\n")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        with open(out, "wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                           input="\n".join(files).encode(), stdout=f, check=True)


def make_disks(work: Path, size: int = 3 << 30) -> list[Path]:
    """The scratch disks: xfs, and ext4 with project quotas (made here, mounted there)."""
    disks = []
    for fs, mkfs in (("xfs", ["mkfs.xfs", "-q", "-f"]),
                     ("ext4", ["mkfs.ext4", "-q", "-F", "-O", "project,quota"])):
        image = work / f"{fs}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
        disks.append(image)
    return disks


# -- booting and reading what came back ----------------------------------------------


@dataclasses.dataclass
class SuiteResult:
    name: str
    rc: int | None
    counts: dict[str, int]
    summary: str
    seconds: float | None
    output: list[str]


@dataclasses.dataclass
class Run:
    series: str
    package: str
    release: str = ""
    boot_seconds: float | None = None  # the guest's uptime when its script started
    seconds: float = 0.0  # qemu's whole run, wall clock
    status: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    suites: list[SuiteResult] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    done: bool = False
    log: Path | None = None

    def quota_mechanism(self, fs: str) -> str:
        for line in self.status.get(fs, []):
            if line.startswith("Quota:"):
                return line.split(":", 1)[1].strip()
        return ""

    def problems(self, expected: Sequence[str]) -> list[str]:
        """What makes this run a failure (empty: it passed)."""
        out = list(self.errors)
        if not self.done:
            out.append("the guest did not finish (see the log)")
        for fs in ("xfs", "ext4"):
            if not self.quota_mechanism(fs).startswith(PQUOTA_STATUS):
                out.append(f"lamina status on {fs} names no project quotas: "
                           f"{self.quota_mechanism(fs) or 'no status'}")
        ran = {s.name: s for s in self.suites}
        for name in expected:
            s = ran.get(name)
            if s is None:
                out.append(f"suite {name} did not run")
                continue
            failed = s.counts.get("failed", 0) + s.counts.get("error", 0) + s.counts.get(
                "errors", 0)
            if s.rc != 0 or failed:
                out.append(f"suite {name}: rc={s.rc} {s.summary or 'no summary'}")
            elif s.counts.get("passed", 0) == 0:
                out.append(f"suite {name}: no test passed ({s.summary or 'no summary'})")
        return out


SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s(?: \([^)]*\))?\s*=*$")
END = re.compile(r"^@@vm end (\S+) rc=(\d+) start=([\d.]+) stop=([\d.]+)$")
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def parse(run: Run, text: str) -> None:
    current: SuiteResult | None = None
    for raw in text.splitlines():
        line = _ESCAPES.sub("", raw).rstrip("\r").rstrip()
        if "@@vm " in line:  # the console's reset sequences may come before it
            line = line[line.index("@@vm "):]
        if (m := re.match(r"^@@vm kernel (\S+) up ([\d.]+)s$", line)) is not None:
            run.release, run.boot_seconds = m[1], float(m[2])
        elif line.startswith("@@vm status "):
            fs, _, rest = line.removeprefix("@@vm status ").partition(" ")
            run.status.setdefault(fs, []).append(rest)
        elif line.startswith("@@vm begin "):
            current = SuiteResult(line.split()[2], None, {}, "", None, [])
            run.suites.append(current)
        elif (m := END.match(line)) is not None and current is not None:
            current.rc = int(m[2])
            current.seconds = float(m[4]) - float(m[3])
            current = None
        elif line.startswith("@@vm error:"):
            run.errors.append(line.removeprefix("@@vm error:").strip())
        elif line == "@@vm done":
            run.done = True
        elif current is not None:
            current.output.append(line)
            if (m := SUMMARY.match(line)) is not None:
                current.summary = m[1]
                current.counts = {w: int(n) for n, w in re.findall(r"(\d+) (\w+)", m[1])}


def qemu_argv(kernel: Kernel, initrd: Path, disks: Sequence[Path]) -> list[str]:
    accel = os.environ.get("LAMINA_VM_ACCEL") or "tcg"
    argv = [
        "qemu-system-x86_64", "-accel", accel, "-cpu", "max", "-smp", "1", "-m", "2048",
        "-nographic", "-nodefaults", "-no-user-config", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off rdinit=/init",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
    ]
    for disk in disks:
        argv += ["-drive", f"file={disk},format=raw,if=virtio,cache=unsafe"]
    return argv


def missing_tools() -> list[str]:
    """The host's tools the runner needs that are not here (scripts/bootstrap.sh)."""
    tools = ["qemu-system-x86_64", "busybox", "cpio", "capsh", "dpkg-deb", "apt-get",
             "mkfs.xfs", "mkfs.ext4"]
    out = [t for t in tools if shutil.which(t) is None]
    if not Path(KEYRING).exists():
        out.append(KEYRING)
    if not (REPO / ".venv/bin/python").exists():
        out.append(str(REPO / ".venv/bin/python"))
    return out


def run_kernel(series: str, suites: Sequence[str] = DEFAULT_SUITES, *,
               timeout: float | None = None, echo: bool = False,
               legacy_mount: bool = False) -> Run:
    """Fetch, build, boot ``series`` and run ``suites`` in it."""
    timeout = timeout or float(os.environ.get("LAMINA_VM_TIMEOUT") or 900)
    kernel = extract(fetch(series), series)
    run = Run(series, kernel.package)
    (CACHE / "runs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE / "runs", prefix=f"{series}-") as tmp:
        work = Path(tmp)
        initrd = work / "initrd.cpio"
        build_initramfs(kernel, guest_script([SUITES[s] for s in suites],
                                             ci=os.environ.get("CI") == "true",
                                             legacy_mount=legacy_mount), initrd)
        disks = make_disks(work)
        run.log = CACHE / f"console-{series}.log"
        say(f"booting {kernel.release} ({kernel.package}) with suites {', '.join(suites)}")
        start = time.monotonic()
        text = _boot(qemu_argv(kernel, initrd, disks), run.log, timeout, echo, run)
        run.seconds = time.monotonic() - start
    parse(run, text)
    return run


def jobs() -> int:
    """How many kernels boot at once (``$LAMINA_VM_JOBS``; default: one per CPU, at most
    two: each qemu is one TCG thread)."""
    return int(os.environ.get("LAMINA_VM_JOBS") or min(2, os.cpu_count() or 1))


def run_kernels(series: Sequence[str], suites: Sequence[str] = DEFAULT_SUITES,
                **kw: Any) -> dict[str, Future[Run]]:
    """:func:`run_kernel` for each of ``series``, :func:`jobs` at a time (in threads)."""
    pool = ThreadPoolExecutor(max_workers=jobs(), thread_name_prefix="vm")
    try:
        return {s: pool.submit(run_kernel, s, suites, **kw) for s in series}
    finally:
        pool.shutdown(wait=False)


def _boot(argv: list[str], log: Path, timeout: float, echo: bool, run: Run) -> str:
    chunks: list[str] = []
    with open(log, "w") as out, subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            line = proc.stdout.readline()
            if line:
                chunks.append(line)
                out.write(line)
                out.flush()
                if echo:
                    sys.stderr.write(line)
                continue
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                proc.kill()
                run.errors.append(f"timed out after {timeout:.0f}s")
                break
            time.sleep(0.05)
        proc.wait()
        rest = proc.stdout.read() or ""
        chunks.append(rest)
        out.write(rest)
    return "".join(chunks)


def report(run: Run) -> list[str]:
    """Lines that say what ran and how it went."""
    boot = f"{run.boot_seconds:.1f}s" if run.boot_seconds is not None else "?"
    lines = [f"kernel {run.release or '?'} ({run.package}): {run.seconds:.0f}s in all, "
             f"guest script started at {boot}"]
    for fs in ("xfs", "ext4"):
        for status in run.status.get(fs, []):
            lines.append(f"  lamina status ({fs}): {status}")
    for s in run.suites:
        secs = f"{s.seconds:.0f}s" if s.seconds is not None else "?"
        lines.append(f"  {s.name}: {s.summary or 'no summary'} (rc={s.rc}, {secs})")
        notes = [line for line in s.output if line.startswith("lamina-vm:")]
        bad = [line for line in s.output if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
        lines += [f"    {line}" for line in notes + bad[:12]]
        if len(bad) > 12:
            lines.append(f"    … {len(bad) - 12} more (the console log has them)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vm-test", description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", action="append", choices=sorted(KERNELS),
                        help="a kernel series (default: all)")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES),
                        help="a suite to run (default: all)")
    parser.add_argument("--legacy-mount", action="store_true",
                        help="force overlay's mount(2) path where lowerdir+ exists")
    parser.add_argument("--timeout", type=float, help="seconds per kernel (default 900)")
    parser.add_argument("-v", "--verbose", action="store_true", help="echo the console")
    args = parser.parse_args(argv)
    if missing := missing_tools():
        say(f"missing: {', '.join(missing)} (scripts/bootstrap.sh installs them)")
        return 2
    failed = False
    suites = args.suite or list(DEFAULT_SUITES)
    runs = run_kernels(args.kernel or list(KERNELS), suites, timeout=args.timeout,
                       echo=args.verbose, legacy_mount=args.legacy_mount)
    for series, future in runs.items():
        try:
            run = future.result()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            print(f"kernel {series}: {e}", flush=True)
            failed = True
            continue
        print("\n".join(report(run)), flush=True)
        for problem in run.problems(suites):
            print(f"  PROBLEM: {problem}", flush=True)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
