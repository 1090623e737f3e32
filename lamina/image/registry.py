"""A client of one registry, as the OCI distribution spec has registries behave.

:class:`Registry` makes every request ``image pull`` and ``image push`` need (manifests,
blobs, uploads) and does, for each of them, what real registries expect of a client:

- **auth** (:mod:`lamina.image.auth`): a request goes out with what the client knows;
  a ``401``'s challenge is answered (basic credentials, or a ``Bearer`` token per set
  of scopes) and the request sent again, once; a refusal is
  :class:`~lamina.errors.Unauthorized`.
- **redirects** (blobs served from a CDN) are followed, at most :data:`MAX_REDIRECTS`
  of them, and ``Authorization`` is sent only to the registry's own host and port.
- **retries**: connection errors, timeouts, ``5xx`` and ``429`` are tried again with
  exponential backoff (a ``Retry-After`` honoured), at most :data:`RETRIES` times.
- **time**: every wait for the network is bounded (``LAMINA_REGISTRY_TIMEOUT`` seconds, to
  connect and between two reads, default 60), and so is every request as a whole, its
  retries, redirects and body included (:mod:`lamina.image.wire`'s deadline): a
  document or a token must come within ``LAMINA_REGISTRY_DEADLINE`` seconds (default
  120); a blob, download or upload, within that plus its size at
  ``LAMINA_REGISTRY_MIN_RATE`` bytes a second (default 32 KiB/s: a 1 GB layer has 9 h).
- **bounds** on what a server sends: documents at most :data:`spec.MAX_DOCUMENT`, token
  answers 1 MiB, error bodies 64 KiB, each read a piece at a time (a gzip bomb inflates
  no further than the limit); URLs it hands over (``Location``, token realms) are
  ``http``/``https`` with a host, else refused at once.
- TLS verified with the system's CAs unless ``insecure``; plain HTTP only for
  ``localhost``/``127.0.0.1``/``::1`` or when asked for.
- blobs are asked for with ``Accept-Encoding: identity`` and read undecoded: their bytes
  are what their digest names.  :meth:`Registry.fetch_blob` resumes a cut download
  with ``Range`` (or skips what it has when the server sends the whole blob again).

Faults are :class:`~lamina.errors.LaminaError`: ``NotFound`` for an unknown
repository, manifest or blob, ``Unauthorized``, ``Corrupt`` for bytes that do not
match their digest, the base class for a registry that cannot be reached or answers
nonsense.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import urllib3
import urllib3.exceptions
from urllib3.response import BaseHTTPResponse

from lamina import errors
from lamina.image import spec, wire
from lamina.image.auth import DOCKER_HUB, Auth, docker_credentials
from lamina.image.wire import Deadline

CHUNK = 1 << 20
MAX_REDIRECTS = 5
RETRIES = 4
"""Tries after the first one, for a request that failed in a way worth trying again."""
MAX_RESUMES = 5
"""How many times one blob download is taken up again after its connection broke."""
MAX_RETRY_AFTER = 60.0
MAX_TOKEN = 1 << 20
"""The largest answer of a token service read."""
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

DEADLINE = 120.0
"""Seconds a document or token request may take, all told (``LAMINA_REGISTRY_DEADLINE``)."""
MIN_RATE = 32 << 10
"""Bytes a second a blob must average at the least (``LAMINA_REGISTRY_MIN_RATE``): a
blob's deadline is :data:`DEADLINE` and its size at this rate."""
_DEADLINE_WHY = "LAMINA_REGISTRY_DEADLINE"
_BLOB_WHY = "LAMINA_REGISTRY_DEADLINE and its size at LAMINA_REGISTRY_MIN_RATE"

MANIFEST_ACCEPT = ", ".join([spec.OCI_INDEX, spec.OCI_MANIFEST, spec.DOCKER_LIST,
                             spec.DOCKER_MANIFEST])
"""What a manifest request accepts: never schema 1 (a registry would down-convert)."""

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Options:
    """How to reach a registry: credentials and transport choices."""

    creds: tuple[str, str] | None = None
    """``(user, password)`` from ``--creds``; None: Docker's config file, else none."""
    insecure: bool = False
    """TLS without verifying the server's certificate; credentials may go to a token
    service on another host over plain HTTP."""
    plain_http: bool = False
    """HTTP, not HTTPS (always so for a registry on this host)."""
    timeout: float | None = None
    """Seconds to connect and between two reads (None: ``LAMINA_REGISTRY_TIMEOUT``, 60)."""
    retries: int = RETRIES
    backoff: float | None = None
    """The first wait before a retry, doubled each time (None: ``LAMINA_REGISTRY_BACKOFF``,
    0.5 s)."""
    docker_config: Path | None = None
    """Docker's ``config.json`` (None: ``$DOCKER_CONFIG/config.json`` or ``~/.docker``)."""


class Sink(Protocol):
    """Where :meth:`Registry.fetch_blob` writes: a blob writer, or one that is watched."""

    @property
    def offset(self) -> int: ...

    def write(self, data: bytes) -> None: ...


def pull_scope(path: str) -> str:
    return f"repository:{path}:pull"


def push_scope(path: str) -> str:
    return f"repository:{path}:pull,push"


class Registry:
    """The registry at ``domain`` (``host[:port]``; ``docker.io`` is Docker Hub)."""

    def __init__(self, domain: str, options: Options | None = None, *, pool_size: int = 4) -> None:
        self.options = options or Options()
        self.domain = domain
        self.host = DOCKER_HUB if domain == "docker.io" else domain
        hostname = urllib.parse.urlsplit(f"//{self.host}").hostname or self.host
        local = hostname in LOCAL_HOSTS or f"[{hostname}]" in LOCAL_HOSTS
        self.scheme = "http" if (self.options.plain_http or local) else "https"
        self.base = f"{self.scheme}://{self.host}"
        self.timeout = self.options.timeout or wire.env_number("LAMINA_REGISTRY_TIMEOUT", 60.0,
                                                               most=86400)
        self.backoff = self.options.backoff or wire.env_number("LAMINA_REGISTRY_BACKOFF", 0.5,
                                                               most=3600)
        self.deadline = wire.env_number("LAMINA_REGISTRY_DEADLINE", DEADLINE, most=7 * 86400)
        self.min_rate = wire.env_number("LAMINA_REGISTRY_MIN_RATE", MIN_RATE, most=1e12,
                                        unit="bytes a second")
        self.creds = self.options.creds or docker_credentials(domain, self.options.docker_config)
        self.auth = Auth(domain, self.creds, self._fetch_token, origin=self.base,
                         insecure=self.options.insecure)
        tls: dict[str, Any] = {}
        if self.options.insecure:
            tls = {"cert_reqs": "CERT_NONE", "assert_hostname": False}
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.pool = wire.pool_manager(num_pools=8, maxsize=max(pool_size, 1), block=False,
                                      retries=False,
                                      timeout=urllib3.Timeout(connect=self.timeout,
                                                              read=self.timeout),
                                      **tls)

    def close(self) -> None:
        self.pool.clear()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------

    def document_deadline(self, what: str) -> Deadline:
        """The deadline of a document's or a token's request."""
        return Deadline(self.deadline, f"registry {self.domain}: {what}", _DEADLINE_WHY)

    def blob_deadline(self, what: str, size: int) -> Deadline:
        """The deadline of a blob of ``size`` bytes (a download or an upload)."""
        return Deadline(self.deadline + max(size, 0) / self.min_rate,
                        f"registry {self.domain}: {what}", _BLOB_WHY)

    def _same_origin(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme == self.scheme and parts.netloc == self.host

    def _attempt(self, method: str, url: str, headers: Mapping[str, str],
                 body: bytes | None, deadline: Deadline) -> BaseHTTPResponse:
        """One request, tried again on connection errors, ``429`` and ``5xx`` while the
        deadline allows."""
        for attempt in range(self.options.retries + 1):
            last = attempt == self.options.retries
            try:
                with wire.watched(deadline):
                    resp = self.pool.request(method, url, headers=dict(headers), body=body,
                                             preload_content=False, redirect=False,
                                             decode_content=False, retries=False,
                                             timeout=deadline.timeout(self.timeout))
            except urllib3.exceptions.HTTPError as e:
                failed = (f"{method} {wire.short(url)}: {wire.reason(e)} (tried "
                          f"{attempt + 1} times)")
                if deadline.left() <= 0:
                    raise errors.LaminaError(f"{deadline.error()}: {failed}") from None
                if last:
                    raise errors.LaminaError(f"registry {self.domain}: {failed}") from None
                deadline.sleep(self.backoff * 2 ** attempt, failed)
                continue
            if resp.status in _RETRY_STATUS and not last:
                delay = _retry_after(resp.headers.get("Retry-After"))
                wire.discard(resp)
                deadline.sleep(delay if delay is not None else self.backoff * 2 ** attempt,
                               f"{method} {wire.short(url)}: HTTP {resp.status}")
                continue
            return resp
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, scopes: Iterable[str], *,
                headers: Mapping[str, str] | None = None, body: bytes | None = None,
                ok: Iterable[int] = (200,), what: str = "",
                deadline: Deadline | None = None) -> BaseHTTPResponse:
        """``method`` on ``path`` (``/v2/…``, or a URL the registry gave), authenticated
        for ``scopes``, redirects followed; the response (its body unread) when its
        status is in ``ok``, else the error it means.  All of it within ``deadline``
        (default: a document's)."""
        scopes = tuple(sorted(set(scopes)))
        subject = f"registry {self.domain}: {what or method}"
        url = wire.check_url(path if "://" in path else self.base + path, subject)
        deadline = deadline or self.document_deadline(what or f"{method} {wire.short(url)}")
        ok = frozenset(ok)
        challenged = False
        for _hop in range(MAX_REDIRECTS + 1):
            sent = dict(headers or {})
            auth = self.auth.header(scopes) if self._same_origin(url) else None
            if auth is not None:
                sent["Authorization"] = auth
            resp = self._attempt(method, url, sent, body, deadline)
            if resp.status in ok:
                return resp
            if resp.status == 401 and self._same_origin(url):
                header = resp.headers.get("WWW-Authenticate", "")
                detail = _error_detail(resp, deadline)
                wire.discard(resp)
                if challenged:  # answered once already: these credentials will not do
                    raise self.auth.refused(header, scopes, detail)
                challenged = True
                self.auth.answer(header, scopes, refused=auth is not None)
                continue
            if resp.status in _REDIRECT_STATUS and resp.headers.get("Location"):
                wire.discard(resp)
                url = wire.join_url(url, resp.headers["Location"], f"{subject}: a redirect")
                if resp.status == 303:
                    method, body = "GET", None
                continue
            raise self._error(resp, method, url, what, deadline)
        raise errors.LaminaError(f"registry {self.domain}: {what or wire.short(url)}: more "
                                 f"than {MAX_REDIRECTS} redirects (a redirect loop?)")

    def _fetch_token(self, url: str, headers: Mapping[str, str]) -> tuple[int, bytes, str]:
        """GET a token service's ``url``: its status, body (at most :data:`MAX_TOKEN`)
        and the error detail it gave."""
        what = f"the token service {wire.short(url)}"
        wire.check_url(url, f"registry {self.domain}: {what}")
        deadline = self.document_deadline(what)
        resp = self._attempt("GET", url, headers, None, deadline)
        try:
            if resp.status != 200:
                return resp.status, b"", _error_detail(resp, deadline)
            return resp.status, wire.read_body(resp, MAX_TOKEN, f"registry {self.domain}: "
                                               f"{what}", deadline), ""
        finally:
            wire.discard(resp)

    def _error(self, resp: BaseHTTPResponse, method: str, url: str, what: str,
               deadline: Deadline) -> errors.LaminaError:
        detail = _error_detail(resp, deadline)
        wire.discard(resp)
        subject = what or f"{method} {wire.short(url)}"
        text = f"registry {self.domain}: {subject}: HTTP {resp.status}{detail}"
        if resp.status in (401, 403):
            return errors.Unauthorized(f"{text} (credentials refused"
                                       f"{'' if self.creds else '; none given: --creds'})")
        if resp.status == 404:
            return errors.NotFound(text)
        if resp.status in _REDIRECT_STATUS:
            return errors.LaminaError(f"{text} (a redirect without a Location)")
        return errors.LaminaError(text)

    # -- manifests --------------------------------------------------------------------

    def get_manifest(self, path: str, ref: str) -> tuple[bytes, str, str]:
        """The manifest or index ``ref`` (a tag or a digest) names: its bytes, media type
        and digest, checked against ``Docker-Content-Digest`` and, for a digest, against
        the bytes (``Corrupt``)."""
        what = f"manifest {path}{'@' if ref.startswith('sha256:') else ':'}{ref}"
        deadline = self.document_deadline(what)
        resp = self.request("GET", f"/v2/{path}/manifests/{ref}", [pull_scope(path)],
                            headers={"Accept": MANIFEST_ACCEPT}, what=what, deadline=deadline)
        try:
            data = wire.read_body(resp, spec.MAX_DOCUMENT, f"registry {self.domain}: {what}",
                                  deadline)
        finally:
            wire.discard(resp)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        said = resp.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise errors.Corrupt(f"registry {self.domain}: {what}: its bytes hash to "
                                 f"{digest}, the registry says {said[:100]}")
        if ref.startswith("sha256:") and digest != ref:
            raise errors.Corrupt(f"registry {self.domain}: {what}: its bytes hash to {digest}")
        media = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if media in spec.DOCKER_SCHEMA1:
            raise errors.InvalidArgument(f"registry {self.domain}: {what}: Docker schema 1 "
                                         "manifests are not supported")
        if media not in spec.MANIFESTS | spec.INDEXES:
            media = spec.sniff_media_type(data, what)
        return data, media, digest

    def put_manifest(self, path: str, ref: str, data: bytes, media_type: str) -> str:
        """Upload a manifest under ``ref``; the digest the registry gives it."""
        what = f"manifest {path}:{ref}"
        resp = self.request("PUT", f"/v2/{path}/manifests/{ref}", [push_scope(path)],
                            headers={"Content-Type": media_type}, body=data, ok=(200, 201),
                            what=what)
        wire.discard(resp)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        said = resp.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise errors.Corrupt(f"registry {self.domain}: {what}: stored as {said[:100]}, "
                                 f"its bytes are {digest}")
        return digest

    # -- blobs ------------------------------------------------------------------------

    def blob_bytes(self, path: str, desc: spec.Descriptor, limit: int) -> bytes:
        """A small blob (a config), verified."""
        what = f"blob {desc.digest}"
        if desc.size > limit:
            raise errors.Corrupt(f"registry {self.domain}: {what}: {desc.size} bytes, over "
                                 f"the {limit >> 20} MiB a document may have")
        deadline = self.document_deadline(what)
        resp = self.request("GET", f"/v2/{path}/blobs/{desc.digest}", [pull_scope(path)],
                            headers={"Accept-Encoding": "identity"}, what=what,
                            deadline=deadline)
        try:
            data = wire.read_body(resp, limit, f"registry {self.domain}: {what}", deadline)
        finally:
            wire.discard(resp)
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != desc.digest or len(data) != desc.size:
            raise errors.Corrupt(f"registry {self.domain}: {what}: its {len(data)} bytes "
                                 f"hash to {got}")
        return data

    def fetch_blob(self, path: str, desc: spec.Descriptor, sink: Sink,
                   cancelled: Callable[[], bool] = lambda: False) -> None:
        """Write blob ``desc`` into ``sink`` (which checks it), from ``sink.offset`` on,
        within the blob's deadline: a broken connection is taken up again with
        ``Range`` (at most :data:`MAX_RESUMES` times); a server that sends the whole
        blob again has what the sink holds skipped."""
        what = f"blob {desc.digest}"
        deadline = self.blob_deadline(what, desc.size)
        resumes = 0
        while True:
            start = sink.offset
            if start >= desc.size:
                return
            headers = {"Accept-Encoding": "identity"}
            if start:
                headers["Range"] = f"bytes={start}-"
            resp = self.request("GET", f"/v2/{path}/blobs/{desc.digest}", [pull_scope(path)],
                                headers=headers, ok=(200, 206), what=what, deadline=deadline)
            try:
                skip = start
                if resp.status == 206:
                    skip = start - _range_start(resp.headers.get("Content-Range", ""), start)
                _copy(resp, sink, skip, what, cancelled, deadline)
                if sink.offset >= desc.size:
                    return
                failure = f"the stream ended at {sink.offset} of {desc.size} bytes"
            except (urllib3.exceptions.HTTPError, OSError) as e:
                failure = wire.reason(e)
            finally:
                wire.discard(resp)
            resumes += 1
            if resumes > MAX_RESUMES:
                raise errors.LaminaError(f"registry {self.domain}: {what}: {failure} (taken "
                                         f"up again {MAX_RESUMES} times)")
            deadline.sleep(self.backoff * 2 ** min(resumes - 1, 4), failure)

    def blob_exists(self, path: str, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{path}/blobs/{digest}", [push_scope(path)],
                            ok=(200, 404), what=f"blob {digest}")
        wire.discard(resp)
        return resp.status == 200

    def start_upload(self, path: str, scopes: list[str], *, mount: str | None = None,
                     source: str | None = None) -> tuple[bool, str]:
        """Open an upload (``POST``), or mount ``mount`` from repository ``source``: (True,
        "") when the registry mounted it, else (False, the upload's location)."""
        query = ""
        if mount is not None and source is not None:
            query = "?" + urllib.parse.urlencode({"mount": mount, "from": source})
        what = f"upload to {path}"
        resp = self.request("POST", f"/v2/{path}/blobs/uploads/{query}", scopes,
                            headers={"Content-Length": "0"}, body=b"", ok=(201, 202),
                            what=what)
        wire.discard(resp)
        if resp.status == 201 and mount is not None:
            return True, ""
        location = resp.headers.get("Location")
        if not location:
            raise errors.LaminaError(f"registry {self.domain}: an upload without a Location")
        return False, wire.join_url(self.base + "/", location,
                                    f"registry {self.domain}: {what}: its Location")

    def upload_chunk(self, location: str, path: str, data: bytes, start: int) -> str:
        """``PATCH`` bytes ``start…`` of a chunked upload; the next location."""
        what = f"upload to {path}"
        resp = self.request("PATCH", location, [push_scope(path)], body=data, ok=(202,),
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Range": f"{start}-{start + len(data) - 1}",
                                     "Content-Length": str(len(data))},
                            what=what, deadline=self.blob_deadline(what, len(data)))
        wire.discard(resp)
        return wire.join_url(location, resp.headers.get("Location") or location,
                             f"registry {self.domain}: {what}: its Location")

    def finish_upload(self, location: str, path: str, digest: str, data: bytes = b"") -> None:
        """``PUT ?digest=`` closing an upload (with the whole blob: a monolithic one)."""
        url = location + ("&" if "?" in location else "?") + urllib.parse.urlencode(
            {"digest": digest})
        what = f"blob {digest} to {path}"
        resp = self.request("PUT", url, [push_scope(path)], body=data, ok=(201, 204),
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Length": str(len(data))},
                            what=what, deadline=self.blob_deadline(what, len(data)))
        wire.discard(resp)


def _copy(resp: BaseHTTPResponse, sink: Sink, skip: int, what: str,
          cancelled: Callable[[], bool], deadline: Deadline) -> None:
    """A blob's body into ``sink``, its first ``skip`` bytes dropped (held already)."""
    while True:
        if cancelled():
            raise errors.LaminaError(f"{what}: download cancelled")
        deadline.check()
        # read1: what has come (up to CHUNK), so that the deadline is looked at even
        # while a server sends a byte at a time.
        chunk = resp.read1(CHUNK, decode_content=False)
        if not chunk:
            return
        if skip:
            drop = min(skip, len(chunk))
            chunk, skip = chunk[drop:], skip - drop
            if not chunk:
                continue
        sink.write(chunk)


def _error_detail(resp: BaseHTTPResponse, deadline: Deadline) -> str:
    """The registry's own words (``{"errors": [{"code", "message"}]}``), as ``: …``;
    at most :data:`wire.ERROR_BODY` of the body is read, and the words shown are cut
    short."""
    try:
        doc = json.loads(wire.error_body(resp, deadline) or b"null")
    except (ValueError, RecursionError):
        return ""
    found = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(found, list):
        return ""
    words = [f"{e.get('code', '')} {e.get('message', '')}".strip() for e in found[:5]
             if isinstance(e, dict)]
    text = "; ".join(w for w in words if w)
    text = text if len(text) <= 300 else text[:300] + "…"
    return f" ({ascii(text)[1:-1]})" if text else ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:  # an HTTP date
            when = email.utils.parsedate_to_datetime(value)
        except (ValueError, TypeError, IndexError, OverflowError):
            return None  # nonsense: the usual backoff
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # nan
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _range_start(header: str, wanted: int) -> int:
    """The first byte of a ``206``'s ``Content-Range: bytes A-B/N`` (a server may start
    before what was asked, never after)."""
    m = re.match(r"bytes\s+(\d+)-\d+/(?:\d+|\*)", header)
    start = int(m.group(1)) if m else -1
    if not m or start > wanted:
        raise errors.LaminaError(f"a partial blob without a usable Content-Range "
                                 f"({header[:100]!r})")
    return start
