"""hosts.toml mirrors against two real docker-registry processes: a mirror and an origin."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.image.store import OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST, Manifest
from snapshotter.registry import hosts
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import NotFoundError, RegistryUnavailableError
from snapshotter.registry.retry import RetryPolicy
from tests.support.registry import LocalRegistry, free_port, registry_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not registry_available(), reason="needs /usr/bin/docker-registry"),
]

FAST = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _push_image(client: RegistryClient, repo: str, tag: str, layer: bytes) -> Manifest:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    for blob in (config, layer):
        client.put_blob(repo, io.BytesIO(blob), _digest(blob), len(blob))
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": _digest(layer), "size": len(layer)}],
    }
    data = json.dumps(doc).encode()
    manifest = Manifest(OCI_MANIFEST, data, _digest(data))
    client.put_manifest(repo, tag, manifest)
    return manifest


@pytest.fixture(autouse=True)
def _empty_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path / "mirror") as reg:
        yield reg


def _hosts_dir(
    tmp_path: Path, origin: str, mirror_url: str, caps: str = '"pull", "resolve"'
) -> Path:
    d = tmp_path / "certs.d" / origin
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(
        f'server = "http://{origin}"\n[host."{mirror_url}"]\n  capabilities = [{caps}]\n'
    )
    return d.parent


def test_origin_down_reads_come_from_the_mirror(tmp_path: Path, mirror: LocalRegistry) -> None:
    layer = os.urandom(100_000)
    with RegistryClient(mirror.host, retry_policy=FAST) as direct:
        manifest = _push_image(direct, "app/mirrored", "v1", layer)
    origin = f"127.0.0.1:{free_port()}"  # nothing listens there
    hosts_dir = _hosts_dir(tmp_path, origin, f"http://{mirror.host}")
    with RegistryClient.for_host(origin, hosts_dir, retry_policy=FAST) as client:
        assert isinstance(client, hosts.MirroredClient)
        assert client.get_manifest("app/mirrored", "v1") == manifest
        assert client.manifest_exists("app/mirrored", "v1")
        assert client.head_blob("app/mirrored", _digest(layer)) == len(layer)
        with client.open_blob("app/mirrored", _digest(layer)) as f:
            assert f.read() == layer
        assert client.read_range("app/mirrored", _digest(layer), 500, 1000) == layer[500:1500]
        # the lazy read path's streamed and multi-range reads too
        with client.open_range("app/mirrored", _digest(layer), 700, 300) as f:
            assert f.read() == layer[700:1000]
        assert client.read_ranges("app/mirrored", _digest(layer), [(0, 10), (90_000, 5)]) == [
            layer[:10], layer[90_000:90_005]]
        # Neither has it: the origin's error, which says the mirror was tried.
        with pytest.raises(RegistryUnavailableError, match=r"mirrors tried first: .*not found"):
            client.get_manifest("app/mirrored", "v2")


def test_what_the_mirror_lacks_comes_from_the_origin(
    tmp_path: Path, mirror: LocalRegistry, registry: LocalRegistry
) -> None:
    only_origin = os.urandom(50_000)
    with RegistryClient(registry.host, retry_policy=FAST) as direct:
        manifest = _push_image(direct, "app/partial", "v1", only_origin)
    with RegistryClient(mirror.host, retry_policy=FAST) as direct:
        _push_image(direct, "app/partial", "v1", os.urandom(10))  # a different image, same tag
    hosts_dir = _hosts_dir(tmp_path, registry.host, f"http://{mirror.host}", caps='"pull"')
    digest = _digest(only_origin)
    with RegistryClient.for_host(registry.host, hosts_dir, retry_policy=FAST) as client:
        # Without "resolve" the mirror is never asked for tags: the origin's manifest wins.
        assert client.get_manifest("app/partial", "v1") == manifest
        assert client.head_blob("app/partial", digest) == len(only_origin)
        with client.open_blob("app/partial", digest) as f:
            assert f.read() == only_origin
        assert client.read_range("app/partial", digest, 10, 20) == only_origin[10:30]
        with pytest.raises(NotFoundError, match="mirrors tried first"):
            client.read_range("app/partial", _digest(b"nowhere"), 0, 1)
        # Writes go to the origin only.
        blob = os.urandom(1000)
        client.put_blob("app/partial", io.BytesIO(blob), _digest(blob), len(blob))
    with RegistryClient(mirror.host) as m, RegistryClient(registry.host) as o:
        assert m.head_blob("app/partial", _digest(blob)) is None
        assert o.head_blob("app/partial", _digest(blob)) == len(blob)


def test_a_mirror_that_is_down_is_skipped_for_a_while(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    layer = os.urandom(1000)
    with RegistryClient(registry.host, retry_policy=FAST) as direct:
        _push_image(direct, "app/down", "v1", layer)
    dead = f"127.0.0.1:{free_port()}"
    hosts_dir = _hosts_dir(tmp_path, registry.host, f"http://{dead}")
    digest = _digest(layer)
    with RegistryClient.for_host(registry.host, hosts_dir, retry_policy=FAST) as client:
        assert client.read_range("app/down", digest, 0, 10) == layer[:10]
        ((_, mirror_client),) = client.mirrors
        calls = 0
        original = mirror_client.read_range

        def counting(*args: object) -> bytes:
            nonlocal calls
            calls += 1
            return original(*args)  # type: ignore[arg-type]

        mirror_client.read_range = counting  # type: ignore[method-assign]
        start = time.monotonic()
        for _ in range(20):
            assert client.read_range("app/down", digest, 0, 10) == layer[:10]
        assert calls == 0 and time.monotonic() - start < 2
