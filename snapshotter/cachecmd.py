"""`zest cache stats` and `zest cache prune`: the chunk cache of a daemon's root.

While the FUSE process runs it owns the cache, so the command asks it (its
in-memory index stays right); otherwise the command opens the directory itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chunkstore.cache import ChunkCache
from snapshotter.fuse import protocol


def _control(root: Path) -> str:
    return str(root / "fuse" / "control.sock")


def cache_stats(root: Path, max_bytes: int) -> dict[str, Any]:
    try:
        reply = protocol.call(_control(root), {"op": "stats"}, timeout=10)
        return {"source": "fuse process", **reply["cache"], "fetch": reply["fetch"]}
    except protocol.ControlError:
        s = ChunkCache(root / "cache", max_bytes).stats()
        return {"source": "directory", "chunks": s.chunks, "bytes": s.bytes,
                "max_bytes": s.max_bytes}


def cache_prune(root: Path, target_bytes: int, max_bytes: int) -> int:
    try:
        reply = protocol.call(_control(root), {"op": "prune", "target_bytes": target_bytes},
                              timeout=300)
        return int(reply["removed"])
    except protocol.ControlError:
        return ChunkCache(root / "cache", max_bytes).prune(target_bytes)


def format_stats(stats: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(stats, indent=2)
    lines = [f"cache ({stats['source']}): {stats['chunks']} chunks, "
             f"{stats['bytes'] / 1e6:.1f} MB of {stats['max_bytes'] / 1e6:.0f} MB"]
    if "hits" in stats:
        lines.append(f"  hits {stats['hits']}  misses {stats['misses']}  evictions "
                     f"{stats['evictions']}  corrupt dropped {stats['corrupt']}")
    fetch = stats.get("fetch")
    if fetch:
        lines.append(f"  fetched {fetch['bytes_fetched'] / 1e6:.1f} MB in {fetch['requests']} "
                     f"requests, {fetch['chunks_fetched']} chunks, memory hits "
                     f"{fetch['memory_hits']}, verify failures {fetch['verify_failures']}")
    return "\n".join(lines)
