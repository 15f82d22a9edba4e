"""End to end: a real containerd uses `zest snapshotter` as its proxy snapshotter.

Images come from a registry on loopback; `ctr image pull --snapshotter zest` unpacks them into
zest (layers are not lazy yet: containerd downloads and applies each one), `ctr run` runs them,
and removing the image lets containerd's garbage collector remove the snapshots from zest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ImageCache
from tests.support import images
from tests.support.containerd import Containerd, proxy_plugin_toml
from tests.support.registry import LocalRegistry
from tests.support.snapshotterd import Snapshotterd

pytestmark = pytest.mark.integration

ZEST = str(Path(sys.executable).with_name("zest"))


@pytest.fixture
def zest() -> Iterator[Snapshotterd]:
    with Snapshotterd(log_level="info") as zsd:
        yield zsd


@pytest.fixture
def ctrd(zest: Snapshotterd, containerd_factory: Callable[..., Containerd]) -> Containerd:
    return containerd_factory(extra_toml=proxy_plugin_toml("zest", zest.address))


def chain_ids(name: str) -> list[str]:
    """The chain IDs of a test image's layers, bottom up (the committed snapshot names)."""
    layout = images.image_layout(name)
    digest = images.manifest(name)["config"]["digest"]  # type: ignore[index]
    config = json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes())
    chain: list[str] = []
    for diff_id in config["rootfs"]["diff_ids"]:
        if not chain:
            chain.append(diff_id)
        else:
            text = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chain


def _converted(image_cache: ImageCache, registry: LocalRegistry, name: str) -> str:
    src = image_cache.push(name, f"e2e/{name}", "src")
    dst = f"{registry.host}/e2e/{name}:zest"
    proc = subprocess.run(
        [ZEST, "convert", "--plain-http", "--no-progress", src, dst],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"zest convert failed:\n{proc.stdout}\n{proc.stderr}"
    return dst


def _pull_run_and_collect(
    ctrd: Containerd, zest: Snapshotterd, ref: str, name: str, image_cache: ImageCache
) -> None:
    recipe = image_cache.recipe(name)
    ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "zest", ref, timeout=900)

    # containerd's view and zest's own: one committed snapshot per layer, named by chain ID
    chain = chain_ids(name)
    listed = ctrd.ctr("snapshots", "--snapshotter", "zest", "ls").stdout.splitlines()[1:]
    rows = {line.split()[0]: line.split()[1:] for line in listed}
    assert sorted(rows) == sorted(chain)
    assert all(row[-1] == "Committed" for row in rows.values())
    infos = zest.client().list()
    assert len(infos) == len(chain)
    assert {i.name.rsplit("/", 1)[-1] for i in infos} == set(chain)  # "<ns>/<n>/<chain id>"

    cid = f"e2e-{uuid.uuid4().hex[:8]}"
    out = ctrd.ctr(
        "run", "--snapshotter", "zest", "--rm", ref, cid, *recipe.cmd, timeout=300
    ).stdout
    assert out.strip() == recipe.expected_output
    # containerd drops the container's snapshot from its own metadata at once and removes it
    # from zest at its next garbage collection, which `images rm --sync` runs below.

    ctrd.ctr("images", "rm", "--sync", ref)
    assert ctrd.ctr("snapshots", "--snapshotter", "zest", "ls").stdout.splitlines()[1:] == []
    assert zest.client().list() == []
    assert os.listdir(zest.root / "snapshots") == []


@pytest.mark.parametrize("name", ["busybox", "debian-python"])
def test_gzip_image(
    name: str, ctrd: Containerd, zest: Snapshotterd, image_cache: ImageCache
) -> None:
    ref = image_cache.push(name)
    _pull_run_and_collect(ctrd, zest, ref, name, image_cache)


def test_zest_converted_image(
    ctrd: Containerd, zest: Snapshotterd, image_cache: ImageCache, registry: LocalRegistry
) -> None:
    ref = _converted(image_cache, registry, "busybox")
    _pull_run_and_collect(ctrd, zest, ref, "busybox", image_cache)


def test_snapshots_survive_a_daemon_restart(
    ctrd: Containerd, zest: Snapshotterd, image_cache: ImageCache
) -> None:
    ref = image_cache.push("busybox")
    ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "zest", ref, timeout=600)
    assert zest.stop() == 0
    zest.start()
    # containerd reconnects to a restarted proxy plugin with backoff, as it would in production
    deadline = time.monotonic() + 60
    while ctrd.ctr("snapshots", "--snapshotter", "zest", "ls", check=False).returncode != 0:
        assert time.monotonic() < deadline, "containerd did not reconnect to zest"
        time.sleep(0.3)
    cid = f"e2e-{uuid.uuid4().hex[:8]}"
    out = ctrd.ctr("run", "--snapshotter", "zest", "--rm", ref, cid, timeout=300).stdout
    assert out.strip() == image_cache.recipe("busybox").expected_output
    ctrd.ctr("images", "rm", "--sync", ref)
    assert zest.client().list() == []
