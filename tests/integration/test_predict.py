"""The ELF predictor on real binaries of a real image, against `ldd` run in a container."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.conftest import Node

pytestmark = pytest.mark.integration


def _ldd(node: Node, image: str, binary: str) -> set[str]:
    script = (f'for f in $(ldd {binary} | grep -o "/[^ ]*"); do readlink -f "$f"; done; '
              f"readlink -f {binary}")
    return set(node.run(image, "sh", "-c", script).split())


@pytest.mark.parametrize("binary", ["python3", "bash", "ls"])
def test_predicted_files_match_ldd(node_factory: Callable[..., Node], python_image: str,
                                   binary: str) -> None:
    node = node_factory()
    node.pull(python_image)
    layers = [x["name"] for x in sorted(node.fuse_call("list")["layers"],
                                        key=lambda x: x["slot"])]
    from snapshotter.fuse.protocol import call

    reply = call(str(node.zsd.root / "fuse" / "control.sock"),
                 {"op": "predict", "layers": layers, "argv": [binary],
                  "env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})
    predicted = set(reply["files"])
    deeper = set(reply["libraries"])  # found, but left to the read path
    expected = _ldd(node, python_image, f"$(command -v {binary})")
    assert expected and expected <= predicted | deeper, (expected - predicted - deeper)
    assert not predicted & deeper
    if binary == "python3":
        assert any(p.endswith("/site.py") or "site.cpython" in p for p in predicted)
    # beyond the binary and what the loader maps: only the files any start reads
    runtime = ("/etc/", "/usr/lib/locale/", "/gconv/", "/usr/share/zoneinfo/")
    extra = {p for p in (predicted | deeper) - expected if not p.startswith("/usr/lib/python3")}
    assert all(p.startswith(runtime) or any(r in p for r in runtime) for p in extra), extra
    assert "/etc/passwd" in predicted


def _quiet(node: Node, seconds: float = 1.5, timeout: float = 60) -> None:
    """Wait until the FUSE process has fetched nothing for `seconds` (prefetch done)."""
    import time

    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = node.fuse_call("stats")["fetch"]["chunks_fetched"]
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(0.2)
    raise AssertionError("fetching never went quiet")


def test_mount_prefetches_the_entrypoint(node_factory: Callable[..., Node],
                                         python_image: str) -> None:
    """The same run with and without prediction: the guess saves most of the misses."""
    misses = {}
    for predict in (False, True):
        node = node_factory(extra_config=f"predict = {str(predict).lower()}\n")
        node.pull(python_image)  # the image's Cmd is python3: predicted at the top layer
        _quiet(node)
        before = len(node.link.requests)
        assert node.run(python_image, "python3", "-c", "print('hello')").strip() == "hello"
        misses[predict] = len([r for r in node.link.requests[before:] if r.range])
    assert misses[True] * 2 < misses[False], misses
