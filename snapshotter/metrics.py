"""Prometheus metrics. The hot path only increments; the FUSE process and the
daemon each keep their own registry and the daemon's /metrics serves both."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram

FUSE_REGISTRY = CollectorRegistry(auto_describe=True)

READ_LATENCY = Histogram(
    "zest_fuse_read_seconds", "Latency of FUSE reads of lazy layers",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=FUSE_REGISTRY,
)  # fmt: skip
LAYERS = Gauge("zest_lazy_layers", "Lazy layers served by the FUSE process",
               registry=FUSE_REGISTRY)
PREFETCH_DONE = Gauge("zest_prefetch_chunks_done", "Chunks of a layer fetched by prefetch",
                      ["layer"], registry=FUSE_REGISTRY)
PREFETCH_TOTAL = Gauge("zest_prefetch_chunks_total", "Chunks of a layer to prefetch",
                       ["layer"], registry=FUSE_REGISTRY)
