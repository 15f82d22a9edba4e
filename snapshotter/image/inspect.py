"""`zest inspect`: per layer its format, sizes, entries, chunks and whether the TOC verifies."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

from chunkstore import format as fmt
from chunkstore import toc as tocmod
from chunkstore.errors import ChunkstoreError
from chunkstore.hot import HotIndex
from snapshotter.image import store as st


@dataclass
class LayerReport:
    index: int
    digest: str
    media_type: str
    format: str
    compressed_size: int
    uncompressed_size: int | None = None
    entries: int | None = None
    chunks: int | None = None
    distinct_chunks: int | None = None
    prefetch: int | None = None
    prefetch_bytes: int | None = None
    hot_frames: int | None = None
    hot_bytes: int | None = None
    toc_verified: bool | None = None
    error: str | None = None


def inspect_layer(store: st.ImageStore, index: int, desc: dict[str, Any]) -> LayerReport:
    digest, size = desc["digest"], int(desc["size"])
    rep = LayerReport(index, digest, desc.get("mediaType", ""), "", size)
    ann = desc.get("annotations") or {}
    try:
        footer = fmt.footer_from_annotations(ann)
    except ChunkstoreError as exc:
        rep.format, rep.toc_verified, rep.error = "zest (bad annotations)", False, str(exc)
        return rep
    if footer is None:
        mt = rep.media_type
        rep.format = ("gzip" if mt.endswith("gzip") else "zstd" if mt.endswith("zstd")
                      else "tar" if mt.endswith("tar") else "other")
        return rep
    rep.format = f"zest v{footer.version}"
    try:
        def read(off: int, n: int) -> bytes:
            return st.read_blob_range(store, digest, off, n)

        tail = tocmod.read_footer(read, size)
        if tail != footer:
            raise ChunkstoreError("footer at the end of the blob disagrees with the annotations")
        toc = tocmod.load_toc(read, footer)
        tocmod.check_chunk_table(toc, size)
        HotIndex(toc)  # hot runs inside their frames and files
    except (ChunkstoreError, OSError) as exc:
        rep.toc_verified, rep.error = False, str(exc)
        return rep
    s = tocmod.summarize(toc)
    rep.uncompressed_size, rep.entries, rep.chunks = s.tar_size, s.entries, s.chunks
    rep.distinct_chunks, rep.toc_verified = s.distinct_chunks, True
    rep.prefetch, rep.prefetch_bytes = s.prefetch, s.prefetch_bytes
    rep.hot_frames, rep.hot_bytes = s.hot_frames, s.hot_bytes
    return rep


def inspect_image(store: st.ImageStore, ref: str) -> list[tuple[str, list[LayerReport]]]:
    """(platform name, layer reports) for a manifest, or for each manifest of an index."""
    top = store.get_manifest(ref)
    manifests: list[tuple[str, st.Manifest]] = []
    if top.media_type in st.INDEX_TYPES:
        for d in json.loads(top.data).get("manifests", []):
            p = d.get("platform") or {}
            name = "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
            manifests.append((name or d["digest"], store.get_manifest(d["digest"])))
    else:
        manifests.append(("image", top))
    out = []
    for name, m in manifests:
        obj = json.loads(m.data)
        layers = obj.get("layers") or []
        out.append((f"{name} {m.digest}", [inspect_layer(store, i, d)
                                           for i, d in enumerate(layers, 1)]))
    return out


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}MB"


def run_inspect(args: argparse.Namespace) -> int:
    from snapshotter.image.stores import open_store

    store, ref = open_store(args.ref, plain_http=args.plain_http)
    try:
        result = inspect_image(store, ref)
    finally:
        store.close()
    if args.json:
        print(json.dumps([{"manifest": n, "layers": [asdict(r) for r in rs]} for n, rs in result],
                         indent=2))
    else:
        for name, reports in result:
            print(f"manifest {name}")
            print(f"  {'#':>2} {'format':<8} {'compressed':>11} {'uncompressed':>12} "
                  f"{'entries':>8} {'chunks':>7} {'distinct':>8} {'prefetch':>9} {'hot':>8}  toc   "
                  "digest")
            for r in reports:
                toc = {True: "ok", False: "BAD", None: "-"}[r.toc_verified]
                print(f"  {r.index:>2} {r.format:<8} {_mb(r.compressed_size):>11} "
                      f"{_mb(r.uncompressed_size):>12} {r.entries or '-':>8} "
                      f"{r.chunks if r.chunks is not None else '-':>7} "
                      f"{r.distinct_chunks if r.distinct_chunks is not None else '-':>8} "
                      f"{_mb(r.prefetch_bytes) if r.prefetch else '-':>9} "
                      f"{_mb(r.hot_bytes) if r.hot_frames else '-':>8}  "
                      f"{toc:<5} {r.digest[:19]}")
                if r.error:
                    print(f"     error: {r.error}")
    bad = any(r.toc_verified is False for _, rs in result for r in rs)
    return 1 if bad else 0
