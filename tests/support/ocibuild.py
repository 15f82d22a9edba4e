"""Small synthetic images written as OCI layouts, for converter tests that need odd input.

Unlike tests/support/images.py (realistic images from Debian packages), these
are built in memory in milliseconds and may be deliberately broken.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "tar"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "tar"): "application/vnd.docker.image.rootfs.diff.tar",
}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes | None], file_mode: int = 0o755,
             modes: dict[str, int] | None = None) -> bytes:
    """name -> content (None for a directory); files get `file_mode` unless `modes` says."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), (modes or {}).get(name, file_mode)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def compress(tar: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(tar, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


@dataclass
class Layer:
    tar: bytes
    compression: str = "gzip"
    blob: bytes | None = None  # override the compressed bytes (to corrupt them)
    claimed_digest: str | None = None  # override the descriptor's digest
    claimed_size: int | None = None

    def data(self) -> bytes:
        return self.blob if self.blob is not None else compress(self.tar, self.compression)


@dataclass
class Image:
    layers: list[Layer]
    arch: str = "amd64"
    flavor: str = "oci"  # or "docker" media types
    cmd: list[str] = field(default_factory=lambda: ["/bin/sh"])


class Layout:
    def __init__(self, path: Path):
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def put(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha(data)
        (self.path / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest

    def manifest(self, img: Image) -> dict[str, Any]:
        config = {
            "architecture": img.arch, "os": "linux",
            "config": {"Cmd": img.cmd},
            "rootfs": {"type": "layers", "diff_ids": [sha(layer.tar) for layer in img.layers]},
        }
        cbytes = json.dumps(config).encode()
        docker = img.flavor == "docker"
        layers = []
        for layer in img.layers:
            data = layer.data()
            real = self.put(data, layer.claimed_digest)
            layers.append({"mediaType": LAYER_TYPES[(img.flavor, layer.compression)],
                           "digest": real,
                           "size": layer.claimed_size if layer.claimed_size is not None
                           else len(data)})
        m = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
             "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                        "digest": self.put(cbytes), "size": len(cbytes)},
             "layers": layers}
        mbytes = json.dumps(m).encode()
        return {"mediaType": m["mediaType"], "digest": self.put(mbytes), "size": len(mbytes),
                "platform": {"os": "linux", "architecture": img.arch}}

    def tag(self, desc: dict[str, Any], tag: str = "latest") -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {**desc, "annotations": {"org.opencontainers.image.ref.name": tag}}]}
        (self.path / "index.json").write_text(json.dumps(index))


def write_image(path: Path, img: Image, tag: str = "latest") -> Path:
    lay = Layout(path)
    lay.tag(lay.manifest(img), tag)
    return path


def write_multiarch(path: Path, images: list[Image], tag: str = "latest",
                    docker: bool = False) -> Path:
    lay = Layout(path)
    descs = [lay.manifest(img) for img in images]
    idx = {"schemaVersion": 2, "mediaType": DOCKER_LIST if docker else OCI_INDEX,
           "manifests": descs}
    ibytes = json.dumps(idx).encode()
    lay.tag({"mediaType": idx["mediaType"], "digest": lay.put(ibytes), "size": len(ibytes)}, tag)
    return path
