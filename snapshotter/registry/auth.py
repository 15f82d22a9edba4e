"""Who we are to a registry: docker config credentials, basic auth and bearer tokens.

`load_docker_credentials` reads the credentials docker would use for a host
(`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`: `auths` entries with
base64 `auth`, `username`/`password` or `identitytoken`; `credHelpers` and
`credsStore` helpers). `RegistryAuth` is the httpx.Auth that answers a
registry's challenge: Basic with those credentials, or Bearer with a token
fetched from the challenge's realm.

Concurrency: one RegistryAuth serves every thread of its client. The token
cache and the remembered challenge are guarded by `_lock`; token fetches are
serialised by `_fetch_lock`, so a burst of requests after a token expired costs
one fetch, not one per thread.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from snapshotter.registry.errors import AuthError, RegistryUnavailableError

log = logging.getLogger(__name__)

DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token service does not say (distribution spec)
_TOKEN_MARGIN = 5.0  # renew a token this long before it expires (half that of a short one)


@dataclass(frozen=True)
class Credentials:
    """A login for one registry host, and where it came from (for error messages)."""

    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token, from `docker login` on some registries
    source: str = "no credentials"

    @property
    def anonymous(self) -> bool:
        return not (self.username or self.identity_token)

    def describe(self) -> str:
        if self.identity_token:
            return f"an identity token from {self.source}"
        if self.username:
            return f"user {self.username!r} from {self.source}"
        return self.source


ANONYMOUS = Credentials(source="no credentials (anonymous access requested)")


# ---------------------------------------------------------------- docker config


def docker_config_path() -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, as docker looks it up."""
    directory = os.environ.get("DOCKER_CONFIG")
    if directory:
        return Path(directory) / "config.json"
    return Path.home() / ".docker" / "config.json"


def config_key_host(key: str) -> str:
    """The host a config.json key stands for, as docker's ConvertToHostname computes it.

    "https://index.docker.io/v1/" -> "index.docker.io"; "http://h:5000/x" -> "h:5000".
    """
    for prefix in ("http://", "https://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key.split("/", 1)[0]


def _same_registry(key: str, host: str) -> bool:
    key_host = config_key_host(key)
    if key_host in _DOCKER_HUB_HOSTS and host in _DOCKER_HUB_HOSTS:
        return True
    return key_host == host


def load_docker_credentials(host: str, config_path: Path | None = None) -> Credentials:
    """The credentials docker would send to `host` ("name[:port]"), or anonymous ones.

    Anonymous credentials still say where we looked, so that a later AuthError can
    tell the operator which file to fix. A malformed config file is an AuthError.
    """
    path = config_path or docker_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return Credentials(source=f"no credentials ({path} does not exist)")
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read docker config {path}: {exc}; fix or remove the file") from exc
    if not isinstance(config, dict):
        raise AuthError(f"docker config {path} is not a JSON object; fix or remove the file")

    helper = _helper_for(config, host)
    if helper:
        creds = _credentials_from_helper(helper, host, path)
        if creds is not None:
            return creds
    auths = config.get("auths") or {}
    if not isinstance(auths, dict):
        raise AuthError(f"docker config {path}: 'auths' is not an object; fix the file")
    entry = auths.get(host)
    if entry is None:
        entry = next((v for k, v in auths.items() if _same_registry(k, host)), None)
    if isinstance(entry, dict):
        creds = _credentials_from_entry(entry, host, path)
        if creds is not None:
            return creds
    return Credentials(source=f"no credentials (no entry for {host} in {path})")


def _credentials_from_entry(entry: Mapping[str, Any], host: str, path: Path) -> Credentials | None:
    source = f"{path} (auths entry for {host})"
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    encoded = entry.get("auth")
    if encoded:
        try:
            decoded = base64.b64decode(str(encoded), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise AuthError(
                f"docker config {path}: the 'auth' value for {host} is not base64 of "
                f"'user:password'; run `docker login {host}` again"
            ) from exc
        username, sep, password = decoded.partition(":")
        if not sep:
            raise AuthError(
                f"docker config {path}: the 'auth' value for {host} has no ':' between "
                f"user and password; run `docker login {host}` again"
            )
    identity_token = str(entry.get("identitytoken") or "")
    if not (username or identity_token):
        return None
    return Credentials(username, password, identity_token, source)


def _helper_for(config: Mapping[str, Any], host: str) -> str:
    helpers = config.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if _same_registry(key, host):
                return str(name)
    return str(config.get("credsStore") or "")


def _credentials_from_helper(name: str, host: str, path: Path) -> Credentials | None:
    """Ask `docker-credential-<name>`; None when it knows nothing of the host or fails."""
    program = f"docker-credential-{name}"
    server = DOCKER_HUB_CONFIG_KEY if host in _DOCKER_HUB_HOSTS else host
    try:
        done = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("credential helper failed", extra={"kv": {"helper": program, "error": exc}})
        return None
    if done.returncode != 0:
        return None  # "credentials not found" is the usual answer
    try:
        answer = json.loads(done.stdout)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AuthError(
            f"{program} (named in {path}) answered something other than "
            "{{Username, Secret}} JSON; check the helper"
        ) from exc
    source = f"{program} (named in {path})"
    if username == "<token>":
        return Credentials(identity_token=secret, source=source)
    return Credentials(username, secret, source=source)


# ---------------------------------------------------------------- challenges and tokens


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: scheme ("bearer"/"basic", lower case) and params."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)')


def parse_challenge(header: str) -> Challenge | None:
    """Parse `Bearer realm="...",service="...",scope="a,b"`; None for an empty header."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True)
class Token:
    value: str
    renew_at: float  # on RegistryAuth's clock (monotonic): a little before it expires

    def fresh(self, now: float) -> bool:
        return now < self.renew_at


def parse_token_response(body: bytes, now: float) -> Token:
    """A token service's JSON answer: `token` or `access_token`, and `expires_in` seconds."""
    try:
        answer = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"token service answered non-JSON: {body[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise ValueError("token service answered JSON that is not an object")
    value = answer.get("token") or answer.get("access_token")
    if not value or not isinstance(value, str):
        raise ValueError("token service answer has neither 'token' nor 'access_token'")
    lifetime = answer.get("expires_in")
    if not isinstance(lifetime, (int, float)) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    lifetime = float(lifetime)
    return Token(value, now + max(lifetime - _TOKEN_MARGIN, lifetime / 2))


_V2_PATH_RE = re.compile(r"^/v2/(?P<repo>.+)/(?:manifests|blobs|tags)/")


def scope_for(request: httpx.Request) -> tuple[str, bool] | None:
    """(repository, needs push) for a distribution API request, None for `/v2/` itself."""
    m = _V2_PATH_RE.match(request.url.path)
    if not m:
        return None
    return m.group("repo"), request.method not in ("GET", "HEAD")


def _scope_string(key: tuple[str, bool]) -> str:
    repo, push = key
    return f"repository:{repo}:{'pull,push' if push else 'pull'}"


# ---------------------------------------------------------------- the httpx.Auth


def _body_replayable(request: httpx.Request) -> bool:
    return isinstance(request.stream, httpx.ByteStream)


class RegistryAuth(httpx.Auth):
    """Answers Basic and Bearer challenges of one registry host; caches tokens per scope.

    A request goes out with whatever this host wanted last time (basic header or a
    cached, unexpired token for its repository and action). On 401 it reads the
    challenge, fetches a token (or uses basic) and resends once. A 401 despite a
    cached token means the token expired or was revoked: it is dropped, a fresh one
    fetched and the request resent once. Requests whose streamed body cannot be sent
    twice get the 401 back; the client restarts such uploads itself.
    """

    def __init__(
        self,
        host: str,
        credentials: Credentials,
        token_client: httpx.Client,
        *,
        base_url: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`base_url` ("scheme://host[:port]", default https) decides which requests get
        credentials: never those to another host, such as an absolute upload Location."""
        self.host = host
        self._netloc = httpx.URL(base_url or f"https://{host}").netloc
        self.credentials = credentials
        self._http = token_client
        self._clock = clock
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, bool] | None, Token] = {}

    # -- the flow httpx drives

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        if request.url.netloc != self._netloc:
            yield request  # not ours: a storage backend or another registry
            return
        key = scope_for(request)
        sent = self._authorize(request, key, self._known_challenge())
        response = yield request
        if response.status_code != 401 or response.request.url.netloc != self._netloc:
            return
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None or challenge.scheme not in ("basic", "bearer"):
            return
        # Remembered for the next requests, minus what was about this one.
        params = {k: v for k, v in challenge.params.items() if k not in ("scope", "error")}
        with self._lock:
            self._challenge = Challenge(challenge.scheme, params)
        if challenge.scheme == "basic" and (
            self.credentials.anonymous or "Authorization" in request.headers
        ):
            return  # nothing to send, or our credentials were refused
        self._authorize(request, key, challenge, stale=sent)
        if not _body_replayable(request):
            return  # the body stream is spent; the caller restarts the upload
        yield request

    # -- helpers

    def _known_challenge(self) -> Challenge | None:
        with self._lock:
            return self._challenge

    def _authorize(
        self,
        request: httpx.Request,
        key: tuple[str, bool] | None,
        challenge: Challenge | None,
        stale: Token | None = None,
    ) -> Token | None:
        """Set the Authorization header the challenge asks for; return the token used."""
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if not self.credentials.anonymous:
                request.headers["Authorization"] = _basic_header(self.credentials)
            return None
        token = self._token(key, challenge, stale)
        request.headers["Authorization"] = f"Bearer {token.value}"
        return token

    def _token(
        self, key: tuple[str, bool] | None, challenge: Challenge, stale: Token | None
    ) -> Token:
        """A fresh token for `key`, never `stale` (one that was just refused)."""
        token = self._cached(key)
        if token is not None and token is not stale:
            return token
        with self._fetch_lock:
            token = self._cached(key)  # another thread may have fetched it meanwhile
            if token is None or token is stale:
                token = self._fetch_token(key, challenge)
                with self._lock:
                    self._tokens[key] = token
            return token

    def _cached(self, key: tuple[str, bool] | None) -> Token | None:
        now = self._clock()
        with self._lock:
            candidates = [self._tokens.get(key)]
            if key is not None and not key[1]:
                candidates.append(self._tokens.get((key[0], True)))  # push implies pull
        return next((t for t in candidates if t is not None and t.fresh(now)), None)

    def _fetch_token(self, key: tuple[str, bool] | None, challenge: Challenge) -> Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(
                f"registry {self.host} sent a Bearer challenge without a realm; "
                "the registry's token auth is misconfigured"
            )
        scopes = {s for s in [challenge.params.get("scope", "")] if s}
        if key is not None:
            scopes.add(_scope_string(key))
        service = challenge.params.get("service", "")
        now = self._clock()
        try:
            response = self._token_request(realm, service, sorted(scopes))
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(
                f"token service {realm} for registry {self.host} is unreachable: {exc}; "
                "check the network or try again later"
            ) from exc
        if response.status_code in (401, 403):
            raise AuthError(
                f"token service {realm} for registry {self.host} refused "
                f"{self.credentials.describe()} (HTTP {response.status_code}); "
                f"log in again with `docker login {self.host}` or fix the credentials"
            )
        if response.status_code != 200:
            raise RegistryUnavailableError(
                f"token service {realm} for registry {self.host} answered HTTP "
                f"{response.status_code}; try again later"
            )
        try:
            token = parse_token_response(response.content, now)
        except ValueError as exc:
            raise AuthError(f"token service {realm} for registry {self.host}: {exc}") from exc
        log.debug("token fetched", extra={"kv": {"host": self.host, "scope": " ".join(scopes)}})
        return token

    def _token_request(self, realm: str, service: str, scopes: list[str]) -> httpx.Response:
        creds = self.credentials
        if creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token}
            form.update(client_id="zest", service=service, scope=" ".join(scopes))
            return self._http.post(realm, data=form)
        params = httpx.QueryParams({"service": service} if service else {})
        for scope in scopes:
            params = params.add("scope", scope)
        headers = {} if creds.anonymous else {"Authorization": _basic_header(creds)}
        return self._http.get(realm, params=params, headers=headers)


def _basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()
