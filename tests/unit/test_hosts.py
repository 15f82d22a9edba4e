"""hosts.toml parsing and endpoint order, as containerd's remotes/docker/config reads them."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from snapshotter.registry import hosts
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.hosts import (
    ALL_CAPABILITIES,
    Endpoint,
    HostsConfigError,
    MirroredClient,
    host_directory,
    load_hosts,
    parse_hosts_toml,
)

BASE = Path("/etc/containerd/certs.d/registry.example")


def test_full_example() -> None:
    text = """
server = "https://registry.example"

[host."https://mirror-b.example"]
  capabilities = ["pull", "resolve"]
  ca = "mirror.pem"
  skip_verify = false

[host."http://mirror-a.local:5000"]
  capabilities = ["pull"]
  skip_verify = true
  client = [["/abs/c.cert", "c.key"], "both.pem"]
  [host."http://mirror-a.local:5000".header]
    x-one = "1"
    x-many = ["a", "b"]
"""
    eps = parse_hosts_toml(text, BASE, "registry.example")
    # File order, not alphabetical; the server last.
    assert [str(e) for e in eps] == [
        "https://mirror-b.example",
        "http://mirror-a.local:5000",
        "https://registry.example",
    ]
    b, a, server = eps
    assert b.capabilities == {"pull", "resolve"} and b.ca_files == (BASE / "mirror.pem",)
    assert b.skip_verify is False and not b.is_server
    assert a.scheme == "http" and a.host == "mirror-a.local:5000" and a.path == "/v2"
    assert a.capabilities == {"pull"} and a.skip_verify is True
    assert a.client_pairs == ((Path("/abs/c.cert"), BASE / "c.key"), (BASE / "both.pem", None))
    assert a.headers == (("x-one", "1"), ("x-many", "a"), ("x-many", "b"))
    assert server.is_server and server.capabilities == ALL_CAPABILITIES


def test_server_defaults_to_the_host() -> None:
    eps = parse_hosts_toml('[host."https://m.example"]\n', BASE, "registry.example:5000")
    assert [str(e) for e in eps] == ["https://m.example", "https://registry.example:5000"]
    assert eps[-1].is_server
    # docker.io's API lives elsewhere; loopback and --plain-http mean http.
    assert str(parse_hosts_toml("", BASE, "docker.io")[-1]) == "https://registry-1.docker.io"
    assert str(parse_hosts_toml("", BASE, "127.0.0.1:5000")[-1]) == "http://127.0.0.1:5000"
    assert str(parse_hosts_toml("", BASE, "r.example", plain_http=True)[-1]) == "http://r.example"


def test_top_level_keys_configure_the_server() -> None:
    text = (
        'server = "r.example:443"\ncapabilities = ["pull", "resolve"]\nca = ["a.crt", "/b.crt"]\n'
    )
    (server,) = parse_hosts_toml(text, BASE, "r.example")
    assert str(server) == "https://r.example:443"  # no scheme: https
    assert server.capabilities == {"pull", "resolve"}
    assert server.ca_files == (BASE / "a.crt", Path("/b.crt"))


@pytest.mark.parametrize(
    ("url", "override", "path"),
    [
        ("https://m.example", False, "/v2"),
        ("https://m.example/", False, "/v2"),
        ("https://m.example/registry", False, "/registry/v2"),
        ("https://m.example/registry/v2", False, "/registry/v2"),
        ("https://m.example/a/../b/", False, "/b/v2"),
        ("https://m.example/custom/api", True, "/custom/api"),
        ("https://m.example", True, ""),
    ],
)
def test_api_root(url: str, override: bool, path: str) -> None:
    text = f'[host."{url}"]\noverride_path = {str(override).lower()}\n'
    assert parse_hosts_toml(text, BASE, "r.example")[0].path == path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = [", "not valid TOML"),
        ('[host."ftp://m"]\n', "not an http:// or https:// URL"),
        ('[host."https://m"]\ncapabilities = ["pull", "fly"]\n', "unknown capability 'fly'"),
        ('[host."https://m"]\nca = 3\n', "`ca` must be a string or a list"),
        ('[host."https://m"]\nclient = [["a"]]\n', "is not a file or a pair"),
        ('[host."https://m"]\nskip_verify = "yes"\n', "must be true or false"),
        ('[host."https://m"]\nheader = "x"\n', "`header` must be a table"),
        ("server = 5\n", "`server` must be a URL"),
    ],
)
def test_errors_name_the_file(text: str, message: str) -> None:
    with pytest.raises(HostsConfigError, match=message) as info:
        parse_hosts_toml(text, BASE, "r.example")
    assert str(BASE / "hosts.toml") in str(info.value)


def test_host_directory_order(tmp_path: Path) -> None:
    assert host_directory(tmp_path, "r.example:5000") is None
    (tmp_path / "_default").mkdir()
    assert host_directory(tmp_path, "r.example:5000") == tmp_path / "_default"
    (tmp_path / "r.example:5000").mkdir()
    assert host_directory(tmp_path, "r.example:5000") == tmp_path / "r.example:5000"
    (tmp_path / "r.example_5000_").mkdir()
    assert host_directory(tmp_path, "r.example:5000") == tmp_path / "r.example_5000_"
    assert host_directory(tmp_path, "other.example") == tmp_path / "_default"


def test_load_hosts(tmp_path: Path) -> None:
    # No directory at all: the default server alone.
    config = load_hosts("r.example", tmp_path)
    assert [str(e) for e in config.endpoints] == ["https://r.example"]
    assert load_hosts("r.example", None).endpoints == config.endpoints
    # _default applies to every host; its server (absent here) is each host's own.
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."http://cache.local"]\n')
    config = load_hosts("r.example", tmp_path)
    assert [str(e) for e in config.endpoints] == ["http://cache.local", "https://r.example"]
    assert config.source == tmp_path / "_default"
    assert [str(e) for e in config.for_capability("push")] == [
        "http://cache.local",
        "https://r.example",
    ]


def test_docker_cert_layout_without_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "r.example"
    d.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "lonely.cert"):
        (d / name).write_text("")
    (server,) = load_hosts("r.example", tmp_path).endpoints
    assert server.ca_files == (d / "ca.crt",)
    assert server.client_pairs == ((d / "client.cert", d / "client.key"),)


def test_tls_settings() -> None:
    assert Endpoint("https", "m").tls() is True
    context = Endpoint("https", "m", skip_verify=True).tls()
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_NONE
    with pytest.raises(HostsConfigError, match="TLS files for https://m"):
        Endpoint("https", "m", ca_files=(Path("/nonexistent/ca.pem"),)).tls()


def test_client_for_host(tmp_path: Path) -> None:
    with RegistryClient.for_host("r.example", tmp_path) as plain:
        assert type(plain) is RegistryClient and plain.base_url == "https://r.example"
    d = tmp_path / "r.example"
    d.mkdir()
    (d / "hosts.toml").write_text(
        'server = "http://r.example:8080"\n[host."http://m.local/api"]\noverride_path = true\n'
    )
    with RegistryClient.for_host("r.example", tmp_path) as client:
        assert isinstance(client, MirroredClient)
        assert client.base_url == "http://r.example:8080"
        ((endpoint, mirror),) = client.mirrors
        assert endpoint.path == "/api" and mirror.base_url == "http://m.local"
    assert Path("/etc/containerd/certs.d") == hosts.DEFAULT_HOSTS_DIR
