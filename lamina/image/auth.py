"""Registry credentials and the answers to a registry's challenges.

A request goes out with what :class:`Auth` knows so far (nothing at first).  A ``401``
carries a ``WWW-Authenticate`` challenge, which :meth:`Auth.answer` learns from:

- ``Basic realm=…``: the credentials, sent with every later request to that registry;
- ``Bearer realm=…,service=…``: a token asked of the realm (``GET realm?service=&scope=…``,
  with the credentials as basic auth when there are some, anonymously otherwise) for
  the request's scopes (``repository:NAME:pull`` or ``…:pull,push``), kept per set of
  scopes until shortly before it expires (``expires_in``, default 60 s, at most a day).
  The realm must be an ``http``/``https`` URL; **credentials never go over plain HTTP
  to a realm on another host** (host and port other than the registry's): that is
  ``Unauthorized`` naming the realm, unless ``--insecure`` (which already gives up on
  knowing who is at the other end).  A token must be visible ASCII (it goes in a
  header as it is).

A second ``401`` for the same request means the credentials will not do:
:meth:`Auth.refused`, an ``Unauthorized`` naming the user (or the scopes).  Credentials
come from ``--creds`` (:func:`parse_creds`) or Docker's ``config.json``
(:func:`docker_credentials`: ``auths``, a base64 ``auth`` or ``username``/``password``;
credential helpers are not run).  A ``config.json`` that cannot be read (not JSON,
nested too deep, over 4 MiB, an ``auth`` that is not base64) is ignored with a warning,
as Docker's own client does (``WARNING: Error loading config file``).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

from lamina import errors
from lamina.image import spec, wire

log = logging.getLogger("lamina")

DOCKER_HUB = "registry-1.docker.io"
"""The host behind the ``docker.io`` of image names."""

MAX_TOKEN_LIFE = 86400.0
"""The longest a token is kept, whatever its ``expires_in`` says."""

_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')

Fetch = Callable[[str, Mapping[str, str]], tuple[int, bytes, str]]
"""GET a URL with headers: (status, body, the registry's error detail)."""


def parse_creds(text: str) -> tuple[str, str]:
    """``USER:PASS`` as a pair; ``InvalidArgument`` without the colon or the user."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise errors.InvalidArgument("--creds: give USER:PASS")
    return user, password


def docker_credentials(domain: str, config: Path | None = None) -> tuple[str, str] | None:
    """The credentials Docker keeps for ``domain`` (``docker login``'s ``auths``); None
    when it keeps none, or when its file cannot be read (a warning, as Docker's)."""
    if config is None:
        base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
        config = Path(base) / "config.json"
    try:
        return _credentials(domain, config)
    except FileNotFoundError:
        return None
    except (OSError, errors.LaminaError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        log.warning("lamina: WARNING: Error loading config file %s: %s (no credentials "
                    "from it)", config, why)
        return None


def _credentials(domain: str, config: Path) -> tuple[str, str] | None:
    with open(config, "rb") as f:
        data = f.read(spec.MAX_DOCUMENT + 1)
    auths = spec.load_json(data, "not usable").get("auths")
    if not isinstance(auths, dict):
        return None
    wanted = {domain}
    if domain == "docker.io":
        wanted |= {"index.docker.io", DOCKER_HUB, "index.docker.io/v1"}
    for key, entry in auths.items():
        host = re.sub(r"^[a-z]+://", "", str(key)).rstrip("/")
        if host not in wanted or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                text = base64.b64decode(entry["auth"], validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise errors.InvalidArgument(f"the 'auth' of {key[:100]!r} is not base64 of "
                                             "USER:PASS") from None
            user, sep, password = text.partition(":")
            if sep:
                return user, password
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """A ``WWW-Authenticate`` header's scheme (lower case) and parameters."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              .replace('\\"', '"') for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


class Auth:
    """What one registry's client knows of its auth: the last challenge, the tokens."""

    def __init__(self, domain: str, creds: tuple[str, str] | None, fetch: Fetch, *,
                 origin: str = "", insecure: bool = False) -> None:
        self.domain = domain
        self.creds = creds
        self._fetch = fetch
        self._origin = wire.origin(origin or f"https://{domain}")
        """The registry's scheme, host and port: a realm elsewhere over HTTP gets no
        credentials."""
        self._insecure = insecure
        self._lock = threading.Lock()
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}

    def header(self, scopes: tuple[str, ...]) -> str | None:
        """The ``Authorization`` a request for ``scopes`` carries (None: none yet)."""
        with self._lock:
            challenge = self._challenge
        if challenge is None:
            return None
        scheme, params = challenge
        if scheme == "basic":
            return basic(self.creds) if self.creds else None
        return f"Bearer {self._token(params, scopes)}"

    def refused(self, header: str, scopes: tuple[str, ...], detail: str) -> errors.Unauthorized:
        """The error of a ``401`` that came although the challenge was answered."""
        scheme, _ = parse_challenge(header)
        who = f"user {self.creds[0]!r}" if self.creds else "anonymous access (no --creds)"
        if scheme == "basic":
            return errors.Unauthorized(f"registry {self.domain}: credentials of {who} "
                                       f"refused{detail}")
        return errors.Unauthorized(f"registry {self.domain}: {' '.join(scopes)} refused to "
                                   f"{who}{detail}")

    def answer(self, header: str, scopes: tuple[str, ...], *, refused: bool) -> None:
        """Learn from a ``401``'s challenge; ``Unauthorized`` if it cannot be met."""
        scheme, params = parse_challenge(header)
        if scheme == "basic":
            if not self.creds:
                raise errors.Unauthorized(f"registry {self.domain}: authentication required "
                                          "(give --creds USER:PASS or docker login)")
            if refused:
                raise self.refused(header, scopes, "")
        elif scheme == "bearer":
            if not params.get("realm"):
                raise errors.LaminaError(f"registry {self.domain}: a Bearer challenge "
                                         "without a realm")
            if refused:  # a token of ours turned down (expired early?): ask for another
                with self._lock:
                    self._tokens.pop(scopes, None)
        else:
            raise errors.Unauthorized(f"registry {self.domain}: HTTP 401 with no challenge "
                                      f"lamina can answer ({header or 'none'!r})")
        with self._lock:
            self._challenge = (scheme, params)

    def _token(self, params: dict[str, str], scopes: tuple[str, ...]) -> str:
        """A token for ``scopes`` from the realm, kept until shortly before it expires."""
        with self._lock:
            held = self._tokens.get(scopes)
            if held is not None and held[1] > time.monotonic():
                return held[0]
        query = [("scope", s) for s in scopes]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        realm = self._realm(params["realm"])
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {"Authorization": basic(self.creds)} if self.creds else {}
        status, data, detail = self._fetch(url, headers)
        if status in (401, 403):
            who = f"user {self.creds[0]!r}" if self.creds else "anonymous access"
            raise errors.Unauthorized(f"registry {self.domain}: the token service "
                                      f"{wire.short(realm)} refused {who} (HTTP {status})")
        if status != 200:
            raise errors.LaminaError(f"registry {self.domain}: the token service "
                                     f"{wire.short(realm)}: HTTP {status}{detail}")
        what = f"registry {self.domain}: the token service's answer"
        doc = spec.load_json(data, what)  # bounded, and RecursionError is Corrupt
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise errors.LaminaError(f"registry {self.domain}: the token service gave no token")
        wire.header_value(token, f"{what}: its token")
        expires = doc.get("expires_in")
        life = 60.0
        if isinstance(expires, int | float) and not isinstance(expires, bool) and expires > 0:
            life = float(min(expires, MAX_TOKEN_LIFE))
        with self._lock:
            # Kept a little less than its life: a token must not expire on its way.
            self._tokens[scopes] = (token, time.monotonic() + max(life - 10, life / 2))
        return token

    def _realm(self, realm: str) -> str:
        """The realm, if a token may be asked of it (with the credentials, if any)."""
        wire.check_url(realm, f"registry {self.domain}: the token realm")
        scheme, host, port = wire.origin(realm)
        if (self.creds and scheme == "http" and (host, port) != self._origin[1:]
                and not self._insecure):
            raise errors.Unauthorized(
                f"registry {self.domain}: will not send the credentials of user "
                f"{self.creds[0]!r} to the token service {wire.short(realm)}: another host "
                "over plain HTTP (--insecure allows it)")
        return realm


def basic(creds: tuple[str, str] | None) -> str:
    """The ``Authorization`` value of basic auth with ``creds``."""
    assert creds is not None
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
