"""The Kubernetes path: the kubelet's CRI PullImage, through containerd's CRI plugin, to zest.

containerd runs with its CRI plugin set to `snapshotter = "zest"` and
`disable_snapshot_annotations = false`, beside a zest daemon registered as a proxy plugin; the
test speaks the CRI ImageService itself (tests/support/cri.py), as the kubelet would. The CRI
plugin adds the `containerd.io/snapshot/cri.*` labels to every layer's Prepare, so zest mounts
the converted layers lazily and containerd downloads no layer. Real containerd, registry, FUSE
and runc; the registry sits behind a counting LinkProxy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.containerd import Containerd, delete_runc_containers, proxy_plugin_toml
from tests.support.cri import CRI_NAMESPACE, CriClient
from tests.support.linkproxy import LinkProxy
from tests.support.registry import LocalRegistry
from tests.support.snapshotterd import Snapshotterd

pytestmark = pytest.mark.integration
ZEST = str(Path(sys.executable).with_name("zest"))
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def python_image(image_cache, registry: LocalRegistry) -> str:  # type: ignore[no-untyped-def]
    """The debian-python image converted to zest format: `repo:tag` in the session registry."""
    src = image_cache.push("debian-python", "src/python", "1")
    proc = subprocess.run(
        [ZEST, "convert", "--no-progress", src, f"{registry.host}/cri/python:1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return "cri/python:1"


@dataclass
class CriNode:
    """A Kubernetes node's runtime: containerd with CRI on zest, and the zest daemon."""

    zsd: Snapshotterd
    ctrd: Containerd
    link: LinkProxy
    cri: CriClient

    @property
    def runc_root(self) -> Path:
        """runc's state dir for our containers. The CRI images live in the `k8s.io` namespace,
        whose default runc root (/run/containerd/runc/k8s.io) every containerd with CRI shares;
        a private one keeps concurrent test runs from seeing, or sweeping, each other's."""
        return self.ctrd.base_dir / "runc"

    def ref(self, repo_tag: str) -> str:
        return f"{self.link.host}/{repo_tag}"

    def fuse_call(self, op: str) -> dict[str, Any]:
        from snapshotter.fuse.protocol import call

        reply: dict[str, Any] = call(str(self.zsd.root / "fuse" / "control.sock"), {"op": op})
        return reply


def _hosts_dir(base: Path, host: str) -> Path:
    """A containerd `config_path` dir that sends `host` over plain http (hosts.toml)."""
    d = base / "certs.d"
    (d / host).mkdir(parents=True)
    (d / host / "hosts.toml").write_text(
        f'server = "http://{host}"\n\n'
        f'[host."http://{host}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return d


@pytest.fixture
def cri_node(registry: LocalRegistry, tmp_path: Path) -> Iterator[CriNode]:
    if os.geteuid() != 0:
        pytest.skip("containerd, FUSE and runc need root")
    with LinkProxy(registry.host) as link:
        zsd = Snapshotterd(
            config_toml="[remote]\nbackground_prefetch = false\n", log_level="info"
        ).start()
        ctrd = Containerd(
            tmp_path,
            cri=True,
            cri_snapshotter="zest",
            cri_registry_config_path=_hosts_dir(tmp_path, link.host),
            extra_toml=proxy_plugin_toml("zest", zsd.address),
        )
        try:
            ctrd.start()
            with CriClient(ctrd.address) as cri:
                yield CriNode(zsd, ctrd, link, cri)
        finally:
            ctrd.stop(keep_dirs=True)
            delete_runc_containers(ctrd.base_dir / "runc")
            ctrd.stop()
            if zsd.running:
                zsd.stop()
            zsd.remove()





def _layer_sizes(registry: LocalRegistry, repo_tag: str) -> dict[str, int]:
    repo, tag = repo_tag.rsplit(":", 1)
    m = httpx.get(
        f"http://{registry.host}/v2/{repo}/manifests/{tag}", headers={"Accept": _OCI_MANIFEST}
    ).json()
    return {d["digest"]: int(d["size"]) for d in m["layers"]}


def test_cri_pull_is_lazy_and_runs(
    cri_node: CriNode, python_image: str, registry: LocalRegistry
) -> None:
    node = cri_node
    ref = node.ref(python_image)

    image_id = node.cri.pull_image(ref)
    pulled = node.link.bytes_sent

    # the CRI knows the image by its reference and by the ID the pull returned
    assert image_id.startswith("sha256:")
    status = node.cri.image_status(ref)
    assert status is not None
    assert status.id == image_id
    assert ref in status.repo_tags
    assert status.size > 0
    assert node.cri.image_status(image_id) is not None
    listed = [img for img in node.cri.list_images() if img.id == image_id]
    assert len(listed) == 1 and ref in listed[0].repo_tags

    # every layer is a lazy FUSE layer of zest's, none was downloaded by containerd
    layers = _layer_sizes(registry, python_image)
    served = node.fuse_call("list")["layers"]
    # "what" names the image ref and layer digest the CRI plugin's Prepare labels carried
    assert {x["what"].rsplit(" ", 1)[-1] for x in served} == set(layers), served
    assert all(x["what"].startswith(ref + " ") for x in served), served
    big_gets = [
        r
        for r in node.link.requests
        if r.method == "GET" and "/blobs/" in r.path and r.range is None and r.bytes > 1_000_000
    ]
    assert big_gets == []
    assert pulled < 0.05 * sum(layers.values()), (pulled, layers)

    # the image runs from the lazy layers, still fetching only a fraction
    out = node.ctrd.ctr(
        "run",
        "--snapshotter",
        "zest",
        "--runc-root",
        node.runc_root,
        "--rm",
        ref,
        f"cri-{uuid.uuid4().hex[:8]}",
        "python3",
        "-c",
        "print('hello')",
        namespace=CRI_NAMESPACE,
        timeout=180,
    )
    assert out.stdout.strip() == "hello"
    assert node.link.bytes_sent < 0.20 * sum(layers.values())

    # and the CRI removes it again
    node.cri.remove_image(image_id)
    assert node.cri.image_status(ref) is None
    assert all(img.id != image_id for img in node.cri.list_images())
