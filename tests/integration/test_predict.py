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


def _layers(node: Node) -> list[str]:
    return [x["name"] for x in sorted(node.fuse_call("list")["layers"], key=lambda x: x["slot"])]


def test_a_shell_cmd_predicts_the_programs_its_script_runs(
        node_factory: Callable[..., Node], python_image: str) -> None:
    """A Dockerfile's shell-form CMD is `/bin/sh -c "..."`: the programs the script runs are
    what to prefetch, not only the shell."""
    node = node_factory()
    node.pull(python_image)
    from snapshotter.fuse.protocol import call

    reply = call(str(node.zsd.root / "fuse" / "control.sock"),
                 {"op": "predict", "layers": _layers(node),
                  "argv": ["/bin/sh", "-c", "cd /tmp && X=1 exec python3 -c 'print(1)'"],
                  "env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})
    found = set(reply["files"]) | set(reply["libraries"])
    expected = _ldd(node, python_image, "$(command -v python3)")
    assert expected <= found, expected - found
    assert not any(p.endswith(("/cd", "/exec")) for p in found)


def test_a_program_started_in_a_container_has_its_libraries_fetched(
        node_factory: Callable[..., Node], python_image: str) -> None:
    """The image's Cmd is python3, but the container runs ls: its libraries (libselinux,
    libpcre2) are found as it starts, and the loader's share of them sent for at once."""
    for predict in (True, False):
        node = node_factory(extra_config=f"predict = {str(predict).lower()}\n")
        node.pull(python_image)
        before = node.fuse_call("stats")["execwatch"]
        assert node.run(python_image, "ls", "/usr").split()[:1] == ["bin"]
        after = node.fuse_call("stats")["execwatch"]
        if predict:
            assert after["programs"] > before["programs"]
            assert after["chunks"] > before["chunks"]
        else:  # nothing predicted: nothing watched
            assert after == {"programs": 0, "chunks": 0}


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
