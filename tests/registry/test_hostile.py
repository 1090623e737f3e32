"""A hostile registry (issue 23): each attack a clear one-line error, within bounds of
memory, time, requests and open files, and nothing stored.

A ``docker-registry`` (no auth of its own) holds a small image and one of 60 layers;
lamina pulls through a :class:`FaultProxy` whose rule plays the hostile part:

- D3: gzip bombs (``Content-Encoding: gzip``: 2 GiB of zeros in 2 MB) as a manifest,
  as a token answer (768 MiB in 800 KB: under the token's 1 MiB on the wire) and
  (``gzip, gzip``: 2 GiB in 5 KB) as an error body; the pull runs as a process
  of its own and its peak RSS must stay under :data:`MAX_RSS`;
- D7: a manifest sent a byte a second (its body; its head): the pull fails at its
  deadline (``LAMINA_REGISTRY_DEADLINE``), and ``image rm``/``image prune`` meanwhile
  return at once;
- D8: a token answer nested too deep for the parser, a token with CR/LF, realms,
  redirects and upload Locations that are no usable URL (``http://[::1:bad/x``),
  timeouts that are no number (``nan``, ``inf``, ``1e309``);
- D10: a ``Bearer`` realm on another port over plain HTTP gets no credentials (unless
  ``--insecure``);
- D12: ``file://`` realms and Locations, an index of 10,000 platforms, a manifest of
  12,000 layers, and a pull of 60 layers with 48 files open at most.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.image.tools import ImageCli
from tests.integration.engine import unmount_below
from tests.registry.harness import (
    OCI_INDEX,
    OCI_MANIFEST,
    DistRegistry,
    FaultProxy,
    ProxyHandler,
    Seen,
    Uploader,
    assert_nothing_stored,
    sha256,
)
from tests.registry.hostile import gzip_bomb, run_measured

pytestmark = [pytest.mark.root, pytest.mark.slow]

MAX_RSS = 300 << 20
BOMB = 2 << 30
TOKEN_BOMB = 768 << 20
BAD_URLS = ["http://[::1:bad/x", "file:///etc/passwd"]
MANY = 60
"""Layers of ``many/app:1``: two files each for all of them would pass :data:`NOFILE`."""
NOFILE = 48


class World:
    def __init__(self, registry: DistRegistry, proxy: FaultProxy, work: Path) -> None:
        self.registry = registry
        self.proxy = proxy
        self.work = work
        up = Uploader(registry.address)
        self.small = up.image("small/app", "1", [{"etc/a": b"a\n"}, {"etc/b": b"b\n"}])
        up.image("many/app", "1", [{f"f{i}": b"%d\n" % i} for i in range(MANY)])
        self.count = 0

    def cli(self) -> ImageCli:
        self.count += 1
        cli = ImageCli(self.work / f"home-{self.count}" / "home")
        cli.env["DOCKER_CONFIG"] = str(self.work / "no-docker-config")
        return cli

    def name(self, repo: str = "small/app") -> str:
        return f"{self.proxy.address}/{repo}:1"

    @property
    def realm(self) -> str:
        return f"http://{self.proxy.address}/token"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("registry-hostile")
    reg = DistRegistry(work / "registry")
    reg.start()
    proxy = FaultProxy(reg.address)
    try:
        yield World(reg, proxy, work)
    finally:
        proxy.stop()
        reg.stop()
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)


def is_manifest(seen: Seen) -> bool:
    return seen.method == "GET" and "/manifests/" in seen.path


def is_token(seen: Seen) -> bool:
    return seen.path.startswith("/token")


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    assert err.startswith("lamina: ") and err.count("\n") == 1, err
    return err


def bearer(world: World, token: tuple[dict[str, str], bytes] | None,
           realm: str | None = None) -> Any:
    """A rule: manifests need a token from ``realm`` (default: the proxy's
    ``/token``), which answers ``token`` (headers, body); None: the tests' own token."""
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_token(seen):
            if token is None:
                h.answer(200, {"Content-Type": "application/json"}, b'{"token": "t0k3n"}')
            else:
                h.answer(200, *token)
            return True
        if is_manifest(seen) and "authorization" not in seen.headers:
            h.challenge(realm or world.realm)
            return True
        return False
    return rule


# -- D3: memory ------------------------------------------------------------------------

def _bomb_rule(world: World, where: str) -> Any:
    if where == "token":  # under the 1 MiB a token answer may have, on the wire
        return bearer(world, ({"Content-Type": "application/json",
                               "Content-Encoding": "gzip"}, gzip_bomb(TOKEN_BOMB)))

    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if not is_manifest(seen):
            return False
        if where == "manifest":
            h.answer(200, {"Content-Type": OCI_MANIFEST, "Content-Encoding": "gzip"},
                     gzip_bomb(BOMB))
        else:
            h.answer(404, {"Content-Type": "application/json",
                           "Content-Encoding": "gzip, gzip"}, gzip_bomb(BOMB, layers=2))
        return True
    return rule


@pytest.mark.parametrize("where", ["manifest", "token", "error"])
def test_gzip_bomb_stays_small(world: World, where: str) -> None:
    """Gigabytes of zeros in a few MB (or KB): the pull's peak RSS under 300 MB."""
    world.proxy.reset(_bomb_rule(world, where))
    cli = world.cli()
    got = run_measured(cli.argv("image", "pull", "--creds", "u:p", world.name()), cli.env)
    print(f"{where} bomb: peak RSS {got.peak_rss >> 20} MiB, {got.seconds:.1f} s")
    assert got.status == 1, got
    one_line(got.stderr)
    want = {"manifest": "over the 4 MiB", "token": "over the 1 MiB",
            "error": "HTTP 404"}[where]
    assert want in got.stderr, got.stderr
    assert got.peak_rss <= MAX_RSS, f"peak RSS {got.peak_rss >> 20} MiB"
    assert_nothing_stored(cli)


# -- D7: deadlines, and rm/prune beside a pull ------------------------------------------

def test_trickled_manifest_meets_the_deadline_and_rm_prune_do_not_wait(world: World) -> None:
    world.proxy.reset()
    cli = world.cli()
    image_id = cli.image_json("pull", world.name())["id"]
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "pad": "x" * 200,
                       "config": {}, "layers": []}).encode()

    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen) and "/slow/" in seen.path:
            h.trickle(200, {"Content-Type": OCI_MANIFEST}, body, rate=1.0, most=60)
            return True
        return False

    world.proxy.reset(rule)
    env = {**cli.env, "LAMINA_REGISTRY_DEADLINE": "3", "LAMINA_REGISTRY_TIMEOUT": "3"}
    began = time.monotonic()
    pull = subprocess.Popen(cli.argv("image", "pull", world.name("slow/app")), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not any(map(is_manifest, world.proxy.seen)):
            assert time.monotonic() - began < 20 and pull.poll() is None, "no pull began"
            time.sleep(0.05)
        for args in (("rm", image_id), ("prune",)):
            started = time.monotonic()
            done = subprocess.run(cli.argv("image", *args), env=cli.env, capture_output=True,
                                  timeout=20)
            assert done.returncode == 0, done
            assert time.monotonic() - started < 10
            assert b"a load or pull is running" in done.stderr, done.stderr
            assert pull.poll() is None, "the pull ended before rm and prune ran"
        _, err = pull.communicate(timeout=30)
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait()
    took = time.monotonic() - began
    assert pull.returncode == 1
    assert "not done within 3 s" in one_line(err.decode()), err
    assert took < 3 + 3 + 6, f"{took:.1f} s"
    assert_nothing_stored(cli)  # the failed pull swept what rm left


def test_trickled_head_meets_the_deadline(world: World) -> None:
    """The status line and headers a byte a second: no read waits long enough for the
    timeout, the deadline's timer cuts the connection."""
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen):
            h.trickle(200, {"Content-Type": OCI_MANIFEST, "X-Pad": "x" * 100}, b"{}",
                      rate=1.0, most=60, head=True)
            return True
        return False

    world.proxy.reset(rule)
    cli = world.cli()
    cli.env.update(LAMINA_REGISTRY_DEADLINE="3", LAMINA_REGISTRY_TIMEOUT="3")
    began = time.monotonic()
    err = one_line(cli.fails("image", "pull", world.name()))
    assert "not done within 3 s" in err, err
    assert time.monotonic() - began < 3 + 3 + 6
    assert sum(map(is_manifest, world.proxy.seen)) == 1


# -- D8: what the parser, the headers and the timers cannot take -----------------------

def test_token_nested_too_deep(world: World) -> None:
    world.proxy.reset(bearer(world, ({"Content-Type": "application/json"},
                                     b"[" * 200_000 + b"]" * 200_000)))
    cli = world.cli()
    err = one_line(cli.fails("image", "pull", world.name()))
    assert "the token service's answer: not JSON" in err, err
    assert_nothing_stored(cli)


def test_token_with_cr_lf(world: World) -> None:
    world.proxy.reset(bearer(world, ({"Content-Type": "application/json"},
                                     b'{"token": "abc\\r\\nX-Evil: 1"}')))
    cli = world.cli()
    err = one_line(cli.fails("image", "pull", world.name()))
    assert "not a usable header value" in err, err
    assert not any("x-evil" in s.headers for s in world.proxy.seen)


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("where", ["realm", "redirect"])
def test_unusable_url_is_refused_at_once(world: World, where: str, url: str) -> None:
    """Refused before any request is made to it, and not retried (D8, D12)."""
    if where == "realm":
        rule = bearer(world, None, realm=url)
    else:
        def rule(h: ProxyHandler, seen: Seen) -> bool:
            if is_manifest(seen):
                h.answer(307, {"Location": url})
                return True
            return False
    world.proxy.reset(rule)
    cli = world.cli()
    began = time.monotonic()
    err = one_line(cli.fails("image", "pull", "--creds", "u:p", world.name()))
    assert time.monotonic() - began < 5
    assert repr(url) in err and ("not a usable URL" in err or "only http" in err), err
    assert sum(map(is_manifest, world.proxy.seen)) == 1


@pytest.mark.parametrize("url", BAD_URLS)
def test_unusable_upload_location_is_refused_at_once(world: World, url: str) -> None:
    world.proxy.reset()
    cli = world.cli()
    cli.image_json("pull", world.name())

    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if seen.method == "POST" and "/blobs/uploads/" in seen.path:
            h.answer(202, {"Location": url})
            return True
        return False

    world.proxy.reset(rule)
    began = time.monotonic()
    err = one_line(cli.fails("image", "push", world.name(), world.name("pushed/app")))
    assert time.monotonic() - began < 5
    assert "Location" in err and repr(url) in err, err
    assert not [s for s in world.proxy.seen if s.method in ("PATCH", "PUT")]


@pytest.mark.parametrize("value", ["nan", "inf", "1e309"])
@pytest.mark.parametrize("name", ["LAMINA_REGISTRY_TIMEOUT", "LAMINA_REGISTRY_BACKOFF"])
def test_timers_that_are_no_number(world: World, name: str, value: str) -> None:
    world.proxy.reset()
    cli = world.cli()
    cli.env[name] = value
    proc = cli.run("--json", "image", "pull", world.name(), code=1)
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "InvalidArgument" and name in doc["error"], doc
    assert "Traceback" not in proc.stderr.decode()
    assert world.proxy.seen == []


# -- D10: credentials to another host --------------------------------------------------

def test_no_credentials_over_http_to_a_realm_on_another_host(world: World) -> None:
    other = FaultProxy("127.0.0.1:1")  # the token service, on another port
    other.reset(lambda h, seen: (h.answer(200, {"Content-Type": "application/json"},
                                          b'{"token": "t0k3n"}'), True)[1])
    realm = f"http://{other.address}/token"
    try:
        world.proxy.reset(bearer(world, None, realm=realm))
        cli = world.cli()
        err = one_line(cli.fails("image", "pull", "--creds", "carol:secret", world.name()))
        assert "will not send the credentials of user 'carol'" in err and realm in err, err
        assert other.seen == []
        # Anonymous: nothing to keep from it; --insecure: the user said so.
        cli.image_json("pull", world.name())
        assert "authorization" not in other.seen[-1].headers
        cli.image_json("pull", "--insecure", "--creds", "carol:secret", world.name())
        assert other.seen[-1].headers["authorization"].startswith("Basic ")
    finally:
        other.stop()


# -- D12: sizes --------------------------------------------------------------------------

def test_index_of_10000_platforms(world: World) -> None:
    entries = [{"mediaType": OCI_MANIFEST, "digest": "sha256:" + f"{i:064x}", "size": 100,
                "platform": {"os": "linux", "architecture": f"arch{i:05d}"}}
               for i in range(10_000)]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": entries}).encode()

    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen):
            h.answer(200, {"Content-Type": OCI_INDEX}, index)
            return True
        return False

    world.proxy.reset(rule)
    cli = world.cli()
    err = one_line(cli.fails("image", "pull", "--platform", "linux/amd64", world.name()))
    assert len(err) < 1000 and "linux/arch00009, and 9990 more" not in err, err
    assert "linux/arch00009 and 9990 more" in err, err


def test_manifest_of_12000_layers(world: World) -> None:
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
               "digest": "sha256:" + f"{i:064x}", "size": 32} for i in range(12_000)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [d["digest"] for d in layers]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
        "size": len(config)}, "layers": layers}).encode()

    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen):
            h.answer(200, {"Content-Type": OCI_MANIFEST}, manifest)
            return True
        if seen.path.endswith(f"/blobs/{sha256(config)}"):
            h.answer(200, {"Content-Type": "application/octet-stream"}, config)
            return True
        return False

    world.proxy.reset(rule)
    cli = world.cli()
    began = time.monotonic()
    err = one_line(cli.fails("image", "pull", world.name()))
    assert "12000 layers, over the 1000 lamina takes" in err, err
    assert time.monotonic() - began < 10
    assert len(world.proxy.seen) == 1, [s.path for s in world.proxy.seen][:5]
    assert_nothing_stored(cli)


def test_pull_opens_blobs_as_it_downloads_them(world: World) -> None:
    """60 layers with at most 48 files open: blobs are opened when their download
    begins (``--jobs`` at a time) and closed when done, not all up front.  On vfs: an
    overlay apply binds every lower layer into its jail (a file each)."""
    world.proxy.reset()
    cli = world.cli()
    cli.backend = "vfs"
    got = run_measured(cli.argv("image", "pull", world.name("many/app")), cli.env,
                       nofile=NOFILE)
    assert got.status == 0, got.stderr
    assert len(cli.image_json("ls")["images"]) == 1


def test_the_tokens_answer_is_read_once_per_scope(world: World) -> None:
    """The tests' own Bearer flow works end to end (so the rules above test lamina)."""
    world.proxy.reset(bearer(world, None))
    cli = world.cli()
    cli.image_json("pull", world.name())
    assert sum(map(is_token, world.proxy.seen)) == 1
    assert all(s.headers.get("authorization") == "Bearer t0k3n"
               for s in world.proxy.seen if is_manifest(s) and "authorization" in s.headers)

