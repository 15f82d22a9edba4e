"""File range -> chunks -> fetcher: the blocking half of a FUSE read.

`read_local` serves what is already here (memory, or a verified chunk on local
disk) and runs on the FUSE loop itself; `read` may wait for the registry, so it
runs in worker threads (trio.to_thread) and a slow registry never stalls the
loop. Errors leave as ChunkUnavailable; ops.py turns them into EIO.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from chunkstore._pb import toc_pb2
from chunkstore.errors import ChunkstoreError
from chunkstore.fetch import ChunkRef, Fetcher
from snapshotter.fuse.layers import Layer
from snapshotter.fuse.tree import chunk_ref
from snapshotter.metrics import READ_LATENCY

log = logging.getLogger(__name__)


SMALL_FILE = 1 << 20  # fetched whole at its first miss (and by prediction)
WholeFile = Callable[[list[tuple[Layer, ChunkRef]]], None]


def _data(layer: Layer, e: toc_pb2.Entry) -> bool:
    """A file of data, not a program: not ELF, or under an eighth code (ICU's data library,
    object files), as the converter recorded. False for a layer converted before it recorded
    ELF facts: that cannot tell, and is read as it was."""
    if e.size > layer.tree.toc.elf_scan_limit:
        return False
    return not (e.HasField("elf") and e.elf.text * 8 >= e.size)


class Reader:
    def __init__(self, fetcher: Fetcher, readahead: int = 512 * 1024, *, whole_file: int = 0,
                 directory: int = 0, on_miss: WholeFile | None = None):
        self.fetcher = fetcher
        self.readahead = readahead  # compressed bytes after a miss that ride along
        # files up to this size are fetched whole (by `on_miss`) once a read misses in them
        self.whole_file = whole_file if on_miss is not None else 0
        # a miss in a small file fetches this many compressed bytes of its directory's others
        self.directory = directory if on_miss is not None else 0
        self.on_miss = on_miss

    def _siblings(self, layer: Layer, local: int,
                  skip: set[bytes]) -> list[tuple[Layer, ChunkRef]]:
        """On the first miss in a small file of a directory, the directory's other small
        files, nearest in the blob first, up to `directory` bytes: programs read headers,
        configuration and modules (PAM's) a directory at a time, one round trip each. Not
        for an executable: the others in /usr/bin are not run with it (initdb running
        `locale` took 500 KB of /usr/bin)."""
        tree = layer.tree
        parent = tree.nodes[local].parent
        mine = tree.entry(local)
        if (not self.directory or mine is None or mine.size > SMALL_FILE
                or parent in layer.dirs_fetched or mine.mode & 0o111):
            return []
        layer.dirs_fetched.add(parent)
        children = tree.nodes[parent].children or {}
        here = tree.chunks_for(local, 0, 1)[1]
        at = here[0].blob_offset if here else 0
        refs: dict[bytes, ChunkRef] = {}
        for ino in children.values():
            e = tree.entry(ino)
            if ino == local or e is None or e.type != toc_pb2.REG or e.size > SMALL_FILE:
                continue
            for c in e.chunks:
                if c.digest not in skip and not self.fetcher.is_cached(ref := chunk_ref(c)):
                    refs.setdefault(c.digest, ref)
        out: list[tuple[Layer, ChunkRef]] = []
        total = 0
        for ref in sorted(refs.values(), key=lambda r: abs(r.blob_offset - at)):
            total += ref.compressed_size
            if total > self.directory:
                break
            out.append((layer, ref))
        return sorted(out, key=lambda pair: pair[1].blob_offset)

    @staticmethod
    def _enough_misses(layer: Layer, local: int, e: toc_pb2.Entry) -> bool:
        """Whether a file has shown that it will be read through: small ones at once; a
        program after misses in a sixteenth of its chunks (it maps and touches most of its
        code); a large file of data after misses in a quarter (ICU's 31 MB data library: node
        reads 4 of its 101 chunks, initdb 19, and fetched whole it took 10 MB of the link)."""
        if e.size <= SMALL_FILE:
            return True
        misses = layer.file_misses[local] = layer.file_misses.get(local, 0) + 1
        return misses >= max(2, len(e.chunks) // (4 if _data(layer, e) else 16))

    def _in_a_run(self, layer: Layer, local: int, first: int) -> bool:
        """Whether the chunk before file offset `first` is here: the file is being read
        through, not sampled."""
        before = layer.tree.chunks_for(local, first - 1, 1)[1] if first else []
        return bool(before) and self.fetcher.is_cached(before[0])

    def read_local(self, layer: Layer, local: int, offset: int, size: int) -> bytes | None:
        """The read from local chunks alone, or None when one must be fetched (or read from
        disk and checked whole the first time)."""
        started = time.monotonic()
        span = self._span(layer, local, offset, size, True)
        if span is None:
            return b""
        _, first, refs, end = span
        out = self.fetcher.read_local(refs, offset - first, end - offset)
        if out is None and (hot := self._hot(layer, local, offset, end)):
            parts = []
            for ref, at, n in hot:
                part = self.fetcher.read_local([ref], at, n)
                if part is None:
                    break
                parts.append(part)
            else:
                out = b"".join(parts)
        if out is not None:
            READ_LATENCY.observe(time.monotonic() - started)
        return out

    def _span(self, layer: Layer, local: int, offset: int, size: int,
              record: bool) -> tuple[toc_pb2.Entry, int, list[ChunkRef], int] | None:
        """The file's entry, the file offset of the first chunk, the chunks and the end of
        the read; None past the end of the file."""
        e = layer.tree.entry(local)
        if e is None or offset >= e.size:
            return None
        end = min(offset + size, e.size)
        first, refs = layer.tree.chunks_for(local, offset, end - offset)
        if not refs:
            return None
        if record:
            layer.touch([r.blob_offset for r in refs])
            if layer.recording:
                layer.touch_pages(layer.tree.nodes[local].entry, offset, end)
        return e, first, refs, end

    @staticmethod
    def _hot(layer: Layer, local: int, offset: int,
             end: int) -> list[tuple[ChunkRef, int, int]] | None:
        """The hot frame pieces (frame, offset in it, length) that hold the read whole."""
        tree = layer.tree
        if not tree.hot:
            return None
        pieces = tree.hot.cover(tree.nodes[local].entry, offset, end)
        if pieces is None:
            return None
        return [(tree.hot.refs[p.frame], p.frame_offset, p.length) for p in pieces]

    def read(self, layer: Layer, local: int, offset: int, size: int,
             record: bool = True) -> bytes:
        """`record=False`: zest's own reads (the predictor), kept out of the profile and of
        whole-file fetching, which answers how a program reads a file, not how zest does."""
        started = time.monotonic()
        span = self._span(layer, local, offset, size, record)
        if span is None:
            return b""
        e, first, refs, end = span
        what = f"{layer.what} file /{e.name.decode(errors='replace')}"
        hot = self._hot(layer, local, offset, end)
        if hot is not None:  # a recorded workload's pages: their hot frame is here or coming
            frames = list({ref.digest: ref for ref, _, _ in hot}.values())
            try:
                got = dict(zip((r.digest for r in frames),
                               self.fetcher.get(layer.source, frames, what), strict=True))
            except ChunkstoreError as exc:  # the chunks hold the same bytes: read those
                log.warning("hot frame unavailable; reading its chunks", extra={"kv": {
                    "what": what, "error": exc}})
            else:
                READ_LATENCY.observe(time.monotonic() - started)
                return b"".join(got[ref.digest][at : at + n] for ref, at, n in hot)
        if record and self.on_miss is not None and not all(
                self.fetcher.is_cached(r) for r in refs):
            wanted = []
            if (self.whole_file and e.size <= self.whole_file and len(e.chunks) > len(refs)
                    and local not in layer.whole_files
                    and self._enough_misses(layer, local, e)):
                layer.whole_files.add(local)
                asked = {r.digest for r in refs}  # this read fetches those itself, at once
                wanted = [(layer, chunk_ref(c)) for c in e.chunks if c.digest not in asked]
            wanted += self._siblings(layer, local, {c.digest for c in e.chunks})
            if wanted:
                self.on_miss(wanted)
        extra = layer.tree.following(refs[-1], self.readahead) if self.readahead else []
        if (record and self.whole_file and not extra and e.size > SMALL_FILE
                and _data(layer, e) and self._in_a_run(layer, local, first)):
            # with whole-file fetching, whose fourth of misses a large data file may never
            # reach: in a run, its next chunk rides along. ICU's is read in short runs of
            # neighbouring chunks (initdb: 19 chunks, 6 of them in one run) while the link is
            # idle; node reads 4 of its chunks, none next to another
            extra = layer.tree.chunks_for(local, first + sum(r.size for r in refs), 1)[1]
        datas = self.fetcher.get(layer.source, refs, what, readahead=extra)
        buf = b"".join(datas) if len(datas) > 1 else datas[0]
        out = buf[offset - first : end - first]
        took = time.monotonic() - started
        READ_LATENCY.observe(took)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("read", extra={"kv": {"what": what, "offset": offset, "size": size,
                                            "ms": round(took * 1000, 1)}})
        return out
