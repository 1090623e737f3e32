"""What the registry tests run against: Debian's ``docker-registry`` (distribution 2.8)
on 127.0.0.1 with its own config and storage, a token issuer for its ``auth: token``,
and a fault-injecting proxy in front of it.

- :class:`DistRegistry`: ``/usr/bin/docker-registry serve CONFIG`` on a free port, its
  log (the access log: every request with its status) in ``registry.log``.
- :func:`htpasswd`: the bcrypt file distribution's ``auth: htpasswd`` reads.
- :class:`TokenIssuer`: a small HTTP token service (``GET /token?service=&scope=``,
  basic auth) that signs ES256 JWTs whose header carries the certificate (``x5c``) the
  registry's ``rootcertbundle`` holds; it grants what the scopes ask for.
- :class:`FaultProxy`: an HTTP proxy to a registry whose :attr:`FaultProxy.rule` may
  answer a request itself (a status, a redirect, a stall, a body, a body a byte a
  second: :meth:`ProxyHandler.trickle`, a ``Bearer`` challenge:
  :meth:`ProxyHandler.challenge`) or cut it; with an unreachable upstream it is a
  hostile server of its own (a token service, a CDN).

The hostile server's payloads and the measure of a pull are in
:mod:`tests.registry.hostile`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.client
import http.server
import json
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import lacking
from tests.integration.engine import Dockerd, docker_missing, teardown

REGISTRY_BIN = Path("/usr/bin/docker-registry")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DistRegistry:
    """distribution's registry on ``127.0.0.1:port``, storing under ``root/storage``."""

    def __init__(self, root: Path, auth: dict[str, Any] | None = None, *,
                 host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None) -> None:
        if not REGISTRY_BIN.exists():
            lacking("no /usr/bin/docker-registry (Debian's docker-registry; "
                    "scripts/bootstrap.sh installs it)")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.storage = root / "storage"
        self.log_path = root / "registry.log"
        self.auth = auth
        self.host = host
        self.tls = tls
        """``(certificate, key)`` PEM files: HTTPS."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def config(self) -> str:
        doc: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False},
                    "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True}, "cache": {}},
            "http": {"addr": self.address, "secret": "lamina-tests"},
        }
        if self.tls:
            doc["http"]["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        if self.auth:
            doc["auth"] = self.auth
        return json.dumps(doc)  # YAML takes JSON

    def start(self, timeout: float = 30) -> None:
        conf = self.root / "config.yml"
        conf.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(REGISTRY_BIN), "serve", str(conf)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited: {self.log()[-3000:]}")
            try:
                conn = connection(self.address, tls=self.tls is not None, timeout=2)
                conn.request("GET", "/v2/")
                conn.getresponse().read()
                conn.close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"docker-registry did not listen: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests(self, since: int = 0) -> list[str]:
        """The access log's request lines (``"METHOD URI PROTO" STATUS``) after offset
        ``since`` of the log."""
        text = self.log()[since:]
        out = []
        for line in text.splitlines():
            start = line.find('"')
            if start >= 0 and ' HTTP/1.1" ' in line:
                out.append(line[start:start + 400])
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def blob_path(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return (self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data")


def connection(address: str, *, tls: bool = False,
               timeout: float = 60) -> http.client.HTTPConnection:
    """A connection to ``host:port`` (TLS unverified: the tests' own certificates)."""
    import ssl

    host, _, port = address.rpartition(":")
    if tls:
        return http.client.HTTPSConnection(host, int(port), timeout=timeout,
                                           context=ssl._create_unverified_context())
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def self_signed(root: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``ip`` and its key, as PEM files under ``root``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    root.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = root / "cert.pem", root / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def outside_ip() -> str | None:
    """An IPv4 address of this machine that is not loopback (lamina speaks HTTPS to it)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    found = [a for a in out if "." in a and not a.startswith("127.")]
    return found[0] if found else None


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    """A bcrypt htpasswd file of ``users`` (distribution takes only bcrypt)."""
    import bcrypt

    path.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(5)).decode()}\n"
                            for u, p in users.items()))
    return path


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class TokenIssuer:
    """A token service for distribution's ``auth: token``: ES256 JWTs with ``x5c``."""

    def __init__(self, root: Path, users: dict[str, str], service: str = "lamina-registry",
                 issuer: str = "lamina-tests") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users = users
        self.service = service
        self.issuer = issuer
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lamina test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .sign(self.key, hashes.SHA256()))
        self.bundle = root / "token-ca.pem"
        root.mkdir(parents=True, exist_ok=True)
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.der = self.cert.public_bytes(serialization.Encoding.DER)
        self.requests: list[dict[str, Any]] = []
        issuer_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                issuer_self.handle(self)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth(self) -> dict[str, Any]:
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.bundle)}}

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.path).query)
        user = None
        header = req.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) != password:
                self.requests.append({"user": name, "refused": True})
                req.send_response(401)
                req.send_header("Content-Length", "0")
                req.end_headers()
                return
            user = name
        scopes = query.get("scope", [])
        self.requests.append({"user": user, "scopes": scopes})
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = actions.split(",") if user is not None else []
            access.append({"type": kind, "name": name, "actions": granted})
        token = self.sign({"iss": self.issuer, "sub": user or "", "aud": self.service,
                           "exp": int(time.time()) + 300, "nbf": int(time.time()) - 10,
                           "iat": int(time.time()), "jti": _b64(hashlib.sha256(
                               str(time.monotonic_ns()).encode()).digest()[:12]),
                           "access": access})
        body = json.dumps({"token": token, "expires_in": 300}).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.der).decode()]}
        signing = (_b64(json.dumps(header).encode()) + "." +
                   _b64(json.dumps(claims).encode()))
        der = self.key.sign(signing.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


@dataclass
class Seen:
    """One request the proxy passed or answered."""

    method: str
    path: str
    headers: dict[str, str]


Rule = Callable[["ProxyHandler", Seen], bool]
"""Decides about a request: True when it answered it itself (else it is forwarded)."""


@dataclass
class FaultProxy:
    """An HTTP proxy on 127.0.0.1 to ``upstream`` (``host:port``); :attr:`rule` may
    answer or break a request instead; every request is recorded in :attr:`seen`."""

    upstream: str
    rule: Rule | None = None
    seen: list[Seen] = field(default_factory=list)
    rate: float | None = None
    """Bytes a second the proxy sends bodies at, all connections together (None: as fast
    as it can)."""

    def __post_init__(self) -> None:
        proxy = self
        self._pace_lock = threading.Lock()
        self._next_free = 0.0

        class Handler(ProxyHandler):
            owner = proxy

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pace(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may go out at :attr:`rate` (a shared bucket)."""
        if not self.rate:
            return
        with self._pace_lock:
            start = max(time.monotonic(), self._next_free)
            self._next_free = start + nbytes / self.rate
            until = self._next_free
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def reset(self, rule: Rule | None = None) -> None:
        self.rule = rule
        self.seen = []

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Forwards to the owner's upstream, after the owner's rule had its say."""

    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def answer(self, status: int, headers: dict[str, str] | None = None,
               body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        self.owner.seen.append(seen)
        rule = self.owner.rule
        if rule is not None and rule(self, seen):
            return
        self.forward(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    def challenge(self, realm: str, service: str = "lamina-tests") -> None:
        """``401`` with a ``Bearer`` challenge naming ``realm``."""
        self.answer(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="{service}"',
                          "Content-Type": "application/json"},
                    b'{"errors": [{"code": "UNAUTHORIZED", "message": "authenticate"}]}')

    def trickle(self, status: int, headers: dict[str, str], body: bytes, *,
                rate: float = 1.0, most: float = 60.0, head: bool = False) -> None:
        """Answer with ``body`` at ``rate`` bytes a second (``head``: the status line and
        headers too), for at most ``most`` seconds (then the connection is closed: a
        bounded server)."""
        lines = [f"HTTP/1.1 {status} Slow", *(f"{k}: {v}" for k, v in headers.items()),
                 f"Content-Length: {len(body)}", "", ""]
        raw = "\r\n".join(lines).encode()
        slow = raw + body if head else body
        if not head:
            self.wfile.write(raw)
            self.wfile.flush()
        until = time.monotonic() + most
        with contextlib.suppress(OSError):
            for i in range(len(slow)):
                if time.monotonic() > until:
                    break
                self.wfile.write(slow[i:i + 1])
                self.wfile.flush()
                time.sleep(1 / rate)
        self.close_connection = True

    def forward(self, body: bytes, *, cut_after: int | None = None,
                replace: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> None:
        """Pass the request on; ``cut_after``: close the connection after that many bytes
        of the response's body; ``replace``: response headers to send instead; ``drop``:
        request headers not to pass on."""
        host, _, port = self.owner.upstream.partition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() != "host" and k.lower() not in drop}
        headers["Host"] = self.owner.address  # so its Locations point back here
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        self.send_response(resp.status)
        replaced = {k.lower(): v for k, v in (replace or {}).items()}
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", *replaced):
                self.send_header(k, v)
        for k, v in replaced.items():
            self.send_header(k, v)
        if resp.getheader("Content-Length") is None:
            data = resp.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()
            return
        self.end_headers()
        sent = 0
        while chunk := resp.read(1 << 16):
            self.owner.pace(len(chunk))
            if cut_after is not None and sent + len(chunk) > cut_after:
                self.wfile.write(chunk[:cut_after - sent])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                conn.close()
                return
            self.wfile.write(chunk)
            sent += len(chunk)
        conn.close()


# -- small images, made in a registry by the tests ------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def layer_tar(files: dict[str, bytes]) -> bytes:
    """A layer tar of regular files (names as given: ``../x`` too), 0644, root's."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Uploader:
    """Puts blobs and manifests into a registry over plain HTTP (monolithic uploads),
    apart from lamina's client; ``auth``: a basic ``(user, password)``."""

    def __init__(self, address: str, auth: tuple[str, str] | None = None, *,
                 tls: bool = False) -> None:
        self.address = address
        self.tls = tls
        self.headers = {}
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def _request(self, method: str, url: str, body: bytes = b"",
                 headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        conn = connection(self.address, tls=self.tls)
        conn.request(method, url, body=body, headers={**self.headers, **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    def blob(self, repo: str, data: bytes) -> dict[str, Any]:
        digest = sha256(data)
        resp = self._request("POST", f"/v2/{repo}/blobs/uploads/")
        assert resp.status == 202, resp.status
        location = urllib.parse.urlsplit(resp.headers["Location"])
        url = f"{location.path}?{location.query}&digest={urllib.parse.quote(digest)}"
        resp = self._request("PUT", url, data, {"Content-Type": "application/octet-stream"})
        assert resp.status == 201, resp.status
        return {"digest": digest, "size": len(data)}

    def manifest(self, repo: str, ref: str, doc: dict[str, Any] | bytes,
                 media: str = OCI_MANIFEST) -> dict[str, Any]:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        resp = self._request("PUT", f"/v2/{repo}/manifests/{ref}", data,
                             {"Content-Type": media})
        assert resp.status == 201, (resp.status, resp.headers)
        return {"mediaType": media, "digest": sha256(data), "size": len(data)}

    def image(self, repo: str, tag: str, layers: list[dict[str, bytes]], *,
              arch: str = "amd64", variant: str = "") -> dict[str, Any]:
        """An image of gzip layers of ``layers``' files; its manifest's descriptor."""
        import gzip

        descs, diff_ids = [], []
        for files in layers:
            tar = layer_tar(files)
            diff_ids.append(sha256(tar))
            gz = gzip.compress(tar, mtime=0)
            descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                          **self.blob(repo, gz)})
        config: dict[str, Any] = {"architecture": arch, "os": "linux",
                                  "rootfs": {"type": "layers", "diff_ids": diff_ids},
                                  "config": {"Env": [f"ARCH={arch}"]}}
        if variant:
            config["variant"] = variant
        cfg = self.blob(repo, json.dumps(config).encode())
        return self.manifest(repo, tag, {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
            "layers": descs})

    def index(self, repo: str, tag: str, entries: list[tuple[dict[str, Any], str]]) -> dict[
            str, Any]:
        """An index of ``(manifest descriptor, "os/arch[/variant]")`` entries."""
        manifests = []
        for desc, plat in entries:
            parts = plat.split("/")
            p = {"os": parts[0], "architecture": parts[1]}
            if len(parts) > 2:
                p["variant"] = parts[2]
            manifests.append({**desc, "platform": p})
        return self.manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                         "manifests": manifests}, OCI_INDEX)


@contextlib.contextmanager
def docker_engine(prefix: str = "lamina-registry-") -> Iterator[Dockerd]:
    """A fresh private ``dockerd`` on overlay2 (data-root under /var/tmp), removed after;
    127.0.0.1 registries are insecure-allowed by Docker's default."""
    reason = docker_missing()
    if reason:
        lacking(reason)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    dockerd = Dockerd(work / "engine", "overlay2")
    try:
        dockerd.start()
        yield dockerd
    finally:
        teardown(dockerd, [], work)


def assert_nothing_stored(cli: Any) -> None:
    """``cli``'s home holds no image, no layer, no blob and no download left over."""
    assert cli.image_json("ls")["images"] == []
    assert cli.json("ls")["layers"] == []
    image = Path(cli.home) / "image"
    if image.exists():
        assert list((image / "blobs" / "sha256").iterdir()) == []
        assert list((image / "ingest").iterdir()) == []
