"""zest's chunk store: the layer format, the converter, and the local content-addressed cache.

A plain library: no gRPC, no FUSE, no containerd, no HTTP. The snapshotter
imports it; it never imports the snapshotter.
"""

from chunkstore.cache import CacheStats, ChunkCache
from chunkstore.chunker import DEFAULT_PARAMS, ChunkerParams, iter_chunks
from chunkstore.convert import LayerResult, convert_tar
from chunkstore.digest import Digest
from chunkstore.errors import (
    ChunkstoreError,
    ChunkUnavailable,
    DigestMismatch,
    FormatError,
    UnsupportedError,
)
from chunkstore.fetch import ChunkRef, Fetcher, RangeSource

__all__ = [
    "DEFAULT_PARAMS",
    "CacheStats",
    "ChunkCache",
    "ChunkRef",
    "ChunkUnavailable",
    "ChunkerParams",
    "ChunkstoreError",
    "Digest",
    "DigestMismatch",
    "Fetcher",
    "FormatError",
    "LayerResult",
    "RangeSource",
    "UnsupportedError",
    "convert_tar",
    "iter_chunks",
]
