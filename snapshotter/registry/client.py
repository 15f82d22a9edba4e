"""A client for the distribution (OCI registry) API of one host.

Manifests, blobs, range reads and uploads over one pooled keep-alive
`httpx.Client`. Authentication is `auth.RegistryAuth`; temporary failures
(5xx, 429, resets, timeouts) are retried by `retry.retry`, everything else
becomes a `RegistryError` subclass whose message names host, repository and
object. `read_range` is the RangeSource the lazy read path uses.

Concurrency: one RegistryClient may be used from many threads at once; httpx's
connection pool and RegistryAuth are thread-safe, and the client keeps no other
mutable state. A stream from `open_blob` belongs to one thread.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import httpx

from chunkstore.digest import Digest
from snapshotter.image.store import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Manifest,
)
from snapshotter.registry import byteranges
from snapshotter.registry.auth import (
    Credentials,
    RegistryAuth,
    docker_config_path,
    load_docker_credentials,
)
from snapshotter.registry.byteranges import Range
from snapshotter.registry.digests import CHUNK_SIZE, verified_chunks
from snapshotter.registry.errors import (
    AuthError,
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from snapshotter.registry.retry import RetryPolicy, retry

if TYPE_CHECKING:
    from snapshotter.registry.hosts import Endpoint

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
MAX_MANIFEST_SIZE = 4 << 20  # distribution refuses larger manifests too
_USER_AGENT = "zest/0.1"
# Blob bytes must arrive as stored: offsets and digests refer to them.
_IDENTITY = {"Accept-Encoding": "identity"}


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1, with or without a port."""
    if host.startswith("["):
        name = host[1 : host.find("]")]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Target:
    """The object a request is about, for error messages."""

    kind: str  # "manifest", "blob", "upload of blob"
    host: str
    repo: str
    name: str  # tag or digest

    def __str__(self) -> str:
        if self.kind == "manifest":
            sep = "@" if self.name.startswith("sha256:") else ":"
            return f"manifest {self.host}/{self.repo}{sep}{self.name}"
        return f"{self.kind} {self.name} in {self.host}/{self.repo}"


class _TemporaryError(Exception):
    """A try failed in a way that waiting may cure (5xx, 429, short body, stale token)."""

    def __init__(self, message: str, cause: Exception | None = None) -> None:
        super().__init__(message)
        self.cause = cause


_TEMPORARY_HTTPX = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _is_temporary(exc: BaseException) -> bool:
    return isinstance(exc, (_TemporaryError, *_TEMPORARY_HTTPX))


@functools.cache
def _system_tls() -> ssl.SSLContext:
    """One context with the system CAs for every client: loading them costs ~20 ms a time."""
    return httpx.create_ssl_context()


def warm_up() -> None:
    """Pays the first client's one-off costs (httpcore's, trio's and the hosts.toml reader's
    imports, the CA bundle) now, so that they are not paid on the first pull (the hosts.toml
    reader alone took 10 ms of the FUSE process's first TOC request). Long-running processes
    call it at start."""
    from snapshotter.registry import hosts  # noqa: F401  (imported by for_host)

    httpx.Client(verify=_system_tls()).close()


class RegistryClient:
    """Distribution API calls against one registry host; see the module docstring."""

    def __init__(
        self,
        host: str,
        *,
        plain_http: bool = False,
        credentials: Credentials | None = None,
        timeout: float = 30.0,
        retry_policy: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        endpoint: Endpoint | None = None,
    ) -> None:
        """`credentials=None` looks the host up in the docker config; pass auth.ANONYMOUS for none.

        Plain http is used when asked for and always for loopback hosts. `endpoint` (from
        hosts.py) sets scheme, API root, TLS and headers instead, as a hosts.toml says.
        """
        self.host = host
        scheme = "http" if plain_http or is_loopback(host) else "https"
        self.base_url = endpoint.base_url if endpoint else f"{scheme}://{host}"
        self._api_root = endpoint.path if endpoint else "/v2"
        self.retry_policy = retry_policy or RetryPolicy()
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            headers={"User-Agent": _USER_AGENT, **dict(endpoint.headers if endpoint else ())},
            transport=transport,
            verify=_verify(endpoint),
        )
        creds = credentials if credentials is not None else load_docker_credentials(host)
        self.auth = RegistryAuth(host, creds, self._http, base_url=self.base_url)
        # whether the registry answers a multi-range request with just those ranges; None
        # until it has been asked (see read_ranges)
        self.multirange: bool | None = None

    @classmethod
    def for_host(
        cls, host: str, hosts_dir: Path | None = None, *, plain_http: bool = False, **kwargs: Any
    ) -> RegistryClient:
        """A client for `host` (as image references name it) that reads through the mirrors
        of its containerd hosts.toml under `hosts_dir` (default /etc/containerd/certs.d)."""
        from snapshotter.registry import hosts

        return hosts.client_for_host(
            host, hosts_dir or hosts.DEFAULT_HOSTS_DIR, plain_http=plain_http, **kwargs
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ manifests

    def get_manifest(self, repo: str, reference: str) -> Manifest:
        """Fetch a manifest or index by tag or digest; its sha256 is checked against the bytes."""
        target = _Target("manifest", self.host, repo, reference)
        by_digest = reference.startswith("sha256:")
        if by_digest:
            Digest.parse(reference)
        url = f"/v2/{repo}/manifests/{reference}"
        headers = {"Accept": MANIFEST_ACCEPT}
        response = self._send(target, "GET", url, headers=headers, limit=MAX_MANIFEST_SIZE)
        data = response.content
        actual = str(Digest.of(data))
        claimed = reference if by_digest else response.headers.get("Docker-Content-Digest", "")
        if claimed.startswith("sha256:") and claimed != actual:
            raise DigestMismatchError(
                f"{target}: the registry sent bytes with digest {actual}, not {claimed}; "
                "the registry or a proxy in between is corrupting data"
            )
        content_type = response.headers.get("Content-Type", "")
        return Manifest(manifest_media_type(content_type, data, str(target)), data, actual)

    def manifest_exists(self, repo: str, reference: str) -> bool:
        """Whether a tag or digest resolves (HEAD, nothing downloaded)."""
        target = _Target("manifest", self.host, repo, reference)
        url = f"/v2/{repo}/manifests/{reference}"
        try:
            self._send(target, "HEAD", url, headers={"Accept": MANIFEST_ACCEPT})
        except NotFoundError:
            return False
        return True

    def put_manifest(self, repo: str, reference: str, manifest: Manifest) -> None:
        """Store a manifest under a tag or under its own digest."""
        target = _Target("manifest", self.host, repo, reference)
        if str(Digest.of(manifest.data)) != manifest.digest:
            raise DigestMismatchError(f"{target}: manifest bytes do not have {manifest.digest}")
        response = self._send(
            target,
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            headers={"Content-Type": manifest.media_type},
            content=manifest.data,
            ok=(200, 201),
        )
        stored = response.headers.get("Docker-Content-Digest", manifest.digest)
        if stored != manifest.digest:
            raise DigestMismatchError(
                f"{target}: the registry stored the manifest as {stored}, not {manifest.digest}; "
                "it rewrote the manifest, so it cannot serve this image unchanged"
            )

    # ------------------------------------------------------------ blobs

    def head_blob(self, repo: str, digest: str) -> int | None:
        """The blob's size, or None when the repository does not have it."""
        Digest.parse(digest)
        target = _Target("blob", self.host, repo, digest)
        try:
            response = self._send(target, "HEAD", f"/v2/{repo}/blobs/{digest}", headers=_IDENTITY)
        except NotFoundError:
            return None
        length = response.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RegistryError(f"{target}: HEAD answer has no Content-Length")
        return int(length)

    def open_blob(self, repo: str, digest: str) -> BinaryIO:
        """Stream a blob; a connection lost mid-way resumes with a range request.

        Redirects (e.g. to object storage) are followed without sending this
        registry's Authorization to the other host. The caller verifies the digest.
        """
        return self._stream(repo, digest, 0, None)

    def open_range(self, repo: str, digest: str, offset: int, length: int) -> BinaryIO:
        """Stream `length` bytes of a blob from `offset` by one range request (resumed where a
        lost connection broke it off): the first bytes can be used while the rest arrive."""
        if offset < 0 or length <= 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        return self._stream(repo, digest, offset, length)

    def _stream(self, repo: str, digest: str, start: int, length: int | None) -> BinaryIO:
        """The blob from `start`, to its end or for `length` bytes, as a stream that reopens
        where it broke off."""
        Digest.parse(digest)
        target = _Target("blob", self.host, repo, digest)
        url = f"/v2/{repo}/blobs/{digest}"
        last = "" if length is None else str(start + length - 1)

        def open_at(pos: int) -> httpx.Response:
            if start + pos == 0 and length is None:
                return self._send(target, "GET", url, headers=_IDENTITY, stream=True)
            headers = {**_IDENTITY, "Range": f"bytes={start + pos}-{last}"}
            response = self._send(target, "GET", url, headers=headers, stream=True, ok=(206,))
            _check_content_range(response, start + pos, target,
                                 None if length is None else length - pos)
            return response

        return io.BufferedReader(_BlobStream(open_at, self.retry_policy, str(target)), CHUNK_SIZE)

    def read_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes of a blob from `offset`, by one HTTP range request."""
        Digest.parse(digest)
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        if length == 0:
            return b""
        target = _Target("blob", self.host, repo, digest)
        headers = {**_IDENTITY, "Range": f"bytes={offset}-{offset + length - 1}"}
        url = f"/v2/{repo}/blobs/{digest}"

        def once() -> bytes:
            response = self._attempt("GET", url, headers=headers)
            try:
                self._check(response, target, ok=(200, 206))
                whole = response.headers.get("Content-Length") == str(length) and offset == 0
                if response.status_code == 200 and not whole:
                    raise RegistryError(
                        f"{target}: the registry ignored the Range header (HTTP 200); "
                        "lazy reads need a registry or proxy that supports range requests"
                    )
                if response.status_code == 206:
                    _check_content_range(response, offset, target, length)
                data = response.read()
            finally:
                response.close()
            if len(data) != length:
                raise _TemporaryError(f"{target}: got {len(data)} of {length} bytes at {offset}")
            return data

        return self._with_retry(target, once)

    def read_ranges(self, repo: str, digest: str, ranges: Sequence[Range]) -> list[bytes]:
        """The bytes of each (offset, length) range of a blob, asking for up to MAX_RANGES of
        them in one request. A registry that answers with the whole blob (no multi-range
        support) is remembered, and gets one request per range from then on."""
        out: list[bytes] = []
        for i in range(0, len(ranges), byteranges.MAX_RANGES):
            batch = ranges[i:i + byteranges.MAX_RANGES]
            got = None
            if len(batch) > 1 and self.multirange is not False:
                got = self._read_multi(repo, digest, batch)
            if got is None:
                got = [self.read_range(repo, digest, off, n) for off, n in batch]
            out += got
        return out

    def _read_multi(self, repo: str, digest: str, ranges: Sequence[Range]) -> list[bytes] | None:
        Digest.parse(digest)
        target = _Target("blob", self.host, repo, digest)
        headers = {**_IDENTITY, "Range": byteranges.range_header(ranges)}
        url = f"/v2/{repo}/blobs/{digest}"

        def once() -> list[bytes] | None:
            response = self._attempt("GET", url, headers=headers)
            try:
                self._check(response, target, ok=(200, 206))
                if response.status_code == 200:  # the whole blob is coming: hang up
                    log.info("registry does not serve several ranges in one request; "
                             "asking for one range a request",
                             extra={"kv": {"host": self.host}})
                    self.multirange = False
                    return None
                boundary = byteranges.boundary_of(response.headers.get("Content-Type", ""))
                body = response.read()
            finally:
                response.close()
            try:
                if boundary is None:  # one part: the server merged the ranges
                    start, end = byteranges.parse_content_range(
                        response.headers.get("Content-Range", ""))
                    parts = [(start, body[:end - start])]
                else:
                    parts = byteranges.split_multipart(body, boundary)
                got = byteranges.pick(parts, ranges)
            except byteranges.ByteRangesError as exc:
                raise _TemporaryError(f"{target}: {exc}") from exc
            self.multirange = True
            return got

        return self._with_retry(target, once)

    def put_blob(self, repo: str, fileobj: BinaryIO, digest: str, size: int) -> None:
        """Upload a blob, streaming from `fileobj` (positioned at the blob's start).

        One POST opens an upload session, one PUT with `?digest=` sends the bytes.
        The bytes are checked against digest and size as they pass; the last chunk
        is withheld when they are wrong, so the registry never commits them. A
        seekable `fileobj` lets a failed upload (5xx, reset, expired token) start over.
        """
        Digest.parse(digest)
        target = _Target("upload of blob", self.host, repo, digest)
        try:
            start = fileobj.tell() if fileobj.seekable() else None
        except OSError:
            start = None

        def once() -> None:
            if start is not None:
                fileobj.seek(start)
            self._upload_once(repo, fileobj, digest, size, target, retryable=start is not None)

        if start is None:
            self._translate(target, once, attempts=1)
        else:
            self._with_retry(target, once)

    def _upload_once(
        self, repo: str, fileobj: BinaryIO, digest: str, size: int, target: _Target, retryable: bool
    ) -> None:
        started = self._send(target, "POST", f"/v2/{repo}/blobs/uploads/", ok=(202,))
        location = _location(started, target)
        body = verified_chunks(fileobj, digest, size, str(target))
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        try:
            url = location.copy_merge_params({"digest": digest})
            response = self._attempt("PUT", url, headers=headers, content=body)
            try:
                if response.status_code == 401 and retryable:
                    # The token expired during the upload and the body cannot be resent.
                    raise _TemporaryError(f"{target}: token expired during upload")
                self._check(response, target, ok=(201,))
            finally:
                response.close()
        except BaseException:
            self._cancel_upload(location)
            raise

    def _cancel_upload(self, location: httpx.URL) -> None:
        """Best effort: tell the registry to drop a failed upload session."""
        try:
            self._http.request("DELETE", location, auth=self.auth).close()
        except (httpx.HTTPError, RegistryError) as exc:
            log.debug("cancelling upload failed", extra={"kv": {"url": location, "error": exc}})

    # ------------------------------------------------------------ plumbing

    def _attempt(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | Iterable[bytes] | None = None,
    ) -> httpx.Response:
        """One try; returns a streaming response or raises a temporary error."""
        if isinstance(url, str) and url.startswith("/v2/") and self._api_root != "/v2":
            url = self._api_root + url[3:]  # a hosts.toml endpoint with its own API root
        request = self._http.build_request(method, url, headers=headers, content=content)
        response = self._http.send(request, auth=self.auth, stream=True, follow_redirects=True)
        if response.status_code >= 500 or response.status_code == 429:
            detail = _error_detail(response)
            response.close()
            raise _TemporaryError(f"HTTP {response.status_code}{detail}")
        return response

    def _send(
        self,
        target: _Target,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        ok: tuple[int, ...] = (200,),
        stream: bool = False,
        limit: int | None = None,
    ) -> httpx.Response:
        """A request with retries and status checks; the body is read unless `stream`.

        `limit` refuses a body larger than that many bytes before it is read.
        """

        def once() -> httpx.Response:
            response = self._attempt(method, url, headers=headers, content=content)
            try:
                self._check(response, target, ok)
                if not stream:
                    _read_limited(response, limit, target)
            except BaseException:
                response.close()
                raise
            if not stream:
                response.close()
            return response

        return self._with_retry(target, once)

    def _with_retry(self, target: _Target, fn: Callable[[], T]) -> T:
        policy = self.retry_policy
        return self._translate(
            target,
            lambda: retry(fn, policy=policy, is_temporary=_is_temporary, what=str(target)),
            attempts=policy.attempts,
        )

    def _translate(self, target: _Target, fn: Callable[[], T], attempts: int) -> T:
        """Run fn; temporary errors that escaped the retries become RegistryUnavailableError."""
        tries = f"after {attempts} tries" if attempts > 1 else "at the first try"
        try:
            return fn()
        except _TemporaryError as exc:
            raise RegistryUnavailableError(
                f"{target}: registry {self.host} failed {tries} ({exc}); "
                "it is overloaded or broken, try again later"
            ) from exc
        except httpx.ConnectError as exc:
            hint = ""
            if self.base_url.startswith("https:") and "SSL" in str(exc):
                hint = "; if the registry speaks plain http, use --plain-http"
            raise RegistryUnavailableError(
                f"{target}: cannot connect to {self.base_url} {tries}: {exc}{hint}; "
                "check the host name, port and network"
            ) from exc
        except _TEMPORARY_HTTPX as exc:
            raise RegistryUnavailableError(
                f"{target}: connection to {self.base_url} failed {tries}: "
                f"{type(exc).__name__}: {exc}; check the network or try again later"
            ) from exc
        except httpx.HTTPError as exc:
            raise RegistryError(f"{target}: request to {self.base_url} failed: {exc}") from exc

    def _check(self, response: httpx.Response, target: _Target, ok: tuple[int, ...]) -> None:
        """Raise the error for a status not in `ok` (5xx was handled by _attempt)."""
        status = response.status_code
        if status in ok:
            return
        detail = _error_detail(response)
        where = f"registry {self.host}"
        if response.url.host != httpx.URL(self.base_url).host:
            where = f"{response.url.host} (where {self.host} redirected to)"
        if status == 404:
            raise NotFoundError(
                f"{target} not found (HTTP 404{detail}); check the repository name, "
                "the tag or digest, and that the image was pushed"
            )
        if status in (401, 403):
            creds = self.auth.credentials
            refused = "refused" if status == 401 else "denied access with"
            todo = f"log in with `docker login {self.host}`"
            if not creds.anonymous:
                todo = f"check the credentials, or log in again with `docker login {self.host}`"
            if status == 403:
                todo = f"ask for access to {target.repo}, or {todo}"
            raise AuthError(
                f"{target}: {where} {refused} {creds.describe()} "
                f"(HTTP {status}{detail}); {todo} (docker config: {docker_config_path()})"
            )
        raise RegistryError(f"{target}: {where} answered HTTP {status}{detail}")


class _BlobStream(io.RawIOBase):
    """The body of a blob GET; reopens at the current offset when the connection drops."""

    def __init__(
        self, open_at: Callable[[int], httpx.Response], policy: RetryPolicy, what: str
    ) -> None:
        super().__init__()
        self._open_at = open_at
        self._policy = policy
        self._what = what
        self._pos = 0
        self._resumes = 0
        self._response = open_at(0)
        self._chunks = self._response.iter_raw()
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
            except _TEMPORARY_HTTPX as exc:
                self._resume(exc)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._pos += n
        return n

    def _resume(self, exc: Exception) -> None:
        self._response.close()
        self._resumes += 1
        if self._resumes >= self._policy.attempts:
            raise RegistryUnavailableError(
                f"{self._what}: connection lost at byte {self._pos} {self._resumes} times "
                f"({type(exc).__name__}: {exc}); check the network or try again later"
            ) from exc
        log.info(
            "blob download interrupted, resuming",
            extra={"kv": {"what": self._what, "offset": self._pos, "error": exc}},
        )
        time.sleep(self._policy.delay(self._resumes))
        self._response = self._open_at(self._pos)
        self._chunks = self._response.iter_raw()

    def close(self) -> None:
        if not self.closed:
            self._response.close()
        super().close()


def _verify(endpoint: Endpoint | None) -> ssl.SSLContext | bool:
    tls = endpoint.tls() if endpoint else True
    return _system_tls() if tls is True else tls


def _location(response: httpx.Response, target: _Target) -> httpx.URL:
    """The absolute upload URL from a Location header, relative or absolute."""
    location = response.headers.get("Location")
    if not location:
        raise RegistryError(f"{target}: the registry started an upload without a Location header")
    return response.url.join(location)


def _check_content_range(
    response: httpx.Response, offset: int, target: _Target, length: int | None = None
) -> None:
    """Refuse a 206 answer for a range other than the one asked for."""
    value = response.headers.get("Content-Range", "")
    try:
        _, _, spec = value.partition(" ")
        first, _, rest = spec.partition("-")
        last, _, total = rest.partition("/")
        start, end = int(first), int(last)
    except ValueError:
        response.close()
        raise RegistryError(f"{target}: 206 answer with bad Content-Range {value!r}") from None
    if start != offset:
        response.close()
        raise RegistryError(f"{target}: asked for bytes from {offset}, got {value!r}")
    if length is not None and end - start + 1 != length:
        response.close()
        raise RegistryError(
            f"{target}: asked for {length} bytes at {offset}, got {value!r}; "
            f"the range runs past the end of the blob (size {total})"
        )


def _error_detail(response: httpx.Response) -> str:
    """`: CODE: message` from a distribution error body, or nothing."""
    try:
        body = response.read()[:4096]
        errors = json.loads(body).get("errors") or []
        parts = [f"{e.get('code', '')}: {e.get('message', '')}" for e in errors[:3]]
    except Exception:
        return ""
    return (": " + "; ".join(parts)) if parts else ""


def _read_limited(response: httpx.Response, limit: int | None, target: _Target) -> None:
    """Read the body; one announced (or found) longer than `limit` bytes is refused."""
    length = response.headers.get("Content-Length", "")
    if limit is not None and length.isdigit() and int(length) > limit:
        raise RegistryError(f"{target} is {length} bytes, larger than a manifest may be ({limit})")
    response.read()
    if limit is not None and len(response.content) > limit:
        raise RegistryError(f"{target} is larger than a manifest may be ({limit} bytes)")


def manifest_media_type(content_type: str, data: bytes, what: str) -> str:
    """The Content-Type when it is a manifest type, else the JSON's mediaType, else a guess."""
    media_type = content_type.split(";", 1)[0].strip()
    if media_type in INDEX_TYPES or media_type in MANIFEST_TYPES:
        return media_type
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"{what} is not JSON (Content-Type {content_type!r})") from exc
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(declared, str) and declared:
        return declared
    return OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else OCI_MANIFEST
