"""Image names as Docker spells them: ``name[:tag][@digest]``, normalised.

``debian`` is ``docker.io/library/debian:latest``; ``corpus/app:1`` is
``docker.io/corpus/app:1``; a first component with a dot or a colon, or ``localhost``,
is a registry (``localhost:5000/x``).  A name is lower case; a tag is up to 128 of
``[A-Za-z0-9_.-]``, not starting with ``.`` or ``-``; a digest is ``sha256:`` and 64
lower-case hex digits.  The *familiar* form drops ``docker.io/`` and ``library/``
again, as ``docker images`` shows names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lamina import errors
from lamina.store.meta import DIGEST as DIGEST  # the one digest pattern

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAIN = "index.docker.io"
DEFAULT_TAG = "latest"
NAME_MAX = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*"
    r"[a-zA-Z0-9])?))*(?::[0-9]+)?|\[[0-9a-fA-F:.]+\](?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


def check_digest(text: str, what: str = "digest") -> str:
    """``text`` when it is a ``sha256:`` digest, else ``InvalidArgument``."""
    if not isinstance(text, str) or not DIGEST.fullmatch(text):
        raise errors.InvalidArgument(f"{what} {text!r} is not a sha256 digest")
    return text


@dataclass(frozen=True)
class Reference:
    """A normalised image name: registry ``domain``, ``path`` (``library/debian``), and a
    ``tag``, a ``digest`` or both."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``docker.io/library/debian``."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        out = self.repository
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    @property
    def familiar_repository(self) -> str:
        """``debian`` for ``docker.io/library/debian``, as Docker shows it."""
        if self.domain != DEFAULT_DOMAIN:
            return self.repository
        return self.path.removeprefix("library/") if self.path.count("/") == 1 else self.path

    @property
    def familiar(self) -> str:
        out = self.familiar_repository
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.domain, self.path, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, None, digest)


def parse(text: str, *, default_tag: bool = True) -> Reference:
    """``text`` as a normalised :class:`Reference`; ``InvalidArgument`` for what Docker
    would refuse.  Without a tag or digest, the tag is ``latest`` (``default_tag``)."""
    if not isinstance(text, str) or not text or len(text) > NAME_MAX + 80:
        raise errors.InvalidArgument(f"invalid image name {text!r}")
    rest, _, digest = text.partition("@")
    if digest:
        check_digest(digest, f"image name {text!r}: digest")
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise errors.InvalidArgument(f"invalid image name {text!r}: bad tag {tag!r}")
    first, sep, remainder = rest.partition("/")
    if sep and (first == "localhost" or "." in first or ":" in first or first.startswith("[")):
        if not _DOMAIN.fullmatch(first):
            raise errors.InvalidArgument(f"invalid image name {text!r}: bad registry {first!r}")
        domain, path = first, remainder
    else:
        domain, path = DEFAULT_DOMAIN, rest
    if domain == LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
        why = "names are lower case" if path.lower() != path else "bad repository name"
        raise errors.InvalidArgument(f"invalid image name {text!r}: {why}")
    if len(f"{domain}/{path}") > NAME_MAX:
        raise errors.InvalidArgument(f"invalid image name {text!r}: longer than {NAME_MAX}")
    if tag is None and not digest and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest or None)
