"""Profiles: `zest optimize` records a workload's reads; a fresh node prefetches them first."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from chunkstore import format as fmt
from tests.integration.conftest import Node, zest
from tests.support import ocibuild as ob
from tests.support.registry import LocalRegistry

pytestmark = pytest.mark.integration


def test_profile_round_trip(node_factory: Callable[..., Node], python_image: str,
                           registry: LocalRegistry) -> None:
    recorder = node_factory()
    dst = f"{registry.host}/opt/python:1"
    out = zest("optimize", "--address", str(recorder.ctrd.address), "--namespace",
               recorder.ctrd.namespace, "--zest-root", str(recorder.zsd.root),
               recorder.ref(python_image), dst, "--", "python3", "-c", "print('hello')").stdout
    assert "workload exited" in out, out
    m = httpx.get(f"http://{registry.host}/v2/opt/python/manifests/1",
                  headers={"Accept": ob.OCI_MANIFEST}).json()
    src = httpx.get(f"http://{registry.host}/v2/lazy/python/manifests/1",
                    headers={"Accept": ob.OCI_MANIFEST}).json()
    assert m["config"] == src["config"]  # same DiffIDs: only TOC and footer changed
    out = zest("inspect", "--json", dst).stdout
    import json

    prefetch = [layer["prefetch"] for layer in json.loads(out)[0]["layers"]]
    assert all(p and p > 10 for p in prefetch), prefetch
    for new, old in zip(m["layers"], src["layers"], strict=True):
        assert fmt.ANN_TOC_DIGEST in new["annotations"]
        assert new["annotations"]["dev.zest.toc.offset"] == old["annotations"][
            "dev.zest.toc.offset"]  # frames reused byte for byte: the TOC starts where it did

    fresh = node_factory()  # another node, cold cache, background prefetch off
    fresh.pull("opt/python:1")
    layers = fresh.wait_prefetched()
    assert sum(x["prefetch_total"] for x in layers) >= sum(prefetch)
    prefetch_requests = [r for r in fresh.link.requests if r.range]
    assert prefetch_requests  # the prefetch list crossed the link before the workload ran
    fresh.link.reset()
    assert fresh.run("opt/python:1", "python3", "-c", "print('hello')").strip() == "hello"
    during = [r for r in fresh.link.requests if r.range]
    assert during == [], during  # every chunk the workload read was already local
