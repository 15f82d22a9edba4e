"""`zest convert` and `zest inspect` as a user runs them, against a real registry on loopback."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from chunkstore import format as fmt
from chunkstore import toc as tocmod
from tests.support import ocibuild as ob
from tests.support.registry import LocalRegistry
from tests.support.tarcheck import assert_chunks_valid, assert_toc_matches_tar
from tests.support.tokenproxy import TokenProxy

pytestmark = pytest.mark.integration
ZEST = str(Path(sys.executable).with_name("zest"))


def zest(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ZEST, *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"zest {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


_HTTP = httpx.Client(timeout=60, follow_redirects=True)


def _get(host: str, path: str, **headers: str) -> httpx.Response:
    accept = ",".join([ob.OCI_MANIFEST, ob.OCI_INDEX, ob.DOCKER_MANIFEST, ob.DOCKER_LIST])
    return _HTTP.get(f"http://{host}{path}", headers={"Accept": accept, **headers})


def _manifest(host: str, repo: str, ref: str) -> dict:  # type: ignore[type-arg]
    r = _get(host, f"/v2/{repo}/manifests/{ref}")
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def _tag_exists(host: str, repo: str, tag: str) -> bool:
    return _get(host, f"/v2/{repo}/manifests/{tag}").status_code == 200


def _blob(host: str, repo: str, digest: str) -> bytes:
    r = _get(host, f"/v2/{repo}/blobs/{digest}")
    r.raise_for_status()
    return r.content


@pytest.fixture(scope="module")
def converted_python(image_cache, registry: LocalRegistry) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    src = image_cache.push("debian-python", "src/python", "1")
    dst = f"{registry.host}/zest/python:1"
    out = zest("convert", "--no-progress", src, dst)
    assert "converted" in out.stdout
    return src, dst


def test_roundtrip_realistic_image(converted_python: tuple[str, str],
                                   registry: LocalRegistry) -> None:
    host = registry.host
    src_m = _manifest(host, "src/python", "1")
    dst_m = _manifest(host, "zest/python", "1")
    assert dst_m["mediaType"] == ob.OCI_MANIFEST
    assert dst_m["config"]["digest"] == src_m["config"]["digest"]  # config blob unchanged
    config = json.loads(_blob(host, "zest/python", dst_m["config"]["digest"]))
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(dst_m["layers"]) == len(src_m["layers"]) == len(diff_ids) >= 2
    for src_desc, desc, diff_id in zip(src_m["layers"], dst_m["layers"], diff_ids, strict=True):
        assert desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
        blob = _blob(host, "zest/python", desc["digest"])
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
        # the stock zstd CLI gives back the original tar: same DiffID
        tar = subprocess.run(["zstd", "-d", "-c"], input=blob, capture_output=True,
                             check=True).stdout
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        assert gzip.decompress(_blob(host, "src/python", src_desc["digest"])) == tar
        # the TOC, found by the annotations with one range request, verifies
        footer = fmt.footer_from_annotations(desc["annotations"])
        assert footer is not None
        url = f"/v2/zest/python/blobs/{desc['digest']}"

        def read_range(off: int, n: int, url: str = url) -> bytes:
            r = _get(host, url, Range=f"bytes={off}-{off + n - 1}")
            assert r.status_code == 206
            return r.content

        toc = tocmod.load_toc(read_range, footer)
        assert tocmod.read_footer(read_range, len(blob)) == footer
        import io

        contents = assert_toc_matches_tar(toc, io.BytesIO(tar))
        # every chunk, fetched alone by an HTTP range request, decompresses alone to the bytes
        n = assert_chunks_valid(toc, read_range, contents)
        assert n == sum(len(e.chunks) for e in toc.entries) > 100


def test_inspect_reports_every_layer(converted_python: tuple[str, str]) -> None:
    _, dst = converted_python
    out = zest("inspect", dst).stdout
    rows = [line for line in out.splitlines() if "zest v1" in line]
    assert len(rows) == 2 and all(" ok " in r for r in rows), out
    data = json.loads(zest("inspect", "--json", dst).stdout)
    layers = data[0]["layers"]
    assert all(layer["toc_verified"] for layer in layers)
    assert all(layer["entries"] > 100 and layer["chunks"] > 100 for layer in layers)
    assert all(layer["distinct_chunks"] <= layer["chunks"] for layer in layers)


def test_inspect_of_unconverted_image(converted_python: tuple[str, str]) -> None:
    src, _ = converted_python
    out = zest("inspect", src).stdout
    assert "gzip" in out and "zest v1" not in out


def test_plain_containerd_pulls_and_runs_converted_image(
    converted_python: tuple[str, str], containerd, image_cache  # type: ignore[no-untyped-def]
) -> None:
    _, dst = converted_python
    containerd.ctr("image", "pull", "--plain-http", dst, timeout=300)
    name = f"zest-compat-{uuid.uuid4().hex[:8]}"
    out = containerd.ctr("run", "--rm", dst, name, *image_cache.recipe("debian-python").cmd,
                         timeout=120)
    assert out.stdout.strip() == image_cache.recipe("debian-python").expected_output
    containerd.ctr("image", "rm", dst)


def test_second_conversion_uploads_no_blob(converted_python: tuple[str, str],
                                           registry: LocalRegistry, tmp_path: Path) -> None:
    src, _ = converted_python
    with TokenProxy(registry.host, require_token=False) as proxy:
        dst = f"{proxy.host}/zest/python:again"
        zest("convert", "--no-progress", src.replace(registry.host, proxy.host), dst)
        methods = [(s.method, s.path) for s in proxy.requests]
    uploads = [m for m in methods if m[0] in ("POST", "PATCH") or
               (m[0] == "PUT" and "/blobs/" in m[1])]
    assert uploads == []
    assert any(m[0] == "HEAD" and "/blobs/" in m[1] for m in methods)
    assert _tag_exists(registry.host, "zest/python", "again")


def test_multiplatform_index_and_oci_archive(registry: LocalRegistry, tmp_path: Path) -> None:
    shared = ob.Layer(ob.make_tar({"bin/": None, "bin/tool": b"x" * 100_000}))
    imgs = [ob.Image([shared, ob.Layer(ob.make_tar({"arch": a.encode()}))], arch=a)
            for a in ("amd64", "arm64")]
    layout = ob.write_multiarch(tmp_path / "multi", imgs, docker=True)
    dst = f"{registry.host}/zest/multi:1"
    zest("convert", "--no-progress", f"oci:{layout}:latest", dst)
    idx = _manifest(registry.host, "zest/multi", "1")
    assert idx["mediaType"] == ob.OCI_INDEX
    assert [m["platform"]["architecture"] for m in idx["manifests"]] == ["amd64", "arm64"]
    for m in idx["manifests"]:
        child = _manifest(registry.host, "zest/multi", m["digest"])
        assert all(fmt.ANN_TOC_DIGEST in layer["annotations"] for layer in child["layers"])
    archive = tmp_path / "out.tar"
    zest("convert", "--no-progress", dst, f"oci-archive:{archive}:v1")
    out = zest("inspect", f"oci-archive:{archive}:v1").stdout
    assert out.count("zest v1") == 4 and "BAD" not in out


# --- bad input: one clear error line naming the layer, non-zero exit, no tag pushed -------------

def _bad_layout(tmp_path: Path, layer: ob.Layer) -> str:
    good = ob.Layer(ob.make_tar({"ok": b"fine"}))
    path = ob.write_image(tmp_path / "bad", ob.Image([good, layer]))
    return f"oci:{path}:latest"


def _assert_fails(src: str, registry: LocalRegistry, match: str, *extra: str) -> str:
    repo, tag = f"zest/bad-{uuid.uuid4().hex[:8]}", "1"
    proc = zest("convert", "--no-progress", *extra, src, f"{registry.host}/{repo}:{tag}",
                check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert match in errors[0].lower(), errors[0]
    assert not _tag_exists(registry.host, repo, tag)
    return errors[0]


def _payload() -> bytes:
    return ob.make_tar({"data": bytes(range(256)) * 2000})


@pytest.mark.parametrize(("case", "match"), [
    ("corrupt-gzip", "gzip"), ("truncated-gzip", "gzip"), ("truncated-zstd", "zstd"),
    ("truncated-tar", "truncated"), ("lying-size", "descriptor says"),
    ("lying-digest", "digest"), ("dotdot", ".."), ("absolute", "absolute"),
])  # fmt: skip
def test_bad_layer(case: str, match: str, tmp_path: Path, registry: LocalRegistry) -> None:
    tar = _payload()
    gz = gzip.compress(tar)
    layers = {
        "corrupt-gzip": lambda: ob.Layer(tar, blob=gz[:2000] + bytes(500) + gz[2500:]),
        "truncated-gzip": lambda: ob.Layer(tar, blob=gz[: len(gz) // 2]),
        "truncated-zstd": lambda: ob.Layer(tar, "zstd", blob=ob.compress(tar, "zstd")[:-30]),
        "truncated-tar": lambda: ob.Layer(tar, "tar", blob=tar[:3000]),
        "lying-size": lambda: ob.Layer(tar, claimed_size=len(gz) + 7),
        "lying-digest": lambda: ob.Layer(tar, claimed_digest="sha256:" + "cd" * 32),
        "dotdot": lambda: ob.Layer(ob.make_tar({"a/../../etc/x": b"x"})),
        "absolute": lambda: ob.Layer(_absolute_tar()),
    }
    err = _assert_fails(_bad_layout(tmp_path, layers[case]()), registry, match)
    assert "layer 2/2" in err


def _absolute_tar() -> bytes:
    tar = bytearray(ob.make_tar({"etc/passwd": b"root"}))
    # tarfile strips a leading "/" on write; put it back and fix the checksum
    for off in range(0, len(tar), 512):
        h = tar[off : off + 512]
        if h[:10] == b"etc/passwd":
            h[:11] = b"/etc/passwd"
            h[148:156] = b" " * 8
            h[148:156] = f"{sum(h):06o}\0 ".encode()
            tar[off : off + 512] = h
    return bytes(tar)


def test_missing_source_tag(registry: LocalRegistry) -> None:
    err = _assert_fails(f"{registry.host}/nope/nothing:1", registry, "not found")
    assert "nope/nothing" in err


@pytest.mark.allow_log_errors
def test_registry_500(registry: LocalRegistry, image_cache) -> None:  # type: ignore[no-untyped-def]
    src = image_cache.push("busybox", "src/busybox", "1")
    with TokenProxy(registry.host, require_token=False) as proxy:
        proxy.fail_next(100, 500)
        _assert_fails(src.replace(registry.host, proxy.host), registry, "500")


def test_registry_401(tmp_path: Path, image_cache) -> None:  # type: ignore[no-untyped-def]
    with LocalRegistry(tmp_path / "auth", htpasswd={"alice": "secret"}) as reg:
        proc = zest("convert", "--no-progress", f"oci:{image_cache.layout('busybox')}:latest",
                    f"{reg.host}/zest/locked:1", check=False)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and ("401" in errors[0] or "auth" in errors[0].lower())
