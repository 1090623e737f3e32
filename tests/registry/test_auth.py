"""Registry auth against the real registry (issue 17): distribution's htpasswd basic
auth, and its ``auth: token`` with a token issuer of the tests' own (ES256 JWTs with
the certificate in ``x5c``, the registry trusting it through ``rootcertbundle``); and
TLS: a registry with a self-signed certificate on this machine's outside address
(HTTPS: only loopback registries are spoken to in plain HTTP) is refused unless the
certificate is trusted (``SSL_CERT_FILE``, as the system's CAs are) or ``--insecure``.

Credentials come from ``--creds`` or Docker's ``config.json`` (``DOCKER_CONFIG``);
none, or wrong ones, are ``Unauthorized`` in one line, and nothing is stored.  Tokens
are kept per scope: a whole pull asks the issuer once.  The issuer listens on another
port over plain HTTP: lamina sends it credentials only with ``--insecure`` (issue 23).
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import lacking
from tests.image.tools import ImageCli
from tests.integration.engine import unmount_below
from tests.registry.harness import (
    DistRegistry,
    TokenIssuer,
    Uploader,
    assert_nothing_stored,
    htpasswd,
    outside_ip,
    self_signed,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

USERS = {"alice": "wonder land:1"}
LAYERS = [{"etc/hello": b"hello\n"}, {"etc/world": b"world\n" * 1000}]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("registry-auth")
    try:
        yield path
    finally:
        unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def basic(work: Path) -> Iterator[DistRegistry]:
    """A registry with htpasswd auth holding ``small/app:1``."""
    reg = DistRegistry(work / "basic", {"htpasswd": {
        "realm": "lamina-tests", "path": str(htpasswd(work / "htpasswd", USERS))}})
    reg.start()
    try:
        Uploader(reg.address, ("alice", USERS["alice"])).image("small/app", "1", LAYERS)
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def issuer(work: Path) -> Iterator[TokenIssuer]:
    tokens = TokenIssuer(work / "issuer", USERS)
    tokens.start()
    try:
        yield tokens
    finally:
        tokens.stop()


@pytest.fixture(scope="module")
def token(work: Path, issuer: TokenIssuer) -> Iterator[DistRegistry]:
    reg = DistRegistry(work / "token", issuer.registry_auth())
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def creds() -> str:
    return f"alice:{USERS['alice']}"


def test_basic_auth(work: Path, basic: DistRegistry) -> None:
    name = f"{basic.address}/small/app:1"
    cli = ImageCli(work / "basic-ok" / "home")
    doc = cli.image_json("pull", "--creds", creds(), name)
    assert doc["layers_applied"] == 2
    pushed = cli.image_json("push", "--creds", creds(), name, f"{basic.address}/small/copy:1")
    assert pushed["digest"] == doc["digest"] and pushed["blobs_mounted"] == 3


def test_basic_auth_refused(work: Path, basic: DistRegistry) -> None:
    name = f"{basic.address}/small/app:1"
    cli = ImageCli(work / "basic-refused" / "home")
    err = cli.fails("image", "pull", "--creds", "alice:wrong", name)
    assert "Unauthorized" not in err and "refused" in err and "alice" in err, err
    assert_nothing_stored(cli)
    err = cli.fails("image", "pull", name)
    assert "authentication required" in err, err
    assert_nothing_stored(cli)
    doc = json.loads(cli.run("--json", "image", "pull", name, code=1).stdout)
    assert doc["kind"] == "Unauthorized"


def test_docker_config_credentials(work: Path, basic: DistRegistry) -> None:
    config = work / "docker-config"
    config.mkdir()
    auth = base64.b64encode(creds().encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {basic.address: {"auth": auth}}}))
    cli = ImageCli(work / "basic-config" / "home")
    cli.env["DOCKER_CONFIG"] = str(config)
    doc = cli.image_json("pull", f"{basic.address}/small/app:1")
    assert doc["layers_applied"] == 2


def test_token_auth(work: Path, basic: DistRegistry, token: DistRegistry,
                    issuer: TokenIssuer) -> None:
    # Into the token registry by lamina's push (of what it pulled from the other one).
    src = ImageCli(work / "token-src" / "home")
    src.image_json("pull", "--creds", creds(), f"{basic.address}/small/app:1")
    name = f"{token.address}/small/app:1"
    issuer.requests.clear()
    pushed = src.image_json("push", "--insecure", "--creds", creds(),
                            f"{basic.address}/small/app:1", name)
    assert pushed["blobs_uploaded"] == 3
    assert issuer.requests and all(r["user"] == "alice" for r in issuer.requests)
    issuer.requests.clear()
    cli = ImageCli(work / "token-pull" / "home")
    doc = cli.image_json("pull", "--insecure", "--creds", creds(), name)
    assert doc["digest"] == pushed["digest"] and doc["layers_applied"] == 2
    # One token for the whole pull: kept for its scope.
    assert [r["scopes"] for r in issuer.requests] == [["repository:small/app:pull"]]


def test_token_auth_refused(work: Path, token: DistRegistry, issuer: TokenIssuer,
                            basic: DistRegistry) -> None:
    cli = ImageCli(work / "token-refused" / "home")
    name = f"{token.address}/small/app:1"
    err = cli.fails("image", "pull", "--insecure", "--creds", "alice:nope", name)
    assert "token service" in err and "refused user 'alice'" in err, err
    assert_nothing_stored(cli)
    err = cli.fails("image", "pull", name)  # anonymous: a token with no access
    assert "repository:small/app:pull refused to anonymous access" in err, err
    assert_nothing_stored(cli)


def test_tls_verified_unless_insecure(work: Path) -> None:
    ip = outside_ip()
    if ip is None:
        lacking("no IPv4 address but loopback (the TLS test needs one)")
    cert, key = self_signed(work / "tls", ip)
    reg = DistRegistry(work / "tls-registry", host=ip, tls=(cert, key))
    reg.start()
    try:
        Uploader(reg.address, tls=True).image("small/app", "1", LAYERS)
        name = f"{reg.address}/small/app:1"
        cli = ImageCli(work / "tls-refused" / "home")
        err = cli.fails("image", "pull", name)
        assert "TLS" in err and "certificate verify failed" in err and "--insecure" in err, err
        assert_nothing_stored(cli)
        # Over plain HTTP it is not (only loopback registries are, or --plain-http).
        err = cli.fails("image", "pull", "--plain-http", name)
        assert_nothing_stored(cli)
        assert cli.image_json("pull", "--insecure", name)["layers_applied"] == 2
        trusting = ImageCli(work / "tls-trusted" / "home")
        trusting.env["SSL_CERT_FILE"] = str(cert)
        assert trusting.image_json("pull", name)["layers_applied"] == 2
    finally:
        reg.stop()


def test_progress_on_a_terminal(work: Path, basic: DistRegistry) -> None:
    """On a terminal a pull draws its bars (a download and an apply a layer) on
    standard error, and standard output says what was pulled."""
    import os
    import subprocess

    cli = ImageCli(work / "progress" / "home")
    master, slave = os.openpty()
    try:
        proc = subprocess.run(cli.argv("image", "pull", "--creds", creds(),
                                       f"{basic.address}/small/app:1"),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                              env={**cli.env, "COLUMNS": "120", "TERM": "xterm"}, timeout=120)
        os.close(slave)
        slave = -1
        drawn = b""
        os.set_blocking(master, False)
        try:
            while chunk := os.read(master, 1 << 16):
                drawn += chunk
        except (BlockingIOError, OSError):
            pass
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0, drawn.decode(errors="replace")
    assert b"Traceback" not in drawn
    assert b"download" in drawn and b"apply" in drawn, drawn
    assert b"Status: pulled" in proc.stdout
