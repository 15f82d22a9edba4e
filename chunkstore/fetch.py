"""Chunks by digest: memory, then the disk cache, then the blob's RangeSource.

The read path's contract: every byte returned was decompressed from the blob
and matched its SHA-256 before it was cached or handed out. Missing chunks
that lie close together in the blob are fetched with one range request, and
the ranges one call needs go out as one multi-range request when the source can;
concurrent callers wanting the same digest share one fetch. A chunk that fails
verification is fetched once more on its own, then reported unavailable.

Concurrency: all methods are blocking and thread-safe; callers (the FUSE
reader, the prefetcher) run them in worker threads. `_lock` guards only the
in-flight table and the memory LRU; network, zstd and hashing run outside it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

import zstandard

from chunkstore.cache import ChunkCache
from chunkstore.digest import Digest
from chunkstore.errors import ChunkUnavailable

log = logging.getLogger(__name__)


class RangeSource(Protocol):
    """One blob that can be read by byte range (a registry blob, a local file)."""

    def read_range(self, offset: int, length: int) -> bytes: ...


@runtime_checkable
class MultiRangeSource(RangeSource, Protocol):
    """A blob that can return several (offset, length) ranges for one request."""

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...


@runtime_checkable
class StreamingSource(RangeSource, Protocol):
    """A blob whose range can be read as a stream: the first bytes are usable while the
    rest is on its way."""

    def open_range(self, offset: int, length: int) -> BinaryIO: ...


@dataclass(frozen=True, slots=True)
class ChunkRef:
    digest: bytes  # raw SHA-256 of the uncompressed bytes
    blob_offset: int
    compressed_size: int
    size: int

    @property
    def end(self) -> int:
        return self.blob_offset + self.compressed_size


@dataclass
class FetchStats:
    requests: int = 0
    bytes_fetched: int = 0
    chunks_fetched: int = 0
    memory_hits: int = 0
    verify_failures: int = 0


class Fetcher:
    def __init__(
        self,
        cache: ChunkCache,
        *,
        max_gap: int = 64 * 1024,
        max_request: int = 16 * 1024 * 1024,
        # chunks reads just fetched, for the next page reads of them; a verified chunk on disk
        # costs one pread, so this stays small (16 MiB made the FUSE process 14 MB larger with
        # ten images mounted, for no read speed in bench/fuse_io.py)
        memory_bytes: int = 4 * 1024 * 1024,
    ):
        self.cache = cache
        self.max_gap = max_gap
        self.max_request = max_request
        self.memory_bytes = memory_bytes
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._memory: OrderedDict[bytes, bytes] = OrderedDict()
        self._memory_total = 0
        self._local = threading.local()
        # monotonic time of the last on-demand fetch that went to the network; background work
        # waits until reads have been quiet for a while (see snapshotter.fuse.prefetch)
        self.last_demand_fetch = 0.0
        self.demand_in_flight = 0

    # -- memory tier -------------------------------------------------------
    def _mem_get(self, digest: bytes) -> bytes | None:
        with self._lock:
            data = self._memory.get(digest)
            if data is not None:
                self._memory.move_to_end(digest)
                self.stats.memory_hits += 1
            return data

    def _mem_put(self, digest: bytes, data: bytes) -> None:
        with self._lock:
            if digest in self._memory or len(data) > self.memory_bytes:
                return
            self._memory[digest] = data
            self._memory_total += len(data)
            while self._memory_total > self.memory_bytes:
                _, old = self._memory.popitem(last=False)
                self._memory_total -= len(old)

    def drop_memory(self) -> None:
        with self._lock:
            self._memory.clear()
            self._memory_total = 0

    # -- public ------------------------------------------------------------
    def is_cached(self, ref: ChunkRef) -> bool:
        with self._lock:
            if ref.digest in self._memory:
                return True
        return Digest(ref.digest) in self.cache

    def is_coming(self, ref: ChunkRef) -> bool:
        """Here already, or on its way (another caller fetches it)."""
        with self._lock:
            if ref.digest in self._inflight:
                return True
        return self.is_cached(ref)

    def read_local(self, refs: Sequence[ChunkRef], skip: int, length: int) -> bytes | None:
        """`length` bytes from `skip` into `refs` laid end to end, when each is in the memory
        tier or verified on disk; None as soon as one is not (then `get`). A read of a few
        pages costs a slice or a pread, not a chunk read and hashed whole."""
        parts: list[bytes] = []
        for ref in refs:
            if length <= 0:
                break
            if skip >= ref.size:
                skip -= ref.size
                continue
            n = min(length, ref.size - skip)
            data = self._mem_get(ref.digest)
            part = (data[skip:skip + n] if data is not None
                    else self.cache.read(Digest(ref.digest), skip, n))
            if part is None:
                return None
            parts.append(part)
            length -= n
            skip = 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def get(self, source: RangeSource, refs: Sequence[ChunkRef], what: str = "",
            demand: bool = True, readahead: Sequence[ChunkRef] = ()) -> list[bytes]:
        """The uncompressed, verified bytes of each chunk, in the order asked. `demand=False`
        marks background work, which does not count as read activity. `readahead`: chunks
        that follow in the blob; when the asked ones must be fetched, those of them that are
        not cached ride along in the same range request (a round trip costs more than the
        bytes), and are cached but not returned."""
        found: dict[bytes, bytes] = {}
        missing: list[ChunkRef] = []
        for ref in refs:
            if ref.digest in found:
                continue
            data = self._mem_get(ref.digest)
            if data is None:
                data = self.cache.get(Digest(ref.digest))
                if data is not None:
                    self._mem_put(ref.digest, data)
            if data is None:
                missing.append(ref)
            else:
                found[ref.digest] = data
        if missing and readahead:
            want = {r.digest for r in missing}
            missing += [r for r in readahead if r.digest not in want and r.digest not in found
                        and not self.is_cached(r)]
        if missing:
            if demand:
                with self._lock:
                    self.demand_in_flight += 1
                try:
                    found.update(self._fetch(source, missing, what, demand))
                finally:
                    with self._lock:
                        self.demand_in_flight -= 1
                        self.last_demand_fetch = time.monotonic()
            else:
                found.update(self._fetch(source, missing, what, demand))
        return [found[r.digest] for r in refs]

    def quiet_for(self) -> float:
        """Seconds since the last on-demand network fetch ended (0 while one is running)."""
        with self._lock:
            if self.demand_in_flight:
                return 0.0
            return time.monotonic() - self.last_demand_fetch

    def prefetch(self, source: RangeSource, refs: Sequence[ChunkRef], what: str = "") -> None:
        """Bring `refs` into the cache, as background work (see `get`). A chunk here already
        or on its way in another fetch is left alone: a prefetch thread waiting for a read's
        fetch leaves the link idle while the rest of its list waits behind it."""
        owned, _ = self._claim([r for r in refs if not self.is_cached(r)])
        if owned:
            self._fetch_owned(source, owned, what, False)

    def _fetch(self, source: RangeSource, refs: list[ChunkRef], what: str,
               demand: bool) -> dict[bytes, bytes]:
        owned, waiting = self._claim(refs)
        out = self._fetch_owned(source, owned, what, demand) if owned else {}
        for digest, fut in waiting.items():
            out[digest] = fut.result()
        return out

    def _fetch_owned(self, source: RangeSource, owned: list[ChunkRef], what: str,
                     demand: bool) -> dict[bytes, bytes]:
        """Fetch the chunks this caller claimed; on failure, whoever waits for them gets the
        error."""
        out: dict[bytes, bytes] = {}
        try:
            groups = self._groups(sorted(owned, key=lambda r: r.blob_offset))
            if len(groups) > 1 and isinstance(source, MultiRangeSource):
                blobs = self._read_many(source, [(g[0].blob_offset, g[-1].end - g[0].blob_offset)
                                                 for g in groups])
                for group, blob in zip(groups, blobs, strict=True):
                    out.update(self._decode_group(source, group, blob, what, demand))
            elif isinstance(source, StreamingSource):
                for group in groups:  # each chunk to its waiters the moment it is in
                    for ref, data in self._stream_group(source, group, what, demand):
                        out[ref.digest] = data
            else:
                for group in groups:
                    start, end = group[0].blob_offset, group[-1].end
                    blob = self._read(source, start, end - start)
                    out.update(self._decode_group(source, group, blob, what, demand))
        except BaseException as exc:
            err = exc if isinstance(exc, ChunkUnavailable) else ChunkUnavailable(
                f"{what}: fetching chunks failed: {exc}")
            self._finish({r.digest for r in owned if r.digest not in out}, None, err)
            if err is exc:
                raise
            raise err from exc
        return out

    def stream(self, source: RangeSource, refs: Sequence[ChunkRef],
               what: str = "") -> Iterator[tuple[ChunkRef, bytes]]:
        """Each chunk's verified bytes, in blob order, as soon as they are in: one streamed
        range request for those not here yet (a layer's hot frames: neighbours, wanted in
        this order), so the first are used while the rest are on their way. A read that
        wants one meanwhile waits for the stream instead of fetching it again."""
        refs = sorted(refs, key=lambda r: r.blob_offset)
        if not isinstance(source, StreamingSource):
            yield from zip(refs, self.get(source, refs, what, demand=False), strict=True)
            return
        missing = []
        for ref in refs:
            data = self._mem_get(ref.digest) or self.cache.get(Digest(ref.digest))
            if data is None:
                missing.append(ref)
            else:
                yield ref, data
        if not missing:
            return
        owned, waiting = self._claim(missing)
        left = {r.digest for r in owned}
        try:
            if owned:
                for ref, data in self._stream_group(source, owned, what, False):
                    left.discard(ref.digest)
                    yield ref, data
        except GeneratorExit:
            raise
        except BaseException as exc:
            err = exc if isinstance(exc, ChunkUnavailable) else ChunkUnavailable(
                f"{what}: streaming chunks failed: {exc}")
            self._finish(left, None, err)
            left = set()
            if err is exc:
                raise
            raise err from exc
        finally:  # the caller stopped early: whoever waits on the rest must not wait forever
            self._finish(left, None, ChunkUnavailable(f"{what}: stream abandoned"))
        by_digest = {r.digest: r for r in missing}
        for digest, fut in waiting.items():
            yield by_digest[digest], fut.result()

    def _stream_group(self, source: StreamingSource, group: Sequence[ChunkRef], what: str,
                      demand: bool) -> Iterator[tuple[ChunkRef, bytes]]:
        """One range request over `group` (in blob order), each chunk verified, cached and
        handed to whoever waits for it as soon as its frame is in: a read that joined a
        prefetch waits for its own chunk, not for the whole request (a megabyte shared with
        three others is 300 ms at 100 Mbit/s)."""
        start = group[0].blob_offset
        with source.open_range(start, group[-1].end - start) as f:
            with self._lock:
                self.stats.requests += 1
            pos = start
            for ref in group:
                gap = ref.blob_offset - pos
                _read_exact(f, gap)  # frames not asked for
                frame = _read_exact(f, ref.compressed_size)
                pos = ref.end
                with self._lock:
                    self.stats.bytes_fetched += gap + ref.compressed_size
                    self.stats.chunks_fetched += 1
                data = self._verified(source, ref, frame, what, demand)
                self._finish({ref.digest}, {ref.digest: data}, None)
                yield ref, data

    def _claim(self, refs: Sequence[ChunkRef]) -> tuple[list[ChunkRef], dict[bytes, Future[bytes]]]:
        """Which chunks this caller fetches (now marked in flight), and the futures of those
        another caller is fetching already."""
        owned: list[ChunkRef] = []
        owned_digests: set[bytes] = set()
        waiting: dict[bytes, Future[bytes]] = {}
        with self._lock:
            for ref in refs:
                if ref.digest in waiting or ref.digest in owned_digests:
                    continue
                fut = self._inflight.get(ref.digest)
                if fut is None:
                    self._inflight[ref.digest] = Future()
                    owned.append(ref)
                    owned_digests.add(ref.digest)
                else:
                    waiting[ref.digest] = fut
        return owned, waiting

    def _finish(self, digests: set[bytes], data: dict[bytes, bytes] | None,
                err: BaseException | None) -> None:
        with self._lock:
            futs = [(d, self._inflight.pop(d)) for d in digests if d in self._inflight]
        for d, fut in futs:
            if err is not None:
                fut.set_exception(err)
            else:
                assert data is not None
                fut.set_result(data[d])

    def _groups(self, refs: list[ChunkRef]) -> list[list[ChunkRef]]:
        groups: list[list[ChunkRef]] = []
        for ref in refs:
            if groups:
                g = groups[-1]
                if (ref.blob_offset - g[-1].end <= self.max_gap
                        and ref.end - g[0].blob_offset <= self.max_request
                        and ref.blob_offset >= g[-1].end):
                    g.append(ref)
                    continue
            groups.append([ref])
        return groups

    def _decode_group(self, source: RangeSource, group: list[ChunkRef], blob: bytes,
                      what: str, demand: bool) -> dict[bytes, bytes]:
        """Verify and cache each chunk. Only chunks a read is waiting for enter the memory
        tier: prefetch would push out what reads use, and keep the process large."""
        start = group[0].blob_offset
        out: dict[bytes, bytes] = {}
        for ref in group:
            data = self._verified(source, ref, blob[ref.blob_offset - start : ref.end - start],
                                  what, demand)
            out[ref.digest] = data
            self._finish({ref.digest}, out, None)
        with self._lock:
            self.stats.chunks_fetched += len(group)
        return out

    def _verified(self, source: RangeSource, ref: ChunkRef, frame: bytes, what: str,
                  demand: bool) -> bytes:
        """The chunk's bytes from its frame, verified (else fetched once more) and cached."""
        data = self._decode(ref, frame)
        if data is None:
            self.stats.verify_failures += 1
            log.warning("chunk failed verification; fetching it again",
                        extra={"kv": {"what": what, "chunk": Digest(ref.digest)}})
            data = self._decode(ref, self._read(source, ref.blob_offset, ref.compressed_size))
            if data is None:
                self.stats.verify_failures += 1
                msg = (f"{what}: chunk {Digest(ref.digest)} at blob offset "
                       f"{ref.blob_offset} does not match its digest after a second "
                       "fetch; the registry serves corrupt data")
                log.error("chunk verification failed", extra={"kv": {
                    "what": what, "chunk": Digest(ref.digest), "offset": ref.blob_offset}})
                raise ChunkUnavailable(msg)
        self.cache.put(Digest(ref.digest), data)
        if demand:
            self._mem_put(ref.digest, data)
        return data

    def _read(self, source: RangeSource, offset: int, length: int) -> bytes:
        data = source.read_range(offset, length)
        with self._lock:
            self.stats.requests += 1
            self.stats.bytes_fetched += len(data)
        if len(data) != length:
            raise ChunkUnavailable(f"short range read: {len(data)} of {length} bytes at "
                                   f"offset {offset}")
        return data

    def _read_many(self, source: MultiRangeSource,
                   ranges: list[tuple[int, int]]) -> list[bytes]:
        datas = source.read_ranges(ranges)
        with self._lock:
            self.stats.requests += 1
            self.stats.bytes_fetched += sum(len(d) for d in datas)
        for (offset, length), data in zip(ranges, datas, strict=True):
            if len(data) != length:
                raise ChunkUnavailable(f"short range read: {len(data)} of {length} bytes at "
                                       f"offset {offset}")
        return datas

    def _decode(self, ref: ChunkRef, frame: bytes) -> bytes | None:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        try:
            data: bytes = dctx.decompress(frame, max_output_size=ref.size)
        except zstandard.ZstdError:
            return None
        if len(data) != ref.size or hashlib.sha256(data).digest() != ref.digest:
            return None
        return data


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n) if n else b""
    if len(data) != n:
        raise ChunkUnavailable(f"stream ended early: {len(data)} of {n} bytes")
    return data
