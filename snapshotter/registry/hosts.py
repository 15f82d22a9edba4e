"""containerd's registry host configuration (`hosts.toml`, the certs.d layout) and mirror fallback.

containerd (1.5+) reads `<config_path>/<host>/hosts.toml`; zest reads the same files, so one
mirror configuration serves both:

    server = "https://registry.example"          # the upstream; default https://<host>

    [host."http://mirror.local:5000"]            # tried first, in file order
      capabilities = ["pull", "resolve"]         # default: pull, resolve, push
      skip_verify = false
      ca = "/etc/certs/mirror.pem"               # or a list; relative to the host directory
      client = [["client.cert", "client.key"]]   # or "both.pem", or a list of such files
      override_path = false                      # true: the URL path *is* the API root
      [host."http://mirror.local:5000".header]
        x-custom = "value"

The directory for a host is the first that exists of `<host>_<port>_` (for hosts with a port),
`<host>` and `_default`. Without hosts.toml, a directory still gives TLS files in docker's layout
(`*.crt` CA certificates, `*.cert` + `*.key` client pairs). `resolve` (tag -> digest) and `pull`
(anything by digest) decide which endpoints a read may use; the server comes last.

`MirroredClient` is a RegistryClient for the server that tries the mirrors first: a read moves
on to the next endpoint on any registry error (unreachable, 5xx, 404, refused credentials, bad
bytes), as containerd's resolver and fetcher do. A mirror that was unreachable is skipped for
`MIRROR_DOWN_SECONDS`, so lazy reads do not pay its connect timeout over and over. Writes go to
the server only.
"""

from __future__ import annotations

import logging
import posixpath
import ssl
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from snapshotter.image.store import Manifest
from snapshotter.registry.byteranges import Range
from snapshotter.registry.client import RegistryClient, is_loopback
from snapshotter.registry.errors import RegistryError, RegistryUnavailableError

log = logging.getLogger(__name__)

DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
DEFAULT_DIR = "_default"
HOSTS_FILE = "hosts.toml"
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "registry-1.docker.io"
API_ROOT = "/v2"
MIRROR_DOWN_SECONDS = 30.0

PULL = "pull"
RESOLVE = "resolve"
PUSH = "push"
ALL_CAPABILITIES = frozenset((PULL, RESOLVE, PUSH))


class HostsConfigError(RegistryError):
    """A hosts.toml (or a file it names) is malformed; the message names file and key."""


@dataclass(frozen=True)
class Endpoint:
    """One place to send distribution API requests for a registry host."""

    scheme: str  # "https" or "http"
    host: str  # "name[:port]"
    path: str = API_ROOT  # the API root: "/v2", or the URL's own path with override_path
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool | None = None  # None: verify as usual
    ca_files: tuple[Path, ...] = ()
    client_pairs: tuple[tuple[Path, Path | None], ...] = ()  # (cert, key or None: in cert)
    headers: tuple[tuple[str, str], ...] = ()
    is_server: bool = False  # the upstream (`server`), tried last

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def __str__(self) -> str:
        return self.base_url + ("" if self.path == API_ROOT else self.path)

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def tls(self) -> ssl.SSLContext | bool:
        """What httpx's `verify` takes: True (system CAs), False, or a context with our files."""
        if self.skip_verify is None and not self.ca_files and not self.client_pairs:
            return True
        context = ssl.create_default_context()
        if self.skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            for ca in self.ca_files:
                context.load_verify_locations(cafile=str(ca))
            for cert, key in self.client_pairs:
                context.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise HostsConfigError(
                f"TLS files for {self.base_url}: {exc}; fix the paths in hosts.toml "
                "(relative ones are relative to the host's directory)"
            ) from exc
        return context


@dataclass(frozen=True)
class HostsConfig:
    """The endpoints for one registry host, in the order to try them; the server is last."""

    host: str
    endpoints: tuple[Endpoint, ...]
    source: Path | None = None  # the directory they came from, None for the default

    def for_capability(self, capability: str) -> list[Endpoint]:
        return [e for e in self.endpoints if e.can(capability)]


# ------------------------------------------------------------------ finding and parsing


def host_directory(hosts_dir: Path, host: str) -> Path | None:
    """The directory containerd would read for `host`: host_port_, host, then _default."""
    candidates = []
    colon = host.rfind(":")
    if colon > 0:
        candidates.append(hosts_dir / f"{host[:colon]}_{host[colon + 1 :]}_")
    candidates += [hosts_dir / host, hosts_dir / DEFAULT_DIR]
    return next((d for d in candidates if d.is_dir()), None)


def default_server(host: str, plain_http: bool = False) -> Endpoint:
    """The upstream when nothing is configured: https://host (registry-1 for docker.io)."""
    if host == DOCKER_HUB:
        return Endpoint("https", DOCKER_HUB_SERVER, is_server=True)
    scheme = "http" if plain_http or is_loopback(host) else "https"
    return Endpoint(scheme, host, is_server=True)


def load_hosts(
    host: str, hosts_dir: Path | None = DEFAULT_HOSTS_DIR, *, plain_http: bool = False
) -> HostsConfig:
    """The endpoints for `host` from hosts_dir (None or missing: the default server alone)."""
    directory = host_directory(hosts_dir, host) if hosts_dir is not None else None
    if directory is None:
        return HostsConfig(host, (default_server(host, plain_http),))
    path = directory / HOSTS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise HostsConfigError(f"cannot read {path}: {exc}") from exc
    if text.strip():
        endpoints = parse_hosts_toml(text, directory, host, plain_http=plain_http, source=path)
    else:
        endpoints = [_with_cert_files(default_server(host, plain_http), directory)]
    log.debug(
        "registry hosts",
        extra={"kv": {"host": host, "dir": directory, "endpoints": [str(e) for e in endpoints]}},
    )
    return HostsConfig(host, tuple(endpoints), directory)


def parse_hosts_toml(
    text: str,
    base_dir: Path,
    host: str,
    *,
    plain_http: bool = False,
    source: Path | None = None,
) -> list[Endpoint]:
    """Endpoints of one hosts.toml: each [host."URL"] in file order, then the server."""
    where = str(source or base_dir / HOSTS_FILE)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostsConfigError(f"{where} is not valid TOML: {exc}; fix or remove it") from exc
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsConfigError(f'{where}: `host` must be tables like [host."https://mirror"]')
    endpoints = []
    for url, table in hosts.items():
        if not isinstance(table, dict):
            raise HostsConfigError(f'{where}: host "{url}" must be a table')
        endpoints.append(_endpoint(url, table, base_dir, f'{where} [host."{url}"]'))
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise HostsConfigError(f"{where}: `server` must be a URL string")
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    if server:
        endpoints.append(_endpoint(server, top, base_dir, where, is_server=True))
    else:
        default = default_server(host, plain_http)
        parsed = _endpoint(default.base_url, top, base_dir, where, is_server=True)
        endpoints.append(parsed)
    return endpoints


_KNOWN_KEYS = {"capabilities", "ca", "client", "skip_verify", "header", "override_path"}


def _endpoint(
    url: str, table: Mapping[str, Any], base_dir: Path, where: str, *, is_server: bool = False
) -> Endpoint:
    unknown = sorted(set(table) - _KNOWN_KEYS)
    if unknown:
        log.debug("hosts.toml: ignoring keys", extra={"kv": {"where": where, "keys": unknown}})
    override_path = table.get("override_path", False)
    skip_verify = table.get("skip_verify")
    if not isinstance(override_path, bool) or not isinstance(skip_verify, bool | None):
        raise HostsConfigError(f"{where}: override_path and skip_verify must be true or false")
    scheme, netloc, path = _split_url(url if "://" in url else "https://" + url, where)
    if path:
        path = posixpath.normpath(path)
        if not path.endswith(API_ROOT) and not override_path:
            path += API_ROOT
    elif not override_path:
        path = API_ROOT
    return Endpoint(
        scheme=scheme,
        host=netloc,
        path=path,
        capabilities=_capabilities(table.get("capabilities"), where),
        skip_verify=skip_verify,
        ca_files=tuple(_abs(p, base_dir) for p in _strings(table.get("ca"), "ca", where)),
        client_pairs=_client_pairs(table.get("client"), base_dir, where),
        headers=_headers(table.get("header"), where),
        is_server=is_server,
    )


def _split_url(url: str, where: str) -> tuple[str, str, str]:
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or scheme not in ("http", "https") or not netloc:
        raise HostsConfigError(f"{where}: {url!r} is not an http:// or https:// URL")
    return scheme, netloc, (slash + path).rstrip("/")


def _capabilities(value: Any, where: str) -> frozenset[str]:
    if value is None or value == []:
        return ALL_CAPABILITIES
    names = {c.lower() for c in _strings(value, "capabilities", where)}
    bad = sorted(names - ALL_CAPABILITIES)
    if bad:
        raise HostsConfigError(f"{where}: unknown capability {bad[0]!r} (pull, resolve, push)")
    return frozenset(names)


def _strings(value: Any, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HostsConfigError(f"{where}: `{key}` must be a string or a list of strings")


def _client_pairs(value: Any, base_dir: Path, where: str) -> tuple[tuple[Path, Path | None], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigError(f"{where}: `client` must be a file, a list of files or of pairs")
    pairs: list[tuple[Path, Path | None]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_abs(item, base_dir), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            pairs.append((_abs(item[0], base_dir), _abs(item[1], base_dir)))
        else:
            raise HostsConfigError(f"{where}: `client` entry {item!r} is not a file or a pair")
    return tuple(pairs)


def _headers(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise HostsConfigError(f"{where}: `header` must be a table")
    return tuple(
        (name, v) for name, raw in value.items() for v in _strings(raw, f"header.{name}", where)
    )


def _abs(path: str, base_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base_dir / p


def _with_cert_files(endpoint: Endpoint, directory: Path) -> Endpoint:
    """docker's certs.d layout: *.crt are CAs, X.cert with X.key are client pairs."""
    cas = tuple(sorted(directory.glob("*.crt")))
    pairs = tuple(
        (cert, cert.with_suffix(".key"))
        for cert in sorted(directory.glob("*.cert"))
        if cert.with_suffix(".key").exists()
    )
    if not cas and not pairs:
        return endpoint
    return Endpoint(
        endpoint.scheme,
        endpoint.host,
        endpoint.path,
        endpoint.capabilities,
        ca_files=cas,
        client_pairs=pairs,
        is_server=endpoint.is_server,
    )


# ------------------------------------------------------------------ the client


@dataclass
class _Health:
    """When each mirror may be tried again after it was unreachable."""

    down_until: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def usable(self, key: str, now: float) -> bool:
        with self.lock:
            return self.down_until.get(key, 0.0) <= now

    def mark_down(self, key: str, until: float) -> None:
        with self.lock:
            self.down_until[key] = until


class MirroredClient(RegistryClient):
    """A RegistryClient for the server endpoint that reads through the mirrors first.

    Reads (`get_manifest`, `manifest_exists`, `head_blob`, `open_blob`, `read_range`,
    `open_range`, `read_ranges`) try each mirror with the needed capability, then the server;
    writes go to the server. Thread-safe like RegistryClient.
    """

    def __init__(
        self,
        server: Endpoint,
        mirrors: Sequence[tuple[Endpoint, RegistryClient]],
        **kwargs: Any,
    ) -> None:
        super().__init__(server.host, endpoint=server, **kwargs)
        self.server = server
        self.mirrors = list(mirrors)
        self._health = _Health()
        self._clock: Callable[[], float] = time.monotonic

    def close(self) -> None:
        for _, client in self.mirrors:
            client.close()
        super().close()

    def get_manifest(self, repo: str, reference: str) -> Manifest:
        manifest: Manifest = self._first(_for_reference(reference), "get_manifest", repo, reference)
        return manifest

    def manifest_exists(self, repo: str, reference: str) -> bool:
        capability = _for_reference(reference)
        return bool(self._first(capability, "manifest_exists", repo, reference, accept=bool))

    def head_blob(self, repo: str, digest: str) -> int | None:
        size: int | None = self._first(
            PULL, "head_blob", repo, digest, accept=lambda size: size is not None
        )
        return size

    def open_blob(self, repo: str, digest: str) -> BinaryIO:
        stream: BinaryIO = self._first(PULL, "open_blob", repo, digest)
        return stream

    def read_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        data: bytes = self._first(PULL, "read_range", repo, digest, offset, length)
        return data

    def open_range(self, repo: str, digest: str, offset: int, length: int) -> BinaryIO:
        stream: BinaryIO = self._first(PULL, "open_range", repo, digest, offset, length)
        return stream

    def read_ranges(self, repo: str, digest: str, ranges: Sequence[Range]) -> list[bytes]:
        parts: list[bytes] = self._first(PULL, "read_ranges", repo, digest, ranges)
        return parts

    def _first(
        self,
        capability: str,
        method: str,
        repo: str,
        *args: Any,
        accept: Callable[[Any], bool] = lambda _: True,
    ) -> Any:
        """The first mirror's answer that `accept`s, else the server's answer or error.

        `method` names the RegistryClient method to call with (repo, *args).
        """
        failures: list[str] = []
        now = self._clock()
        for endpoint, client in self.mirrors:
            key = str(endpoint)
            if not endpoint.can(capability) or not self._health.usable(key, now):
                continue
            try:
                result = getattr(client, method)(repo, *args)
            except RegistryError as exc:
                if isinstance(exc, RegistryUnavailableError):
                    self._health.mark_down(key, self._clock() + MIRROR_DOWN_SECONDS)
                failures.append(f"{key}: {exc}")
                log.info(
                    "mirror failed, trying the next endpoint",
                    extra={"kv": {"mirror": key, "call": method, "repo": repo, "error": exc}},
                )
                continue
            if accept(result):
                return result
            failures.append(f"{key}: not there")
        try:
            return getattr(RegistryClient, method)(self, repo, *args)
        except RegistryError as exc:
            if not failures:
                raise
            raise type(exc)(f"{exc} (mirrors tried first: {'; '.join(failures)})") from exc


def _for_reference(reference: str) -> str:
    """Tags need `resolve`; anything by digest needs only `pull`."""
    return PULL if reference.startswith("sha256:") else RESOLVE


def client_for_host(
    host: str,
    hosts_dir: Path | None = DEFAULT_HOSTS_DIR,
    *,
    plain_http: bool = False,
    **kwargs: Any,
) -> RegistryClient:
    """A client for `host` that honours its hosts.toml; a plain RegistryClient without mirrors.

    `host` is the name in image references (docker.io, not registry-1.docker.io); keyword
    arguments go to every RegistryClient (credentials, timeout, retry_policy, transport).
    """
    config = load_hosts(host, hosts_dir, plain_http=plain_http)
    *mirror_eps, server = config.endpoints
    if not server.is_server:  # cannot happen with parse_hosts_toml; keeps the contract explicit
        raise HostsConfigError(f"{config.source}: no server endpoint for {host}")
    if not mirror_eps:
        return RegistryClient(server.host, endpoint=server, **kwargs)
    # Explicit credentials are the server's; a mirror's come from the docker config.
    mirror_kwargs = {k: v for k, v in kwargs.items() if k != "credentials"}
    mirrors = [(ep, RegistryClient(ep.host, endpoint=ep, **mirror_kwargs)) for ep in mirror_eps]
    return MirroredClient(server, mirrors, **kwargs)
