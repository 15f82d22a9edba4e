"""Chunk cache: content addressing, LRU bound, torn and corrupt files, restart."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from chunkstore.cache import ChunkCache
from chunkstore.digest import Digest


def _chunk(i: int, size: int = 1000) -> tuple[Digest, bytes]:
    data = bytes([i % 256]) * size
    return Digest.of(data), data


def test_put_get_and_miss(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 10**6)
    d, data = _chunk(1)
    assert c.get(d) is None
    c.put(d, data)
    assert c.get(d) == data
    assert d in c
    s = c.stats()
    assert (s.chunks, s.bytes, s.hits, s.misses) == (1, 1000, 1, 1)


def test_lru_eviction_keeps_recent(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 5000)
    chunks = [_chunk(i) for i in range(5)]
    for d, data in chunks:
        c.put(d, data)
    assert c.get(chunks[0][0]) == chunks[0][1]  # 0 becomes most recent
    c.put(*_chunk(9))  # 6000 > 5000: evict down to 4500
    assert c.stats().bytes <= 4500
    assert chunks[0][0] in c
    assert chunks[1][0] not in c and chunks[2][0] not in c
    assert not (tmp_path / "chunks" / chunks[1][0].hex[:2] / chunks[1][0].hex).exists()


@pytest.mark.allow_log_errors
def test_corrupt_file_is_dropped_not_served(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 10**6)
    d, data = _chunk(3)
    c.put(d, data)
    path = tmp_path / "chunks" / d.hex[:2] / d.hex
    path.write_bytes(data[:500])  # torn write after a power cut
    assert c.get(d) is None
    assert not path.exists()
    assert c.stats().corrupt == 1


def test_survives_restart_with_recency(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 10**6)
    old, new = _chunk(1), _chunk(2)
    c.put(*old)
    c.put(*new)
    p = tmp_path / "chunks" / old[0].hex[:2] / old[0].hex
    os.utime(p, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "tmp" / "leftover.partial").write_bytes(b"half")
    c2 = ChunkCache(tmp_path, 2500)
    assert c2.stats().chunks == 2
    assert list((tmp_path / "tmp").iterdir()) == []
    c2.put(*_chunk(3))
    assert old[0] not in c2 and new[0] in c2


def test_prune(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 10**6)
    for i in range(4):
        c.put(*_chunk(i))
    assert c.prune(0) == 4
    assert c.stats().bytes == 0


def test_read_serves_parts_of_verified_chunks_only(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 10**6)
    d = Digest.of(data := bytes(range(256)) * 8)
    c.put(d, data)  # put is given verified bytes
    assert c.read(d, 100, 50) == data[100:150]
    assert c.read(d, 2000, 500) == data[2000:]  # cut at the end of the chunk
    c2 = ChunkCache(tmp_path, 10**6)  # a new process has verified nothing yet
    assert c2.read(d, 0, 10) is None
    assert c2.get(d) == data  # read whole and hashed once...
    assert c2.read(d, 0, 10) == data[:10]  # ...then served in parts


def test_read_of_a_file_gone_or_cut_short_drops_the_chunk(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 10**6)
    gone, cut = _chunk(1), _chunk(2)
    for d, data in (gone, cut):
        c.put(d, data)
    (tmp_path / "chunks" / gone[0].hex[:2] / gone[0].hex).unlink()
    (tmp_path / "chunks" / cut[0].hex[:2] / cut[0].hex).write_bytes(cut[1][:10])
    assert c.read(gone[0], 0, 10) is None
    assert c.read(cut[0], 0, 100) is None
    assert gone[0] not in c and cut[0] not in c
    assert c.stats().chunks == 0


def test_a_restart_indexes_chunk_files_only(tmp_path: Path) -> None:
    """A file in the chunk directories whose name is not a digest (an operator's copy, an
    editor's backup) is neither indexed nor counted nor evicted."""
    c = ChunkCache(tmp_path, 10**6)
    d, data = _chunk(4, 3000)
    c.put(d, data)
    stray = tmp_path / "chunks" / d.hex[:2] / f"{d.hex}.bak"
    stray.write_bytes(b"x" * 5000)
    c2 = ChunkCache(tmp_path, 10**6)
    assert c2.stats().chunks == 1 and c2.stats().bytes == 3000
    assert c2.get(d) == data and c2.read(d, 1000, 10) == data[1000:1010]
    assert c2.prune(0) == 1
    assert stray.exists() and d not in c2


def test_the_index_keeps_size_use_and_verification_apart() -> None:
    from chunkstore.cache import _entry, _last_use, _size, _verified

    now = time.time()
    for size in (0, 1, 1000, (1 << 32) - 1):
        for verified in (False, True):
            e = _entry(size, now, verified)
            assert (_size(e), _last_use(e), _verified(e)) == (size, int(now), verified)
