"""A loopback front for a real registry: token service, bearer auth, faults, redirects.

    with LocalRegistry(tmp) as reg, TokenProxy(reg.host, users={"bob": "pw"}) as proxy:
        client = RegistryClient(proxy.host, credentials=Credentials("bob", "pw"))

`TokenProxy(upstream)` listens on 127.0.0.1 and plays two parts, like a
registry with token auth (docker hub, Harbor, GHCR):

- a token service at `/token` (GET with `service` and `scope` params; when
  `users` is given, it demands one of them by HTTP basic auth) that issues
  random tokens valid for `token_lifetime` seconds; `advertised_lifetime` is
  what it tells clients (`expires_in`), so a test can make a token expire while
  the client still trusts it;
- a registry front for `/v2/...` that answers 401 with a
  `WWW-Authenticate: Bearer realm=...,service=...,scope=...` challenge unless
  the request carries a valid, unexpired token covering the repository and
  action (pull for GET/HEAD, push otherwise), and forwards everything else to
  `upstream`, streaming both ways and rewriting Location headers to itself.

`require_token=False` makes it a plain forwarding proxy. Switches for tests:
`fail_next(n, status)` (fault injection), `truncate_blob_gets=n` (the first n
full blob downloads are cut off half-way, the connection dropped), `revoke_tokens()`,
`expire_tokens_at_next(method)`, and `redirect_blobs_to="host:port"` (blob GETs
answered 307 to another server, e.g. a second TokenProxy with
require_token=False standing in for object storage). Every request is recorded
in `requests`. Standard library only; no zest imports.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
_V2_RE = re.compile(r"^/v2/(?P<repo>.+)/(?:manifests|blobs|tags)/")
_BLOB_GET_RE = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
_COPY_CHUNK = 1 << 16


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it."""

    method: str
    path: str
    authorization: str | None
    range: str | None
    status: int


class TokenProxy:
    """See the module docstring."""

    def __init__(
        self,
        upstream: str,
        *,
        users: Mapping[str, str] | None = None,
        token_lifetime: float = 300.0,
        advertised_lifetime: float | None = None,
        require_token: bool = True,
        redirect_blobs_to: str | None = None,
        truncate_blob_gets: int = 0,
        service: str = "zest-test",
    ) -> None:
        self.upstream = upstream
        self.users = dict(users) if users is not None else None
        self.token_lifetime = token_lifetime
        self.advertised_lifetime = advertised_lifetime or token_lifetime
        self.require_token = require_token
        self.redirect_blobs_to = redirect_blobs_to
        self._truncate_left = truncate_blob_gets
        self.service = service
        self.requests: list[Seen] = []
        self.tokens_issued = 0
        self.challenges = 0
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, frozenset[str]]] = {}  # token -> expiry, scopes
        self._fail: list[int] = []
        self._expire_at_method: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    @property
    def host(self) -> str:
        assert self._server is not None, "not started"
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def realm(self) -> str:
        return f"http://{self.host}/token"

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> TokenProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- switches

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next `count` /v2/ requests with `status` instead of forwarding them."""
        with self._lock:
            self._fail.extend([status] * count)

    def revoke_tokens(self) -> None:
        """Every token issued so far stops working now."""
        with self._lock:
            self._tokens.clear()

    def expire_tokens_at_next(self, method: str) -> None:
        """Revoke all tokens when the next request with this method arrives (e.g. "PUT")."""
        with self._lock:
            self._expire_at_method = method

    # -- token bookkeeping (called by the handler)

    def _issue(self, scopes: list[str]) -> str:
        token = secrets.token_hex(16)
        with self._lock:
            self._tokens[token] = (time.monotonic() + self.token_lifetime, frozenset(scopes))
            self.tokens_issued += 1
        return token

    def _authorized(self, header: str | None, needed: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self._lock:
            entry = self._tokens.get(header[len("Bearer ") :])
        if entry is None or entry[0] < time.monotonic():
            return False
        if needed is None:
            return True
        repo_needed, actions_needed = needed.rsplit(":", 1)
        for scope in entry[1]:
            repo, _, actions = scope.rpartition(":")
            if repo == repo_needed and set(actions_needed.split(",")) <= set(actions.split(",")):
                return True
        return False

    def _check_users(self, header: str | None) -> bool:
        if self.users is None:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return self.users.get(user) == password

    def _take_fault(self, method: str) -> int | None:
        with self._lock:
            if self._expire_at_method == method:
                self._expire_at_method = None
                self._tokens.clear()
            return self._fail.pop(0) if self._fail else None

    def _take_truncation(self) -> bool:
        with self._lock:
            if self._truncate_left <= 0:
                return False
            self._truncate_left -= 1
            return True

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)
            if seen.status == 401:
                self.challenges += 1


def _handler_for(proxy: TokenProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: tests assert on proxy.requests

        def do_GET(self) -> None:
            self._handle()

        do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        # -- dispatch

        def _handle(self) -> None:
            path = urlsplit(self.path).path
            if path == "/token":
                self._token()
            elif path.startswith("/v2/"):
                self._registry(path)
            else:
                self._reply(404, b"not found\n")

        def send_response(self, code: int, message: str | None = None) -> None:
            # Recorded before the body goes out, so a client that has its answer finds it.
            proxy._record(
                Seen(
                    self.command,
                    self.path,
                    self.headers.get("Authorization"),
                    self.headers.get("Range"),
                    code,
                )
            )
            super().send_response(code, message)

        def _token(self) -> None:
            self._drain()
            if not proxy._check_users(self.headers.get("Authorization")):
                self._reply(401, b'{"details":"bad credentials"}\n')
                return
            query = parse_qs(urlsplit(self.path).query)
            scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
            token = proxy._issue(scopes)
            body = json.dumps(
                {
                    "token": token,
                    "access_token": token,
                    "expires_in": proxy.advertised_lifetime,
                    "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            ).encode()
            self._reply(200, body, {"Content-Type": "application/json"})

        def _registry(self, path: str) -> None:
            fault = proxy._take_fault(self.command)
            if fault is not None:
                self._drain()
                body = b'{"errors":[{"code":"UNKNOWN","message":"injected fault"}]}\n'
                self._reply(fault, body, {"Content-Type": "application/json"})
                return
            if proxy.require_token:
                m = _V2_RE.match(path)
                needed = None
                if m:
                    action = "pull" if self.command in ("GET", "HEAD") else "pull,push"
                    needed = f"repository:{m.group('repo')}:{action}"
                if not proxy._authorized(self.headers.get("Authorization"), needed):
                    self._drain()
                    challenge = f'Bearer realm="{proxy.realm}",service="{proxy.service}"'
                    if needed:
                        challenge += f',scope="{needed}"'
                    body = b'{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}\n'
                    headers = {"WWW-Authenticate": challenge, "Content-Type": "application/json"}
                    self._reply(401, body, headers)
                    return
            if proxy.redirect_blobs_to and self.command == "GET" and _BLOB_GET_RE.match(path):
                self._drain()
                location = f"http://{proxy.redirect_blobs_to}{self.path}"
                self._reply(307, b"", {"Location": location})
                return
            self._forward()

        # -- plumbing

        def _forward(self) -> None:
            conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "authorization":
                        conn.putheader(key, value)
                conn.endheaders()
                length = int(self.headers.get("Content-Length") or 0)
                while length > 0:
                    chunk = self.rfile.read(min(_COPY_CHUNK, length))
                    if not chunk:
                        break
                    conn.send(chunk)
                    length -= len(chunk)
                response = conn.getresponse()
                self.send_response(response.status)
                body_length = response.getheader("Content-Length")
                for key, value in response.getheaders():
                    if key.lower() in _HOP_BY_HOP:
                        continue
                    if key.lower() == "location":
                        value = value.replace(f"http://{proxy.upstream}", f"http://{proxy.host}")
                    self.send_header(key, value)
                data = b""
                if body_length is None and self.command != "HEAD":
                    data = response.read()
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if data:
                    self.wfile.write(data)
                cut = -1
                blob_get = _BLOB_GET_RE.match(urlsplit(self.path).path)
                if response.status == 200 and blob_get and body_length:
                    cut = int(body_length) // 2 if proxy._take_truncation() else -1
                sent = 0
                while chunk := response.read(_COPY_CHUNK):
                    if 0 <= cut < sent + len(chunk):
                        self.wfile.write(chunk[: cut - sent])
                        self.wfile.flush()
                        self.close_connection = True  # the client sees a short body
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
            finally:
                conn.close()

        def _drain(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            while length > 0:
                chunk = self.rfile.read(min(_COPY_CHUNK, length))
                if not chunk:
                    break
                length -= len(chunk)

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler
