"""The registry client and the image stores against a real docker-registry on loopback.

`registry` is the session fixture of tests/conftest.py (anonymous); tests that
need basic auth start their own LocalRegistry. Fronts from
tests/support/tokenproxy.py add what the plain registry lacks:
bearer tokens that expire, injected 5xx faults and redirects to another host.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.image.store import OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST, Manifest
from snapshotter.image.stores import (
    OciArchiveStore,
    OciLayoutStore,
    RegistryStore,
    open_store,
)
from snapshotter.registry.auth import ANONYMOUS, Credentials
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import (
    AuthError,
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from snapshotter.registry.retry import RetryPolicy
from tests.support.registry import LocalRegistry, registry_available
from tests.support.tokenproxy import TokenProxy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not registry_available(), reason="needs /usr/bin/docker-registry"),
]

FAST = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _image(layer: bytes) -> tuple[bytes, Manifest]:
    """A config blob and a manifest pointing at it and at `layer`."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": _digest(layer), "size": len(layer)}],
    }
    data = json.dumps(doc).encode()
    return config, Manifest(OCI_MANIFEST, data, _digest(data))


@pytest.fixture(autouse=True)
def _empty_docker_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """No test sees the credentials of the machine it runs on."""
    directory = tmp_path_factory.mktemp("docker-config")
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return directory


@pytest.fixture
def client(registry: LocalRegistry) -> Iterator[RegistryClient]:
    with RegistryClient(registry.host, retry_policy=FAST) as c:
        yield c


@pytest.fixture
def blob() -> tuple[bytes, str]:
    data = os.urandom(300_000)
    return data, _digest(data)


# ---------------------------------------------------------------- basic API


def test_push_and_pull_blob_and_manifest(client: RegistryClient, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    config, manifest = _image(data)
    assert client.head_blob("app/one", digest) is None
    client.put_blob("app/one", io.BytesIO(data), digest, len(data))
    client.put_blob("app/one", io.BytesIO(config), _digest(config), len(config))
    client.put_manifest("app/one", "v1", manifest)

    assert client.head_blob("app/one", digest) == len(data)
    with client.open_blob("app/one", digest) as f:
        assert f.read() == data
    assert client.get_manifest("app/one", "v1") == manifest
    assert client.get_manifest("app/one", manifest.digest) == manifest
    assert client.manifest_exists("app/one", "v1")
    assert not client.manifest_exists("app/one", "v2")


def test_range_reads(client: RegistryClient, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    client.put_blob("app/range", io.BytesIO(data), digest, len(data))
    for offset, length in [(0, 1), (0, len(data)), (12345, 65536), (len(data) - 7, 7)]:
        assert (
            client.read_range("app/range", digest, offset, length) == data[offset : offset + length]
        )
    assert client.read_range("app/range", digest, 10, 0) == b""
    with pytest.raises(RegistryError, match="past the end of the blob"):
        client.read_range("app/range", digest, len(data) - 7, 8)
    with client.open_range("app/range", digest, 12345, 200_000) as f:  # streamed, in pieces
        assert f.read(1000) == data[12345:13345]
        assert f.read() == data[13345:212345]
    with pytest.raises(RegistryError, match="past the end of the blob"):
        client.open_range("app/range", digest, len(data) - 7, 8)


def test_multi_range_reads_from_the_real_registry(
    client: RegistryClient, blob: tuple[bytes, str]
) -> None:
    data, digest = blob
    client.put_blob("app/multirange", io.BytesIO(data), digest, len(data))
    ranges = [(i * 2_900 + 17, 1_000 + i) for i in range(100)]  # two requests: 64 + 36
    got = client.read_ranges("app/multirange", digest, ranges)
    assert got == [data[o : o + n] for o, n in ranges]
    assert client.multirange is True  # the distribution registry answers multipart/byteranges


def test_missing_objects(client: RegistryClient, registry: LocalRegistry) -> None:
    missing = _digest(b"never pushed")
    assert client.head_blob("app/none", missing) is None
    with pytest.raises(NotFoundError) as info:
        client.get_manifest("app/none", "nope")
    message = str(info.value)
    assert f"{registry.host}/app/none:nope" in message
    assert "HTTP 404" in message and "MANIFEST_UNKNOWN" in message
    with pytest.raises(NotFoundError, match=f"blob {missing} in {registry.host}/app/none"):
        client.open_blob("app/none", missing)


def test_put_blob_with_wrong_digest_or_size_stores_nothing(
    client: RegistryClient, blob: tuple[bytes, str]
) -> None:
    data, digest = blob
    with pytest.raises(DigestMismatchError, match="content has digest"):
        client.put_blob("app/bad", io.BytesIO(data[:-1] + b"x"), digest, len(data))
    with pytest.raises(DigestMismatchError, match="ended after"):
        client.put_blob("app/bad", io.BytesIO(data[:-1]), digest, len(data))
    with pytest.raises(DigestMismatchError, match="more than the claimed"):
        client.put_blob("app/bad", io.BytesIO(data + b"x"), digest, len(data))
    assert client.head_blob("app/bad", digest) is None


def test_concurrent_range_reads_share_one_client(
    client: RegistryClient, blob: tuple[bytes, str]
) -> None:
    data, digest = blob
    client.put_blob("app/threads", io.BytesIO(data), digest, len(data))
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            for i in range(20):
                offset = (seed * 7919 + i * 4099) % (len(data) - 4096)
                assert (
                    client.read_range("app/threads", digest, offset, 4096)
                    == data[offset : offset + 4096]
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---------------------------------------------------------------- retries


def test_server_errors_are_retried(registry: LocalRegistry, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    with (
        TokenProxy(registry.host, require_token=False) as proxy,
        RegistryClient(proxy.host, retry_policy=FAST) as c,
    ):
        proxy.fail_next(2, status=503)
        c.put_blob("app/retry", io.BytesIO(data), digest, len(data))  # POST fails twice
        proxy.fail_next(2, status=500)
        assert c.read_range("app/retry", digest, 5, 10) == data[5:15]
        statuses = [s.status for s in proxy.requests if s.method == "GET"]
        assert statuses == [500, 500, 206]

        proxy.fail_next(3, status=502)
        with pytest.raises(RegistryUnavailableError) as info:
            c.head_blob("app/retry", digest)
        assert "after 3 tries" in str(info.value)
        assert f"blob {digest} in {proxy.host}/app/retry" in str(info.value)


def test_client_errors_are_not_retried(registry: LocalRegistry) -> None:
    with (
        TokenProxy(registry.host, require_token=False) as proxy,
        RegistryClient(proxy.host, retry_policy=FAST) as c,
    ):
        proxy.fail_next(1, status=400)
        with pytest.raises(RegistryError, match="HTTP 400: UNKNOWN: injected fault"):
            c.get_manifest("app/x", "v1")
        assert len(proxy.requests) == 1


def test_connection_refused_is_unavailable() -> None:
    from tests.support.registry import free_port

    host = f"127.0.0.1:{free_port()}"
    with (
        RegistryClient(host, retry_policy=FAST) as c,
        pytest.raises(RegistryUnavailableError) as info,
    ):
        c.get_manifest("app/x", "v1")
    assert f"cannot connect to http://{host}" in str(info.value)


def test_blob_download_resumes_after_a_dropped_connection(
    registry: LocalRegistry, blob: tuple[bytes, str]
) -> None:
    data, digest = blob
    with RegistryClient(registry.host, retry_policy=FAST) as c:
        c.put_blob("app/resume", io.BytesIO(data), digest, len(data))
    with (
        TokenProxy(registry.host, require_token=False, truncate_blob_gets=1) as proxy,
        RegistryClient(proxy.host, retry_policy=FAST) as c,
        c.open_blob("app/resume", digest) as f,
    ):
        assert f.read() == data
    ranges = [s.range for s in proxy.requests]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")


# ---------------------------------------------------------------- auth


def _basic_config(directory: Path, host: str, user: str, password: str) -> Path:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path = directory / "config.json"
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


def test_basic_auth_with_docker_config(
    tmp_path: Path, _empty_docker_config: Path, blob: tuple[bytes, str]
) -> None:
    data, digest = blob
    with LocalRegistry(tmp_path / "reg", htpasswd={"alice": "s3cret"}) as reg:
        with RegistryClient(reg.host, retry_policy=FAST) as c, pytest.raises(AuthError) as info:
            c.head_blob("app/auth", digest)  # no config entry yet
        assert "docker login" in str(info.value) and reg.host in str(info.value)

        config = _basic_config(_empty_docker_config, reg.host, "alice", "s3cret")
        with RegistryClient(reg.host, retry_policy=FAST) as c:
            c.put_blob("app/auth", io.BytesIO(data), digest, len(data))
            assert c.read_range("app/auth", digest, 0, 100) == data[:100]

        _basic_config(_empty_docker_config, reg.host, "alice", "wrong")
        with RegistryClient(reg.host, retry_policy=FAST) as c, pytest.raises(AuthError) as info:
            c.head_blob("app/auth", digest)
        message = str(info.value)
        assert "user 'alice'" in message and str(config) in message and "HTTP 401" in message


def test_bearer_auth_renews_an_expired_token_between_range_reads(
    registry: LocalRegistry, blob: tuple[bytes, str]
) -> None:
    data, digest = blob
    # Tokens die after 0.5 s but are announced as valid for 5 minutes, so the
    # client keeps using one until the registry refuses it.
    with TokenProxy(
        registry.host, users={"bob": "pw"}, token_lifetime=0.5, advertised_lifetime=300
    ) as proxy:
        creds = Credentials("bob", "pw", source="test")
        with RegistryClient(proxy.host, credentials=creds, retry_policy=FAST) as c:
            c.put_blob("app/bearer", io.BytesIO(data), digest, len(data))
            issued = proxy.tokens_issued
            for i in range(6):
                offset = i * 1000
                assert (
                    c.read_range("app/bearer", digest, offset, 1000) == data[offset : offset + 1000]
                )
                if i == 2:
                    threading.Event().wait(0.6)  # the token expires mid-sequence
            # The upload's push token served the reads until it died; then one replacement.
            assert proxy.tokens_issued == issued + 1
            refused = [s for s in proxy.requests if s.status == 401 and s.authorization]
            assert len(refused) == 1  # exactly one read hit the expired token

        with (
            RegistryClient(proxy.host, credentials=ANONYMOUS, retry_policy=FAST) as c,
            pytest.raises(AuthError, match="token service"),
        ):
            c.head_blob("app/bearer", digest)


def test_bearer_token_revoked_during_upload(
    registry: LocalRegistry, blob: tuple[bytes, str]
) -> None:
    data, digest = blob
    with (
        TokenProxy(registry.host) as proxy,
        RegistryClient(proxy.host, credentials=ANONYMOUS, retry_policy=FAST) as c,
    ):
        proxy.expire_tokens_at_next("PUT")
        c.put_blob("app/revoked", io.BytesIO(data), digest, len(data))
        assert c.head_blob("app/revoked", digest) == len(data)
        puts = [s.status for s in proxy.requests if s.method == "PUT"]
        assert puts == [401, 201]  # the upload was restarted with a fresh token


def test_redirects_do_not_carry_the_registry_credentials(
    registry: LocalRegistry, blob: tuple[bytes, str]
) -> None:
    data, digest = blob
    with (
        TokenProxy(registry.host, require_token=False) as storage,
        TokenProxy(registry.host, redirect_blobs_to=storage.host) as front,
        RegistryClient(front.host, credentials=ANONYMOUS, retry_policy=FAST) as c,
    ):
        c.put_blob("app/redirect", io.BytesIO(data), digest, len(data))
        with c.open_blob("app/redirect", digest) as f:
            assert f.read() == data
        assert c.read_range("app/redirect", digest, 100, 50) == data[100:150]
        assert [s.status for s in storage.requests] == [200, 206]
        assert all(s.authorization is None for s in storage.requests)
        assert storage.requests[1].range == "bytes=100-149"
        redirected = [s for s in front.requests if s.status == 307]
        assert len(redirected) == 2 and all(s.authorization for s in redirected)


# ---------------------------------------------------------------- streaming


def test_streamed_put_and_get_of_50mb_stay_small_in_memory(
    client: RegistryClient, tmp_path: Path
) -> None:
    size = 50 * 1024 * 1024
    path = tmp_path / "big"
    hasher = hashlib.sha256()
    with path.open("wb") as f:
        block = os.urandom(1 << 20)
        for i in range(size >> 20):
            chunk = block[i:] + block[:i]
            hasher.update(chunk)
            f.write(chunk)
    digest = "sha256:" + hasher.hexdigest()

    tracemalloc.start()
    try:
        with path.open("rb") as f:
            client.put_blob("app/big", f, digest, size)
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        check = hashlib.sha256()
        with client.open_blob("app/big", digest) as f:
            while chunk := f.read(1 << 20):
                check.update(chunk)
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "sha256:" + check.hexdigest() == digest
    assert put_peak < 8 << 20, f"put_blob peaked at {put_peak} bytes"
    assert get_peak < 8 << 20, f"open_blob peaked at {get_peak} bytes"


# ---------------------------------------------------------------- stores


def _fill(store: RegistryStore | OciLayoutStore | OciArchiveStore, tag: str) -> Manifest:
    layer = os.urandom(100_000)
    config, manifest = _image(layer)
    for blob in (layer, config):
        store.put_blob(io.BytesIO(blob), _digest(blob), len(blob))
    store.put_manifest(manifest, tag)
    return manifest


def _check_copy(src: RegistryStore | OciLayoutStore | OciArchiveStore, reference: str) -> None:
    manifest = src.get_manifest(reference)
    doc = json.loads(manifest.data)
    for desc in [doc["config"], *doc["layers"]]:
        assert src.has_blob(desc["digest"])
        with src.open_blob(desc["digest"]) as f:
            assert _digest(f.read()) == desc["digest"]


def test_oci_layout_round_trip(tmp_path: Path) -> None:
    location = f"oci:{tmp_path / 'layout'}:v1"
    store, ref = open_store(location, for_writing=True)
    assert ref == "v1"
    manifest = _fill(store, ref)
    store.close()
    assert json.loads((tmp_path / "layout" / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    assert not list((tmp_path / "layout" / "blobs" / "sha256").glob(".*"))  # no temp files

    reader, ref = open_store(location)
    assert isinstance(reader, OciLayoutStore)
    assert reader.get_manifest(ref) == manifest
    assert reader.get_manifest(manifest.digest) == manifest
    _check_copy(reader, ref)
    assert open_store(f"oci:{tmp_path / 'layout'}")[1] == manifest.digest  # the only image

    writer = OciLayoutStore(tmp_path / "layout", create=True)  # adds to an existing layout
    second = _fill(writer, "v2")
    assert sorted(writer.tags()) == ["v1", "v2"]
    assert writer.get_manifest("v2") == second
    with pytest.raises(NotFoundError, match="tags: v1, v2"):
        open_store(f"oci:{tmp_path / 'layout'}")
    with pytest.raises(NotFoundError, match="tag 'v3' not found"):
        writer.get_manifest("v3")


def test_corrupt_blobs_in_a_layout_are_detected(tmp_path: Path) -> None:
    store = OciLayoutStore(tmp_path / "layout", create=True)
    manifest = _fill(store, "v1")
    doc = json.loads(manifest.data)
    blobs = tmp_path / "layout" / "blobs" / "sha256"

    layer_path = blobs / doc["layers"][0]["digest"].removeprefix("sha256:")
    layer_path.write_bytes(b"X" + layer_path.read_bytes()[1:])
    copy = OciLayoutStore(tmp_path / "copy", create=True)
    layer = doc["layers"][0]
    with store.open_blob(layer["digest"]) as f, pytest.raises(DigestMismatchError):
        copy.put_blob(f, layer["digest"], layer["size"])  # a copy refuses the bad bytes
    assert not copy.has_blob(layer["digest"])

    (blobs / manifest.digest.removeprefix("sha256:")).write_bytes(manifest.data + b" ")
    with pytest.raises(DigestMismatchError, match="is corrupt"):
        store.get_manifest("v1")


def test_layout_refuses_other_directories(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        OciLayoutStore(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(RegistryError, match="not empty"):
        OciLayoutStore(tmp_path / "junk", create=True)
    with pytest.raises(RegistryError, match="not an OCI image layout"):
        OciLayoutStore(tmp_path / "junk")


def test_oci_archive_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "image.tar"
    store, ref = open_store(f"oci-archive:{target}:v1", for_writing=True)
    manifest = _fill(store, ref)
    assert not target.exists()  # nothing before close()
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.tar"]  # temp dir gone

    with tarfile.open(target) as tar:
        names = tar.getnames()
    assert names[:2] == ["oci-layout", "index.json"]
    reader, ref = open_store(f"oci-archive:{target}")
    assert ref == manifest.digest
    assert reader.get_manifest("v1") == manifest
    _check_copy(reader, "v1")
    layer = json.loads(manifest.data)["layers"][0]
    with reader.open_blob(layer["digest"]) as f:  # seekable, as a layout's files are
        whole = f.read()
        f.seek(-10, io.SEEK_END)
        assert f.read() == whole[-10:]
        f.seek(5)
        assert f.read(3) == whole[5:8] and f.tell() == 8
    with pytest.raises(RegistryError, match="opened for reading"):
        reader.put_manifest(manifest, "v2")
    reader.close()


def test_unfinished_archive_leaves_the_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "image.tar"
    target.write_bytes(b"previous contents")
    with pytest.raises(RuntimeError), OciArchiveStore(target, for_writing=True) as store:
        _fill(store, "v1")
        raise RuntimeError("conversion failed")
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.tar"]

    store = OciArchiveStore(target, for_writing=True)
    with pytest.raises(DigestMismatchError):
        store.put_blob(io.BytesIO(b"abc"), _digest(b"abd"), 3)
    store.abort()
    assert target.read_bytes() == b"previous contents"

    # A caller that closes in `finally` after a failure: blobs and untagged
    # manifests were stored, the tagged one never was, so nothing is written.
    store = OciArchiveStore(target, for_writing=True)
    layer = b"more"
    store.put_blob(io.BytesIO(layer), _digest(layer), len(layer))
    _, untagged = _image(layer)
    store.put_manifest(untagged, None)
    store.close()
    assert target.read_bytes() == b"previous contents"


def test_registry_store_round_trip_through_open_store(registry: LocalRegistry) -> None:
    store, ref = open_store(f"{registry.host}/app/store:v1", for_writing=True)
    assert isinstance(store, RegistryStore) and ref == "v1"
    manifest = _fill(store, ref)
    store.close()
    reader, ref = open_store(f"{registry.host}/app/store@{manifest.digest}")
    assert ref == manifest.digest
    _check_copy(reader, ref)
    assert reader.get_manifest("v1") == manifest
    reader.close()


def test_index_by_digest_in_layout(tmp_path: Path) -> None:
    store = OciLayoutStore(tmp_path / "layout", create=True)
    child = _fill(store, "child")
    index_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child.digest, "size": len(child.data)}],
    }
    data = json.dumps(index_doc).encode()
    index = Manifest(OCI_INDEX, data, _digest(data))
    store.put_manifest(index, None)  # untagged: a blob only
    assert store.get_manifest(index.digest) == index
    assert "child" in store.tags() and len(store.tags()) == 1


# ---------------------------------------------------------------- other tools


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")
def test_skopeo_reads_what_we_write(tmp_path: Path) -> None:
    target = tmp_path / "image.tar"
    store = OciArchiveStore(target, for_writing=True)
    manifest = _fill(store, "v1")
    store.close()
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci-archive:{target}:v1"],
        check=True,
        capture_output=True,
    ).stdout
    assert out == manifest.data
    layout = tmp_path / "from-skopeo"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci-archive:{target}:v1", f"oci:{layout}:copied"],
        check=True,
        capture_output=True,
    )
    reader, ref = open_store(f"oci:{layout}:copied")
    assert ref == "copied"
    _check_copy(reader, ref)
