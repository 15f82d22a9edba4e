"""Image conversion: walk an index or manifest, convert each layer, push blobs, then manifests.

Order of writes is what keeps a failed conversion harmless: every blob first,
then child manifests by digest, the tagged manifest or index last. Nothing is
tagged until everything it points at is in place.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chunkstore import format as fmt
from chunkstore.chunker import DEFAULT_PARAMS, ChunkerParams
from chunkstore.convert import DEFAULT_LEVEL, LayerResult, convert_tar
from chunkstore.digest import Digest
from chunkstore.errors import ChunkstoreError, FormatError
from snapshotter.image import store as st
from snapshotter.image.layers import VerifyingReader, open_tar_stream

log = logging.getLogger(__name__)

_TAR_LAYER_TYPES = {
    st.OCI_LAYER_TAR, st.OCI_LAYER_GZIP, st.OCI_LAYER_ZSTD, st.DOCKER_LAYER_GZIP,
    st.DOCKER_LAYER_TAR,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}  # fmt: skip


class ConvertError(Exception):
    """Conversion failed; the message names the image part and what is wrong."""


@dataclass
class ConvertOptions:
    level: int = DEFAULT_LEVEL
    threads: int = 0
    progress: bool = True
    tmpdir: str | None = None
    chunking: ChunkerParams = DEFAULT_PARAMS


@dataclass
class _Run:
    src: st.ImageStore
    dst: st.ImageStore
    opts: ConvertOptions
    # source layer digest -> converted descriptor; shared layers are converted once
    done_layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: list[LayerResult] = field(default_factory=list)


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ConvertError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ConvertError(f"{what} is not a JSON object")
    return obj


def _manifest_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=False).encode()


def _copy_blob(run: _Run, desc: dict[str, Any], what: str) -> None:
    """Copy a blob unchanged (configs, non-tar layers), verifying digest and size."""
    digest, size = desc["digest"], int(desc["size"])
    if run.dst.has_blob(digest):
        return
    with tempfile.TemporaryFile(dir=run.opts.tmpdir) as tmp:
        src = VerifyingReader(run.src.open_blob(digest), digest, size, what)
        while chunk := src.read(1024 * 1024):
            tmp.write(chunk)
        src.check()
        tmp.seek(0)
        run.dst.put_blob(tmp, digest, size)


def _read_small_blob(run: _Run, desc: dict[str, Any], what: str) -> bytes:
    size = int(desc["size"])
    if size > 64 * 1024 * 1024:
        raise ConvertError(f"{what}: {size} bytes is too large for a config blob")
    src = VerifyingReader(run.src.open_blob(desc["digest"]), desc["digest"], size, what)
    data = src.readall()
    try:
        src.check()
    except FormatError as exc:
        raise ConvertError(str(exc)) from exc
    return data


def _progress_for(what: str, total: int | None, enabled: bool) -> tuple[Callable[[int], None],
                                                                       Callable[[], None]]:
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, leave=True)
        state = {"n": 0}

        def update(n: int) -> None:
            bar.update(n - state["n"])
            state["n"] = n

        return update, bar.close
    return (lambda n: None), (lambda: None)


def _convert_layer(run: _Run, desc: dict[str, Any], diff_id: str | None,
                   what: str) -> dict[str, Any]:
    digest, size = desc["digest"], int(desc["size"])
    annotations = dict(desc.get("annotations") or {})
    if fmt.ANN_TOC_DIGEST in annotations:
        _copy_blob(run, desc, what)  # already converted: keep it byte for byte
        return dict(desc)
    started = time.monotonic()
    update, close = _progress_for(what, None, run.opts.progress)
    with tempfile.TemporaryFile(dir=run.opts.tmpdir) as tmp:
        raw = VerifyingReader(run.src.open_blob(digest), digest, size, what)
        tar, kind = open_tar_stream(raw, what)
        try:
            result = convert_tar(tar, tmp, params=run.opts.chunking, level=run.opts.level,
                                 threads=run.opts.threads, progress=update)
            raw.check()
        except ChunkstoreError as exc:
            raise ConvertError(f"{what}: {exc}" if what not in str(exc) else str(exc)) from exc
        finally:
            close()
        if diff_id is not None and str(result.diff_id) != diff_id:
            raise ConvertError(f"{what}: uncompressed digest {result.diff_id} does not match "
                               f"the config's diff_id {diff_id}")
        secs = time.monotonic() - started
        log.info("layer converted", extra={"kv": {
            "layer": what, "source": kind, "tar_mb": round(result.tar_size / 1e6, 1),
            "blob_mb": round(result.blob_size / 1e6, 1), "entries": result.entries,
            "chunks": result.chunks, "seconds": round(secs, 2),
            "mb_per_s": round(result.tar_size / 1e6 / max(secs, 1e-6), 1)}})
        run.results.append(result)
        blob_digest = str(result.blob_digest)
        if not run.dst.has_blob(blob_digest):
            tmp.seek(0)
            run.dst.put_blob(tmp, blob_digest, result.blob_size)
    annotations.update(fmt.toc_annotations(result.footer))
    return {"mediaType": st.OCI_LAYER_ZSTD, "digest": blob_digest, "size": result.blob_size,
            "annotations": annotations}


def _convert_manifest(run: _Run, manifest: st.Manifest, name: str) -> st.Manifest:
    obj = _load_json(manifest.data, f"manifest {manifest.digest}")
    if obj.get("schemaVersion") != 2 or "layers" not in obj or "config" not in obj:
        raise ConvertError(f"manifest {manifest.digest} is not an image manifest (schema 2 "
                           "or OCI); Docker schema 1 images must be re-pushed first")
    config_desc = obj["config"]
    config = _load_json(_read_small_blob(run, config_desc, f"{name} config"), f"{name} config")
    _copy_blob(run, config_desc, f"{name} config {config_desc['digest']}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    layers = obj["layers"]
    tar_layers = [d for d in layers if d.get("mediaType") in _TAR_LAYER_TYPES]
    if diff_ids and len(diff_ids) != len(tar_layers):
        raise ConvertError(f"{name}: config lists {len(diff_ids)} diff_ids for "
                           f"{len(tar_layers)} layers")
    new_layers = []
    tar_index = 0
    for i, desc in enumerate(layers, 1):
        what = f"{name} layer {i}/{len(layers)} {desc.get('digest')}"
        if desc.get("mediaType") not in _TAR_LAYER_TYPES:
            _copy_blob(run, desc, what)
            new_layers.append(desc)
            continue
        diff_id = diff_ids[tar_index] if diff_ids else None
        tar_index += 1
        key = desc["digest"]
        if key not in run.done_layers:
            run.done_layers[key] = _convert_layer(run, desc, diff_id, what)
        new_layers.append(run.done_layers[key])
    new_config = dict(config_desc)
    if new_config.get("mediaType") == st.DOCKER_CONFIG:
        new_config["mediaType"] = st.OCI_CONFIG
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": st.OCI_MANIFEST,
                           "config": new_config, "layers": new_layers}
    if obj.get("annotations"):
        out["annotations"] = obj["annotations"]
    data = _manifest_bytes(out)
    return st.Manifest(st.OCI_MANIFEST, data, str(Digest.of(data)))


def _convert_index(run: _Run, index: st.Manifest) -> st.Manifest:
    obj = _load_json(index.data, f"index {index.digest}")
    children = []
    for desc in obj.get("manifests") or []:
        plat = desc.get("platform") or {}
        name = "/".join(x for x in (plat.get("os"), plat.get("architecture"),
                                    plat.get("variant")) if x) or desc["digest"][:19]
        child = run.src.get_manifest(desc["digest"])
        if child.media_type in st.MANIFEST_TYPES:
            new = _convert_manifest(run, child, name)
        else:  # nested index or an artifact: copied as it is
            new = child
        run.dst.put_manifest(new, None)
        nd = {k: v for k, v in desc.items() if k not in ("mediaType", "digest", "size")}
        children.append({"mediaType": new.media_type, "digest": new.digest,
                         "size": len(new.data), **nd})
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": st.OCI_INDEX, "manifests": children}
    if obj.get("annotations"):
        out["annotations"] = obj["annotations"]
    data = _manifest_bytes(out)
    return st.Manifest(st.OCI_INDEX, data, str(Digest.of(data)))


def convert_image(src: st.ImageStore, src_ref: str, dst: st.ImageStore, dst_tag: str | None,
                  opts: ConvertOptions) -> tuple[st.Manifest, list[LayerResult]]:
    """Convert src_ref into dst; the result is tagged dst_tag only once all of it is pushed."""
    run = _Run(src, dst, opts)
    top = src.get_manifest(src_ref)
    if top.media_type in st.INDEX_TYPES:
        new = _convert_index(run, top)
    elif top.media_type in st.MANIFEST_TYPES:
        new = _convert_manifest(run, top, "image")
    else:
        raise ConvertError(f"{src_ref}: unsupported manifest media type {top.media_type!r}")
    dst.put_manifest(new, dst_tag)
    return new, run.results


def run_convert(args: argparse.Namespace) -> int:
    from snapshotter.image.stores import open_store

    src, src_ref = open_store(args.src, plain_http=args.plain_http)
    try:
        dst, dst_ref = open_store(args.dst, plain_http=args.plain_http, for_writing=True)
        try:
            tag = None if dst_ref.startswith("sha256:") else dst_ref
            avg = args.chunk_kb << 10
            opts = ConvertOptions(level=args.level or DEFAULT_LEVEL, threads=args.threads,
                                  progress=not args.no_progress,
                                  chunking=ChunkerParams(avg // 4, avg, avg * 4))
            started = time.monotonic()
            new, results = convert_image(src, src_ref, dst, tag, opts)
            secs = time.monotonic() - started
            tar = sum(r.tar_size for r in results)
            print(f"converted {args.src} -> {args.dst} digest {new.digest} "
                  f"({len(results)} layers, {tar / 1e6:.1f} MB tar, {secs:.1f} s)")
        finally:
            dst.close()
    finally:
        src.close()
    return 0

