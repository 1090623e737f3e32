"""Image names as Docker normalises them, and the documents' validation."""

from __future__ import annotations

import json

import pytest

from lamina import errors
from lamina.image import reference, spec

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "full", "familiar"), [
    ("debian", "docker.io/library/debian:latest", "debian:latest"),
    ("debian:12", "docker.io/library/debian:12", "debian:12"),
    ("library/debian", "docker.io/library/debian:latest", "debian:latest"),
    ("docker.io/debian", "docker.io/library/debian:latest", "debian:latest"),
    ("index.docker.io/library/debian:12", "docker.io/library/debian:12", "debian:12"),
    ("corpus/app:1", "docker.io/corpus/app:1", "corpus/app:1"),
    ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
    ("localhost:5000/a/b:c", "localhost:5000/a/b:c", "localhost:5000/a/b:c"),
    ("127.0.0.1:5000/app:v1.2_3-x", "127.0.0.1:5000/app:v1.2_3-x",
     "127.0.0.1:5000/app:v1.2_3-x"),
    ("ghcr.io/o/r/s", "ghcr.io/o/r/s:latest", "ghcr.io/o/r/s:latest"),
    (f"debian@{DIGEST}", f"docker.io/library/debian@{DIGEST}", f"debian@{DIGEST}"),
    (f"debian:12@{DIGEST}", f"docker.io/library/debian:12@{DIGEST}", f"debian:12@{DIGEST}"),
    ("a__b/c.d-e", "docker.io/a__b/c.d-e:latest", "a__b/c.d-e:latest"),
])
def test_normalised(text: str, full: str, familiar: str) -> None:
    ref = reference.parse(text)
    assert str(ref) == full and ref.familiar == familiar
    assert reference.parse(full) == ref


@pytest.mark.parametrize("text", [
    "", "Debian", "debian:", ":tag", "debian:-x", "debian:" + "x" * 129, "a//b", "/a",
    "debian@sha256:abc", "debian@md5:" + "0" * 32, "a/../b", "a b", "-a", "a-", "x" * 300,
    "exa mple.com/a", "local host:5000/a",
])
def test_refused(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        reference.parse(text)


def _manifest(**over: object) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": spec.OCI_MANIFEST,
           "config": {"mediaType": spec.OCI_CONFIG, "digest": DIGEST, "size": 2},
           "layers": [{"mediaType": spec.OCI_LAYER_GZIP, "digest": DIGEST, "size": 3}]}
    doc.update(over)
    return json.dumps(doc).encode()


def test_manifest_parsed() -> None:
    m = spec.parse_manifest(_manifest())
    assert m.config.digest == DIGEST and [d.size for d in m.layers] == [3]
    assert spec.layer_compression(m.layers[0].media_type) == "gzip"


@pytest.mark.parametrize(("doc", "kind"), [
    (_manifest(schemaVersion=1), errors.InvalidArgument),
    (_manifest(mediaType="application/vnd.docker.distribution.manifest.v1+prettyjws"),
     errors.InvalidArgument),
    (_manifest(mediaType="text/plain"), errors.InvalidArgument),
    (_manifest(layers=[{"mediaType": "x/y", "digest": DIGEST, "size": 1}]),
     errors.InvalidArgument),
    (_manifest(layers=[{"mediaType": spec.OCI_LAYER, "digest": "sha256:xyz", "size": 1}]),
     errors.Corrupt),
    (_manifest(layers=[{"mediaType": spec.OCI_LAYER, "digest": DIGEST, "size": -1}]),
     errors.Corrupt),
    (_manifest(layers=[{"mediaType": spec.OCI_LAYER, "digest": DIGEST, "size": True}]),
     errors.Corrupt),
    (_manifest(layers="nope"), errors.Corrupt),
    (_manifest(config=None), errors.Corrupt),
    (b"[1, 2]", errors.Corrupt),
    (b"{" * 100_000, errors.Corrupt),
    (b"\xff\xfe", errors.Corrupt),
    (b" " * (spec.MAX_DOCUMENT + 1), errors.Corrupt),
])
def test_manifest_refused(doc: bytes, kind: type[errors.LaminaError]) -> None:
    with pytest.raises(kind):
        spec.parse_manifest(doc)


def test_config_and_index() -> None:
    cfg = spec.parse_config(json.dumps({"os": "linux", "architecture": "arm64", "variant": "v8",
                                        "rootfs": {"type": "layers",
                                                   "diff_ids": [DIGEST]}}).encode())
    assert str(cfg.platform) == "linux/arm64/v8" and cfg.diff_ids == (DIGEST,)
    with pytest.raises(errors.Corrupt):
        spec.parse_config(b'{"rootfs": {"type": "layers", "diff_ids": ["nope"]}}')
    index = spec.parse_index(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": spec.OCI_MANIFEST, "digest": DIGEST, "size": 5,
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode())
    assert index.manifests[0].platform == spec.Platform("linux", "amd64")
    with pytest.raises(errors.InvalidArgument):
        spec.parse_index(_manifest(mediaType=spec.OCI_MANIFEST))
