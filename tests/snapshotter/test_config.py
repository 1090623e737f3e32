"""``lamina snapshotter --print-containerd-config``: the lines of containerd's config.toml
that make lamina its snapshotter (and, for containerd 2.x, its first differ), as TOML that
parses, with the socket, the home and the platform in place; the one for 1.x is taken
by Debian's containerd 1.6 itself (``containerd config dump`` of it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from lamina.frontends.containerd import config
from tests.conftest import lacking

SOCK, HOME = "/run/lamina/x.sock", "/var/lib/lamina"


def test_for_containerd_2() -> None:
    doc = tomllib.loads(config.config_text(2, SOCK, HOME, "linux/arm64"))
    assert doc["version"] == 3
    assert doc["proxy_plugins"]["lamina"] == {"type": "snapshot", "address": SOCK,
                                              "capabilities": ["remap-ids"],
                                              "exports": {"root": HOME}}
    assert doc["proxy_plugins"]["lamina-diff"] == {"type": "diff", "address": SOCK}
    plugins = doc["plugins"]
    assert plugins["io.containerd.service.v1.diff-service"]["default"] == [
        "lamina-diff", "walking"]
    assert plugins["io.containerd.transfer.v1.local"]["unpack_config"] == [
        {"platform": "linux/arm64", "snapshotter": "lamina", "differ": "lamina-diff"},
        {"platform": "linux/arm64", "snapshotter": "overlayfs"}]
    assert plugins["io.containerd.cri.v1.images"]["snapshotter"] == "lamina"


def test_for_containerd_1() -> None:
    doc = tomllib.loads(config.config_text(1, SOCK, HOME, "linux/amd64"))
    assert doc["version"] == 2
    assert doc["proxy_plugins"] == {"lamina": {"type": "snapshot", "address": SOCK}}
    assert doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "lamina"


def test_the_cli_prints_it_for_the_containerd_here(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lamina", "--home", str(tmp_path / "home"),
                          "--backend", "vfs", "--json", "snapshotter", "--socket", SOCK,
                          "--print-containerd-config"], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    doc = json.loads(out)
    major = config.containerd_major()
    assert doc["containerd_major"] == (major or 2)
    parsed = tomllib.loads(doc["config"])
    assert parsed["proxy_plugins"]["lamina"]["address"] == SOCK
    if shutil.which("containerd") is None:
        lacking("no containerd here to take the config (Debian's containerd package)")
    (tmp_path / "config.toml").write_text(doc["config"])
    dump = subprocess.run(["containerd", "--config", str(tmp_path / "config.toml"), "config",
                           "dump"], check=True, capture_output=True, text=True, timeout=60)
    assert "[proxy_plugins.lamina]" in dump.stdout
    assert f'address = "{SOCK}"' in dump.stdout
    if doc["containerd_major"] < 2:  # 1.x's proxy plugins have no capabilities: none said
        assert "capabilities" not in doc["config"]
