"""Errors of the registry client and the image stores.

Every message names the host (or path), the repository and the object, and
says what the operator can do about it. The local image stores (OCI layout and
archive) raise the same classes, so `zest convert` handles one set of errors
whatever the source and destination are.
"""

from __future__ import annotations


class RegistryError(Exception):
    """An image could not be read or written; the message says why and what to do."""


class NotFoundError(RegistryError):
    """The manifest, tag, blob or repository does not exist (HTTP 404 or a missing file)."""


class AuthError(RegistryError):
    """The registry refused the credentials (HTTP 401/403) or the token service failed."""


class RegistryUnavailableError(RegistryError):
    """A temporary failure (5xx, connection error, timeout) outlasted the retries."""


class DigestMismatchError(RegistryError):
    """Bytes do not match the digest or size they were claimed to have."""
