"""Lazy reads against registries that misbehave: expiring tokens, dead origins, bad bytes."""

from __future__ import annotations

import base64
import json
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Node, zest
from tests.support import ocibuild as ob
from tests.support.linkproxy import LinkProxy
from tests.support.registry import LocalRegistry, free_port
from tests.support.tokenproxy import TokenProxy

pytestmark = pytest.mark.integration


def test_bearer_token_renewed_during_lazy_reads(
    node_factory: Callable[..., Node], python_image: str, registry: LocalRegistry,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with TokenProxy(registry.host, users={"bob": "pw"}, token_lifetime=2,
                    advertised_lifetime=300) as auth:
        link = LinkProxy(auth.host).__enter__()
        cfg = tmp_path / "docker"
        cfg.mkdir()
        token = base64.b64encode(b"bob:pw").decode()
        (cfg / "config.json").write_text(json.dumps({"auths": {link.host: {"auth": token}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(cfg))  # the daemon and FUSE process inherit it
        node = node_factory(link=link)
        node.pull(python_image)
        assert node.run(python_image, "python3", "-c", "print('first')").strip() == "first"
        import time

        time.sleep(2.5)  # every token the FUSE process holds has now expired
        seen = len(auth.requests)
        out = node.run(python_image, "python3", "-c",
                       "import email.mime.text, http.client, json; print('second')")
        assert out.strip() == "second"
        later = auth.requests[seen:]
        refused = [s for s in later if s.status == 401 and s.range]
        assert refused, "no range read met an expired token"
        renewed = [s for s in later if s.path.startswith("/token")]
        assert renewed and any(s.status == 206 for s in later)


def test_mirror_from_hosts_toml_when_origin_is_down(
    node_factory: Callable[..., Node], busybox_image: str, registry: LocalRegistry,
    tmp_path: Path,
) -> None:
    origin = f"127.0.0.1:{free_port()}"  # nothing listens here
    hosts = tmp_path / "certs.d"
    (hosts / origin).mkdir(parents=True)
    (hosts / origin / "hosts.toml").write_text(
        f'server = "http://{origin}"\n[host."http://{registry.host}"]\n'
        '  capabilities = ["pull", "resolve"]\n')
    node = node_factory(extra_config=f'hosts_dir = "{hosts}"\n')
    ref = f"{origin}/{busybox_image}"
    zest("pull", "--address", str(node.ctrd.address), "--namespace", node.ctrd.namespace,
         "--hosts-dir", str(hosts), ref)
    name = "mirror-run"
    out = node.ctrd.ctr("run", "--snapshotter", "zest", "--rm", ref, name, "sh", "-c",
                        "echo via mirror")
    assert out.stdout.strip() == "via mirror"
    assert len(node.fuse_call("list")["layers"]) == 1


@pytest.mark.allow_log_errors
def test_corrupt_chunk_in_registry_gives_eio(node_factory: Callable[..., Node],
                                             image_cache, registry: LocalRegistry,  # type: ignore[no-untyped-def]
                                             tmp_path: Path) -> None:
    rnd = random.Random(77)
    good, bad = rnd.randbytes(200_000), rnd.randbytes(200_000)
    extra = ob.make_tar({"data/": None, "data/good": good, "data/bad": bad})
    base = image_cache.layout("busybox")
    index = json.loads((base / "index.json").read_text())
    man = json.loads((base / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    cfg = json.loads((base / "blobs/sha256" / man["config"]["digest"][7:]).read_text())
    import gzip

    base_tar = gzip.decompress((base / "blobs/sha256" / man["layers"][0]["digest"][7:])
                               .read_bytes())
    layout = ob.write_image(tmp_path / "img", ob.Image(
        [ob.Layer(base_tar), ob.Layer(extra)], cmd=cfg["config"]["Cmd"]))
    zest("convert", "--no-progress", f"oci:{layout}:latest", f"{registry.host}/corrupt/img:1")
    m = httpx.get(f"http://{registry.host}/v2/corrupt/img/manifests/1",
                  headers={"Accept": ob.OCI_MANIFEST}).json()
    digest = m["layers"][1]["digest"][7:]
    data_file = (registry.storage / "docker/registry/v2/blobs/sha256" / digest[:2] / digest
                 / "data")
    blob = bytearray(data_file.read_bytes())
    # the zstd frame of data/bad: find it by decompressing frames is overkill; its bytes are
    # random, so zstd stored them nearly raw and a slice of them is findable in the blob
    pos = blob.find(bad[1000:1032])
    assert pos > 0
    blob[pos : pos + 16] = bytes(16)
    data_file.write_bytes(bytes(blob))
    node = node_factory()
    node.pull("corrupt/img:1")
    out = node.run("corrupt/img:1", "sh", "-c",
                   "cat /data/good | wc -c; cat /data/bad > /dev/null; echo rc=$?")
    lines = out.split()
    assert lines[0] == str(len(good))
    assert lines[-1] == "rc=1"  # the read failed (EIO); no unverified byte was served
    stats = node.fuse_call("stats")
    assert stats["fetch"]["verify_failures"] >= 2
    subprocess.run(["true"], check=True)
