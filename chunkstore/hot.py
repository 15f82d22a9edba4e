"""Hot data: the pages a recorded workload touched, packed into a few large frames.

Chunks are cut for random access (256 KiB on average) and compressed one by one, and a
program touches a few scattered pages of each: fetching a workload's chunks moves two to
three times the bytes it reads. `zest optimize` records the pages instead and packs them, in
first-touch order, into frames of about HOT_FRAME_SIZE, compressed hard (a frame is written
once and fetched by every node). They sit in skippable frames right after the TOC, so the
blob still decompresses to the original tar and one range request brings the TOC and then,
with no round trip between, the frames; the TOC lists them (`hot_frames`) with the file runs
each holds (`hot`). A node fetches them first; the frames are content-addressed like chunks,
so the fetcher and the cache take them as they are. (Blobs optimized by earlier builds hold
them before the TOC; readers take both.)
"""

from __future__ import annotations

import bisect
import io
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from chunkstore import format as fmt
from chunkstore._pb import toc_pb2
from chunkstore.digest import Digest
from chunkstore.errors import FormatError
from chunkstore.fetch import ChunkRef

PAGE = 4096
HOT_FRAME_SIZE = 512 * 1024  # uncompressed; a frame is what a stalled read waits for
HOT_LEVEL = 19  # measured: 4-7% smaller than level 3 on binaries, and paid once

# (entry index, file offset, length): a run of a regular file's bytes
Run = tuple[int, int, int]
ReadRange = Callable[[int, int], bytes]


def page_runs(pages: Iterable[tuple[int, int, int]], sizes: Callable[[int], int]) -> list[Run]:
    """(entry, first page, pages) in first-touch order -> byte runs, cut at each file's end."""
    out: list[Run] = []
    for entry, first, count in pages:
        start = first * PAGE
        length = min(count * PAGE, sizes(entry) - start)
        if length > 0:
            out.append((entry, start, length))
    return out


class _ChunkReader:
    """A file run's bytes out of a blob's chunk frames, each chunk verified, the last few
    kept decompressed (runs of one file come together)."""

    def __init__(self, toc: toc_pb2.TOC, read_range: ReadRange, keep: int = 16):
        self.toc = toc
        self.read_range = read_range
        self._keep = keep
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self._offsets: dict[int, list[int]] = {}
        self._dctx = zstandard.ZstdDecompressor()

    def _chunk(self, c: toc_pb2.Chunk) -> bytes:
        data = self._chunks.get(c.digest)
        if data is None:
            frame = self.read_range(c.blob_offset, c.compressed_size)
            data = self._dctx.decompress(frame, max_output_size=c.size)
            Digest(c.digest).verify(data, "chunk")
            self._chunks[c.digest] = data
            if len(self._chunks) > self._keep:
                self._chunks.popitem(last=False)
        return data

    def read(self, entry: int, offset: int, length: int) -> bytes:
        e = self.toc.entries[entry]
        if e.type != toc_pb2.REG or offset + length > e.size:
            raise FormatError(f"hot run {entry}:{offset}+{length} is not inside a regular file")
        offs = self._offsets.get(entry)
        if offs is None:
            offs = self._offsets[entry] = [c.file_offset for c in e.chunks]
        i = bisect.bisect_right(offs, offset) - 1
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            c = e.chunks[i]
            data = self._chunk(c)
            lo = pos - c.file_offset
            hi = min(end - c.file_offset, c.size)
            parts.append(data[lo:hi])
            pos = c.file_offset + hi
            i += 1
        return b"".join(parts)


def write_hot(write: Callable[[bytes], object], blob_offset: int, toc: toc_pb2.TOC,
              read_range: ReadRange, runs: list[Run], frame_size: int = HOT_FRAME_SIZE,
              level: int = HOT_LEVEL) -> int:
    """Pack the runs' bytes (read from the blob's own chunks) into hot frames appended by
    `write` at `blob_offset` of the new blob; fills the TOC's hot_frames and hot.
    Returns the bytes written."""
    del toc.hot_frames[:]
    del toc.hot[:]
    reader = _ChunkReader(toc, read_range)
    cctx = zstandard.ZstdCompressor(level=level)
    written = 0
    buf = bytearray()

    def flush() -> None:
        nonlocal written
        if not buf:
            return
        payload = cctx.compress(bytes(buf))
        write(fmt.hot_frame_header(len(payload)))
        write(payload)
        toc.hot_frames.add(blob_offset=blob_offset + written + fmt.SKIPPABLE_HEADER_SIZE,
                           compressed_size=len(payload), size=len(buf),
                           digest=Digest.of(bytes(buf)).raw)
        written += fmt.SKIPPABLE_HEADER_SIZE + len(payload)
        buf.clear()

    for entry, offset, length in runs:
        while length > 0:  # a run never spans two frames: split it at the frame's end
            n = min(length, frame_size - len(buf))
            toc.hot.add(entry=entry, file_offset=offset, length=n,
                        frame=len(toc.hot_frames), frame_offset=len(buf))
            buf += reader.read(entry, offset, n)
            offset += n
            length -= n
            if len(buf) >= frame_size:
                flush()
    flush()
    return written


def frames_span(toc: toc_pb2.TOC) -> tuple[int, int] | None:
    """(offset, size) of the blob range that holds all the hot frames (ANN_HOT)."""
    if not toc.hot_frames:
        return None
    start = min(f.blob_offset for f in toc.hot_frames)
    return start, max(f.blob_offset + f.compressed_size for f in toc.hot_frames) - start


def frame_refs(toc: toc_pb2.TOC) -> list[ChunkRef]:
    """The fetcher's handles on a layer's hot frames, in blob order: content-addressed like
    chunks, so they are fetched, verified and cached as chunks are."""
    return [ChunkRef(f.digest, f.blob_offset, f.compressed_size, f.size) for f in toc.hot_frames]


@dataclass(frozen=True, slots=True)
class Piece:
    frame: int  # index into the TOC's hot_frames
    frame_offset: int
    length: int


class HotIndex:
    """Which bytes of which file the hot frames hold: per TOC entry, the runs sorted by file
    offset. Answers whether a read is covered whole, and by which frame pieces."""

    def __init__(self, toc: toc_pb2.TOC):
        self.refs = frame_refs(toc)  # Piece.frame indexes these
        # (entry, file offset, length, frame offset) of the runs in each frame
        self.by_frame: list[list[tuple[int, int, int, int]]] = [[] for _ in self.refs]
        runs: dict[int, list[tuple[int, int, int, int]]] = {}
        for h in toc.hot:
            if (h.frame >= len(self.refs) or h.entry >= len(toc.entries)
                    or h.frame_offset + h.length > self.refs[h.frame].size
                    or h.file_offset + h.length > toc.entries[h.entry].size):
                raise FormatError(f"TOC hot run of entry {h.entry} lies outside its frame "
                                  "or its file")
            self.by_frame[h.frame].append((h.entry, h.file_offset, h.length, h.frame_offset))
            runs.setdefault(h.entry, []).append((h.file_offset, h.length, h.frame,
                                                 h.frame_offset))
        self._starts: dict[int, list[int]] = {}
        self._runs: dict[int, list[tuple[int, int, int, int]]] = {}
        for entry, rs in runs.items():
            rs.sort()
            self._runs[entry] = rs
            self._starts[entry] = [r[0] for r in rs]

    def __bool__(self) -> bool:
        return bool(self.refs)

    def cover(self, entry: int, offset: int, end: int) -> list[Piece] | None:
        """The frame pieces that hold [offset, end) of an entry, or None unless they hold all."""
        starts = self._starts.get(entry)
        if starts is None:
            return None
        rs = self._runs[entry]
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0:
            return None
        out: list[Piece] = []
        pos = offset
        while pos < end:
            if i >= len(rs):
                return None
            start, length, frame, foff = rs[i]
            if not start <= pos < start + length:
                return None
            n = min(end, start + length) - pos
            out.append(Piece(frame, foff + pos - start, n))
            pos += n
            i += 1
        return out


def finish_blob(f: BinaryIO, frames_end: int, toc: toc_pb2.TOC,
                pages: Iterable[tuple[int, int, int]],
                frame_size: int = HOT_FRAME_SIZE) -> fmt.Footer:
    """`f` (read and write) holds a blob's chunk frames up to `frames_end`: append the TOC,
    the hot frames of `pages` ((entry, first page, pages) in first-touch order, packed from
    those chunks) and the footer. Returns the footer."""
    def read_range(offset: int, length: int) -> bytes:
        f.seek(offset)
        return f.read(length)

    f.truncate(frames_end)
    runs = page_runs(pages, lambda k: toc.entries[k].size if k < len(toc.entries) else 0)
    frames = io.BytesIO()
    write_hot(frames.write, 0, toc, read_range, runs, frame_size)
    toc_offset = frames_end + fmt.SKIPPABLE_HEADER_SIZE
    payload, pad = _place_toc(toc, toc_offset)
    f.seek(0, os.SEEK_END)
    f.write(fmt.toc_frame_header(len(payload)))
    f.write(payload)
    f.write(fmt.pad_frame(pad))
    f.write(frames.getbuffer())
    footer = fmt.Footer(toc_offset, len(payload), Digest.of(payload))
    f.write(footer.encode())
    return footer


def _place_toc(toc: toc_pb2.TOC, toc_offset: int) -> tuple[bytes, int]:
    """The TOC's payload, with its hot frames placed right after it, and the pad (0, or 8
    bytes or more) between the two. The frames' offsets are in the TOC, so its size depends
    on them: `toc.hot_frames` come in relative to the first frame's header and are moved to
    follow a room measured, and grown, until the TOC fits it."""
    relative = [h.blob_offset for h in toc.hot_frames]
    room = len(fmt.encode_toc(toc))
    for attempt in range(8):
        for h, rel in zip(toc.hot_frames, relative, strict=True):
            h.blob_offset = toc_offset + room + rel
        payload = fmt.encode_toc(toc)
        pad = room - len(payload)
        if pad == 0 or pad >= fmt.SKIPPABLE_HEADER_SIZE:
            return payload, pad
        # too small, or a gap no frame fits in: more room (more each time, so it settles)
        room = max(room, len(payload)) + fmt.SKIPPABLE_HEADER_SIZE * (1 << attempt)
    raise FormatError("the TOC's size did not settle around its hot frames' offsets")
