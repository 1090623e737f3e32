"""Registry auth against the real registry (issue 17): distribution's htpasswd basic
auth, and its ``auth: token`` with a token issuer of the tests' own (ES256 JWTs with
the certificate in ``x5c``, the registry trusting it through ``rootcertbundle``).

Credentials come from ``--creds`` or Docker's ``config.json`` (``DOCKER_CONFIG``);
none, or wrong ones, are ``Unauthorized`` in one line, and nothing is stored.  Tokens
are kept per scope: a whole pull asks the issuer once.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.tools import ImageCli
from tests.integration.engine import unmount_below
from tests.registry.harness import (
    DistRegistry,
    TokenIssuer,
    Uploader,
    assert_nothing_stored,
    htpasswd,
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
    pushed = src.image_json("push", "--creds", creds(), f"{basic.address}/small/app:1", name)
    assert pushed["blobs_uploaded"] == 3
    assert issuer.requests and all(r["user"] == "alice" for r in issuer.requests)
    issuer.requests.clear()
    cli = ImageCli(work / "token-pull" / "home")
    doc = cli.image_json("pull", "--creds", creds(), name)
    assert doc["digest"] == pushed["digest"] and doc["layers_applied"] == 2
    # One token for the whole pull: kept for its scope.
    assert [r["scopes"] for r in issuer.requests] == [["repository:small/app:pull"]]


def test_token_auth_refused(work: Path, token: DistRegistry, issuer: TokenIssuer,
                            basic: DistRegistry) -> None:
    cli = ImageCli(work / "token-refused" / "home")
    name = f"{token.address}/small/app:1"
    err = cli.fails("image", "pull", "--creds", "alice:nope", name)
    assert "token service" in err and "refused user 'alice'" in err, err
    assert_nothing_stored(cli)
    err = cli.fails("image", "pull", name)  # anonymous: a token with no access
    assert "repository:small/app:pull refused to anonymous access" in err, err
    assert_nothing_stored(cli)
