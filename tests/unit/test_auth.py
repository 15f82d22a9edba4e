"""Credentials from the docker config, challenge and token parsing, the auth flow (no network)."""

from __future__ import annotations

import base64
import json
import re
import threading
from pathlib import Path

import httpx
import pytest

from snapshotter.registry.auth import (
    ANONYMOUS,
    Challenge,
    Credentials,
    RegistryAuth,
    config_key_host,
    docker_config_path,
    load_docker_credentials,
    parse_challenge,
    parse_token_response,
    scope_for,
)
from snapshotter.registry.errors import AuthError


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _write_config(directory: Path, config: dict[str, object]) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------- docker config


def test_config_path_follows_docker_config_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert docker_config_path() == tmp_path / "config.json"
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert docker_config_path() == tmp_path / "home" / ".docker" / "config.json"


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("registry.example:5000", "registry.example:5000"),
        ("https://registry.example", "registry.example"),
        ("http://registry.example:5000/v2/", "registry.example:5000"),
        ("https://index.docker.io/v1/", "index.docker.io"),
    ],
)
def test_config_key_host(key: str, host: str) -> None:
    assert config_key_host(key) == host


def test_auth_field_is_base64_user_colon_password(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"auths": {"reg.example:5000": {"auth": _b64("al:pa:ss")}}})
    creds = load_docker_credentials("reg.example:5000", path)
    assert (creds.username, creds.password) == ("al", "pa:ss")
    assert str(path) in creds.source
    assert "user 'al'" in creds.describe()


def test_username_and_password_fields(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"auths": {"h.io": {"username": "u", "password": "p"}}})
    creds = load_docker_credentials("h.io", path)
    assert (creds.username, creds.password, creds.anonymous) == ("u", "p", False)


def test_identity_token(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"auths": {"h.io": {"auth": "", "identitytoken": "refresh"}}})
    creds = load_docker_credentials("h.io", path)
    assert creds.identity_token == "refresh"
    assert not creds.anonymous
    assert "identity token" in creds.describe()


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("https://h.io", "h.io"),
        ("http://h.io:5000/", "h.io:5000"),
        ("https://index.docker.io/v1/", "registry-1.docker.io"),
        ("https://index.docker.io/v1/", "docker.io"),
        ("docker.io", "registry-1.docker.io"),
    ],
)
def test_keys_match_like_docker(tmp_path: Path, key: str, host: str) -> None:
    path = _write_config(tmp_path, {"auths": {key: {"auth": _b64("u:p")}}})
    assert load_docker_credentials(host, path).username == "u"


def test_port_must_match(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"auths": {"h.io": {"auth": _b64("u:p")}}})
    creds = load_docker_credentials("h.io:5000", path)
    assert creds.anonymous
    assert "no entry for h.io:5000" in creds.source
    assert str(path) in creds.source


def test_exact_key_wins(tmp_path: Path) -> None:
    config = {"auths": {"https://h.io": {"auth": _b64("a:1")}, "h.io": {"auth": _b64("b:2")}}}
    assert load_docker_credentials("h.io", _write_config(tmp_path, config)).username == "b"


def test_missing_config_is_anonymous_and_says_where_it_looked(tmp_path: Path) -> None:
    creds = load_docker_credentials("h.io", tmp_path / "config.json")
    assert creds.anonymous
    assert "does not exist" in creds.describe()


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("{not json", "cannot read docker config"),
        ("[]", "not a JSON object"),
        ('{"auths": {"h.io": {"auth": "%%%"}}}', "not base64"),
        (json.dumps({"auths": {"h.io": {"auth": _b64("nocolon")}}}), "no ':'"),
    ],
)
def test_malformed_config_names_the_file(tmp_path: Path, content: str, complaint: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(AuthError, match=complaint) as info:
        load_docker_credentials("h.io", path)
    assert str(path) in str(info.value)


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text(
        "#!/bin/sh\nread server\n"
        'if [ "$server" = "h.io" ]; then echo \'{"Username":"hu","Secret":"hs"}\'; exit 0; fi\n'
        "echo 'credentials not found' >&2; exit 1\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:/usr/bin:/bin")
    path = _write_config(
        tmp_path, {"credHelpers": {"h.io": "fake"}, "auths": {"o.io": {"auth": _b64("o:p")}}}
    )
    creds = load_docker_credentials("h.io", path)
    assert (creds.username, creds.password) == ("hu", "hs")
    assert "docker-credential-fake" in creds.source
    assert load_docker_credentials("o.io", path).username == "o"  # no helper for o.io


# ---------------------------------------------------------------- challenges, tokens, scopes


def test_parse_bearer_challenge_with_commas_in_scope() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push",error="insufficient_scope"'
    )
    challenge = parse_challenge(header)
    assert challenge == Challenge(
        "bearer",
        {
            "realm": "https://auth.example/token",
            "service": "registry.example",
            "scope": "repository:a/b:pull,push",
            "error": "insufficient_scope",
        },
    )


def test_parse_basic_challenge_and_unquoted_values() -> None:
    assert parse_challenge('Basic realm="Registry Realm"') == Challenge(
        "basic", {"realm": "Registry Realm"}
    )
    challenge = parse_challenge("Bearer realm=https://a/token, service=svc")
    assert challenge is not None
    assert challenge.params == {"realm": "https://a/token", "service": "svc"}
    assert parse_challenge("") is None


def test_token_response_fields() -> None:
    token = parse_token_response(b'{"token": "t1", "expires_in": 300}', now=1000.0)
    assert token.value == "t1"
    assert token.fresh(1000.0 + 290) and not token.fresh(1000.0 + 296)
    token = parse_token_response(b'{"access_token": "t2"}', now=0.0)
    assert token.value == "t2"
    assert token.fresh(50.0) and not token.fresh(56.0)  # 60 s by default
    short = parse_token_response(b'{"token": "t3", "expires_in": 2}', now=0.0)
    assert short.fresh(0.9) and not short.fresh(1.1)  # renewed half-way, not at once


@pytest.mark.parametrize("body", [b"nope", b"[]", b"{}", b'{"token": 5}'])
def test_bad_token_responses(body: bytes) -> None:
    with pytest.raises(ValueError, match="token"):
        parse_token_response(body, now=0.0)


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/v2/", None),
        ("GET", "/v2/a/b/manifests/latest", ("a/b", False)),
        ("HEAD", "/v2/a/blobs/sha256:00", ("a", False)),
        ("POST", "/v2/a/b/c/blobs/uploads/", ("a/b/c", True)),
        ("PUT", "/v2/x/blobs/uploads/uuid", ("x", True)),
        ("GET", "/v2/x/tags/list", ("x", False)),
    ],
)
def test_scope_for_request(method: str, path: str, scope: tuple[str, bool] | None) -> None:
    assert scope_for(httpx.Request(method, f"http://r{path}")) == scope


# ---------------------------------------------------------------- the auth flow, mocked


class FakeRegistry:
    """A MockTransport handler: token service + registry demanding valid bearer tokens."""

    def __init__(self, basic_only: bool = False) -> None:
        self.valid: set[str] = set()
        self.token_requests: list[httpx.Request] = []
        self.registry_auth: list[str | None] = []
        self.basic_only = basic_only
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            with self.lock:
                self.token_requests.append(request)
                token = f"tok{len(self.token_requests)}"
                self.valid.add(token)
            return httpx.Response(200, json={"token": token, "expires_in": 300})
        auth = request.headers.get("Authorization")
        self.registry_auth.append(auth)
        if self.basic_only:
            if auth == "Basic " + _b64("u:p"):
                return httpx.Response(200, content=b"ok")
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if auth and auth.removeprefix("Bearer ") in self.valid:
            return httpx.Response(200, content=b"ok")
        scope = scope_for(request)
        challenge = 'Bearer realm="http://auth.test/token",service="svc"'
        if scope:
            action = "pull,push" if scope[1] else "pull"
            challenge += f',scope="repository:{scope[0]}:{action}"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})


def _client(
    fake: FakeRegistry, creds: Credentials = ANONYMOUS
) -> tuple[httpx.Client, RegistryAuth]:
    http = httpx.Client(transport=httpx.MockTransport(fake), base_url="http://reg.test")
    return http, RegistryAuth("reg.test", creds, http, base_url="http://reg.test")


def test_bearer_flow_fetches_once_then_reuses_the_token() -> None:
    fake = FakeRegistry()
    http, auth = _client(fake, Credentials("u", "p", source="test"))
    for _ in range(3):
        assert http.get("/v2/a/manifests/x", auth=auth).status_code == 200
    assert len(fake.token_requests) == 1
    token_request = fake.token_requests[0]
    assert token_request.headers["Authorization"] == "Basic " + _b64("u:p")
    assert token_request.url.params.get_list("scope") == ["repository:a:pull"]
    assert token_request.url.params["service"] == "svc"
    assert fake.registry_auth == [None, "Bearer tok1", "Bearer tok1", "Bearer tok1"]


def test_revoked_token_is_replaced_once() -> None:
    fake = FakeRegistry()
    http, auth = _client(fake)
    http.get("/v2/a/blobs/sha256:00", auth=auth)
    fake.valid.clear()  # the registry forgets the token: expired early
    response = http.get("/v2/a/blobs/sha256:00", auth=auth)
    assert response.status_code == 200
    assert fake.registry_auth[-2:] == ["Bearer tok1", "Bearer tok2"]
    assert "Authorization" not in fake.token_requests[0].headers  # anonymous token


def test_push_token_covers_pull_and_tokens_are_per_repository() -> None:
    fake = FakeRegistry()
    http, auth = _client(fake)
    http.post("/v2/a/blobs/uploads/", auth=auth)
    http.get("/v2/a/blobs/sha256:00", auth=auth)  # pull on a: the push token does
    http.get("/v2/b/blobs/sha256:00", auth=auth)  # another repository: a new token
    scopes = [r.url.params.get_list("scope") for r in fake.token_requests]
    assert scopes == [["repository:a:pull,push"], ["repository:b:pull"]]


class StreamingTransport(httpx.BaseTransport):
    """Consumes request bodies as a network transport does (MockTransport buffers them)."""

    def __init__(self, handler: FakeRegistry) -> None:
        self.handler = handler

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _ in request.stream:  # type: ignore[union-attr]
            pass
        return self.handler(request)


def test_unreplayable_body_gets_the_401_back() -> None:
    fake = FakeRegistry()
    http = httpx.Client(transport=StreamingTransport(fake), base_url="http://reg.test")
    auth = RegistryAuth("reg.test", ANONYMOUS, http, base_url="http://reg.test")
    response = http.put("/v2/a/blobs/uploads/u", content=iter([b"data"]), auth=auth)
    assert response.status_code == 401  # the caller restarts the upload
    assert len(fake.token_requests) == 1  # but the next try already has a token
    assert http.put("/v2/a/blobs/uploads/u", content=iter([b"x"]), auth=auth).status_code == 200


def test_basic_challenge_uses_credentials_and_then_sends_them_preemptively() -> None:
    fake = FakeRegistry(basic_only=True)
    http, auth = _client(fake, Credentials("u", "p", source="test"))
    assert http.get("/v2/a/manifests/x", auth=auth).status_code == 200
    assert http.get("/v2/a/manifests/y", auth=auth).status_code == 200
    assert fake.registry_auth == [None, "Basic " + _b64("u:p"), "Basic " + _b64("u:p")]


def test_basic_challenge_without_credentials_returns_401() -> None:
    fake = FakeRegistry(basic_only=True)
    http, auth = _client(fake)
    assert http.get("/v2/a/manifests/x", auth=auth).status_code == 401


def test_identity_token_is_exchanged_by_post() -> None:
    fake = FakeRegistry()
    http, auth = _client(fake, Credentials(identity_token="refresh-me", source="test"))
    assert http.get("/v2/a/manifests/x", auth=auth).status_code == 200
    request = fake.token_requests[0]
    assert request.method == "POST"
    form = dict(httpx.QueryParams(request.content.decode()))
    assert form["grant_type"] == "refresh_token"
    assert form["refresh_token"] == "refresh-me"


def test_token_service_refusal_is_an_auth_error_naming_the_credentials() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(401)
        challenge = 'Bearer realm="http://auth.test/token",service="svc"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://reg.test")
    creds = Credentials("u", "p", source="/cfg/config.json")
    auth = RegistryAuth("reg.test", creds, http, base_url="http://reg.test")
    with pytest.raises(AuthError, match=re.escape("refused user 'u' from /cfg/config.json")):
        http.get("/v2/a/manifests/x", auth=auth)


def test_other_hosts_never_get_credentials() -> None:
    fake = FakeRegistry(basic_only=True)
    http, auth = _client(fake, Credentials("u", "p", source="test"))
    http.get("/v2/a/manifests/x", auth=auth)  # learns that reg.test wants basic auth
    http.get("http://storage.test/v2/a/manifests/x", auth=auth)
    assert fake.registry_auth[-1] is None
