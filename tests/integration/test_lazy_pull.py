"""Lazy pull end to end: real containerd, registry, FUSE and runc; no mocks.

The registry sits behind a counting LinkProxy so each test can say what
crossed the network and when. Fixtures are in tests/integration/conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable

import pytest

from tests.integration.conftest import Node, blob_bytes, zest
from tests.support.registry import LocalRegistry

pytestmark = pytest.mark.integration


def test_lazy_start_fetches_a_fraction(node_factory: Callable[..., Node], python_image: str,
                                      registry: LocalRegistry) -> None:
    node = node_factory(background=False)
    node.pull(python_image)
    pulled = node.link.bytes_sent
    out = node.run(python_image, "python3", "-c", "print('hello')")
    assert out.strip() == "hello"
    total = blob_bytes(registry, python_image)
    fetched = node.link.bytes_sent
    assert fetched < 0.20 * total, (pulled, fetched, total)
    # every layer was served by zest: containerd downloaded no layer blob
    blob_gets = [r for r in node.link.requests if r.method == "GET" and "/blobs/" in r.path
                 and r.range is None and r.bytes > 1_000_000]
    assert blob_gets == []
    snaps = node.ctrd.ctr("snapshots", "--snapshotter", "zest", "ls").stdout
    assert snaps.count("Committed") >= 2
    # the metrics endpoint reports what the FUSE process fetched
    import httpx

    text = httpx.get(f"http://127.0.0.1:{node.metrics_port}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("zest_fetch_bytes_total"))
    assert 0 < float(line.split()[1]) <= fetched
    assert "zest_fuse_read_seconds_bucket" in text


def test_background_prefetch_fetches_whole_image(node_factory: Callable[..., Node],
                                                 python_image: str,
                                                 registry: LocalRegistry) -> None:
    node = node_factory(background=True)
    node.pull(python_image)
    assert node.run(python_image, "python3", "-c", "print('hello')").strip() == "hello"
    layers = node.wait_prefetched()
    assert all(x["prefetch_total"] > 100 for x in layers)  # the whole layer was planned
    stats = node.fuse_call("stats")
    total = blob_bytes(registry, python_image)
    assert stats["cache"]["bytes"] > 0
    # the whole image crossed the link once, with no chunk fetched twice
    assert 0.9 * total < node.link.bytes_sent < 1.1 * total


def test_ctr_remote_rpull(node_factory: Callable[..., Node], busybox_image: str) -> None:
    node = node_factory()
    subprocess.run(["ctr-remote", "--address", str(node.ctrd.address), "--namespace",
                    node.ctrd.namespace, "image", "rpull", "--plain-http", "--snapshotter",
                    "zest", node.ref(busybox_image)], check=True, capture_output=True,
                   timeout=120)
    assert node.run(busybox_image, "sh", "-c", "echo lazy ok").strip() == "lazy ok"
    assert len(node.fuse_call("list")["layers"]) == 1


def test_plain_image_layers_served_by_daemon(node_factory: Callable[..., Node],
                                             image_cache, registry: LocalRegistry) -> None:  # type: ignore[no-untyped-def]
    image_cache.push("debian-python", "plain/python", "1")
    node = node_factory()
    node.pull("plain/python:1")
    assert node.run("plain/python:1", "python3", "-c", "print('hello')").strip() == "hello"
    assert node.fuse_call  # the daemon unpacked both gzip layers itself
    gets = [r for r in node.link.requests if r.method == "GET" and "/blobs/" in r.path]
    layer_gets = [r for r in gets if r.bytes > 1_000_000]
    assert len(layer_gets) == 2  # each layer blob downloaded exactly once, by the daemon
    # their files are on the node's disk, and Usage says so
    usage = node.ctrd.ctr("snapshots", "--snapshotter", "zest", "usage").stdout.splitlines()[1:]
    inodes = [int(line.split()[-1]) for line in usage if line.strip()]
    assert len(inodes) >= 2 and min(sorted(inodes)[-2:]) > 100, usage


def test_daemon_kill_leaves_containers_running(node_factory: Callable[..., Node],
                                               python_image: str) -> None:
    node = node_factory()
    node.pull(python_image)
    name = f"long-{uuid.uuid4().hex[:8]}"
    node.ctrd.ctr("run", "-d", "--snapshotter", "zest", node.ref(python_image), name,
                  "sleep", "600")
    try:
        node.zsd.kill()  # kill -9 of the gRPC service
        out = node.ctrd.ctr("tasks", "exec", "--exec-id", "e1", name, "python3", "-c",
                            "import json, email; print('still reading')")
        assert out.stdout.strip() == "still reading"
        node.restart_daemon()
        assert node.run(python_image, "python3", "-c", "print('hello')").strip() == "hello"
    finally:
        node.ctrd.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
        time.sleep(0.5)
        node.ctrd.ctr("tasks", "rm", "-f", name, check=False)
        node.ctrd.ctr("containers", "rm", name, check=False)


@pytest.mark.allow_log_errors
def test_restart_after_fuse_process_died(node_factory: Callable[..., Node],
                                         python_image: str) -> None:
    node = node_factory()
    node.pull(python_image)
    assert node.run(python_image, "python3", "-c", "print('hello')").strip() == "hello"
    pid = int(node.fuse_call("ping")["pid"])
    node.zsd.kill()
    os.kill(pid, signal.SIGKILL)
    node.restart_daemon()  # re-mounts every remote layer from its metadata before serving
    assert node.fuse_call("ping")["pid"] != pid
    assert node.run(python_image, "python3", "-c", "print('again')").strip() == "again"


def test_cache_stats_and_prune(node_factory: Callable[..., Node], busybox_image: str) -> None:
    node = node_factory()
    node.pull(busybox_image)
    assert node.run(busybox_image, "sh", "-c", "cat /bin/busybox | wc -c").strip() != "0"
    root = str(node.zsd.root)
    stats = json.loads(zest("cache", "--root", root, "stats", "--json").stdout)
    assert stats["source"] == "fuse process" and stats["chunks"] > 0 and stats["bytes"] > 0
    assert "removed" in zest("cache", "--root", root, "prune").stdout
    assert json.loads(zest("cache", "--root", root, "stats", "--json").stdout)["chunks"] == 0
    before = node.link.bytes_sent
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
    assert node.run(busybox_image, "sh", "-c", "echo after prune").strip() == "after prune"
    assert node.link.bytes_sent > before  # chunks fetched again, verified, served
