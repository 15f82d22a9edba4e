"""Fetcher: coalescing, single flight, verification and retry, errors."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import zstandard

from chunkstore.cache import ChunkCache
from chunkstore.convert import convert_tar
from chunkstore.digest import Digest
from chunkstore.errors import ChunkUnavailable
from chunkstore.fetch import ChunkRef, Fetcher
from chunkstore.toc import load_toc, read_footer
from tests.support import ocibuild as ob


class Blob:
    """A RangeSource over bytes that records requests and can corrupt them."""

    def __init__(self, data: bytes, delay: float = 0.0):
        self.data = data
        self.requests: list[tuple[int, int]] = []
        self.corrupt_times = 0
        self.delay = delay
        self.lock = threading.Lock()

    def read_range(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.requests.append((offset, length))
        time.sleep(self.delay)
        out = self.data[offset : offset + length]
        if self.corrupt_times:
            self.corrupt_times -= 1
            out = bytes(len(out))
        return out


def _layer() -> tuple[Blob, list[ChunkRef], dict[bytes, bytes]]:
    files = {f"f{i}": bytes([i]) * (1000 + i) for i in range(10)}
    out = io.BytesIO()
    convert_tar(io.BytesIO(ob.make_tar(files)), out)  # type: ignore[arg-type]
    blob = out.getvalue()
    toc = load_toc(lambda o, n: blob[o : o + n], read_footer(lambda o, n: blob[o : o + n],
                                                             len(blob)))
    refs = [ChunkRef(c.digest, c.blob_offset, c.compressed_size, c.size)
            for e in toc.entries for c in e.chunks]
    content = {e.chunks[0].digest: files[e.name.decode()] for e in toc.entries}
    return Blob(blob), refs, content


def test_adjacent_chunks_in_one_request(tmp_path: Path) -> None:
    src, refs, content = _layer()
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    got = f.get(src, refs)
    assert got == [content[r.digest] for r in refs]
    assert len(src.requests) == 1  # headers between files are smaller than the gap
    assert f.get(src, refs) == got
    assert len(src.requests) == 1  # second time from memory


def test_far_apart_chunks_split(tmp_path: Path) -> None:
    src, refs, _ = _layer()
    f = Fetcher(ChunkCache(tmp_path, 10**7), max_gap=0)
    f.get(src, [refs[0], refs[5]])
    assert len(src.requests) == 2


def test_disk_cache_used_by_new_fetcher(tmp_path: Path) -> None:
    src, refs, content = _layer()
    Fetcher(ChunkCache(tmp_path, 10**7)).get(src, refs)
    src.requests.clear()
    assert Fetcher(ChunkCache(tmp_path, 10**7)).get(src, refs[:3]) == [
        content[r.digest] for r in refs[:3]]
    assert src.requests == []


@pytest.mark.allow_log_errors
def test_corrupt_once_is_refetched(tmp_path: Path) -> None:
    src, refs, content = _layer()
    src.corrupt_times = 1
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    assert f.get(src, refs[:1]) == [content[refs[0].digest]]
    assert f.stats.verify_failures == 1


@pytest.mark.allow_log_errors
def test_corrupt_twice_fails_and_caches_nothing(tmp_path: Path) -> None:
    src, refs, _ = _layer()
    src.corrupt_times = 2
    cache = ChunkCache(tmp_path, 10**7)
    f = Fetcher(cache)
    with pytest.raises(ChunkUnavailable, match="does not match its digest"):
        f.get(src, refs[:1], "layer x")
    assert Digest(refs[0].digest) not in cache
    assert f.get(src, refs[:1])  # a later read can succeed


def test_concurrent_readers_share_one_fetch(tmp_path: Path) -> None:
    src, refs, content = _layer()
    src.delay = 0.2
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    results: list[list[bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(f.get(src, refs[:2])))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(src.requests) == 1
    assert all(r == [content[refs[0].digest], content[refs[1].digest]] for r in results)


def test_source_error_becomes_unavailable_for_all_waiters(tmp_path: Path) -> None:
    class Failing:
        def read_range(self, offset: int, length: int) -> bytes:
            raise OSError("connection reset")

    _, refs, _ = _layer()
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    with pytest.raises(ChunkUnavailable, match="connection reset"):
        f.get(Failing(), refs[:1], "layer y")
    assert f._inflight == {}


def test_zstd_decoder_agrees() -> None:
    src, refs, content = _layer()
    r = refs[0]
    frame = src.data[r.blob_offset : r.end]
    assert zstandard.ZstdDecompressor().decompress(frame) == content[r.digest]


class MultiBlob(Blob):
    """A MultiRangeSource: several ranges for one call, each call recorded."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.multi_calls: list[list[tuple[int, int]]] = []

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.multi_calls.append(list(ranges))
        return [self.read_range(o, n) for o, n in ranges]


def test_far_apart_groups_go_in_one_multi_range_call(tmp_path: Path) -> None:
    src, refs, content = _layer()
    multi = MultiBlob(src.data)
    f = Fetcher(ChunkCache(tmp_path, 10**7), max_gap=0)
    got = f.get(multi, [refs[0], refs[5], refs[8]])
    assert got == [content[r.digest] for r in (refs[0], refs[5], refs[8])]
    assert len(multi.multi_calls) == 1 and len(multi.multi_calls[0]) == 3
    assert f.stats.requests == 1


@pytest.mark.allow_log_errors
def test_corrupt_part_of_a_multi_range_answer_is_refetched(tmp_path: Path) -> None:
    src, refs, content = _layer()
    multi = MultiBlob(src.data)
    multi.corrupt_times = 1  # the first range of the answer comes back as zeros
    f = Fetcher(ChunkCache(tmp_path, 10**7), max_gap=0)
    got = f.get(multi, [refs[1], refs[6]])
    assert got == [content[refs[1].digest], content[refs[6].digest]]
    assert f.stats.verify_failures == 1
    assert len(multi.requests) == 3  # two ranges, then the bad one again on its own


def test_read_local_joins_parts_and_never_fetches(tmp_path: Path) -> None:
    src, refs, content = _layer()
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    assert f.read_local(refs[:3], 0, 10) is None  # not here: the caller must fetch
    f.get(src, refs[:3])
    whole = b"".join(content[r.digest] for r in refs[:3])
    assert f.read_local(refs[:3], 500, 1600) == whole[500:2100]  # spans three chunks
    f.drop_memory()  # from the verified files on disk now
    assert f.read_local(refs[:3], 1500, 100) == whole[1500:1600]
    assert f.read_local(refs[:4], 0, len(whole) + 1) is None  # the fourth is not here
    assert len(src.requests) == 1


class StreamBlob(Blob):
    """A Blob that also streams a range, and can stall after some bytes until released."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.streams: list[tuple[int, int]] = []
        self.stall_after: int | None = None
        self.release = threading.Event()

    def open_range(self, offset: int, length: int) -> io.BufferedIOBase:
        self.streams.append((offset, length))
        blob = self

        class Body(io.BufferedIOBase):
            pos = 0

            def read(self, n: int | None = -1) -> bytes:
                n = length - self.pos if n is None or n < 0 else min(n, length - self.pos)
                if blob.stall_after is not None and self.pos + n > blob.stall_after:
                    blob.release.wait(10)
                out = blob.data[offset + self.pos : offset + self.pos + n]
                self.pos += n
                return out

        return Body()


def test_stream_hands_out_each_chunk_as_it_arrives_and_reads_join_it(tmp_path: Path) -> None:
    blob, refs, content = _layer()
    src = StreamBlob(blob.data)
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    f.get(src, [refs[0]])  # one already here: not asked for again
    src.stall_after = refs[6].blob_offset - refs[1].blob_offset  # the stream stops before 6
    it = f.stream(src, list(reversed(refs)))
    got = [next(it) for _ in range(6)]  # refs 0..5 are out while the rest still hangs
    assert [r for r, _ in got] == refs[:6]
    assert all(data == content[r.digest] for r, data in got)
    assert src.streams == [(refs[0].blob_offset, refs[0].compressed_size),  # the get
                           (refs[1].blob_offset, refs[-1].end - refs[1].blob_offset)]
    joined: list[bytes] = []
    t = threading.Thread(target=lambda: joined.extend(f.get(src, [refs[8]])))
    t.start()  # a read of a chunk the stream owns waits for the stream
    time.sleep(0.1)
    assert joined == []
    src.release.set()
    rest = list(it)
    t.join(5)
    assert [r for r, _ in rest] == refs[6:]
    assert joined == [content[refs[8].digest]]
    assert len(src.streams) == 2 and src.requests == []  # no other fetch


def test_a_read_that_joins_a_prefetch_gets_its_chunk_before_the_request_ends(
        tmp_path: Path) -> None:
    """A prefetch's range request hands each chunk out as its frame arrives: a read waiting
    for the second chunk of a megabyte request does not wait for the megabyte."""
    blob, refs, content = _layer()
    src = StreamBlob(blob.data)
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    src.stall_after = refs[4].blob_offset - refs[0].blob_offset  # stalls before chunk 4
    prefetch = threading.Thread(target=f.get, args=(src, refs), kwargs={"demand": False})
    prefetch.start()
    deadline = time.monotonic() + 5
    while not f.is_coming(refs[2]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert f.get(src, [refs[2]]) == [content[refs[2].digest]]  # while the request hangs
    assert prefetch.is_alive() and not f.is_cached(refs[5])
    src.release.set()
    prefetch.join(5)
    assert f.is_cached(refs[-1])
    assert src.streams == [(refs[0].blob_offset, refs[-1].end - refs[0].blob_offset)]


def test_prefetch_leaves_chunks_on_their_way_to_their_fetch(tmp_path: Path) -> None:
    """A prefetch thread fetches what nobody fetches yet and returns: waiting for a read's
    chunks would leave the link idle while the rest of its list waits."""
    blob, refs, content = _layer()
    src = StreamBlob(blob.data)
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    src.stall_after = 0  # the read's request hangs until released
    read = threading.Thread(target=f.get, args=(src, refs[:3]))
    read.start()
    deadline = time.monotonic() + 5
    while not f.is_coming(refs[0]) and time.monotonic() < deadline:
        time.sleep(0.01)
    src.stall_after = None
    f.prefetch(src, refs)  # returns with the read still hanging
    assert read.is_alive()
    assert all(f.is_cached(r) for r in refs[3:]) and not f.is_cached(refs[0])
    assert src.streams[1] == (refs[3].blob_offset, refs[-1].end - refs[3].blob_offset)
    src.release.set()
    read.join(5)
    assert f.get(src, refs[:3]) == [content[r.digest] for r in refs[:3]]
    assert len(src.streams) == 2  # nothing fetched twice


@pytest.mark.allow_log_errors
def test_stream_verifies_and_a_stream_left_early_releases_its_chunks(tmp_path: Path) -> None:
    blob, refs, content = _layer()
    data = bytearray(blob.data)
    data[refs[2].blob_offset + refs[2].compressed_size // 2] ^= 0xFF  # corrupt in the stream
    src = StreamBlob(bytes(data))
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    with pytest.raises(ChunkUnavailable):  # fetched once more on its own: still corrupt
        list(f.stream(src, refs))
    assert f.stats.verify_failures == 2
    src2 = StreamBlob(blob.data)
    f2 = Fetcher(ChunkCache(tmp_path / "2", 10**7))
    it = f2.stream(src2, refs)
    next(it)
    it.close()  # the consumer stopped: the chunks it claimed can be fetched by a read
    assert f2.get(src2, [refs[5]]) == [content[refs[5].digest]]


def test_a_chunk_in_flight_is_coming_but_not_cached(tmp_path: Path) -> None:
    """Prefetch leaves a chunk to the fetch that brings it (Fetcher.is_coming), instead of
    holding one of its threads waiting for it."""
    src, refs, _ = _layer()
    src.delay = 0.5
    f = Fetcher(ChunkCache(tmp_path, 10**7))
    ref = refs[0]
    assert not f.is_coming(ref)
    t = threading.Thread(target=f.get, args=(src, [ref]))
    t.start()
    deadline = time.monotonic() + 5
    while not src.requests:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert f.is_coming(ref) and not f.is_cached(ref)
    t.join()
    assert f.is_coming(ref) and f.is_cached(ref)
    assert not f.is_coming(refs[1])
