"""The one seam between image conversion and where images live.

A registry repository, an OCI layout directory and an OCI archive all look the
same to the converter: blobs by digest, manifests by tag or digest. Every
implementation streams blobs; none holds a whole layer in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Protocol

# Media types the converter reads and writes.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as stored: its bytes are what the digest covers."""

    media_type: str
    data: bytes
    digest: str  # "sha256:<hex>" of data


class ImageStore(Protocol):
    """Blobs and manifests of one repository (or one layout/archive)."""

    def get_manifest(self, reference: str) -> Manifest:
        """Fetch by tag or "sha256:..." digest; the digest is verified against the bytes."""
        ...

    def open_blob(self, digest: str) -> BinaryIO:
        """A stream of the blob's bytes. Callers verify the digest as they read."""
        ...

    def has_blob(self, digest: str) -> bool: ...

    def put_blob(self, fileobj: BinaryIO, digest: str, size: int) -> None:
        """Upload from a stream positioned at the blob's start; the store checks the digest."""
        ...

    def put_manifest(self, manifest: Manifest, tag: str | None) -> None:
        """Store a manifest under its digest and, when tag is given, under the tag."""
        ...

    def close(self) -> None:
        """Finish (an archive is written here) and release connections."""
        ...


def read_blob_range(store: ImageStore, digest: str, offset: int, length: int) -> bytes:
    """`length` bytes of a blob from `offset`: one range request where the store does those
    (a registry), else a seek into the blob's stream."""
    reader = getattr(store, "read_range", None)
    if reader is not None:
        data: bytes = reader(digest, offset, length)
        return data
    with store.open_blob(digest) as f:
        f.seek(offset)
        return f.read(length)
