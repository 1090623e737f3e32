"""Registry faults (issue 17): each one a clear error and nothing stored, or, where the
protocol allows, survived.

A ``docker-registry`` with htpasswd auth (so credentials are in play) holds a few small
images the tests make; lamina pulls them through a :class:`FaultProxy` whose rule breaks
requests: a blob corrupted in the registry's storage, the connection cut mid-blob
(once: resumed with ``Range``; every time: a clean error), ``503`` twice then success
(and for ever: an error), ``429`` with ``Retry-After``, a redirect to another host (which
must see no credentials), a redirect loop, a server that stalls (the timeout, made short
with ``LAMINA_REGISTRY_TIMEOUT``), a manifest over 4 MiB, and a layer that tries to
escape (``../``: ``UnsafeArchive``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.tools import ImageCli
from tests.integration.engine import unmount_below
from tests.registry.harness import (
    DistRegistry,
    FaultProxy,
    ProxyHandler,
    Seen,
    Uploader,
    assert_nothing_stored,
    htpasswd,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

USER, PASSWORD = "carol", "secret"
CREDS = f"{USER}:{PASSWORD}"
BIG = 4 << 20
"""The incompressible layer's size: big enough to be cut in the middle."""


class Images:
    def __init__(self, registry: DistRegistry, proxy: FaultProxy, work: Path) -> None:
        self.registry = registry
        self.proxy = proxy
        self.work = work
        up = Uploader(registry.address, (USER, PASSWORD))
        self.payload = os.urandom(BIG)
        self.small = up.image("small/app", "1", [{"etc/a": b"a\n"}, {"big": self.payload}])
        self.big_layer = self._layer_digests(up, "small/app", self.small)[1]
        self.corrupt = up.image("corrupt/app", "1", [{"c": os.urandom(1 << 16)}])
        self.escape = up.image("escape/app", "1", [{"ok": b"ok\n"},
                                                   {"../../../escaped": b"out\n"}])
        self.count = 0

    @staticmethod
    def _layer_digests(up: Uploader, repo: str, desc: dict[str, object]) -> list[str]:
        import json
        import urllib.request

        req = urllib.request.Request(
            f"http://{up.address}/v2/{repo}/manifests/{desc['digest']}",
            headers={**up.headers, "Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(req) as resp:
            return [d["digest"] for d in json.load(resp)["layers"]]

    def cli(self) -> ImageCli:
        self.count += 1
        cli = ImageCli(self.work / f"home-{self.count}" / "home")
        cli.env["LAMINA_REGISTRY_BACKOFF"] = "0.01"
        return cli

    def name(self, repo: str = "small/app") -> str:
        return f"{self.proxy.address}/{repo}:1"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    work = tmp_path_factory.mktemp("registry-faults")
    reg = DistRegistry(work / "registry", {"htpasswd": {
        "realm": "lamina-tests", "path": str(htpasswd(work / "htpasswd", {USER: PASSWORD}))}})
    reg.start()
    proxy = FaultProxy(reg.address)
    try:
        yield Images(reg, proxy, work)
    finally:
        proxy.stop()
        reg.stop()
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)


def is_blob(seen: Seen, digest: str) -> bool:
    return seen.method == "GET" and seen.path.endswith(f"/blobs/{digest}")


def is_manifest(seen: Seen) -> bool:
    return seen.method == "GET" and "/manifests/" in seen.path


def pull_fails(images: Images, name: str, *words: str, cli: ImageCli | None = None) -> str:
    cli = cli or images.cli()
    err = cli.fails("image", "pull", "--creds", CREDS, name)
    for word in words:
        assert word in err, err
    assert_nothing_stored(cli)
    return err


def pull_works(images: Images, name: str) -> ImageCli:
    cli = images.cli()
    cli.image_json("pull", "--creds", CREDS, name)
    root = Path(cli.image("mount", name).strip())
    try:
        if name == images.name():
            assert (root / "big").read_bytes() == images.payload
    finally:
        cli.image("unmount", name)
    return cli


def test_blob_corrupted_in_the_registry(images: Images) -> None:
    digests = Images._layer_digests(Uploader(images.registry.address, (USER, PASSWORD)),
                                    "corrupt/app", images.corrupt)
    path = images.registry.blob_path(digests[0])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    images.proxy.reset()
    pull_fails(images, images.name("corrupt/app"), "hash")


def test_cut_once_is_resumed_with_range(images: Images) -> None:
    cut: list[Seen] = []

    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_blob(seen, images.big_layer) and not cut:
            cut.append(seen)
            h.forward(b"", cut_after=BIG // 3)
            return True
        return False

    images.proxy.reset(rule)
    pull_works(images, images.name())
    ranged = [s for s in images.proxy.seen if is_blob(s, images.big_layer)]
    assert len(ranged) == 2 and "range" not in ranged[0].headers
    assert ranged[1].headers["range"].startswith("bytes=") and ranged[1].headers[
        "range"] != "bytes=0-"
    assert all(s.headers.get("accept-encoding") == "identity" for s in ranged)


def test_cut_then_a_server_that_ignores_range(images: Images) -> None:
    """The blob again from its start (200, not 206): what is held already is skipped."""
    cut: list[Seen] = []

    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_blob(seen, images.big_layer):
            if not cut:
                cut.append(seen)
                h.forward(b"", cut_after=BIG // 2)
            else:
                h.forward(b"", drop=("range",))
            return True
        return False

    images.proxy.reset(rule)
    pull_works(images, images.name())
    assert sum(is_blob(s, images.big_layer) for s in images.proxy.seen) == 2


def test_cut_every_time_is_a_clean_error(images: Images) -> None:
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_blob(seen, images.big_layer):
            h.forward(b"", cut_after=1 << 16)
            return True
        return False

    images.proxy.reset(rule)
    pull_fails(images, images.name(), "taken up again")


def test_503_twice_then_success(images: Images) -> None:
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen) and sum(map(is_manifest, images.proxy.seen)) <= 2:
            h.answer(503, body=b"busy")
            return True
        return False

    images.proxy.reset(rule)
    pull_works(images, images.name())
    # Two 503s, the 401 that asks for credentials, the answer.
    assert sum(map(is_manifest, images.proxy.seen)) == 4


def test_503_for_ever_is_an_error(images: Images) -> None:
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen):
            h.answer(503, body=b"busy")
            return True
        return False

    images.proxy.reset(rule)
    pull_fails(images, images.name(), "HTTP 503")
    assert sum(map(is_manifest, images.proxy.seen)) == 5  # bounded: 1 and 4 retries


def test_429_honours_retry_after(images: Images) -> None:
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_blob(seen, images.big_layer) and sum(
                is_blob(s, images.big_layer) for s in images.proxy.seen) == 1:
            h.answer(429, {"Retry-After": "2"}, b"slow down")
            return True
        return False

    images.proxy.reset(rule)
    began = time.monotonic()
    pull_works(images, images.name())
    assert time.monotonic() - began >= 2
    assert sum(is_blob(s, images.big_layer) for s in images.proxy.seen) == 2


def test_redirect_to_another_host_sends_no_credentials(images: Images) -> None:
    blob = images.registry.blob_path(images.big_layer).read_bytes()
    cdn = FaultProxy("127.0.0.1:1")

    def serve(h: ProxyHandler, seen: Seen) -> bool:
        h.answer(200, {"Content-Type": "application/octet-stream"}, blob)
        return True

    cdn.reset(serve)

    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_blob(seen, images.big_layer):
            h.answer(307, {"Location": f"http://{cdn.address}/cdn/{images.big_layer}?sig=x"})
            return True
        return False

    images.proxy.reset(rule)
    try:
        pull_works(images, images.name())
    finally:
        cdn.stop()
    assert [s.path for s in cdn.seen] == [f"/cdn/{images.big_layer}?sig=x"]
    assert "authorization" not in cdn.seen[0].headers
    assert any("authorization" in s.headers for s in images.proxy.seen
               if is_blob(s, images.big_layer))


def test_redirect_loop(images: Images) -> None:
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_blob(seen, images.big_layer):
            h.answer(302, {"Location": seen.path})
            return True
        return False

    images.proxy.reset(rule)
    pull_fails(images, images.name(), "redirect")


def test_stalled_server_times_out(images: Images) -> None:
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen):
            time.sleep(3)
            h.close_connection = True
            return True
        return False

    images.proxy.reset(rule)
    cli = images.cli()
    cli.env["LAMINA_REGISTRY_TIMEOUT"] = "0.3"
    began = time.monotonic()
    pull_fails(images, images.name(), "timed out", cli=cli)
    assert time.monotonic() - began < 30


def test_manifest_over_4_mib(images: Images) -> None:
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen):
            h.answer(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                     b"{" + b" " * (5 << 20) + b"}")
            return True
        return False

    images.proxy.reset(rule)
    pull_fails(images, images.name(), "4 MiB")


def test_layer_that_escapes(images: Images) -> None:
    images.proxy.reset()
    err = pull_fails(images, images.name("escape/app"))
    cli = images.cli()
    doc = cli.run("--json", "image", "pull", "--creds", CREDS, images.name("escape/app"),
                  code=1)
    assert '"kind": "UnsafeArchive"' in doc.stdout.decode(), (err, doc.stdout)
    assert_nothing_stored(cli)


def test_docker_content_digest_checked(images: Images) -> None:
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen):
            h.forward(b"", replace={"Docker-Content-Digest": "sha256:" + "0" * 64})
            return True
        return False

    images.proxy.reset(rule)
    pull_fails(images, images.name(), "the registry says sha256:000")


def test_schema_1_refused(images: Images) -> None:
    def rule(h: ProxyHandler, seen: Seen) -> bool:
        if is_manifest(seen):
            h.answer(200, {"Content-Type":
                           "application/vnd.docker.distribution.manifest.v1+prettyjws"},
                     b'{"schemaVersion": 1, "name": "small/app", "fsLayers": []}')
            return True
        return False

    images.proxy.reset(rule)
    pull_fails(images, images.name(), "schema 1")
    accept = [s.headers.get("accept", "") for s in images.proxy.seen if is_manifest(s)]
    assert accept and all("distribution.manifest.v1" not in a and "vnd.oci.image.index.v1+json" in a
                          for a in accept), accept


def test_pull_by_digest_checks_the_bytes(images: Images) -> None:
    other = images.corrupt["digest"]

    def rule(h: ProxyHandler, seen: Seen) -> bool:
        # Asked for one digest, the registry sends another manifest (and no header).
        if is_manifest(seen):
            h.path = h.path.rsplit("/", 1)[0].replace("small/app", "corrupt/app") + "/" + other
            h.forward(b"", replace={"Docker-Content-Digest": ""})
            return True
        return False

    images.proxy.reset(rule)
    pull_fails(images, f"{images.proxy.address}/small/app@{images.small['digest']}",
               "hash to " + other)
