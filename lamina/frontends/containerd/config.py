"""The lines of containerd's ``config.toml`` that make lamina its snapshotter and differ.

``lamina snapshotter --print-containerd-config`` prints them for the containerd found on
``PATH`` (its ``--version``), else for containerd 2.x:

- containerd 1.x (``version = 2``): the snapshotter as the proxy plugin ``lamina``, and
  CRI's snapshotter; 1.x has no proxy differ.
- containerd 2.x (``version = 3``): the proxy plugins ``lamina`` (with ``exports.root``,
  the home, where CRI reads the image filesystem's usage, and the capability
  ``remap-ids``: containerd passes user-namespaced containers' id mappings as labels
  instead of making a chowned copy of every layer,
  :mod:`lamina.frontends.containerd.idmap`; 1.x's proxy plugins have no
  ``capabilities``) and ``lamina-diff`` on the same
  socket; the diff service trying ``lamina-diff`` before ``walking`` (lamina answers
  ``Unimplemented`` for mounts that are not its own); the transfer service's
  ``unpack_config`` unpacking into ``lamina`` with ``lamina-diff`` and keeping
  containerd's own ``overlayfs`` (its entries replace containerd's defaults); CRI's
  images snapshotter.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess

_VERSION = re.compile(r"\bv?(\d+)\.(\d+)\.(\d+)")
_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm/v7", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def containerd_major(binary: str = "containerd") -> int | None:
    """The major version of the containerd on ``PATH`` (None: none, or unreadable)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    fields = out.split()
    found = _VERSION.search(fields[2]) if len(fields) >= 3 else None
    return int(found.group(1)) if found else None


def host_platform() -> str:
    """This host's platform as containerd names it (``linux/amd64``)."""
    machine = platform.machine()
    return "linux/" + _ARCHES.get(machine, machine)


def config_text(major: int, socket: str, home: str, plat: str, *,
                remap_ids: bool = True) -> str:
    """The configuration for containerd ``major``.x, lamina serving on ``socket`` with its
    store at ``home``, on platform ``plat``; ``remap_ids=False`` leaves the capability
    out (lamina in a user namespace cannot make idmapped mounts)."""
    q = json.dumps  # a TOML basic string is a JSON string, for paths and names
    if major < 2:
        return "\n".join([
            "version = 2", "",
            '[proxy_plugins.lamina]', '  type = "snapshot"', f"  address = {q(socket)}", "",
            '[plugins."io.containerd.grpc.v1.cri".containerd]', '  snapshotter = "lamina"', ""])
    return "\n".join([
        "version = 3", "",
        "[proxy_plugins.lamina]", '  type = "snapshot"', f"  address = {q(socket)}",
        *(['  capabilities = ["remap-ids"]'] if remap_ids else []),
        "  [proxy_plugins.lamina.exports]", f"    root = {q(home)}", "",
        '[proxy_plugins.lamina-diff]', '  type = "diff"', f"  address = {q(socket)}", "",
        '[plugins."io.containerd.service.v1.diff-service"]',
        '  default = ["lamina-diff", "walking"]', "",
        '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
        f"  platform = {q(plat)}", '  snapshotter = "lamina"', '  differ = "lamina-diff"',
        '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
        f"  platform = {q(plat)}", '  snapshotter = "overlayfs"', "",
        '[plugins."io.containerd.cri.v1.images"]', '  snapshotter = "lamina"', ""])
