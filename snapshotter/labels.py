"""containerd snapshot label keys, and how to read them, all in one place.

containerd's metadata layer passes a proxy snapshotter only the labels whose key
is `containerd.io/snapshot.ref` or starts with `containerd.io/snapshot/`
(snapshots.FilterInheritedLabels); everything zest reads from a request is
therefore under those keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Prepare of an image layer names the chain ID of the layer it unpacks; a remote snapshotter that
# can serve the layer commits a snapshot of that name itself and answers ALREADY_EXISTS.
TARGET_SNAPSHOT_REF = "containerd.io/snapshot.ref"

# Set by the CRI plugin (and `ctr`/nerdctl with annotations enabled) on each layer's Prepare.
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"  # comma-separated, this layer onward

# Set by stargz-snapshotter's `ctr-remote image rpull` (no manifest digest: resolved by reference).
STARGZ_IMAGE_REF = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_LAYER_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_IMAGE_LAYERS = "containerd.io/snapshot/remote/stargz.layers"

# Marks a committed snapshot that is served by a LayerMounter rather than a plain directory.
REMOTE = "containerd.io/snapshot/remote"
REMOTE_VALUE = "remote snapshot"

# containerd's GC keeps a snapshot with this label; the test suites set it.
GC_ROOT = "containerd.io/gc.root"

# Prefix of the labels containerd passes through to a proxy snapshotter.
INHERITED_PREFIX = "containerd.io/snapshot/"

# Labels on containerd's own objects (content, leases), set by `zest pull` as containerd's pull
# and unpacker set them. containerd refuses a label whose key and value exceed MAX_LABEL_SIZE.
MAX_LABEL_SIZE = 4096
GC_EXPIRE = "containerd.io/gc.expire"  # on a lease: RFC 3339 time after which GC drops it
GC_REF_CONTENT = "containerd.io/gc.ref.content."  # + "config", "m.<i>", "l.<i>", "<i>"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."  # + snapshotter name, on the config blob
DISTRIBUTION_SOURCE = "containerd.io/distribution.source."  # + registry host; value: repos
UNCOMPRESSED = "containerd.io/uncompressed"  # on a layer blob: its DiffID


@dataclass(frozen=True)
class RemoteLayerRequest:
    """What a Prepare tells a remote snapshotter about the layer it is about to unpack."""

    target: str  # the snapshot name (chain ID) to commit if the layer is served remotely
    image_ref: str
    layer_digest: str
    manifest_digest: str
    image_layers: tuple[str, ...]


def remote_layer_request(labels: Mapping[str, str]) -> RemoteLayerRequest | None:
    """The remote-snapshot request in a Prepare's labels, or None when there is none.

    Needs the target and the layer digest; the other fields may be empty (ctr without CRI
    annotations sends only the target).
    """
    target = labels.get(TARGET_SNAPSHOT_REF, "")
    digest = labels.get(CRI_LAYER_DIGEST) or labels.get(STARGZ_LAYER_DIGEST, "")
    if not target or not digest:
        return None
    layers = labels.get(CRI_IMAGE_LAYERS) or labels.get(STARGZ_IMAGE_LAYERS, "")
    return RemoteLayerRequest(
        target=target,
        image_ref=labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_IMAGE_REF, ""),
        layer_digest=digest,
        manifest_digest=labels.get(CRI_MANIFEST_DIGEST, ""),
        image_layers=tuple(d for d in layers.split(",") if d),
    )
