"""Hot frames: packing recorded pages, the blob staying a valid layer, and the index."""

from __future__ import annotations

import io
import random
import struct
import tarfile

import pytest
import zstandard

from chunkstore import format as fmt
from chunkstore import hot
from chunkstore import toc as tocmod
from chunkstore._pb import toc_pb2
from chunkstore.chunker import ChunkerParams
from chunkstore.convert import convert_tar
from chunkstore.digest import Digest
from chunkstore.errors import FormatError
from tests.support.tarcheck import assert_decodes_to

P = ChunkerParams(min_size=4096, avg_size=16384, max_size=65536)


def _layer(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    out = io.BytesIO()
    convert_tar(io.BytesIO(tar), out, params=P, threads=1)
    return tar, out.getvalue()


def _toc(blob: bytes) -> toc_pb2.TOC:
    def read(off: int, n: int) -> bytes:
        return blob[off : off + n]

    return tocmod.load_toc(read, tocmod.read_footer(read, len(blob)))


def _optimized(blob: bytes, pages: list[tuple[int, int, int]],
               frame_size: int = hot.HOT_FRAME_SIZE) -> tuple[bytes, toc_pb2.TOC]:
    toc = _toc(blob)
    footer = tocmod.read_footer(lambda o, n: blob[o : o + n], len(blob))
    f = io.BytesIO(blob)
    hot.finish_blob(f, footer.toc_offset - 8, toc, pages, frame_size)
    new = f.getvalue()
    return new, _toc(new)


RNG = random.Random(5)
FILES = {
    "bin/a": RNG.randbytes(300_000),
    "lib/b": bytes(RNG.choice(b"abcdefgh") for _ in range(200_001)),
    "etc/c": b"short\n",
}


def test_hot_frames_hold_the_recorded_pages_and_the_layer_stays_the_same_tar() -> None:
    tar, blob = _layer(FILES)
    names = [e.name.decode() for e in _toc(blob).entries]
    a, b, c = (names.index(n) for n in ("bin/a", "lib/b", "etc/c"))
    # first-touch order, across files; b's last page is cut at the file's end
    pages = [(b, 0, 2), (a, 10, 3), (c, 0, 1), (b, 48, 1), (a, 0, 1)]
    new, toc = _optimized(blob, pages)
    assert len(toc.hot_frames) == 1
    assert [(h.entry, h.file_offset, h.length) for h in toc.hot] == [
        (b, 0, 8192), (a, 40960, 12288), (c, 0, 6), (b, 196608, 200_001 - 196608), (a, 0, 4096)]
    # plain zstd decoders skip hot frames: the blob is still the original tar
    assert_decodes_to(new, tar)
    # the chunk frames are the old blob's, byte for byte
    old_toc = _toc(blob)
    assert [list(e.chunks) for e in toc.entries] == [list(e.chunks) for e in old_toc.entries]
    # each frame verifies, and each run is the file's bytes
    f = toc.hot_frames[0]
    data = zstandard.ZstdDecompressor().decompress(
        new[f.blob_offset : f.blob_offset + f.compressed_size], max_output_size=f.size)
    assert Digest(f.digest).raw == Digest.of(data).raw and len(data) == f.size
    by_entry = {a: FILES["bin/a"], b: FILES["lib/b"], c: FILES["etc/c"]}
    for h in toc.hot:
        got = data[h.frame_offset : h.frame_offset + h.length]
        assert got == by_entry[h.entry][h.file_offset : h.file_offset + h.length]


def test_runs_are_split_at_frame_boundaries_and_the_index_finds_them() -> None:
    _, blob = _layer(FILES)
    a = [e.name for e in _toc(blob).entries].index(b"bin/a")
    _, toc = _optimized(blob, [(a, 0, 20)], frame_size=32768)
    assert len(toc.hot_frames) == 3  # 80 KiB in 32 KiB frames
    assert [(h.frame, h.file_offset, h.length) for h in toc.hot] == [
        (0, 0, 32768), (1, 32768, 32768), (2, 65536, 16384)]
    idx = hot.HotIndex(toc)
    pieces = idx.cover(a, 30000, 40000)
    assert pieces == [hot.Piece(0, 30000, 2768), hot.Piece(1, 0, 7232)]
    assert idx.cover(a, 80000, 82000) is None  # past the recorded pages
    assert idx.cover(a + 1, 0, 10) is None
    assert [len(r) for r in idx.by_frame] == [1, 1, 1]


def test_a_hot_run_outside_its_frame_or_file_is_refused() -> None:
    _, blob = _layer(FILES)
    _, toc = _optimized(blob, [(0, 0, 1)])
    toc.hot[0].frame_offset = toc.hot_frames[0].size
    with pytest.raises(FormatError, match="outside"):
        hot.HotIndex(toc)
    toc.hot[0].frame_offset = 0
    toc.hot[0].file_offset = toc.entries[toc.hot[0].entry].size
    with pytest.raises(FormatError, match="outside"):
        hot.HotIndex(toc)


def test_recorded_pages_past_a_file_or_the_toc_are_dropped_and_bad_runs_refused() -> None:
    _, blob = _layer(FILES)
    toc = _toc(blob)
    c = [e.name for e in toc.entries].index(b"etc/c")
    sizes = {c: 6}
    assert hot.page_runs([(c, 0, 1), (c, 1, 5), (99, 0, 1)], lambda k: sizes.get(k, 0)) == [
        (c, 0, 6)]
    with pytest.raises(FormatError, match="regular file"):
        hot.write_hot(lambda d: None, 0, toc, lambda o, n: blob[o : o + n], [(c, 4, 4096)])


def test_hot_frames_follow_the_toc_so_one_range_brings_both() -> None:
    tar, blob = _layer(FILES)
    a = [e.name for e in _toc(blob).entries].index(b"bin/a")
    new, toc = _optimized(blob, [(a, 0, 20)], frame_size=32768)
    footer = tocmod.read_footer(lambda o, n: new[o : o + n], len(new))
    span = hot.frames_span(toc)
    assert span is not None and span[0] > footer.toc_offset
    assert fmt.hot_after_toc(footer.toc_offset, footer.toc_size, span) == span
    # TOC, maybe a pad frame, the frames back to back, the footer last
    pos = footer.toc_offset + footer.toc_size
    skippable = struct.Struct("<II")
    magic, size = skippable.unpack_from(new, pos)
    if magic == fmt.SKIPPABLE_PAD:
        assert new[pos + 8 : pos + 8 + size] == bytes(size)
        pos += 8 + size
    for f in toc.hot_frames:
        assert skippable.unpack_from(new, pos) == (fmt.SKIPPABLE_HOT, f.compressed_size)
        assert f.blob_offset == pos + 8
        pos = f.blob_offset + f.compressed_size
    assert pos == len(new) - fmt.FOOTER_SIZE
    assert_decodes_to(new, tar)
    # optimized again (another profile): the old frames go, the chunk frames stay
    again, toc2 = _optimized(new, [(a, 5, 1)])
    frames_end = footer.toc_offset - 8
    assert len(toc2.hot_frames) == 1 and again[:frames_end] == new[:frames_end]
    assert_decodes_to(again, tar)


@pytest.mark.parametrize("frames", [1, 3, 40, 300])
def test_the_toc_settles_around_its_frames_offsets(frames: int) -> None:
    toc = toc_pb2.TOC(version=1)
    for i in range(frames):  # offsets relative to the first frame, as write_hot leaves them
        toc.hot_frames.add(blob_offset=8 + i * 70_000, compressed_size=69_992, size=1 << 19,
                           digest=bytes(32))
    base = 123_456_789
    payload, pad = hot._place_toc(toc, base)
    assert pad == 0 or pad >= 8
    assert fmt.encode_toc(toc) == payload  # the offsets in it are the ones it was sized for
    assert toc.hot_frames[0].blob_offset == base + len(payload) + pad + 8
    assert fmt.pad_frame(pad) == (b"" if pad == 0 else struct.pack("<II", fmt.SKIPPABLE_PAD,
                                                                   pad - 8) + bytes(pad - 8))
