"""File range -> chunks -> fetcher: the blocking half of a FUSE read.

Runs in worker threads (trio.to_thread) so a slow registry never stalls the
FUSE loop. Errors leave as ChunkUnavailable; ops.py turns them into EIO.
"""

from __future__ import annotations

import logging
import time

from chunkstore.fetch import Fetcher
from snapshotter.fuse.layers import Layer
from snapshotter.metrics import READ_LATENCY

log = logging.getLogger(__name__)


class Reader:
    def __init__(self, fetcher: Fetcher, readahead: int = 512 * 1024):
        self.fetcher = fetcher
        self.readahead = readahead  # compressed bytes after a miss that ride along

    def read(self, layer: Layer, local: int, offset: int, size: int,
             record: bool = True) -> bytes:
        """`record=False`: zest's own reads (the predictor), kept out of the profile."""
        started = time.monotonic()
        e = layer.tree.entry(local)
        if e is None or offset >= e.size:
            return b""
        end = min(offset + size, e.size)
        first, refs = layer.tree.chunks_for(local, offset, end - offset)
        if not refs:
            return b""
        if record:
            layer.touch([r.blob_offset for r in refs])
        what = f"{layer.what} file /{e.name.decode(errors='replace')}"
        extra = layer.tree.following(refs[-1], self.readahead) if self.readahead else []
        datas = self.fetcher.get(layer.source, refs, what, readahead=extra)
        buf = b"".join(datas) if len(datas) > 1 else datas[0]
        out = buf[offset - first : end - first]
        READ_LATENCY.observe(time.monotonic() - started)
        return out
