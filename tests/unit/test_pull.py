"""Pure parts of `zest pull`: chain IDs, the labels sent to containerd, platforms."""

from __future__ import annotations

import re

import pytest

from snapshotter import labels as lbl
from snapshotter.containerd_api import Descriptor
from snapshotter.image.platform import Platform, PlatformError, pick_manifest
from snapshotter.pull import (
    chain_ids,
    child_gc_labels,
    content_ref,
    distribution_source,
    extract_key,
    image_layers_label,
    is_layer_type,
    layer_labels,
)

OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def _d(n: int) -> str:
    return f"sha256:{n:064x}"


# ------------------------------------------------------------------ chain IDs

# Computed by image-spec's identity.ChainID (Go), as quoted in mc256/starlight's snapshotter tests.
GO_DIFF_IDS = [
    "sha256:bad4c2b21ac784690edb9fab9336c06f429523122db8258386b0816ea9ccff13",
    "sha256:541172e54f7a947125460b76b5788026aa93b9cfb6a9ee132159bd792fc5a213",
    "sha256:a0daea3da3a891e0907836e15387b107376b938918839afd555a93f56a04a437",
    "sha256:c21bfa4fc8f93fcf8cee7f410285c9b0830c39e581d122668f1bfac657d01539",
    "sha256:2f02d7c1705eec01163defce0c73bad60ef4696b9fd2e009bf64f15425e3cb9b",
    "sha256:56b9282b4ec2b115a530fb08958abc2dee400cebc1befbdc3d2a70ee8a7afc97",
]
GO_CHAIN_ID = "sha256:b2defa2545685fad9251740b472ecc07e0334f652a973ec0f37bf55ba9917b70"


def test_chain_ids_match_go_identity_chainid() -> None:
    chain = chain_ids(GO_DIFF_IDS)
    assert len(chain) == 6 and chain[-1] == GO_CHAIN_ID
    assert chain[0] == GO_DIFF_IDS[0]  # the bottom layer's chain ID is its DiffID


def test_chain_ids_step_by_step() -> None:
    # sha256("sha256:00..01 sha256:00..02"), computed with coreutils' sha256sum.
    expected = "sha256:e0213565073dd272477933ef550455db21856966e444074f1492aef0939305ac"
    chain = chain_ids([_d(1), _d(2)])
    assert chain[0] == _d(1)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", chain[1])
    assert chain_ids([_d(1), _d(2), _d(3)])[:2] == chain
    assert chain_ids([]) == []
    assert chain[1] == expected


# ------------------------------------------------------------------ labels


def test_layer_labels() -> None:
    layers = [Descriptor(OCI_ZSTD, _d(i), 10) for i in range(3)]
    labels = layer_labels("r.example/app:1", _d(99), layers, 1, _d(77))
    assert labels == {
        "containerd.io/snapshot.ref": _d(77),
        "containerd.io/snapshot/cri.image-ref": "r.example/app:1",
        "containerd.io/snapshot/cri.layer-digest": _d(1),
        "containerd.io/snapshot/cri.manifest-digest": _d(99),
        "containerd.io/snapshot/cri.image-layers": f"{_d(1)},{_d(2)}",
    }
    # All of them reach a proxy snapshotter (containerd's FilterInheritedLabels).
    assert all(k == lbl.TARGET_SNAPSHOT_REF or k.startswith(lbl.INHERITED_PREFIX) for k in labels)
    assert lbl.remote_layer_request(labels) is not None
    # a layer's own annotations under containerd.io/snapshot/ come along, as containerd's
    # unpacker passes them (zest's TOC hint); the others, and oversized ones, do not
    hinted = Descriptor(OCI_ZSTD, _d(5), 10, {
        "containerd.io/snapshot/zest.toc": "1,2,sha256:" + "0" * 64, "dev.zest.version": "1",
        "containerd.io/snapshot/huge": "x" * 5000})
    labels = layer_labels("r.example/app:1", _d(99), [hinted], 0, _d(77))
    assert labels["containerd.io/snapshot/zest.toc"] == "1,2,sha256:" + "0" * 64
    assert "dev.zest.version" not in labels and "containerd.io/snapshot/huge" not in labels


def test_image_layers_label_is_capped_like_containerd() -> None:
    layers = [Descriptor(OCI_GZIP, _d(i), 1) for i in range(100)]
    value = image_layers_label(layers)
    assert len(lbl.CRI_IMAGE_LAYERS) + len(value) <= lbl.MAX_LABEL_SIZE
    kept = value.split(",")
    assert kept == [_d(i) for i in range(len(kept))]  # whole digests, in order
    # One more digest would have crossed the limit.
    assert len(lbl.CRI_IMAGE_LAYERS) + len(value) + 1 + len(_d(0)) > lbl.MAX_LABEL_SIZE
    assert image_layers_label([]) == ""


def test_child_gc_labels_are_keyed_like_containerd() -> None:
    config = Descriptor(OCI_CONFIG, _d(1), 1)
    layers = [Descriptor(OCI_GZIP, _d(2), 1), Descriptor(OCI_ZSTD, _d(3), 1)]
    assert child_gc_labels([config, *layers]) == {
        "containerd.io/gc.ref.content.config": _d(1),
        "containerd.io/gc.ref.content.l.0": _d(2),
        "containerd.io/gc.ref.content.l.1": _d(3),
    }
    children = [
        Descriptor(OCI_MANIFEST, _d(4), 1),
        Descriptor("application/vnd.docker.distribution.manifest.v2+json", _d(5), 1),
        Descriptor("application/vnd.in-toto+json", _d(6), 1),
        Descriptor("application/vnd.oci.image.index.v1+json", _d(7), 1),
    ]
    assert child_gc_labels(children) == {
        "containerd.io/gc.ref.content.m.0": _d(4),
        "containerd.io/gc.ref.content.m.1": _d(5),
        "containerd.io/gc.ref.content.0": _d(6),
        "containerd.io/gc.ref.content.1": _d(7),
    }


def test_distribution_source_merges_repositories() -> None:
    key = "containerd.io/distribution.source.r.example:5000"
    assert distribution_source("r.example:5000", "app") == {key: "app"}
    assert distribution_source("r.example:5000", "app", "zz,base") == {key: "app,base,zz"}
    assert distribution_source("r.example:5000", "app", "app") == {key: "app"}


@pytest.mark.parametrize(
    ("media_type", "layer"),
    [
        (OCI_GZIP, True),
        (OCI_ZSTD, True),
        ("application/vnd.oci.image.layer.v1.tar", True),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", True),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", True),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", True),
        (OCI_CONFIG, False),
        (OCI_MANIFEST, False),
    ],
)
def test_is_layer_type(media_type: str, layer: bool) -> None:
    assert is_layer_type(media_type) is layer


def test_extract_key_and_content_ref() -> None:
    key = extract_key(_d(5))
    assert re.fullmatch(r"extract-\d+-[A-Za-z0-9_-]{4} " + _d(5), key)
    assert extract_key(_d(5)) != key
    assert content_ref(Descriptor(OCI_GZIP, _d(1), 1)) == f"layer-{_d(1)}"
    assert content_ref(Descriptor(OCI_MANIFEST, _d(1), 1)) == f"manifest-{_d(1)}"
    assert content_ref(Descriptor(OCI_CONFIG, _d(1), 1)) == f"config-{_d(1)}"
    index = "application/vnd.oci.image.index.v1+json"
    assert content_ref(Descriptor(index, _d(1), 1)) == f"index-{_d(1)}"


def test_descriptor_json_and_protobuf() -> None:
    doc = {"mediaType": OCI_GZIP, "digest": _d(1), "size": 5, "annotations": {"a": "b"}}
    desc = Descriptor.from_json(doc)
    assert desc == Descriptor(OCI_GZIP, _d(1), 5, {"a": "b"})
    assert Descriptor.from_pb(desc.to_pb()) == desc


# ------------------------------------------------------------------ platforms


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("Linux/x86_64", Platform("linux", "amd64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64")),
        ("linux/arm", Platform("linux", "arm", "v7")),
        ("linux/arm/v6", Platform("linux", "arm", "v6")),
    ],
)
def test_platform_parse(text: str, parsed: Platform) -> None:
    assert Platform.parse(text) == parsed


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_platform_parse_errors(text: str) -> None:
    with pytest.raises(PlatformError, match="expected os/arch"):
        Platform.parse(text)


def test_pick_manifest() -> None:
    entries = [
        {"digest": _d(0)},  # no platform: an attestation, never picked
        {"digest": _d(1), "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
        {"digest": _d(2), "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": _d(3), "platform": {"os": "linux", "architecture": "amd64"}},
    ]
    assert pick_manifest(entries, Platform.parse("linux/amd64")) == entries[3]
    assert pick_manifest(entries, Platform.parse("linux/arm64")) == entries[2]
    assert pick_manifest(entries, Platform.parse("linux/arm/v6")) == entries[1]
    assert pick_manifest(entries, Platform.parse("linux/arm/v7")) is None
    assert pick_manifest(entries, Platform.parse("windows/amd64")) is None
