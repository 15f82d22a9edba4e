"""Fixtures for lazy-pull tests: a converted image, and nodes (zest daemon + containerd).

A node's registry traffic goes through a counting LinkProxy so tests can say
what crossed the network and when.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.containerd import Containerd, proxy_plugin_toml
from tests.support.linkproxy import LinkProxy
from tests.support.registry import LocalRegistry, free_port
from tests.support.snapshotterd import Snapshotterd

ZEST = str(Path(sys.executable).with_name("zest"))


def zest(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ZEST, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"zest {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def python_image(image_cache, registry: LocalRegistry) -> str:  # type: ignore[no-untyped-def]
    """The debian-python image converted to zest format: `repo:tag` in the session registry."""
    src = image_cache.push("debian-python", "src/python", "1")
    zest("convert", "--no-progress", src, f"{registry.host}/lazy/python:1")
    return "lazy/python:1"


@pytest.fixture(scope="module")
def busybox_image(image_cache, registry: LocalRegistry) -> str:  # type: ignore[no-untyped-def]
    src = image_cache.push("busybox", "src/busybox", "1")
    zest("convert", "--no-progress", src, f"{registry.host}/lazy/busybox:1")
    return "lazy/busybox:1"


@dataclass
class Node:
    """One machine's worth of zest: a snapshotter daemon and a containerd that uses it."""

    zsd: Snapshotterd
    ctrd: Containerd
    link: LinkProxy
    metrics_port: int

    def ref(self, repo_tag: str) -> str:
        return f"{self.link.host}/{repo_tag}"

    def pull(self, repo_tag: str) -> None:
        zest("pull", "--address", str(self.ctrd.address), "--namespace", self.ctrd.namespace,
             "--snapshotter", "zest", self.ref(repo_tag))

    def run(self, repo_tag: str, *cmd: str, timeout: float = 180) -> str:
        name = f"lazy-{uuid.uuid4().hex[:8]}"
        out = self.ctrd.ctr("run", "--snapshotter", "zest", "--rm", self.ref(repo_tag), name,
                            *cmd, timeout=timeout)
        return str(out.stdout)

    def restart_daemon(self) -> None:
        """Start the killed daemon again and wait until containerd has reconnected to it
        (containerd's gRPC client backs off between reconnect attempts)."""
        self.zsd.start()
        deadline = time.monotonic() + 60
        while True:
            ok = self.ctrd.ctr("snapshots", "--snapshotter", "zest", "ls", check=False)
            if ok.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd did not reconnect: {ok.stderr}")
            time.sleep(0.5)

    def wait_prefetched(self, timeout: float = 180) -> list[dict]:  # type: ignore[type-arg]
        """Wait until every lazy layer's prefetch (list and, if on, background) is done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            layers: list[dict] = self.fuse_call("list")["layers"]  # type: ignore[type-arg]
            # a layer whose prefetch has not counted its total yet shows 0 of 0
            if layers and all(x["prefetch_planned"] and x["prefetch_done"] >= x["prefetch_total"]
                              for x in layers):
                return layers
            time.sleep(0.3)
        raise AssertionError(f"prefetch did not finish: {self.fuse_call('list')}")

    def fuse_call(self, op: str) -> dict:  # type: ignore[type-arg]
        from snapshotter.fuse.protocol import call

        return call(str(self.zsd.root / "fuse" / "control.sock"), {"op": op})


def _config(metrics_port: int, background: bool, extra: str = "") -> str:
    return (f"[remote]\nbackground_prefetch = {str(background).lower()}\n"
            f'metrics_address = "127.0.0.1:{metrics_port}"\n' + extra)


@pytest.fixture
def node_factory(registry: LocalRegistry, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    if os.geteuid() != 0:
        pytest.skip("containerd, FUSE and runc need root")
    started: list[Node] = []

    def make(background: bool = False, link: LinkProxy | None = None,
             extra_config: str = "") -> Node:
        link = link or LinkProxy(registry.host).__enter__()
        port = free_port()
        zsd = Snapshotterd(config_toml=_config(port, background, extra_config),
                           log_level="info")
        try:
            zsd.start()
        except BaseException:
            zsd.remove()  # a daemon that never came up leaves no directory behind
            raise
        ctrd = Containerd(tmp_path, extra_toml=proxy_plugin_toml("zest", zsd.address)).start()
        node = Node(zsd, ctrd, link, port)
        started.append(node)
        return node

    yield make
    for node in reversed(started):
        node.ctrd.stop()
        if node.zsd.running:
            node.zsd.stop()
        node.zsd.remove()
        node.link.__exit__(None, None, None)




def blob_bytes(registry: LocalRegistry, repo_tag: str) -> int:
    import httpx

    repo, tag = repo_tag.rsplit(":", 1)
    m = httpx.get(f"http://{registry.host}/v2/{repo}/manifests/{tag}",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    return sum(int(d["size"]) for d in m["layers"])
