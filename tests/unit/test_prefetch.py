"""Prefetch scheduling: ranked waves, whole files after misses, and early prefetch (`warm`)
of a layer that is not served yet."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest

from chunkstore._pb import toc_pb2
from chunkstore.cache import ChunkCache
from chunkstore.convert import convert_tar
from chunkstore.fetch import ChunkRef, Fetcher
from chunkstore.toc import load_toc, read_footer
from snapshotter.fuse.layers import Layer
from snapshotter.fuse.prefetch import Prefetcher, _RankedPool, _split
from snapshotter.fuse.reader import Reader
from snapshotter.fuse.tree import LayerTree, chunk_ref
from tests.support import ocibuild as ob
from tests.unit.test_fetch import MultiBlob

BIG = os.urandom(3 << 20)  # random: does not compress, many chunks


def _layer(tmp_path: Path) -> tuple[Layer, MultiBlob]:
    out = io.BytesIO()
    convert_tar(io.BytesIO(ob.make_tar({"big": BIG, "small": b"s" * 5000})), out)  # type: ignore[arg-type]
    data = out.getvalue()
    blob_path = tmp_path / "blob"
    blob_path.write_bytes(data)
    toc = load_toc(lambda o, n: data[o:o + n], read_footer(lambda o, n: data[o:o + n],
                                                           len(data)))
    src = MultiBlob(data)
    return Layer(name="1", slot=1, tree=LayerTree(toc), source=src, what="test layer"), src


def _ino(layer: Layer, name: bytes) -> int:
    node = layer.tree.lookup(1, name)
    assert node is not None
    return node


def _wait(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_ranked_pool_runs_lowest_rank_first() -> None:
    pool = _RankedPool(1, "test")
    gate = threading.Event()
    order: list[int] = []
    blocker = pool.submit(0, gate.wait)
    futs = [pool.submit(rank, order.append, rank) for rank in (3, 1, 2, 1)]
    gate.set()
    blocker.result(timeout=5)
    for f in futs:
        f.result(timeout=5)
    assert order == [1, 1, 2, 3]
    pool.shutdown()


def test_waves_grow() -> None:
    refs = [ChunkRef(bytes([i]) * 32, i * 100_000, 100_000, 200_000) for i in range(100)]
    waves = _split(refs, 256 * 1024, 4 * 1024 * 1024)
    sizes = [sum(r.compressed_size for r in w) for w in waves]
    assert sizes[0] <= 256 * 1024 < sizes[1] <= 512 * 1024
    assert max(sizes) <= 4 * 1024 * 1024
    assert sum(len(w) for w in waves) == 100


def test_a_list_of_files_is_fetched_in_its_order_across_waves(tmp_path: Path) -> None:
    """A predicted list puts a large program's code after every file's data: a later wave
    must not overtake an earlier one (ranks restarted at each wave did)."""
    layer, src = _layer(tmp_path)
    prefetcher = Prefetcher(Fetcher(ChunkCache(tmp_path / "cache", 10**8)), parallel=1,
                            background=False)
    entry = layer.tree.entry(_ino(layer, b"big"))
    assert entry is not None
    wanted = [(layer, chunk_ref(c)) for c in reversed(entry.chunks)]
    gate = threading.Event()
    prefetcher._pool.submit(-1, gate.wait)  # the one worker waits until every job is queued
    prefetcher.fetch_files(wanted)
    _wait(lambda: prefetcher._pool._queue.qsize() >= 5)
    time.sleep(0.1)
    gate.set()
    _wait(lambda: all(prefetcher.fetcher.is_cached(r) for _, r in wanted))

    def asked(r: ChunkRef) -> int:  # which request brought the chunk
        return next(i for i, (off, n) in enumerate(src.requests)
                    if off <= r.blob_offset < off + n)

    waves = _split((r for _, r in wanted), 2 << 20)
    assert len(waves) == 2
    assert max(map(asked, waves[0])) < min(map(asked, waves[1]))
    prefetcher.shutdown()


def _whole_file_reader(tmp_path: Path) -> tuple[Layer, MultiBlob, Fetcher, Prefetcher, Reader, int,
                                                toc_pb2.Entry]:
    """A layer, its blob, and a reader with whole-file fetching on; `big` and its entry."""
    layer, src = _layer(tmp_path)
    fetcher = Fetcher(ChunkCache(tmp_path / "cache", 10**8))
    prefetcher = Prefetcher(fetcher, parallel=2, background=False)
    reader = Reader(fetcher, 0, whole_file=64 << 20, on_miss=prefetcher.fetch_files)
    big = _ino(layer, b"big")
    entry = layer.tree.entry(big)
    assert entry is not None and len(entry.chunks) >= 4
    return layer, src, fetcher, prefetcher, reader, big, entry


def test_a_read_through_a_big_file_fetches_the_rest_of_it(tmp_path: Path) -> None:
    layer, src, fetcher, prefetcher, reader, big, entry = _whole_file_reader(tmp_path)
    refs = [ChunkRef(c.digest, c.blob_offset, c.compressed_size, c.size) for c in entry.chunks]
    # one miss is not enough in a file this size: a file of data (not a program) needs misses
    # in a quarter of its chunks, at least two; then the whole file is sent for
    need = max(2, len(refs) // 4)
    assert reader.read(layer, big, 0, 4096) == BIG[:4096]
    time.sleep(0.2)
    assert not all(fetcher.is_cached(r) for r in refs)
    far = entry.chunks[::-2][: need - 1]  # each a miss: none of them came along with another
    for c in far:
        off = c.file_offset
        assert reader.read(layer, big, off, 4096) == BIG[off:off + 4096]
    _wait(lambda: all(fetcher.is_cached(r) for r in refs))
    asked = len(src.requests)
    assert reader.read(layer, big, len(BIG) // 2, 8192) == BIG[len(BIG) // 2:len(BIG) // 2 + 8192]
    assert len(src.requests) == asked  # served from the cache
    prefetcher.shutdown()


def test_whole_file_fetching_off_fetches_only_what_is_read(
        tmp_path: Path) -> None:
    layer, src = _layer(tmp_path)
    fetcher = Fetcher(ChunkCache(tmp_path / "cache", 10**8))
    prefetcher = Prefetcher(fetcher, parallel=2, background=False)
    off = Reader(fetcher, 0, whole_file=0, on_miss=prefetcher.fetch_files)
    big = _ino(layer, b"big")
    entry = layer.tree.entry(big)
    assert entry is not None
    for c in entry.chunks[:3]:
        off.read(layer, big, c.file_offset, 10)
    time.sleep(0.2)
    assert len(src.requests) == 3  # only what was read
    prefetcher.shutdown()


def test_zest_s_own_reads_never_send_for_whole_files(tmp_path: Path) -> None:
    """The predictor reads ELF headers here and there; that is not a program reading a file
    through, so it must not fetch the whole file (it did: libcrypto, 4.7 MB, for two
    header reads)."""
    layer, src, _, prefetcher, reader, big, entry = _whole_file_reader(tmp_path)
    for c in (entry.chunks[0], entry.chunks[-1], entry.chunks[1]):
        reader.read(layer, big, c.file_offset, 10, record=False)
    time.sleep(0.2)
    assert len(src.requests) == 3  # only what was read
    assert layer.touched == []  # and kept out of the profile
    prefetcher.shutdown()


def test_warm_fetches_a_prefetch_list_before_the_layer_is_added(tmp_path: Path) -> None:
    from snapshotter.fuse.server import Server

    layer, _ = _layer(tmp_path)
    entry = layer.tree.entry(_ino(layer, b"big"))
    assert entry is not None
    blob = tmp_path / "blob"
    toc_path = tmp_path / "toc"
    data = blob.read_bytes()
    footer = read_footer(lambda o, n: data[o:o + n], len(data))
    toc_path.write_bytes(data[footer.toc_offset:footer.toc_offset + footer.toc_size])
    server = Server(tmp_path / "mnt", ChunkCache(tmp_path / "cache", 10**8),
                    background_prefetch=False, prefetch_parallel=2)
    wanted = [c.blob_offset for c in entry.chunks[:2]]
    reply = server.op_warm({"toc_path": str(toc_path), "toc_digest": str(footer.toc_digest),
                            "source": {"kind": "file", "path": str(blob)},
                            "profile": wanted, "what": "layer 2/2"})
    assert reply == {"chunks": 2}
    refs = [ChunkRef(c.digest, c.blob_offset, c.compressed_size, c.size)
            for c in entry.chunks]
    _wait(lambda: all(server.fetcher.is_cached(r) for r in refs[:2]))
    assert not server.fetcher.is_cached(refs[2])  # only the list
    # the layer's add later takes the tree warm built
    reply = server.op_add({"name": "7", "slot": 7, "toc_path": str(toc_path),
                           "toc_digest": str(footer.toc_digest), "prefetch": False,
                           "source": {"kind": "file", "path": str(blob)}})
    assert reply == {"slot": 7} and not server._pending
    server.prefetcher.shutdown()


def test_a_guess_starts_on_layers_warmed_but_not_yet_added(tmp_path: Path) -> None:
    from snapshotter.fuse.server import Server

    layer, _ = _layer(tmp_path)
    blob = tmp_path / "blob"
    data = blob.read_bytes()
    footer = read_footer(lambda o, n: data[o:o + n], len(data))
    toc_path = tmp_path / "toc"
    toc_path.write_bytes(data[footer.toc_offset:footer.toc_offset + footer.toc_size])
    server = Server(tmp_path / "mnt", ChunkCache(tmp_path / "cache", 10**8),
                    background_prefetch=False, prefetch_parallel=2)
    source = {"kind": "file", "path": str(blob), "digest": "sha256:" + "1" * 64}
    server.op_warm({"toc_path": str(toc_path), "toc_digest": str(footer.toc_digest),
                    "source": source, "what": "layer 1/1"})
    spec = {"toc_digest": str(footer.toc_digest), "digest": source["digest"]}
    other = {"toc_digest": "sha256:" + "2" * 64, "digest": "sha256:" + "3" * 64}
    # a layer the FUSE process has not seen: no guess on part of the image
    assert server.op_predict({"layers": [spec, other], "argv": ["/small"],
                              "require_all": True}) == {"files": [], "missing": True}
    reply = server.op_predict({"layers": [spec], "argv": ["/small"], "require_all": True})
    assert reply["files"] == ["/small"]
    small = layer.tree.entry(_ino(layer, b"small"))
    assert small is not None
    _wait(lambda: all(server.fetcher.is_cached(chunk_ref(c)) for c in small.chunks))
    pending = server._pending[str(footer.toc_digest)]
    server.op_add({"name": "3", "slot": 3, "toc_path": str(toc_path), "prefetch": False,
                   "toc_digest": str(footer.toc_digest), "source": source})
    assert server.layers.by_name("3") is pending  # what the guess learnt stays with it
    assert pending.name == "3" and pending.slot == 3
    # added: found by its name, or by its digests for a guess that started before
    assert server._predict_layer(spec) is pending and server._predict_layer("3") is pending
    server.prefetcher.shutdown()


@pytest.mark.allow_log_errors
def test_a_profile_that_cannot_be_written_costs_nothing_else(tmp_path: Path) -> None:
    from snapshotter.fuse.server import Server

    (tmp_path / "profiles").write_text("a file where the directory should be")
    server = Server(tmp_path / "mnt", ChunkCache(tmp_path / "cache", 10**8),
                    background_prefetch=False, prefetch_parallel=2,
                    profile_dir=tmp_path / "profiles")
    layer, _ = _layer(tmp_path)
    layer.digest = "sha256:" + "ab" * 32
    layer.touched.append(0)
    server.layers.add(layer)
    assert server.save_profiles(quiet=0) == 0  # logged, not raised: the process lives on
    server.prefetcher.shutdown()


def test_chunk_index_lookups(tmp_path: Path) -> None:
    layer, _ = _layer(tmp_path)
    tree = layer.tree
    every = tree.all_chunks()
    assert len(every) == tree.chunk_count == len({r.digest for r in every})
    assert [r.blob_offset for r in every] == sorted(r.blob_offset for r in every)
    for r in every:
        assert tree.chunk_at(r.blob_offset) == r
    assert tree.chunk_at(every[0].blob_offset + 1) is None
    assert list(tree.iter_chunks(every[2].blob_offset)) == every[3:]
    nxt = tree.following(every[0], every[1].compressed_size + 1)
    assert nxt == every[1:3]


def test_prefetched_chunks_skip_the_memory_tier(tmp_path: Path) -> None:
    layer, src = _layer(tmp_path)
    fetcher = Fetcher(ChunkCache(tmp_path / "cache", 10**8))
    refs = layer.tree.all_chunks()
    fetcher.get(src, refs[:2], demand=False)
    assert all(fetcher.is_cached(r) for r in refs[:2])
    assert fetcher._memory_total == 0  # on disk only
    fetcher.get(src, refs[2:3])
    assert fetcher._memory_total == refs[2].size


def test_recording_keeps_pages_in_first_touch_order_and_only_while_recording(
        tmp_path: Path) -> None:
    layer, _ = _layer(tmp_path)
    f = Fetcher(ChunkCache(tmp_path / "c", 1 << 30))
    r = Reader(f)
    big = _ino(layer, b"big")
    entry = layer.tree.nodes[big].entry
    r.read(layer, big, 0, 4096)
    assert layer.pages == []  # not recording: nothing kept
    layer.recording = True
    for off, size in [(8192, 8192), (0, 100), (4096, 4096), (1 << 20, 5000), (8192, 10)]:
        r.read(layer, big, off, size)
    assert layer.page_runs() == [(entry, 2, 2), (entry, 0, 2), (entry, 256, 2)]


def test_hot_frames_are_streamed_first_and_serve_the_reads_they_cover(tmp_path: Path) -> None:
    from chunkstore import hot
    from chunkstore.toc import load_toc, read_footer
    from snapshotter.fuse.layers import FileSource

    layer, src = _layer(tmp_path)
    data = bytearray(src.data)
    toc = layer.tree.toc
    big = _ino(layer, b"big")
    entry = layer.tree.nodes[big].entry
    footer = read_footer(lambda o, n: bytes(data[o:o + n]), len(data))
    buf = io.BytesIO(bytes(data))
    new = hot.finish_blob(buf, footer.toc_offset - 8, toc, [(entry, 10, 300)])
    blob = tmp_path / "hot.blob"
    blob.write_bytes(buf.getvalue())
    toc2 = load_toc(lambda o, n: buf.getvalue()[o:o + n], new)
    hot_layer = Layer(name="2", slot=2, tree=LayerTree(toc2), source=FileSource(blob),
                      what="hot layer")
    f = Fetcher(ChunkCache(tmp_path / "c", 1 << 30))
    p = Prefetcher(f, background=False)
    p.start(hot_layer)
    _wait(lambda: hot_layer.prefetch_done == hot_layer.prefetch_total == len(toc2.hot_frames))
    assert f.stats.requests == 1  # every hot frame in one streamed request; no chunk list
    reader = Reader(f)
    got = reader.read(hot_layer, big, 10 * 4096 + 5, 200 * 4096)
    assert got == BIG[10 * 4096 + 5 : 210 * 4096 + 5]
    assert f.stats.requests == 1  # served from the hot frames
    p.shutdown()


def test_pages_recorded_from_many_threads_are_kept_once(tmp_path: Path) -> None:
    layer, _ = _layer(tmp_path)
    layer.start_recording()

    def record() -> None:
        for page in range(3000):
            layer.touch_pages(7, page * 4096, page * 4096 + 1)

    threads = [threading.Thread(target=record) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(layer.pages) == len(set(layer.pages)) == 3000
    assert layer.page_runs() == [(7, 0, 3000)]


def test_a_started_prefetch_is_not_done_before_it_has_counted_its_total(
        tmp_path: Path) -> None:
    """0 of 0 is not finished: a waiter polling `list` sees the prefetch unplanned until its
    thread has counted the chunks it will fetch."""
    gate = threading.Event()

    class Held(Prefetcher):
        def _run(self, layer: Layer) -> None:
            gate.wait(10)
            super()._run(layer)

    layer, _ = _layer(tmp_path)
    entry = layer.tree.entry(_ino(layer, b"big"))
    assert entry is not None
    layer.prefetch_override = [c.blob_offset for c in entry.chunks[:3]]
    prefetcher = Held(Fetcher(ChunkCache(tmp_path / "cache", 10**8)), parallel=2,
                      background=False)
    assert layer.prefetch_planned  # nothing started: nothing to wait for
    prefetcher.start(layer)
    assert not layer.prefetch_planned and layer.prefetch_total == 0
    gate.set()
    _wait(lambda: layer.prefetch_planned)
    assert layer.prefetch_total == 3
    _wait(lambda: layer.prefetch_done >= 3)
    prefetcher.shutdown()
