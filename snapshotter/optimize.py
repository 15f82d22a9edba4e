"""`zest optimize SRC DST -- CMD`: record what a workload reads first, write it as each layer's
prefetch list, push the result.

The image is pulled lazily through the zest daemon, its layers' page cache and
recorded profile are reset, the workload runs in a real container (`ctr run`)
until it exits, prints the ready line, or times out; the FUSE process's
first-touch order of chunks is then written into each layer's TOC. Chunk
frames are copied byte for byte; only the TOC and the footer change, so the
new layer decompresses to the same tar (same DiffID, same config).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import select
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chunkstore import format as fmt
from chunkstore import hot
from chunkstore.digest import Digest
from snapshotter.fuse import protocol
from snapshotter.image import store as st
from snapshotter.image.platform import host_platform, pick_manifest
from snapshotter.image.stores import open_store

log = logging.getLogger(__name__)


class OptimizeError(Exception):
    """The workload or the image cannot be profiled; the message says why."""


def run_workload(address: str, namespace: str, ref: str, cmd: list[str], timeout: float,
                 ready: str | None) -> str:
    """Run the container to its end, its ready line or the timeout; returns why it stopped."""
    name = f"zest-optimize-{uuid.uuid4().hex[:8]}"
    argv = ["ctr", "--address", address, "--namespace", namespace, "run", "--rm",
            "--snapshotter", "zest", ref, name, *cmd]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    why = "timeout"
    buf = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([proc.stdout], [], [], min(left, 0.2))
            if r:
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    why = "exited"
                    break
                buf += data
                if ready and ready.encode() in buf:
                    why = "ready"
                    break
            elif proc.poll() is not None:
                why = "exited"
                break
    finally:
        if proc.poll() is None:
            subprocess.run(["ctr", "--address", address, "--namespace", namespace, "tasks",
                            "kill", "-s", "SIGKILL", name], capture_output=True, check=False)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if why == "exited" and proc.returncode not in (0, None):
        tail = buf.decode(errors="replace")[-500:]
        raise OptimizeError(f"the workload exited with {proc.returncode}: {tail}")
    return why


def rewrite_layer(src: st.ImageStore, dst: st.ImageStore, desc: dict[str, Any],
                  offsets: list[int], tmpdir: str | None,
                  pages: Sequence[tuple[int, int, int]] = ()) -> dict[str, Any]:
    """The layer with `offsets` as its TOC's prefetch list and the recorded `pages` (entry,
    first page, pages) packed as its hot frames, uploaded to dst."""
    footer = fmt.footer_from_annotations(desc.get("annotations") or {})
    if footer is None:
        return desc
    digest = desc["digest"]
    toc = fmt.decode_toc(st.read_blob_range(src, digest, footer.toc_offset, footer.toc_size),
                         footer.toc_digest)
    # chunk frames are kept byte for byte; hot frames of an earlier optimize are not, so
    # the copy ends where the first of those, or else the TOC, begins
    first_hot = min((h.blob_offset for h in toc.hot_frames), default=footer.toc_offset)
    frames_end = min(first_hot, footer.toc_offset) - fmt.SKIPPABLE_HEADER_SIZE
    with src.open_blob(digest) as f, tempfile.TemporaryFile(dir=tmpdir) as tmp:
        left = frames_end
        while left:
            piece = f.read(min(left, 1 << 20))
            if not piece:
                raise OptimizeError(f"layer {digest} is shorter than its TOC offset")
            tmp.write(piece)
            left -= len(piece)

        valid = {c.blob_offset for e in toc.entries for c in e.chunks}
        del toc.prefetch[:]
        toc.prefetch.extend(o for o in offsets if o in valid)
        new_footer = hot.finish_blob(tmp, frames_end, toc, pages)
        size = tmp.tell()
        tmp.seek(0)
        h = hashlib.sha256()
        while chunk := tmp.read(1 << 20):
            h.update(chunk)
        new_digest = "sha256:" + h.hexdigest()
        if not dst.has_blob(new_digest):
            tmp.seek(0)
            dst.put_blob(tmp, new_digest, size)
    ann = dict(desc.get("annotations") or {})
    ann.update(fmt.toc_annotations(new_footer))
    span = hot.frames_span(toc)
    ann.pop(fmt.ANN_HOT, None)  # an earlier optimize's frames are gone
    ann.pop(fmt.LABEL_HOT, None)
    if span is not None:
        ann[fmt.ANN_HOT] = ann[fmt.LABEL_HOT] = f"{span[0]},{span[1]}"
    return {**desc, "digest": new_digest, "size": size, "annotations": ann}


def _platform_manifest(store: st.ImageStore, ref: str) -> st.Manifest:
    top = store.get_manifest(ref)
    if top.media_type in st.MANIFEST_TYPES:
        return top
    want = host_platform()
    desc = pick_manifest(json.loads(top.data).get("manifests") or [], want)
    if desc is None:
        raise OptimizeError(f"{ref} has no manifest for {want.os}/{want.architecture}")
    return store.get_manifest(str(desc["digest"]))


def run_optimize(args: argparse.Namespace) -> int:
    from snapshotter.pull import pull

    control = str(Path(args.zest_root) / "fuse" / "control.sock")
    result = pull(args.src, address=args.address, namespace=args.namespace,
                  plain_http=args.plain_http)
    digests = {layer.digest for layer in result.layers}
    reset = protocol.call(control, {"op": "profile_reset", "digests": sorted(digests)})
    if reset.get("layers", 0) == 0:
        raise OptimizeError(f"no layer of {args.src} is served lazily by zest; convert it "
                            "with `zest convert` and check the daemon's [remote] settings")
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    why = run_workload(args.address, args.namespace, args.src, cmd, args.timeout, args.ready)
    recorded = [p for p in protocol.call(control, {"op": "profile"})["layers"]
                if p["digest"] in digests]
    profiles = {p["digest"]: p["offsets"] for p in recorded}
    pages = {p["digest"]: [tuple(r) for r in p.get("pages") or []] for p in recorded}
    src, src_ref = open_store(args.src, plain_http=args.plain_http)
    dst, dst_ref = open_store(args.dst, plain_http=args.plain_http, for_writing=True)
    try:
        manifest = _platform_manifest(src, src_ref)
        obj = json.loads(manifest.data)
        cfg = obj["config"]
        if not dst.has_blob(cfg["digest"]):
            with src.open_blob(cfg["digest"]) as f:
                dst.put_blob(io.BytesIO(f.read()), cfg["digest"], int(cfg["size"]))
        obj["layers"] = [rewrite_layer(src, dst, d, profiles.get(d["digest"], []),
                                       args.tmpdir, pages.get(d["digest"], []))
                         for d in obj["layers"]]
        data = json.dumps(obj, indent=2).encode()
        new = st.Manifest(manifest.media_type, data, str(Digest.of(data)))
        dst.put_manifest(new, None if dst_ref.startswith("sha256:") else dst_ref)
    finally:
        dst.close()
        src.close()
    counts = ", ".join(f"{len(v)}" for v in profiles.values())
    hot_pages = ", ".join(str(sum(r[2] for r in v)) for v in pages.values())
    print(f"optimized {args.src} -> {args.dst} digest {new.digest} (workload {why}; "
          f"prefetch chunks per layer: {counts}; hot pages per layer: {hot_pages})")
    return 0

