"""The registry client's pieces that need no registry: challenges, Docker's credential
file, ``Retry-After``, ``Content-Range``, creds on the command line, the transport
chosen for a host."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from lamina import errors
from lamina.image import registry, wire
from lamina.image.auth import docker_credentials, parse_challenge, parse_creds


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.docker.io/token",
                      "service": "registry.docker.io",
                      "scope": "repository:samalba/my-app:pull,push"}
    assert parse_challenge('Basic realm="a \\"quoted\\" realm"') == (
        "basic", {"realm": 'a "quoted" realm'})
    assert parse_challenge("Basic realm=plain") == ("basic", {"realm": "plain"})


def test_docker_credentials(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    assert docker_credentials("example.com", config) is None
    auth = base64.b64encode(b"me:pa:ss").decode()
    config.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
        "example.com:5000": {"auth": auth},
        "https://other.example": {"username": "u", "password": "p"}}}))
    assert docker_credentials("docker.io", config) == ("hub", "pw")
    assert docker_credentials("example.com:5000", config) == ("me", "pa:ss")
    assert docker_credentials("other.example", config) == ("u", "p")
    assert docker_credentials("example.com", config) is None


def test_unusable_docker_config_is_ignored_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As Docker's client (``WARNING: Error loading config file``): no credentials from
    it, and no traceback for one nested too deep for the parser (issue 23, D8)."""
    config = tmp_path / "config.json"
    for text, why in ((json.dumps({"auths": {"x.io": {"auth": "%%%"}}}), "base64"),
                      ("{not json", "not JSON"),
                      ('{"auths": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deep"),
                      ("{" + " " * (5 << 20) + "}", "4 MiB")):
        config.write_text(text)
        caplog.clear()
        assert docker_credentials("x.io", config) is None
        assert "Error loading config file" in caplog.text and why in caplog.text, caplog.text


def test_parse_creds() -> None:
    assert parse_creds("a:b:c") == ("a", "b:c")
    assert parse_creds("a:") == ("a", "")
    for bad in ("nocolon", ":pw"):
        with pytest.raises(errors.InvalidArgument, match="USER:PASS"):
            parse_creds(bad)


def test_retry_after() -> None:
    assert registry._retry_after("2") == 2.0
    assert registry._retry_after("100000") == registry.MAX_RETRY_AFTER
    assert registry._retry_after("-3") == 0.0
    assert registry._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert registry._retry_after(None) is None
    assert registry._retry_after("soon") is None


def test_range_start() -> None:
    assert registry._range_start("bytes 100-199/200", 100) == 100
    assert registry._range_start("bytes 50-199/*", 100) == 50
    for bad in ("bytes 150-199/200", "", "items 1-2/3"):
        with pytest.raises(errors.LaminaError, match="Content-Range"):
            registry._range_start(bad, 100)


def test_transport_by_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    for domain, scheme in (("localhost:5000", "http"), ("127.0.0.1:5000", "http"),
                           ("[::1]:5000", "http"), ("registry.example.com", "https"),
                           ("192.0.2.7:5000", "https")):
        assert registry.Registry(domain).scheme == scheme, domain
    assert registry.Registry("docker.io").base == "https://registry-1.docker.io"
    plain = registry.Registry("registry.example.com", registry.Options(plain_http=True))
    assert plain.base == "http://registry.example.com"


def test_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMINA_REGISTRY_TIMEOUT", "nope")
    with pytest.raises(errors.InvalidArgument, match="LAMINA_REGISTRY_TIMEOUT"):
        registry.Registry("localhost:5000")
    # Not numbers of seconds a timer takes (issue 23, D8): one InvalidArgument each.
    for name in ("LAMINA_REGISTRY_TIMEOUT", "LAMINA_REGISTRY_BACKOFF",
                 "LAMINA_REGISTRY_DEADLINE", "LAMINA_REGISTRY_MIN_RATE"):
        for bad in ("nan", "inf", "-inf", "1e309", "0", "-1", "1e300"):
            monkeypatch.setenv(name, bad)
            with pytest.raises(errors.InvalidArgument, match=name):
                registry.Registry("localhost:5000")
        monkeypatch.delenv(name)
    monkeypatch.setenv("LAMINA_REGISTRY_TIMEOUT", "2.5")
    reg = registry.Registry("localhost:5000")
    assert reg.pool.connection_pool_kw["timeout"].read_timeout == 2.5


def test_urls_from_outside_are_checked() -> None:
    """A Location or realm lamina will not request: refused at once (issue 23, D8/D12)."""
    for bad, why in (("http://[::1:bad/x", "IPv6"), ("file:///etc/passwd", "only http"),
                     ("gopher://h/x", "only http"), ("http://h/x\r\nX-Evil: 1", "control"),
                     ("http:///x", "no host"), ("http://h:99999/x", "Port")):
        with pytest.raises(errors.InvalidArgument, match=why):
            wire.check_url(bad, "a redirect")
    with pytest.raises(errors.InvalidArgument, match="IPv6"):
        wire.join_url("http://127.0.0.1:5000/v2/", "http://[::1:bad/x", "a redirect")
    assert wire.join_url("http://127.0.0.1:5000/v2/a", "/v2/b?x=1", "a redirect") == (
        "http://127.0.0.1:5000/v2/b?x=1")
    assert wire.header_value("abc.DEF-_~+/=", "a token")
    for bad in ("a\r\nX: y", "a b", "é", ""):
        with pytest.raises(errors.LaminaError, match="header value"):
            wire.header_value(bad, "a token")


def test_unreachable_registry_is_one_error(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    reg = registry.Registry("127.0.0.1:1", registry.Options(retries=1, backoff=0.01))
    with pytest.raises(errors.LaminaError, match=r"cannot connect .*refused.* \(tried 2 times\)"):
        reg.get_manifest("x", "latest")
