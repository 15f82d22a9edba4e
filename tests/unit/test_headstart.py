"""The hot frames' head start: a stream begun before the TOC names the frames, whose bytes
the fetcher takes later and checks like any other."""

from __future__ import annotations

import contextlib
import io
import os
import random
import threading
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest
import zstandard

from chunkstore import format as fmt
from chunkstore import hot
from chunkstore.cache import ChunkCache
from chunkstore.digest import Digest
from chunkstore.fetch import Fetcher
from snapshotter.fuse.headstart import HeadStarts
from snapshotter.fuse.server import Server, _RegistryBlob
from tests.unit.test_hot import _layer, _optimized, _toc

RNG = random.Random(11)
FILES = {f"lib/{i}": RNG.randbytes(40_000) for i in range(6)}
DIGEST = "sha256:" + "d" * 64


def _blob() -> tuple[bytes, Any]:
    _, blob = _layer(FILES)
    names = [e.name.decode() for e in _toc(blob).entries]
    pages = [(names.index(f"lib/{i}"), 0, 8) for i in (3, 0, 5, 1)]
    return _optimized(blob, pages, frame_size=3 * 4096)


class _Client:
    """The registry client's open_range over a blob in memory: each range is written into a
    pipe by a thread, a piece at a time, so reads see it arrive."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.opened: list[tuple[int, int]] = []
        self.reads: list[tuple[int, int]] = []
        self.flip_at: int | None = None  # a byte the "network" corrupts

    def read_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.blob[offset:offset + length]

    def open_range(self, repo: str, digest: str, offset: int, length: int) -> BinaryIO:
        self.opened.append((offset, length))
        data = bytearray(self.blob[offset:offset + length])
        if self.flip_at is not None and offset <= self.flip_at < offset + length:
            data[self.flip_at - offset] ^= 0xFF
        r, w = os.pipe()

        def feed() -> None:
            with contextlib.suppress(BrokenPipeError), os.fdopen(w, "wb", buffering=0) as out:
                for i in range(0, len(data), 1000):  # the reader may stop early
                    out.write(data[i:i + 1000])

        threading.Thread(target=feed, daemon=True).start()
        return cast(BinaryIO, os.fdopen(r, "rb"))


def _start(heads: HeadStarts, client: _Client, span: tuple[int, int]) -> bool:
    return heads.start(DIGEST, span[0], span[1],
                       lambda off, n: client.open_range("app", DIGEST, off, n))


def test_the_label_spans_the_hot_frames_from_the_toc_to_the_footer() -> None:
    new, toc = _blob()
    assert len(toc.hot_frames) > 1
    span = hot.frames_span(toc)
    assert span is not None
    footer = fmt.Footer.decode(new[-fmt.FOOTER_SIZE:])
    first = toc.hot_frames[0]
    assert span == (first.blob_offset, len(new) - fmt.FOOTER_SIZE - first.blob_offset)
    assert fmt.hot_after_toc(footer.toc_offset, footer.toc_size, span) == span
    # frames before the TOC (an older optimize), or far behind it: two requests
    assert fmt.hot_after_toc(footer.toc_offset, footer.toc_size, (0, 100)) is None
    far = footer.toc_offset + footer.toc_size + fmt.MAX_TOC_HOT_GAP + 1
    assert fmt.hot_after_toc(footer.toc_offset, footer.toc_size, (far, 100)) is None
    assert hot.frames_span(_toc(_layer(FILES)[1])) is None  # no profile, no label
    label = {fmt.ANN_HOT: f"{span[0]},{span[1]}"}
    assert fmt.hot_hint(label) == span
    for bad in ("", "1", "a,b", "-1,5", "5,0", f"0,{fmt.MAX_HOT_HINT + 1}", "1,2,3"):
        assert fmt.hot_hint({fmt.ANN_HOT: bad}) is None, bad
    assert fmt.hot_hint({}) is None


def test_the_hot_stream_uses_the_head_start_and_checks_every_frame(tmp_path: Path) -> None:
    new, toc = _blob()
    span = hot.frames_span(toc)
    assert span is not None
    client, heads = _Client(new), HeadStarts()
    assert _start(heads, client, span)
    assert not _start(heads, client, span)  # one per blob
    source = _RegistryBlob(cast(Any, client), "app", DIGEST, heads)
    fetcher = Fetcher(ChunkCache(tmp_path, 10**7))
    refs = hot.frame_refs(toc)
    got = dict(fetcher.stream(source, refs))
    assert client.opened == [span]  # the head start's request, and no other
    for ref in refs:
        frame = new[ref.blob_offset:ref.blob_offset + ref.compressed_size]
        assert got[ref] == zstandard.ZstdDecompressor().decompress(
            frame, max_output_size=ref.size)
        assert fetcher.is_cached(ref)
    # used once: the next stream for this blob asks the registry
    assert heads.take(DIGEST, span[0], span[1]) is None


@pytest.mark.allow_log_errors  # the damaged frame's warning
def test_a_damaged_frame_from_the_head_start_is_fetched_again_not_served(
        tmp_path: Path) -> None:
    new, toc = _blob()
    span = hot.frames_span(toc)
    assert span is not None
    refs = hot.frame_refs(toc)
    client, heads = _Client(new), HeadStarts()
    client.flip_at = refs[1].blob_offset + 10  # the second frame arrives damaged
    assert _start(heads, client, span)
    client.flip_at = None  # the registry itself is fine
    source = _RegistryBlob(cast(Any, client), "app", DIGEST, heads)
    fetcher = Fetcher(ChunkCache(tmp_path, 10**7))
    got = dict(fetcher.stream(source, refs))
    assert client.reads == [(refs[1].blob_offset, refs[1].compressed_size)]
    assert fetcher.stats.verify_failures == 1
    for ref in refs:
        assert Digest.of(got[ref]).raw == ref.digest


def test_a_range_outside_the_head_start_goes_to_the_registry() -> None:
    new, toc = _blob()
    span = hot.frames_span(toc)
    assert span is not None
    client, heads = _Client(new), HeadStarts()
    assert _start(heads, client, span)
    source = _RegistryBlob(cast(Any, client), "app", DIGEST, heads)
    with source.open_range(span[0] - 1, 10) as f:  # starts before it
        assert f.read(10) == new[span[0] - 1:span[0] + 9]
    assert client.opened == [span, (span[0] - 1, 10)]
    with source.open_range(span[0] + 7, 100) as f:  # inside: its bytes, skipped to there
        assert f.read(100) == new[span[0] + 7:span[0] + 107]
    assert len(client.opened) == 2


def test_head_starts_are_bounded_and_a_failed_one_says_so() -> None:
    heads = HeadStarts(max_bytes=1000)
    blob = bytes(range(256)) * 8

    def opener(off: int, n: int) -> BinaryIO:
        return io.BytesIO(blob[off:off + n])

    assert not heads.start("a", 0, 1001, opener)  # more than it may hold
    assert heads.start("a", 0, 600, opener)
    assert not heads.start("b", 0, 600, opener)  # 1200 together
    assert heads.start("b", 0, 400, opener)
    with pytest.raises(ValueError):
        heads.start("c", 0, 0, opener)

    def broken(off: int, n: int) -> BinaryIO:
        return io.BytesIO(blob[off:off + n // 2])  # the connection drops half way

    heads = HeadStarts()
    assert heads.start("x", 0, 100, broken)
    f = heads.take("x", 0, 100)
    assert f is not None
    with pytest.raises(OSError, match="head start failed"):
        f.read(100)


def test_an_unused_head_start_is_dropped_after_its_time() -> None:
    heads = HeadStarts(max_age=0.0)
    assert heads.start("a", 0, 10, lambda off, n: io.BytesIO(bytes(n)))
    assert heads.start("b", 0, 10, lambda off, n: io.BytesIO(bytes(n)))  # expires "a"
    assert heads.take("a", 0, 10) is None


def _server(tmp_path: Path, client: _Client) -> Server:
    server = Server(tmp_path / "mnt", ChunkCache(tmp_path / "cache", 10**7),
                    background_prefetch=False, prefetch_parallel=1)
    server._clients[("reg", True)] = cast(Any, client)
    return server


def _spec() -> dict[str, Any]:
    return {"kind": "registry", "host": "reg", "plain_http": True, "repo": "app",
            "digest": DIGEST}


class _TocCase:
    """An optimized blob served by an in-memory client to a real Server."""

    def __init__(self, tmp_path: Path):
        self.blob, self.toc = _blob()
        self.footer = fmt.Footer.decode(self.blob[-fmt.FOOTER_SIZE:])
        span = hot.frames_span(self.toc)
        assert span is not None
        self.span = span
        self.client = _Client(self.blob)
        self.server = _server(tmp_path, self.client)
        self.path = tmp_path / "toc"

    def ask(self, span: list[int] | None) -> dict[str, Any]:
        return self.server.op_toc({"source": _spec(), "path": str(self.path),
                                   "toc": [self.footer.toc_offset, self.footer.toc_size],
                                   "hot": span})

    @property
    def toc_bytes(self) -> bytes:
        return self.blob[self.footer.toc_offset:self.footer.toc_offset + self.footer.toc_size]


def test_one_range_brings_the_toc_and_then_the_hot_frames(tmp_path: Path) -> None:
    case = _TocCase(tmp_path)
    span, server, client = case.span, case.server, case.client
    assert case.ask(list(span)) == {"hot": True}
    assert case.path.read_bytes() == case.toc_bytes
    start = case.footer.toc_offset
    assert client.opened == [(start, span[0] + span[1] - start)]
    # warm-up names the frames: their stream is the rest of that response, checked frame by
    # frame, and the warm call's own head start finds one on its way
    assert not server.head_starts.start(DIGEST, span[0], span[1], lambda o, n: io.BytesIO())
    refs = hot.frame_refs(case.toc)
    got = dict(server.fetcher.stream(server._source(_spec()), refs))
    assert len(client.opened) == 1 and client.reads == []
    for ref in refs:
        frame = case.blob[ref.blob_offset:ref.blob_offset + ref.compressed_size]
        assert got[ref] == zstandard.ZstdDecompressor().decompress(
            frame, max_output_size=ref.size)


def test_a_toc_without_frames_behind_it_is_one_plain_read(tmp_path: Path) -> None:
    case = _TocCase(tmp_path)
    for hot_span in (None, [1, 10]):  # no frames, or frames before the TOC
        assert case.ask(hot_span) == {"hot": False}
        assert case.path.read_bytes() == case.toc_bytes
    assert case.client.opened == [] and len(case.client.reads) == 2


def test_no_single_request_when_the_frames_would_not_be_kept(tmp_path: Path) -> None:
    case = _TocCase(tmp_path)
    case.server.head_starts.max_bytes = case.span[1] - 1  # no memory for these frames
    assert not case.server.head_starts.room(DIGEST, case.span[1])
    assert case.ask(list(case.span)) == {"hot": False}
    assert case.path.read_bytes() == case.toc_bytes
    assert case.client.opened == [] and len(case.client.reads) == 1
