"""Prometheus text for the FUSE process: fetch and cache counters read at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import generate_latest

from snapshotter.metrics import FUSE_REGISTRY, LAYERS, PREFETCH_DONE, PREFETCH_TOTAL

if TYPE_CHECKING:
    from snapshotter.fuse.server import Server


def render(server: Server) -> str:
    f, c = server.fetcher.stats, server.cache.stats()
    LAYERS.set(len(server.layers.all()))
    for layer in server.layers.all():
        PREFETCH_DONE.labels(layer=layer.what).set(layer.prefetch_done)
        PREFETCH_TOTAL.labels(layer=layer.what).set(layer.prefetch_total)
    lines = [
        "# TYPE zest_fetch_requests_total counter",
        f"zest_fetch_requests_total {f.requests}",
        "# TYPE zest_fetch_bytes_total counter",
        f"zest_fetch_bytes_total {f.bytes_fetched}",
        "# TYPE zest_fetch_chunks_total counter",
        f"zest_fetch_chunks_total {f.chunks_fetched}",
        "# TYPE zest_chunk_verify_failures_total counter",
        f"zest_chunk_verify_failures_total {f.verify_failures}",
        "# TYPE zest_chunk_cache_hits_total counter",
        f"zest_chunk_cache_hits_total {c.hits + f.memory_hits}",
        "# TYPE zest_chunk_cache_misses_total counter",
        f"zest_chunk_cache_misses_total {c.misses}",
        "# TYPE zest_chunk_cache_bytes gauge",
        f"zest_chunk_cache_bytes {c.bytes}",
        "# TYPE zest_chunk_cache_evictions_total counter",
        f"zest_chunk_cache_evictions_total {c.evictions}",
    ]
    return "\n".join(lines) + "\n" + generate_latest(FUSE_REGISTRY).decode()
