"""`zest pull`: put an image into containerd through its gRPC API, as containerd's own pull and
unpacker do with a remote snapshotter.

    result = pull("registry.example/app:1-zest", address=..., namespace="default")

Steps (containerd 1.6 client.Pull with WithPullUnpack, unpacker.go):

1. Resolve the reference in the registry (hosts.toml mirrors honoured): index -> the manifest for
   the platform -> config (its diff_ids give the chain IDs).
2. Create a lease that expires by itself (`containerd.io/gc.expire`), so that a crash leaks
   nothing, and send it with every call that creates something.
3. Write index, manifest and config into the content store, labelled as containerd labels them:
   `containerd.io/gc.ref.content.*` from each blob to its children, and
   `containerd.io/distribution.source.<host>=<repo>`.
4. For each layer in order: skip it when the snapshot `<chain id>` exists; else Prepare
   `extract-<unique> <chain id>` on the parent chain ID with the remote-snapshot labels
   (`layer_labels`). ALREADY_EXISTS means the snapshotter served the layer itself: go on. Else
   (containerd's ordinary path) the layer and all later ones are downloaded into the content store,
   a few at a time, and this one is unpacked by the Diff service onto the Prepare's mounts, checked
   against its DiffID, committed as `<chain id>` and its blob labelled `containerd.io/uncompressed`.
5. Label the config `containerd.io/gc.ref.snapshot.<snapshotter>=<top chain id>`, create or update
   the image record (name: the reference as given, target: index or manifest), delete the lease.

Concurrency: `pull` runs in the calling thread; layer downloads run in a small thread pool, each
streaming one blob from the registry into one content Write. Nothing else is shared.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter import labels as lbl
from snapshotter.containerd_api import (
    DEFAULT_ADDRESS,
    Containerd,
    ContainerdAlreadyExistsError,
    ContainerdError,
    Descriptor,
)
from snapshotter.image import reference as refmod
from snapshotter.image.platform import Platform, host_platform, pick_manifest, platforms_of
from snapshotter.image.store import INDEX_TYPES, MANIFEST_TYPES, Manifest
from snapshotter.registry.client import RegistryClient

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "default"
DEFAULT_SNAPSHOTTER = "zest"
LEASE_EXPIRY = datetime.timedelta(hours=24)  # containerd's pull uses the same
DOWNLOADS = 3  # layers downloaded at once (CRI's max_concurrent_downloads default)
CHUNK = 1 << 20  # bytes per content Write message
MAX_CONFIG_SIZE = 32 << 20
PREPARE_TRIES = 3

_CONFIG_TYPES = {
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.containerd.container.criu.checkpoint.config.v1+proto",
    "application/vnd.containerd.container.checkpoint.config.v1+proto",
}
_DOCKER_LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
}


class PullError(Exception):
    """The image cannot be pulled; the message says why and what to do."""


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class LayerResult:
    """What happened to one layer."""

    digest: str
    diff_id: str
    chain_id: str
    state: str  # "remote": served by the snapshotter; "unpacked": downloaded and applied;
    #             "present": the snapshot existed before this pull


@dataclass(frozen=True)
class PullResult:
    name: str  # the image record's name
    target: Descriptor  # what the record points at: the index, or the manifest
    manifest: Descriptor
    config: Descriptor
    chain_id: str  # the top layer's snapshot
    layers: tuple[LayerResult, ...]
    seconds: float

    def count(self, state: str) -> int:
        return sum(1 for layer in self.layers if layer.state == state)

    def summary(self) -> str:
        counts = ", ".join(
            f"{self.count(s)} {s}" for s in ("remote", "unpacked", "present") if self.count(s)
        )
        return (
            f"pulled {self.name} ({self.manifest.digest}): {len(self.layers)} layers"
            f"{' (' + counts + ')' if counts else ''} in {self.seconds:.1f}s"
        )


# ------------------------------------------------------------------ pure helpers


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain IDs: ChainID(1) = DiffID(1), ChainID(n) = sha256(ChainID(n-1) + " " + DiffID(n))
    (image-spec config.md, "Layer ChainID")."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            digest = hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
            chain.append(f"sha256:{digest}")
    return chain


def is_layer_type(media_type: str) -> bool:
    """containerd's images.IsLayerType."""
    if media_type.startswith("application/vnd.oci.image.layer."):
        return True
    return media_type.split("+", 1)[0] in _DOCKER_LAYER_TYPES


def child_gc_labels(children: Sequence[Descriptor]) -> dict[str, str]:
    """The labels by which a blob keeps its children from garbage collection, keyed as
    containerd's images.ChildGCLabels and SetChildrenMappedLabels key them."""
    labels: dict[str, str] = {}
    seen: dict[str, int] = {}
    for child in children:
        if child.media_type in _CONFIG_TYPES:
            key = lbl.GC_REF_CONTENT + "config"
        elif child.media_type in MANIFEST_TYPES:
            key = lbl.GC_REF_CONTENT + "m."
        elif is_layer_type(child.media_type):
            key = lbl.GC_REF_CONTENT + "l."
        else:
            key = lbl.GC_REF_CONTENT
        index = seen.get(key, 0)
        seen[key] = index + 1
        if index > 0 or key.endswith("."):
            key = f"{key}{index}"
        labels[key] = child.digest
    return labels


def distribution_source(host: str, repo: str, existing: str | None = None) -> dict[str, str]:
    """`containerd.io/distribution.source.<host>`: the sorted set of repositories holding a blob."""
    repos = {r for r in (existing or "").split(",") if r} | {repo}
    return {lbl.DISTRIBUTION_SOURCE + host: ",".join(sorted(repos))}


def image_layers_label(layers: Sequence[Descriptor]) -> str:
    """Comma-separated layer digests, cut before the label would exceed containerd's limit
    (the CRI plugin's getLayers)."""
    value = ""
    for layer in layers:
        item = ("," if value else "") + layer.digest
        if len(lbl.CRI_IMAGE_LAYERS) + len(value) + len(item) > lbl.MAX_LABEL_SIZE:
            break
        value += item
    return value


def layer_labels(
    image_ref: str, manifest_digest: str, layers: Sequence[Descriptor], index: int, chain_id: str
) -> dict[str, str]:
    """The labels of layer `index`'s Prepare (and Commit): the target snapshot, the
    `containerd.io/snapshot/cri.*` annotations the CRI plugin adds to layer descriptors, and,
    as containerd's unpacker passes them, the descriptor's own annotations under
    `containerd.io/snapshot/` (zest's TOC hint)."""
    inherited = {k: v for k, v in layers[index].annotations.items()
                 if k.startswith(lbl.INHERITED_PREFIX) and len(k) + len(v) <= lbl.MAX_LABEL_SIZE}
    return {
        **inherited,
        lbl.TARGET_SNAPSHOT_REF: chain_id,
        lbl.CRI_IMAGE_REF: image_ref,
        lbl.CRI_LAYER_DIGEST: layers[index].digest,
        lbl.CRI_MANIFEST_DIGEST: manifest_digest,
        lbl.CRI_IMAGE_LAYERS: image_layers_label(layers[index:]),
    }


def extract_key(chain_id: str) -> str:
    """The active snapshot's key while a layer is unpacked (containerd: "extract-%s %s")."""
    unique = base64.urlsafe_b64encode(os.urandom(3)).decode()
    return f"extract-{time.time_ns() % 1_000_000_000}-{unique} {chain_id}"


def content_ref(desc: Descriptor) -> str:
    """The ingest name containerd's remotes.MakeRefKey gives a blob."""
    if desc.media_type in INDEX_TYPES:
        kind = "index"
    elif desc.media_type in MANIFEST_TYPES:
        kind = "manifest"
    elif desc.media_type in _CONFIG_TYPES:
        kind = "config"
    elif is_layer_type(desc.media_type):
        kind = "layer"
    else:
        kind = "unknown"
    return f"{kind}-{desc.digest}"


# ------------------------------------------------------------------ resolving


@dataclass(frozen=True)
class ResolvedImage:
    """An image as the registry has it, down to the platform's manifest and config."""

    ref: refmod.ImageReference
    index: Manifest | None
    index_children: tuple[Descriptor, ...]
    manifest: Manifest
    config: Descriptor
    config_data: bytes
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]

    @property
    def target(self) -> Descriptor:
        top = self.index or self.manifest
        return Descriptor(top.media_type, top.digest, len(top.data))

    @property
    def manifest_desc(self) -> Descriptor:
        return Descriptor(self.manifest.media_type, self.manifest.digest, len(self.manifest.data))


def resolve_image(
    client: RegistryClient, ref: refmod.ImageReference, platform: Platform
) -> ResolvedImage:
    """Fetch index (if any), the platform's manifest and the config; check they fit together."""
    repo = ref.repository
    top = client.get_manifest(repo, ref.reference or refmod.DEFAULT_TAG)
    index: Manifest | None = None
    children: tuple[Descriptor, ...] = ()
    manifest = top
    if top.media_type in INDEX_TYPES:
        index = top
        entries = _json(top.data, f"index {top.digest}").get("manifests") or []
        children = tuple(Descriptor.from_json(d) for d in entries)
        chosen = pick_manifest(entries, platform)
        if chosen is None:
            offered = ", ".join(platforms_of(entries)) or "none"
            raise PullError(
                f"{ref} has no image for {platform} (it has: {offered}); pass --platform"
            )
        manifest = client.get_manifest(repo, str(chosen["digest"]))
    if manifest.media_type not in MANIFEST_TYPES:
        raise PullError(
            f"{ref}: manifest type {manifest.media_type} is not supported "
            "(OCI and docker schema 2 are); re-push the image with a current tool"
        )
    doc = _json(manifest.data, f"manifest {manifest.digest}")
    try:
        config = Descriptor.from_json(doc["config"])
        layers = tuple(Descriptor.from_json(d) for d in doc.get("layers") or [])
    except (KeyError, TypeError, ValueError) as exc:
        raise PullError(f"{ref}: manifest {manifest.digest} is malformed ({exc!r})") from exc
    config_data = _read_config(client, repo, config)
    try:
        rootfs = _json(config_data, f"config {config.digest}")["rootfs"]
        diff_ids = tuple(str(d) for d in rootfs["diff_ids"])
    except (KeyError, TypeError) as exc:
        raise PullError(f"{ref}: config {config.digest} has no rootfs.diff_ids ({exc!r})") from exc
    if len(diff_ids) != len(layers):
        raise PullError(
            f"{ref}: the manifest lists {len(layers)} layers but the config "
            f"{len(diff_ids)} diff_ids; the image is broken, rebuild or re-push it"
        )
    return ResolvedImage(ref, index, children, manifest, config, config_data, layers, diff_ids)


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise PullError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise PullError(f"{what} is not a JSON object")
    return doc


def _read_config(client: RegistryClient, repo: str, desc: Descriptor) -> bytes:
    if desc.size > MAX_CONFIG_SIZE:
        raise PullError(f"config {desc.digest} is {desc.size} bytes; refusing more than 32 MiB")
    with client.open_blob(repo, desc.digest) as f:
        data = f.read(desc.size + 1)
    if len(data) != desc.size or f"sha256:{hashlib.sha256(data).hexdigest()}" != desc.digest:
        raise PullError(
            f"config {desc.digest} in {client.host}/{repo}: the registry sent other bytes "
            "(size or digest differ); the registry or a proxy is corrupting data"
        )
    return data


# ------------------------------------------------------------------ pulling


def pull(
    ref: str,
    *,
    address: str | os.PathLike[str] = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    snapshotter: str = DEFAULT_SNAPSHOTTER,
    platform: Platform | str | None = None,
    plain_http: bool = False,
    hosts_dir: Path | None = None,
    registry: RegistryClient | None = None,
    downloads: int = DOWNLOADS,
) -> PullResult:
    """Pull `ref` into containerd at `address` and unpack it for `snapshotter`; see the module
    docstring. `registry` overrides the client built from the reference's host and hosts_dir."""
    started = time.monotonic()
    image_ref = _parse(ref)
    want = Platform.parse(platform) if isinstance(platform, str) else platform or host_platform()
    with contextlib.ExitStack() as stack:
        ctrd = stack.enter_context(Containerd(address, namespace))
        ctrd.connect()
        client = registry or stack.enter_context(
            RegistryClient.for_host(image_ref.host, hosts_dir, plain_http=plain_http)
        )
        image = resolve_image(client, image_ref, want)
        lease = _create_lease(ctrd)
        stack.callback(_delete_lease, ctrd, lease)
        session = _Session(ctrd, client, image, lease, ref)
        session.write_metadata()
        layers = session.unpack(snapshotter, downloads)
        top = layers[-1].chain_id if layers else ""
        if top:
            gc_label = {lbl.GC_REF_SNAPSHOT + snapshotter: top}
            ctrd.update_content_labels(image.config.digest, gc_label, lease=lease)
        ctrd.put_image(ref, image.target, {}, lease=lease)
    result = PullResult(
        name=ref,
        target=image.target,
        manifest=image.manifest_desc,
        config=image.config,
        chain_id=top,
        layers=tuple(layers),
        seconds=time.monotonic() - started,
    )
    log.info(
        "image pulled",
        extra={
            "kv": {
                "ref": ref,
                "manifest": result.manifest.digest,
                "remote": result.count("remote"),
                "unpacked": result.count("unpacked"),
                "present": result.count("present"),
                "seconds": round(result.seconds, 3),
            }
        },
    )
    return result


def _parse(ref: str) -> refmod.ImageReference:
    try:
        image_ref = refmod.parse_reference(ref)
    except refmod.ReferenceError as exc:
        raise PullError(str(exc)) from None
    if image_ref.kind is not refmod.Kind.REGISTRY:
        raise PullError(f"{ref}: zest pull reads from a registry, not from {image_ref.kind}")
    return image_ref


def _create_lease(ctrd: Containerd) -> str:
    expires = datetime.datetime.now(datetime.UTC) + LEASE_EXPIRY
    lease_id = f"zest-pull-{time.time_ns()}-{secrets.token_hex(4)}"
    return ctrd.create_lease(lease_id, {lbl.GC_EXPIRE: expires.strftime("%Y-%m-%dT%H:%M:%SZ")})


def _delete_lease(ctrd: Containerd, lease: str) -> None:
    try:
        ctrd.delete_lease(lease)
    except ContainerdError as exc:
        log.warning(
            "could not delete the pull's lease; containerd drops it when it expires",
            extra={"kv": {"lease": lease, "error": exc}},
        )


class _Session:
    """One pull's writes into containerd, all under one lease."""

    def __init__(
        self,
        ctrd: Containerd,
        client: RegistryClient,
        image: ResolvedImage,
        lease: str,
        name: str,
    ) -> None:
        self.ctrd = ctrd
        self.client = client
        self.image = image
        self.lease = lease
        self.name = name
        self.repo = image.ref.repository
        self.source_host = image.ref.host

    def write_metadata(self) -> None:
        """Index, manifest and config, labelled with their children and their source."""
        image = self.image
        if image.index is not None:
            index_data = image.index.data
            children = child_gc_labels(image.index_children)
            self._put(image.target, lambda: iter([index_data]), children)
        children = child_gc_labels([image.config, *image.layers])
        self._put(image.manifest_desc, lambda: iter([image.manifest.data]), children)
        self._put(image.config, lambda: iter([image.config_data]), {})

    def write_layer(self, index: int, stop: threading.Event) -> None:
        desc = self.image.layers[index]

        def chunks() -> Iterator[bytes]:
            with self.client.open_blob(self.repo, desc.digest) as f:
                while data := f.read(CHUNK):
                    if stop.is_set():
                        raise PullError("pull cancelled")
                    yield data

        started = time.monotonic()
        written = self._put(desc, chunks, {})
        kv = {"layer": desc.digest, "size": desc.size, "written": written}
        kv["seconds"] = round(time.monotonic() - started, 3)
        log.debug("layer downloaded", extra={"kv": kv})

    def _put(
        self, desc: Descriptor, chunks: Callable[[], Iterator[bytes]], labels: Mapping[str, str]
    ) -> bool:
        """Write a blob unless containerd has it; either way it ends up with `labels` and its
        distribution source. True when it was written."""
        ctrd = self.ctrd
        source = distribution_source(self.source_host, self.repo)
        written = ctrd.write_content(
            desc, chunks(), ref=content_ref(desc), labels={**labels, **source}, lease=self.lease
        )
        if not written:
            existing = ctrd.content_labels(desc.digest) or {}
            key = next(iter(source))
            source = distribution_source(self.source_host, self.repo, existing.get(key))
            ctrd.update_content_labels(desc.digest, {**labels, **source}, lease=self.lease)
        return written

    def unpack(self, snapshotter: str, downloads: int) -> list[LayerResult]:
        image = self.image
        chain = chain_ids(image.diff_ids)
        fetch = _Downloads(self.write_layer, len(image.layers), downloads)
        try:
            return [self._layer(snapshotter, chain, i, fetch) for i in range(len(chain))]
        finally:
            fetch.close()

    def _layer(
        self, snapshotter: str, chain: Sequence[str], i: int, fetch: _Downloads
    ) -> LayerResult:
        image, ctrd = self.image, self.ctrd
        desc, chain_id, parent = image.layers[i], chain[i], chain[i - 1] if i else ""

        def result(state: str) -> LayerResult:
            kv = {"layer": desc.digest, "chain_id": chain_id, "state": state}
            log.info("layer ready", extra={"kv": kv})
            return LayerResult(desc.digest, image.diff_ids[i], chain_id, state)

        if ctrd.snapshot_exists(snapshotter, chain_id):
            return result("present")
        labels = layer_labels(self.name, image.manifest.digest, image.layers, i, chain_id)
        for _ in range(PREPARE_TRIES):
            key = extract_key(chain_id)
            try:
                mounts = ctrd.prepare_snapshot(snapshotter, key, parent, labels, lease=self.lease)
                break
            except ContainerdAlreadyExistsError:
                if ctrd.snapshot_exists(snapshotter, chain_id):
                    return result("remote")
                log.debug("extract key taken, chain id absent", extra={"kv": {"key": key}})
        else:
            raise PullError(f"layer {desc.digest}: could not prepare a snapshot to unpack into")
        try:
            fetch.wait(i)
            applied = ctrd.apply_layer(desc, mounts, lease=self.lease)
            if applied.digest != image.diff_ids[i]:
                raise PullError(
                    f"layer {desc.digest} unpacks to {applied.digest}, but the config says "
                    f"{image.diff_ids[i]}; the image is broken, rebuild or re-push it"
                )
            ctrd.commit_snapshot(snapshotter, chain_id, key, labels, lease=self.lease)
        except ContainerdAlreadyExistsError:
            self._remove(snapshotter, key)  # another pull committed the same layer meanwhile
        except BaseException:
            self._remove(snapshotter, key)
            raise
        uncompressed = {lbl.UNCOMPRESSED: image.diff_ids[i]}
        ctrd.update_content_labels(desc.digest, uncompressed, lease=self.lease)
        return result("unpacked")

    def _remove(self, snapshotter: str, key: str) -> None:
        try:
            self.ctrd.remove_snapshot(snapshotter, key, lease=self.lease)
        except ContainerdError as exc:
            log.debug("removing extract snapshot failed", extra={"kv": {"key": key, "error": exc}})


class _Downloads:
    """Layer downloads as containerd's unpacker does them: the first layer that must be
    downloaded starts it and every later layer, `parallel` at a time; `wait(i)` blocks until
    layer i is in the content store and raises its download's error."""

    def __init__(
        self, write: Callable[[int, threading.Event], None], count: int, parallel: int
    ) -> None:
        self._write = write
        self._count = count
        self._parallel = max(1, parallel)
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future[None]] = {}

    def wait(self, index: int) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._parallel, thread_name_prefix="zest-pull")
            for i in range(index, self._count):
                self._futures[i] = self._pool.submit(self._write, i, self._stop)
        self._futures[index].result()

    def close(self) -> None:
        """Cancel what has not started, stop what has, and wait for the threads."""
        if self._pool is not None:
            self._stop.set()
            self._pool.shutdown(wait=True, cancel_futures=True)
