"""`zest pull` into a real containerd that uses the zest snapshotter daemon, then `ctr run`.

Each test starts a private containerd whose [proxy_plugins.zest] points at a `zest snapshotter`
subprocess. Whether the daemon serves a layer remotely or leaves it to containerd's ordinary path
(content store + Diff.Apply + Commit), the image must end up runnable with `ctr run`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from snapshotter import labels as lbl
from snapshotter.containerd_api import Containerd as ContainerdClient
from snapshotter.image.store import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Manifest
from snapshotter.pull import PullError, PullResult, chain_ids, pull
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import NotFoundError
from tests.conftest import ImageCache
from tests.support.containerd import Containerd, proxy_plugin_toml
from tests.support.registry import LocalRegistry, free_port
from tests.support.snapshotterd import Snapshotterd

pytestmark = pytest.mark.integration

ZEST = [sys.executable, "-m", "snapshotter"]
REPO = Path(__file__).resolve().parents[2]


def zest(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*ZEST, *args], capture_output=True, text=True, timeout=600, cwd=REPO, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"zest {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def zest_containerd(containerd_factory) -> Iterator[Target]:  # type: ignore[no-untyped-def]
    """A private containerd with the zest snapshotter daemon as proxy plugin `zest`."""
    zsd = Snapshotterd()
    try:
        zsd.start()
        ctrd = containerd_factory(extra_toml=proxy_plugin_toml("zest", zsd.address))
        try:
            yield Target(ctrd)
        finally:
            ctrd.stop()  # containers and snapshots go while the daemon still answers
    finally:
        zsd.stop()
        _kill_mentioning(str(zsd.base_dir))  # the FUSE process outlives the daemon by design
        zsd.remove()


def _kill_mentioning(needle: str) -> None:
    """SIGKILL the processes whose command line names `needle` (a test's private dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "cmdline").read_text(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def converted_busybox(image_cache: ImageCache, registry: LocalRegistry) -> str:
    src = image_cache.push("busybox")
    dst = f"{registry.host}/zest/busybox:pull"
    zest("convert", "--no-progress", "--threads", "2", src, dst)
    return dst


@dataclass
class Target:
    """A containerd, a namespace in it and the snapshotter to pull for."""

    ctrd: Containerd
    snapshotter: str = "zest"
    namespace: str = ""

    def __post_init__(self) -> None:
        self.namespace = self.namespace or self.ctrd.namespace

    def ctr(self, *args: str) -> str:
        return self.ctrd.ctr(*args, namespace=self.namespace, timeout=120).stdout

    def pull(self, ref: str, **kwargs: Any) -> PullResult:
        return pull(
            ref,
            address=self.ctrd.address,
            namespace=self.namespace,
            snapshotter=self.snapshotter,
            plain_http=True,
            **kwargs,
        )

    def run(self, ref: str) -> str:
        cid = f"pull-{secrets.token_hex(4)}"
        return self.ctr("run", "--snapshotter", self.snapshotter, "--rm", ref, cid).strip()

    def content_labels(self, digest: str) -> dict[str, str] | None:
        with ContainerdClient(self.ctrd.address, self.namespace) as client:
            return client.content_labels(digest)

    def check_pulled(self, result: PullResult, registry_host: str, repo: str) -> None:
        """What containerd's own pull would have left: image, labels, snapshots, no lease."""
        assert result.name in self.ctr("images", "ls", "-q").split()
        config = self.content_labels(result.config.digest) or {}
        assert config[lbl.GC_REF_SNAPSHOT + self.snapshotter] == result.chain_id
        assert config[lbl.DISTRIBUTION_SOURCE + registry_host] == repo
        manifest = self.content_labels(result.manifest.digest) or {}
        assert manifest[lbl.GC_REF_CONTENT + "config"] == result.config.digest
        digests = [layer.digest for layer in result.layers]
        for i, layer in enumerate(result.layers):
            assert manifest[f"{lbl.GC_REF_CONTENT}l.{i}"] == layer.digest
            info = json.loads(
                self.ctr("snapshots", "--snapshotter", self.snapshotter, "info", layer.chain_id)
            )
            sent = {  # what the Prepare (and Commit) carried; the snapshotter may add its own
                lbl.TARGET_SNAPSHOT_REF: layer.chain_id,
                lbl.CRI_IMAGE_REF: result.name,
                lbl.CRI_LAYER_DIGEST: layer.digest,
                lbl.CRI_MANIFEST_DIGEST: result.manifest.digest,
                lbl.CRI_IMAGE_LAYERS: ",".join(digests[i:]),
            }
            assert sent.items() <= info["Labels"].items()
            if layer.state == "unpacked":
                blob = self.content_labels(layer.digest) or {}
                assert blob[lbl.UNCOMPRESSED] == layer.diff_id
        assert "extract-" not in self.ctr("snapshots", "--snapshotter", self.snapshotter, "ls")
        assert "zest-pull-" not in self.ctr("leases", "ls")


def test_pull_converted_busybox_and_run(
    zest_containerd: Target,
    converted_busybox: str,
    image_cache: ImageCache,
    registry: LocalRegistry,
) -> None:
    t = zest_containerd
    address = str(t.ctrd.address)
    out = zest("pull", "--address", address, "--namespace", t.namespace, converted_busybox)
    assert out.stdout.startswith(f"pulled {converted_busybox} (sha256:")

    result = t.pull(converted_busybox)  # again: everything is there already
    assert [layer.state for layer in result.layers] == ["present"]
    t.check_pulled(result, registry.host, "zest/busybox")
    assert t.run(converted_busybox) == image_cache.recipe("busybox").expected_output


def test_pull_plain_gzip_busybox_and_run(
    zest_containerd: Target, image_cache: ImageCache, registry: LocalRegistry
) -> None:
    t = zest_containerd
    ref = image_cache.push("busybox")
    with RegistryClient(registry.host) as client:
        manifest = json.loads(client.get_manifest("test/busybox", "latest").data)
        with client.open_blob("test/busybox", manifest["config"]["digest"]) as f:
            config = json.loads(f.read())

    result = t.pull(ref)

    assert [layer.state for layer in result.layers] in (["unpacked"], ["remote"])
    assert [layer.chain_id for layer in result.layers] == chain_ids(config["rootfs"]["diff_ids"])
    t.check_pulled(result, registry.host, "test/busybox")
    assert t.run(ref) == image_cache.recipe("busybox").expected_output


@pytest.mark.parametrize("converted", [False, True], ids=["gzip", "zest"])
def test_containerds_ordinary_path(
    converted: bool,
    containerd: Containerd,
    image_cache: ImageCache,
    registry: LocalRegistry,
    request: pytest.FixtureRequest,
) -> None:
    """A snapshotter that serves nothing remotely (containerd's own overlayfs): every layer
    goes through the content store, Diff.Apply and Commit."""
    t = Target(containerd, "overlayfs", namespace=f"zest-pull-{secrets.token_hex(4)}")
    ref = request.getfixturevalue("converted_busybox") if converted else image_cache.push("busybox")

    result = t.pull(ref)

    assert [layer.state for layer in result.layers] == ["unpacked"]
    repo = "zest/busybox" if converted else "test/busybox"
    t.check_pulled(result, registry.host, repo)
    assert t.run(ref) == image_cache.recipe("busybox").expected_output
    t.ctr("images", "rm", "--sync", ref)


def _push_empty_image(client: RegistryClient, repo: str, platform: dict[str, str]) -> Manifest:
    config = json.dumps({**platform, "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    client.put_blob(repo, io.BytesIO(config), config_digest, len(config))
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [],
    }
    data = json.dumps(doc).encode()
    manifest = Manifest(OCI_MANIFEST, data, "sha256:" + hashlib.sha256(data).hexdigest())
    client.put_manifest(repo, manifest.digest, manifest)
    return manifest


def test_pull_index_and_multi_layer_image(
    zest_containerd: Target, image_cache: ImageCache, registry: LocalRegistry
) -> None:
    """debian-python (two layers: chain IDs with parents), behind an OCI index."""
    t = zest_containerd
    src = image_cache.push("debian-python")
    repo, tag = src.split("/", 1)[1].rsplit(":", 1)
    with RegistryClient(registry.host) as client:
        manifest = client.get_manifest(repo, tag)
        other = _push_empty_image(client, repo, {"os": "linux", "architecture": "arm64"})
        entries = [
            (other, {"os": "linux", "architecture": "arm64"}),  # never fetched
            (manifest, {"os": "linux", "architecture": "amd64"}),
        ]
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": m.media_type, "digest": m.digest, "size": len(m.data), "platform": p}
                for m, p in entries
            ],
        }
        data = json.dumps(index).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        client.put_manifest(repo, "index", Manifest(OCI_INDEX, data, digest))
    ref = f"{registry.host}/{repo}:index"

    with pytest.raises(PullError, match=r"has no image for linux/s390x \(it has: linux/arm64, "):
        t.pull(ref, platform="linux/s390x")
    result = t.pull(ref, platform="linux/amd64")

    assert result.target.digest == digest and result.manifest.digest == manifest.digest
    assert len(result.layers) == 2 and result.layers[1].chain_id == result.chain_id
    index_labels = t.content_labels(digest) or {}
    assert index_labels[lbl.GC_REF_CONTENT + "m.0"] == other.digest
    assert index_labels[lbl.GC_REF_CONTENT + "m.1"] == manifest.digest
    assert t.content_labels(other.digest) is None
    t.check_pulled(result, registry.host, repo)
    assert t.run(ref) == image_cache.recipe("debian-python").expected_output


def test_pull_through_a_mirror_while_the_origin_is_down(
    zest_containerd: Target,
    image_cache: ImageCache,
    registry: LocalRegistry,
    tmp_path: Path,
) -> None:
    t = zest_containerd
    image_cache.push("busybox")
    origin = f"127.0.0.1:{free_port()}"  # nothing listens there
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / origin).mkdir(parents=True)
    (hosts_dir / origin / "hosts.toml").write_text(
        f'server = "http://{origin}"\n[host."http://{registry.host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    ref = f"{origin}/test/busybox:latest"

    result = t.pull(ref, hosts_dir=hosts_dir)

    assert result.name in t.ctr("images", "ls", "-q").split()
    assert t.run(ref) == image_cache.recipe("busybox").expected_output


def test_pull_fails_clearly_when_containerd_is_not_running(tmp_path: Path) -> None:
    socket = tmp_path / "containerd.sock"
    out = zest("pull", "--address", str(socket), "127.0.0.1:1/any/image:1", check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"zest pull: error: containerd is not running at {socket} (no such socket); "
        "start containerd, or pass --address with its socket"
    ]


def test_pull_fails_clearly_without_the_proxy_plugin(
    containerd: Containerd, image_cache: ImageCache
) -> None:
    ref = image_cache.push("busybox")
    out = zest(
        "pull",
        "--address",
        str(containerd.address),
        "--namespace",
        containerd.namespace,
        ref,
        check=False,
    )
    assert out.returncode == 1
    assert "containerd has no snapshotter 'zest': add [proxy_plugins.zest]" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_pull_of_a_missing_image(zest_containerd: Target, registry: LocalRegistry) -> None:
    t = zest_containerd
    ref = f"{registry.host}/test/nothing-here:1"
    address = str(t.ctrd.address)
    out = zest("pull", "--address", address, "--namespace", t.namespace, ref, check=False)
    assert out.returncode == 1
    assert "not found" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert ref not in t.ctr("images", "ls", "-q")


def test_a_failed_pull_leaves_nothing_behind(
    containerd: Containerd, image_cache: ImageCache, registry: LocalRegistry
) -> None:
    """A layer the registry lost: a clear error; no image, extract snapshot or lease remains."""
    t = Target(containerd, "overlayfs", namespace=f"zest-pull-{secrets.token_hex(4)}")
    ref = image_cache.push("busybox", repo="test/lost-layer")
    with RegistryClient(registry.host) as client:
        layer = json.loads(client.get_manifest("test/lost-layer", "latest").data)["layers"][0]
        url = f"http://{registry.host}/v2/test/lost-layer/blobs/{layer['digest']}"
        assert httpx.delete(url).status_code == 202
        assert client.head_blob("test/lost-layer", layer["digest"]) is None

    with pytest.raises(NotFoundError, match=layer["digest"]):
        t.pull(ref)

    assert ref not in t.ctr("images", "ls", "-q")
    assert "extract-" not in t.ctr("snapshots", "--snapshotter", "overlayfs", "ls")
    assert "zest-pull-" not in t.ctr("leases", "ls")
