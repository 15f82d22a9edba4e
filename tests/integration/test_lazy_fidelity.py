"""What a lazily pulled image looks like, byte for byte, and what crossing the network costs."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Node, zest
from tests.support import ocibuild as ob
from tests.support.linkproxy import LinkProxy
from tests.support.registry import LocalRegistry

pytestmark = pytest.mark.integration
_SKIP_XATTRS = ("trusted.overlay.", "security.selinux")


def _describe(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, size, sha256 | link target | rdev, xattrs)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while piece := f.read(1 << 20):
                        h.update(piece)
                what: object = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                what = st.st_rdev
            else:
                what = None
            xattrs = tuple(sorted(
                (x, os.getxattr(p, x, follow_symlinks=False))
                for x in os.listxattr(p, follow_symlinks=False)
                if not x.startswith(_SKIP_XATTRS)))
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                             st.st_uid, st.st_gid, size, what, xattrs)
    return out


def test_merged_rootfs_equals_full_extraction(node_factory: Callable[..., Node],
                                              python_image: str, image_cache,  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    node = node_factory()
    original = image_cache.push("debian-python", "src/python", "1")
    node.ctrd.ctr("image", "pull", "--plain-http", original, timeout=600)  # overlayfs, in full
    node.pull(python_image)  # zest, lazily
    full, lazy = tmp_path / "full", tmp_path / "lazy"
    full.mkdir()
    lazy.mkdir()
    node.ctrd.ctr("images", "mount", original, str(full))
    try:
        node.ctrd.ctr("images", "mount", "--snapshotter", "zest", node.ref(python_image),
                      str(lazy))
        try:
            want, got = _describe(full), _describe(lazy)
        finally:
            node.ctrd.ctr("images", "unmount", str(lazy), check=False)
    finally:
        node.ctrd.ctr("images", "unmount", str(full), check=False)
    assert len(want) > 5000
    assert "etc/motd" not in got  # deleted by the upper layer (a whiteout)
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    assert not missing and not extra, (missing, extra)
    diff = [p for p in want if want[p] != got[p]][:5]
    assert not diff, [(p, want[p], got[p]) for p in diff]


def _layer_tars(registry: LocalRegistry, repo_tag: str) -> tuple[list[bytes], dict]:  # type: ignore[type-arg]
    repo, tag = repo_tag.rsplit(":", 1)
    base = f"http://{registry.host}/v2/{repo}"
    m = httpx.get(f"{base}/manifests/{tag}", headers={"Accept": ob.OCI_MANIFEST}).json()
    cfg = httpx.get(f"{base}/blobs/{m['config']['digest']}", follow_redirects=True).json()
    tars = [subprocess.run(["zstd", "-d", "-c"], input=httpx.get(
        f"{base}/blobs/{d['digest']}", follow_redirects=True).content, capture_output=True,
        check=True).stdout for d in m["layers"]]
    return tars, cfg


def _replace_file(tar: bytes, name: str, data: bytes) -> bytes:
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            f = src.extractfile(m) if m.isreg() else None
            if m.name.lstrip("./") == name:
                m.size = len(data)
                f = io.BytesIO(data)  # type: ignore[assignment]
            dst.addfile(m, f)
    return out.getvalue()


def test_second_version_fetches_only_the_changed_file(
    node_factory: Callable[..., Node], python_image: str, registry: LocalRegistry,
    tmp_path: Path,
) -> None:
    tars, cfg = _layer_tars(registry, python_image)
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tars[1])) as tf:
        victim = next(m for m in tf if m.isreg() and m.size > 20_000)
        name = victim.name.lstrip("./")
        old = tf.extractfile(victim).read()  # type: ignore[union-attr]
    new_file = random.Random(5).randbytes(600_000)
    v1_top = _replace_file(tars[1], name, old)  # same encoder for both versions
    v2_top = _replace_file(tars[1], name, new_file)
    cmd = cfg["config"]["Cmd"]
    for tag, top in (("v1", v1_top), ("v2", v2_top)):
        layout = ob.write_image(tmp_path / tag, ob.Image(
            [ob.Layer(tars[0], blob=gzip.compress(tars[0], 1)),
             ob.Layer(top, blob=gzip.compress(top, 1))], cmd=cmd))
        zest("convert", "--no-progress", f"oci:{layout}:latest",
             f"{registry.host}/dedup/python:{tag}")
    node = node_factory(background=True)
    node.pull("dedup/python:v1")
    node.wait_prefetched()  # the whole of v1 is in the chunk cache
    before = node.link.bytes_sent
    node.pull("dedup/python:v2")
    node.wait_prefetched()
    assert node.run("dedup/python:v2", "sh", "-c", f"wc -c < /{name}").strip() == str(
        len(new_file))
    fetched = node.link.bytes_sent - before
    m = httpx.get(f"http://{registry.host}/v2/dedup/python/manifests/v2",
                  headers={"Accept": ob.OCI_MANIFEST}).json()
    tocs = sum(int(d["annotations"]["dev.zest.toc.size"]) for d in m["layers"])
    # the changed file's chunks (random: incompressible), the TOCs, the manifests and config,
    # and a little slack for tar headers around the file
    assert fetched < len(new_file) + tocs + 200_000, (fetched, len(new_file), tocs)


def test_mixed_image_every_layer_served(node_factory: Callable[..., Node],
                                        python_image: str, registry: LocalRegistry,
                                        tmp_path: Path) -> None:
    top = ob.make_tar({"opt/": None, "opt/app.txt": b"plain gzip layer\n"})
    base = f"http://{registry.host}/v2/lazy/python"
    m = httpx.get(f"{base}/manifests/1", headers={"Accept": ob.OCI_MANIFEST}).json()
    cfg = httpx.get(f"{base}/blobs/{m['config']['digest']}", follow_redirects=True).json()
    # lower layers: the converted ones as they are; top: a plain gzip layer
    layout = tmp_path / "mixed"
    lay = ob.Layout(layout)
    layers = []
    for d in m["layers"]:
        lay.put(httpx.get(f"{base}/blobs/{d['digest']}", follow_redirects=True).content)
        layers.append(d)
    gz = gzip.compress(top)
    layers.append({"mediaType": ob.LAYER_TYPES[("oci", "gzip")], "digest": lay.put(gz),
                   "size": len(gz)})
    cfg["rootfs"]["diff_ids"].append(ob.sha(top))
    cbytes = json.dumps(cfg).encode()
    man = {"schemaVersion": 2, "mediaType": ob.OCI_MANIFEST,
           "config": {"mediaType": ob.OCI_CONFIG, "digest": lay.put(cbytes),
                      "size": len(cbytes)}, "layers": layers}
    mbytes = json.dumps(man).encode()
    lay.tag({"mediaType": ob.OCI_MANIFEST, "digest": lay.put(mbytes), "size": len(mbytes)})
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{registry.host}/mixed/python:1"],
                   check=True, capture_output=True)
    node = node_factory()
    out = zest("pull", "--address", str(node.ctrd.address), "--namespace",
               node.ctrd.namespace, node.ref("mixed/python:1")).stdout
    assert "remote=3" in out.replace(" ", "") or "3 remote" in out or "remote 3" in out, out
    assert node.run("mixed/python:1", "cat", "/opt/app.txt").strip() == "plain gzip layer"
    # the gzip layer was downloaded once, by the daemon; the converted ones never in full
    def full_gets(digest: str) -> int:
        return sum(1 for r in node.link.requests if r.method == "GET" and r.range is None
                   and r.path.endswith(digest))

    assert full_gets(layers[-1]["digest"]) == 1
    assert all(full_gets(d["digest"]) == 0 for d in layers[:-1])


def test_basic_auth_from_docker_config(node_factory: Callable[..., Node], busybox_image: str,
                                       registry: LocalRegistry, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalRegistry(tmp_path / "locked", htpasswd={"alice": "s3cret"}) as locked:
        zest("convert", "--no-progress", f"{registry.host}/{busybox_image}",
             f"{locked.host}/{busybox_image}", check=False)  # no credentials yet: refused
        cfg = tmp_path / "docker"
        cfg.mkdir()
        auth = base64.b64encode(b"alice:s3cret").decode()
        link = LinkProxy(locked.host).__enter__()
        (cfg / "config.json").write_text(json.dumps(
            {"auths": {locked.host: {"auth": auth}, link.host: {"auth": auth}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
        zest("convert", "--no-progress", f"{registry.host}/{busybox_image}",
             f"{locked.host}/{busybox_image}")
        node = node_factory(link=link)
        node.pull(busybox_image)
        assert node.run(busybox_image, "sh", "-c", "echo authorized").strip() == "authorized"
        assert len(node.fuse_call("list")["layers"]) == 1
        assert any(r.status == 206 for r in link.requests)


@pytest.mark.allow_log_errors
def test_flipped_byte_is_never_served(node_factory: Callable[..., Node],
                                      python_image: str) -> None:
    # nothing fetched ahead of the run: the run's own reads must meet the bad responses
    node = node_factory(extra_config="predict = false\n")  # background prefetch is off
    node.pull(python_image)
    node.link.corrupt_ranges = 1  # one bad response: refetched, the right bytes served
    out = node.run(python_image, "python3", "-c", "print('hello')")
    assert out.strip() == "hello"
    assert node.fuse_call("stats")["fetch"]["verify_failures"] >= 1  # each chunk it held
    node.link.corrupt_ranges = 10_000  # every response bad: reads fail, nothing wrong is served
    # (only modules the first run already loaded: a library mapped from a failing file
    # would kill the process with SIGBUS before it could print anything)
    script = ("try:\n  d=open('/usr/lib/python3.11/pydoc_data/topics.py','rb').read()\n"
              "  print('read', len(d))\n"
              "except OSError as e:\n  print('error', e.errno)\n")
    out = node.run(python_image, "python3", "-c", script)
    assert out.split() == ["error", "5"], out
