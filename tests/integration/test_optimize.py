"""Profiles: `zest optimize` records a workload's reads; a fresh node prefetches them first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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

    reports = json.loads(out)[0]["layers"]
    prefetch = [layer["prefetch"] for layer in reports]
    assert all(p and p > 10 for p in prefetch), prefetch
    # what a node fetches first: some of each layer, never more than the layer
    assert all(0 < r["prefetch_bytes"] < r["compressed_size"] for r in reports), reports
    # the recorded pages, packed: fewer bytes than the chunks that hold them
    assert all(r["hot_frames"] and 0 < r["hot_bytes"] < r["prefetch_bytes"] for r in reports)
    for new, old in zip(m["layers"], src["layers"], strict=True):
        assert fmt.ANN_TOC_DIGEST in new["annotations"]
        frames_end = int(old["annotations"]["dev.zest.toc.offset"]) - 8
        blobs = [httpx.get(f"http://{registry.host}/v2/{repo}/blobs/{d['digest']}",
                           headers={"Range": f"bytes=0-{frames_end - 1}"}).content
                 for repo, d in (("opt/python", new), ("lazy/python", old))]
        assert blobs[0] == blobs[1]  # chunk frames reused byte for byte

    fresh = node_factory()  # another node, cold cache, background prefetch off
    fresh.pull("opt/python:1")
    layers = fresh.wait_prefetched()
    assert sum(x["prefetch_total"] for x in layers) == sum(r["hot_frames"] for r in reports)
    prefetch_requests = sorted((r for r in fresh.link.requests if r.range),
                               key=lambda r: r.started)
    # each layer names its hot frames' place, right behind its TOC: one range request a layer
    # brings both, and they come first (the first Prepare asked for every layer's)
    want, hot_starts = set(), set()
    for x in m["layers"]:
        span = fmt.hot_hint(x["annotations"])
        assert span is not None and x["annotations"][fmt.LABEL_HOT] == f"{span[0]},{span[1]}"
        want.add((int(x["annotations"]["dev.zest.toc.offset"]), span[0] + span[1] - 1))
        hot_starts.add(span[0])
    ranges = [tuple(int(v) for v in (r.range or "").split("=")[1].split("-"))
              for r in prefetch_requests]
    assert set(ranges[:len(want)]) == want
    assert not [r for r in ranges if r[0] in hot_starts]  # no stream of the frames alone
    fresh.link.reset()
    assert fresh.run("opt/python:1", "python3", "-c", "print('hello')").strip() == "hello"
    during = [r for r in fresh.link.requests if r.range]
    assert during == [], during  # every chunk the workload read was already local


def test_profile_artifact_used_by_a_fresh_node(node_factory: Callable[..., Node],
                                               python_image: str,
                                               registry: LocalRegistry) -> None:
    """A profile learnt at run time on one node, pushed, is prefetched by another node."""
    import json as _json

    from snapshotter.profiles import profile_tag

    # a repository of its own: the profile tag must not reach other tests' pulls
    zest("convert", "--no-progress", f"{registry.host}/{python_image}",
         f"{registry.host}/learnt/python:1")
    python_image = "learnt/python:1"
    first = node_factory(extra_config="predict = false\n")
    first.pull(python_image)
    assert first.run(python_image, "python3", "-c", "print('hello')").strip() == "hello"
    out = zest("profile", "push", "--zest-root", str(first.zsd.root),
               f"{registry.host}/{python_image}").stdout
    repo = python_image.rsplit(":", 1)[0]
    m = httpx.get(f"http://{registry.host}/v2/{repo}/manifests/1",
                  headers={"Accept": ob.OCI_MANIFEST})
    tag = profile_tag(m.headers["Docker-Content-Digest"])
    assert tag in out
    art = httpx.get(f"http://{registry.host}/v2/{repo}/manifests/{tag}",
                    headers={"Accept": ob.OCI_MANIFEST}).json()
    assert art["subject"]["digest"] == m.headers["Docker-Content-Digest"]
    assert art["artifactType"] == "application/vnd.zest.profile.v1+json"

    fresh = node_factory(extra_config="predict = false\n")
    fresh.pull(python_image)
    layers = fresh.wait_prefetched()
    assert sum(x["prefetch_total"] for x in layers) > 10  # the profile was used
    fresh.link.reset()
    assert fresh.run(python_image, "python3", "-c", "print('hello')").strip() == "hello"
    assert len([r for r in fresh.link.requests if r.range]) <= 2
    _ = _json


@pytest.mark.allow_log_errors("another manifest")
def test_profile_of_another_manifest_is_ignored(node_factory: Callable[..., Node],
                                               python_image: str, busybox_image: str,
                                               registry: LocalRegistry) -> None:
    """An artifact under the image's tag whose subject is some other manifest is not used."""
    import io

    zest("convert", "--no-progress", f"{registry.host}/{python_image}",
         f"{registry.host}/bogus/python:1")
    python_image = "bogus/python:1"

    from snapshotter.image.stores import open_store
    from snapshotter.profiles import EMPTY_BLOB, Profile, artifact, profile_tag

    repo = python_image.rsplit(":", 1)[0]
    store, _ = open_store(f"{registry.host}/{repo}:1", for_writing=True)
    try:
        target = store.get_manifest("1")
        other = open_store(f"{registry.host}/{busybox_image}")[0].get_manifest(
            busybox_image.rsplit(":", 1)[1])
        layer = _layer_digests(target)[0]
        art, blob = artifact(Profile(other.digest, {layer: [0]}), other)
        for data in (EMPTY_BLOB, blob):
            from chunkstore.digest import Digest

            store.put_blob(io.BytesIO(data), str(Digest.of(data)), len(data))
        store.put_manifest(art, profile_tag(target.digest))  # wrong subject under this tag
        node = node_factory(extra_config="predict = false\n")
        node.pull(python_image)
        layers = node.fuse_call("list")["layers"]
        assert all(x["prefetch_total"] == 0 for x in layers)
        log = (node.zsd.log_path).read_text()
        assert "refers to another manifest" in log
    finally:
        store.close()


def _layer_digests(manifest) -> list[str]:  # type: ignore[no-untyped-def]
    import json as _json

    return [d["digest"] for d in _json.loads(manifest.data)["layers"]]


def _messy_tar(entries: list[tuple[str, str, bytes | str]]) -> bytes:
    """(name, kind, data or link target) in this order, exactly: no parents added."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = 1_700_000_000, 0o644
            if kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, str(data)
                tf.addfile(ti)
            else:
                assert isinstance(data, bytes)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_messy_layers_convert_profile_and_serve(node_factory: Callable[..., Node],
                                                registry: LocalRegistry,
                                                tmp_path: Path) -> None:
    """Parents the tar never lists, a hard link to another directory, and files a later layer
    whites out: recorded by `zest optimize`, then served from the profile alone."""
    import gzip
    import hashlib
    import json
    import os

    from tests.support import images

    layout = images.image_layout("busybox")
    index = json.loads((layout / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / mdigest).read_text())
    base_tar = gzip.decompress(
        (layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1])
        .read_bytes())
    big = os.urandom(700_000)  # several chunks
    messy = _messy_tar([
        ("deep/a/b/data.txt", "file", b"from a directory nobody listed\n"),
        ("x/orig.bin", "file", big),
        ("y/link.bin", "hardlink", "x/orig.bin"),
        ("etc/gone", "file", b"deleted above\n"),
    ])
    upper = _messy_tar([("etc/.wh.gone", "file", b""), ("x/.wh.orig.bin", "file", b"")])
    img = ob.Image([ob.Layer(base_tar), ob.Layer(messy), ob.Layer(upper)])
    src = ob.write_image(tmp_path / "messy", img)
    zest("convert", "--no-progress", f"oci:{src}:latest", f"{registry.host}/messy/img:1")
    script = ("cat /deep/a/b/data.txt; md5sum /y/link.bin; test -e /etc/gone || echo gone; "
              "test -e /x/orig.bin || echo orig-hidden; ls -ld /deep/a | cut -c1")
    want = ("from a directory nobody listed\n"
            f"{hashlib.md5(big).hexdigest()}  /y/link.bin\ngone\norig-hidden\nd\n")

    recorder = node_factory()
    zest("optimize", "--address", str(recorder.ctrd.address), "--namespace",
         recorder.ctrd.namespace, "--zest-root", str(recorder.zsd.root),
         recorder.ref("messy/img:1"), f"{registry.host}/messy/img:opt", "--",
         "/bin/sh", "-c", script)
    assert recorder.run("messy/img:1", "/bin/sh", "-c", script) == want

    fresh = node_factory()
    fresh.pull("messy/img:opt")
    layers = fresh.wait_prefetched()
    assert sum(x["prefetch_total"] for x in layers) >= 3  # the busybox binary and big's chunks
    fresh.link.reset()
    assert fresh.run("messy/img:opt", "/bin/sh", "-c", script) == want
    assert [r for r in fresh.link.requests if r.range] == []  # all of it came from the profile
