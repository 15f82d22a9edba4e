"""Workload profiles as OCI artifacts: what a node learnt, published for every other node.

A profile is each layer's first-touch chunk order (blob offsets), recorded by
the FUSE process the first time an image runs on a node. `zest profile push
REF` stores it in the registry as an artifact manifest whose `subject` is the
image manifest, under the tag `sha256-<hex>.zest-profile` (not every registry
has the referrers API). A snapshotter pulling an image whose TOCs carry no
prefetch list looks for that tag, and uses the profile only when its subject
is the very manifest being pulled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from chunkstore.digest import Digest
from snapshotter.image import store as st

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "application/vnd.zest.profile.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"


def profile_tag(manifest_digest: str) -> str:
    return Digest.parse(manifest_digest).hex.join(("sha256-", ".zest-profile"))


@dataclass(frozen=True)
class Profile:
    manifest: str  # digest of the image manifest it was recorded for
    layers: dict[str, list[int]]  # layer digest -> blob offsets, first touch first

    def encode(self) -> bytes:
        return json.dumps({"version": 1, "manifest": self.manifest, "layers": self.layers},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Profile:
        obj = json.loads(data)
        if obj.get("version") != 1:
            raise ValueError(f"unsupported profile version {obj.get('version')!r}")
        layers = {str(k): [int(x) for x in v] for k, v in (obj.get("layers") or {}).items()}
        return cls(str(obj["manifest"]), layers)


def artifact(profile: Profile, subject: st.Manifest) -> tuple[st.Manifest, bytes]:
    """The artifact manifest and the profile blob it points at."""
    blob = profile.encode()
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": st.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": str(Digest.of(EMPTY_BLOB)), "size": 2},
        "layers": [{"mediaType": ARTIFACT_TYPE, "digest": str(Digest.of(blob)),
                    "size": len(blob)}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest,
                    "size": len(subject.data)},
    }
    data = json.dumps(obj, indent=2).encode()
    return st.Manifest(st.OCI_MANIFEST, data, str(Digest.of(data))), blob


def parse_artifact(manifest: st.Manifest, expected_subject: str) -> str | None:
    """The profile blob's digest, or None (with a log line) when the artifact is not a zest
    profile of `expected_subject`."""
    obj = json.loads(manifest.data)
    subject = (obj.get("subject") or {}).get("digest")
    if obj.get("artifactType") != ARTIFACT_TYPE or not obj.get("layers"):
        log.info("ignoring profile artifact: not a zest profile",
                 extra={"kv": {"artifact": manifest.digest}})
        return None
    if subject != expected_subject:
        log.info("ignoring profile artifact: it refers to another manifest",
                 extra={"kv": {"artifact": manifest.digest, "subject": subject,
                               "manifest": expected_subject}})
        return None
    return str(obj["layers"][0]["digest"])


def push_profile(ref: str, zest_root: str, plain_http: bool = False) -> str:
    """Publish what this node recorded for REF's layers; returns the artifact's tag."""
    import io
    from pathlib import Path

    from snapshotter.fuse import protocol
    from snapshotter.image.stores import open_store
    from snapshotter.optimize import OptimizeError, _platform_manifest

    store, reference = open_store(ref, plain_http=plain_http, for_writing=True)
    try:
        manifest = _platform_manifest(store, reference)
        digests = [d["digest"] for d in json.loads(manifest.data).get("layers") or []]
        control = str(Path(zest_root) / "fuse" / "control.sock")
        recorded = {p["digest"]: p["offsets"] for p in
                    protocol.call(control, {"op": "profile"})["layers"] if p["offsets"]}
        layers = {d: recorded[d] for d in digests if d in recorded}
        if not layers:
            raise OptimizeError(f"nothing recorded for {ref} on this node: run the image with "
                                "the zest snapshotter first")
        art, blob = artifact(Profile(manifest.digest, layers), manifest)
        for data in (EMPTY_BLOB, blob):
            d = str(Digest.of(data))
            if not store.has_blob(d):
                store.put_blob(io.BytesIO(data), d, len(data))
        tag = profile_tag(manifest.digest)
        store.put_manifest(art, tag)
    finally:
        store.close()
    return tag
