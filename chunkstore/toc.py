"""Finding, verifying and summarizing the TOC of a zest blob.

Callers give a `read_range(offset, length) -> bytes` function over the blob
(a registry range request, a local file), so this module needs no network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chunkstore import format as fmt
from chunkstore._pb import toc_pb2
from chunkstore.errors import FormatError

ReadRange = Callable[[int, int], bytes]


def read_footer(read_range: ReadRange, blob_size: int) -> fmt.Footer:
    if blob_size < fmt.FOOTER_SIZE:
        raise FormatError(f"blob of {blob_size} bytes is too small to be a zest layer")
    footer = fmt.Footer.decode(read_range(blob_size - fmt.FOOTER_SIZE, fmt.FOOTER_SIZE))
    if footer.toc_offset + footer.toc_size > blob_size - fmt.FOOTER_SIZE:
        raise FormatError("zest footer points past the end of the blob")
    return footer


def load_toc(read_range: ReadRange, footer: fmt.Footer) -> toc_pb2.TOC:
    """One range request for the TOC, verified against the footer's (or annotation's) digest."""
    payload = read_range(footer.toc_offset, footer.toc_size)
    if len(payload) != footer.toc_size:
        raise FormatError(f"short read of TOC: {len(payload)} of {footer.toc_size} bytes")
    return fmt.decode_toc(payload, footer.toc_digest)


@dataclass(frozen=True)
class TocSummary:
    entries: int
    chunks: int
    distinct_chunks: int
    tar_size: int
    file_bytes: int
    prefetch: int  # chunks in the prefetch list
    prefetch_bytes: int  # their compressed size
    hot_frames: int  # recorded pages packed by `zest optimize` (chunkstore/hot.py)
    hot_bytes: int  # their compressed size: with hot frames, what a node fetches first


def summarize(toc: toc_pb2.TOC) -> TocSummary:
    digests: set[bytes] = set()
    sizes: dict[int, int] = {}
    chunks = file_bytes = 0
    for e in toc.entries:
        chunks += len(e.chunks)
        file_bytes += e.size
        digests.update(c.digest for c in e.chunks)
        sizes.update((c.blob_offset, c.compressed_size) for c in e.chunks)
    return TocSummary(len(toc.entries), chunks, len(digests), toc.tar_size, file_bytes,
                      len(toc.prefetch), sum(sizes.get(o, 0) for o in set(toc.prefetch)),
                      len(toc.hot_frames), sum(h.compressed_size for h in toc.hot_frames))


def check_chunk_table(toc: toc_pb2.TOC, blob_size: int) -> None:
    """Structural checks a reader relies on: chunks cover each file in order, inside the blob."""
    for e in toc.entries:
        pos = 0
        for c in e.chunks:
            if c.file_offset != pos or c.size == 0 or len(c.digest) != 32:
                raise FormatError(f"TOC entry {e.name!r}: chunk table has a gap or bad digest")
            if c.blob_offset + c.compressed_size > blob_size:
                raise FormatError(f"TOC entry {e.name!r}: chunk lies past the end of the blob")
            pos += c.size
        if e.chunks and pos != e.size:
            raise FormatError(f"TOC entry {e.name!r}: chunks cover {pos} of {e.size} bytes")
    for h in toc.hot_frames:
        if h.blob_offset + h.compressed_size > blob_size or len(h.digest) != 32:
            raise FormatError("TOC hot frame lies past the end of the blob or has a bad digest")
