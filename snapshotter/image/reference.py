"""Image locations as `zest convert` and `zest inspect` take them.

Three kinds:

    [host[:port]/]repo[:tag][@sha256:<hex>]   a registry repository (kind "registry")
    oci:PATH[:TAG|@sha256:<hex>]              an OCI image layout directory
    oci-archive:FILE[:TAG|@sha256:<hex>]      a tar of an OCI image layout

Registry names follow docker's rules: the first path component is a host only
if it contains '.' or ':' or is 'localhost'; otherwise the host is docker.io,
and a single-component name gets the `library/` prefix. The tag defaults to
"latest" when there is no digest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's distribution API lives
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?$"
)
_MAX_NAME = 255


class ReferenceError(ValueError):
    """A malformed image location; the message shows the accepted forms.

    Shadows the builtin ReferenceError (weak references) inside this module only;
    import it by module (`reference.ReferenceError`) where that could confuse.
    """


class Kind(StrEnum):
    REGISTRY = "registry"
    OCI = "oci"
    OCI_ARCHIVE = "oci-archive"


@dataclass(frozen=True)
class ImageReference:
    """A parsed image location. Registry: host/repository; oci and oci-archive: path."""

    kind: Kind
    host: str = ""  # registry only: "name[:port]", docker.io by default
    repository: str = ""  # registry only: "library/alpine"
    path: str = ""  # oci and oci-archive only
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"; wins over the tag

    @property
    def reference(self) -> str | None:
        """What to ask the store for: the digest, else the tag (None: the store decides)."""
        return self.digest or self.tag

    @property
    def api_host(self) -> str:
        """The host that serves the distribution API (docker.io's is registry-1.docker.io)."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    def __str__(self) -> str:
        suffix = (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")
        if self.kind is Kind.REGISTRY:
            return f"{self.host}/{self.repository}{suffix}"
        return f"{self.kind.value}:{self.path}{suffix}"


_FORMS = "expected host[:port]/repo[:tag][@sha256:<hex>], oci:PATH[:TAG] or oci-archive:FILE[:TAG]"


def parse_reference(text: str) -> ImageReference:
    """Parse an image location; ReferenceError says what is wrong with a malformed one."""
    if not text or text != text.strip():
        raise ReferenceError(f"invalid image reference {text!r}: empty or padded; {_FORMS}")
    for kind in (Kind.OCI_ARCHIVE, Kind.OCI):
        prefix = kind.value + ":"
        if text.startswith(prefix):
            return _parse_local(kind, text, text[len(prefix) :])
    return _parse_registry(text)


def _parse_registry(text: str) -> ImageReference:
    def bad(why: str) -> ReferenceError:
        return ReferenceError(f"invalid image reference {text!r}: {why}; {_FORMS}")

    rest, digest = _split_digest(text, bad)
    host = DOCKER_HUB
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _HOST_RE.match(first):
            raise bad(f"{first!r} is not a valid registry host")
        host, rest = first, remainder
    name, tag = rest, None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise bad(f"tag {tag!r} must be 1-128 of [A-Za-z0-9_.-], not starting with . or -")
    if not _REPO_RE.match(name):
        raise bad(
            f"repository {name!r} must be lowercase path components of [a-z0-9] "
            "joined by '.', '_', '__' or '-'"
        )
    if host == DOCKER_HUB and "/" not in name:
        name = "library/" + name
    if len(host) + 1 + len(name) > _MAX_NAME:
        raise bad(f"name is longer than {_MAX_NAME} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(Kind.REGISTRY, host=host, repository=name, tag=tag, digest=digest)


def _parse_local(kind: Kind, text: str, rest: str) -> ImageReference:
    def bad(why: str) -> ReferenceError:
        return ReferenceError(f"invalid image reference {text!r}: {why}; {_FORMS}")

    rest, digest = _split_digest(rest, bad)
    path, tag = rest, None
    colon = rest.rfind(":")
    # PATH may contain ':'; only a suffix that is a valid tag (no '/') is taken as one.
    if colon > 0 and _TAG_RE.match(rest[colon + 1 :]):
        path, tag = rest[:colon], rest[colon + 1 :]
    elif colon == len(rest) - 1 and colon >= 0:
        raise bad("empty tag after ':'")
    if not path:
        raise bad(f"{kind.value}: needs a path")
    return ImageReference(kind, path=path, tag=tag, digest=digest)


def _split_digest(text: str, bad: Callable[[str], ReferenceError]) -> tuple[str, str | None]:
    rest, at, digest = text.rpartition("@")
    if not at:
        return text, None
    if not _DIGEST_RE.match(digest):
        raise bad(f"digest {digest!r} must be sha256: and 64 lowercase hex digits")
    return rest, digest
