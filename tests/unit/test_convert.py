"""Converter round trips on generated tars covering the awkward corners of the format."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from chunkstore import format as fmt
from chunkstore import toc as tocmod
from chunkstore._pb import toc_pb2
from chunkstore.chunker import ChunkerParams
from chunkstore.convert import convert_tar
from chunkstore.digest import Digest
from chunkstore.errors import FormatError, UnsupportedError
from tests.support.tarcheck import assert_chunks_valid, assert_decodes_to, assert_toc_matches_tar

P = ChunkerParams(min_size=4096, avg_size=16384, max_size=65536)


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt_: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt_) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _info(name: str, type_: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mtime = 1_700_000_000
    ti.mode = 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _roundtrip(tar: bytes, params: ChunkerParams = P) -> tuple[toc_pb2.TOC, bytes]:
    out = io.BytesIO()
    res = convert_tar(io.BytesIO(tar), out, params=params, threads=2)
    blob = out.getvalue()
    assert res.blob_size == len(blob)
    assert res.blob_digest == Digest.of(blob)
    assert res.diff_id == Digest.of(tar)
    assert res.tar_size == len(tar)

    def read(off: int, n: int) -> bytes:
        return blob[off : off + n]

    footer = tocmod.read_footer(read, len(blob))
    assert footer == res.footer
    toc = tocmod.load_toc(read, footer)
    tocmod.check_chunk_table(toc, len(blob))
    assert toc.tar_digest == Digest.of(tar).raw
    # any zstd decoder gives back the original tar
    import zstandard

    assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) is not None
    assert_decodes_to(blob, tar)
    if not tar:  # tarfile refuses a zero-byte stream; there is nothing to compare
        assert len(toc.entries) == 0
        return toc, blob
    contents = assert_toc_matches_tar(toc, io.BytesIO(tar))
    assert_chunks_valid(toc, read, contents)
    return toc, blob


def test_mixed_tree_roundtrip() -> None:
    rnd = random.Random(5)
    members = [
        (_info("./", tarfile.DIRTYPE, mode=0o755), b""),
        (_info("./etc", tarfile.DIRTYPE, mode=0o755), b""),
        (_info("./etc/empty"), b""),
        (_info("./etc/small", uid=1000, gid=1000, uname="u", gname="g"), b"hello\n"),
        (_info("./bin/big", mode=0o4755), rnd.randbytes(300_000)),
        (_info("./bin/link", tarfile.SYMTYPE, linkname="big"), b""),
        (_info("./bin/hard", tarfile.LNKTYPE, linkname="./bin/big"), b""),
        (_info("./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
        (_info("./dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), b""),
        (_info("./run/fifo", tarfile.FIFOTYPE), b""),
        (_info("./etc/.wh.removed"), b""),
        (_info("./var/.wh..wh..opq"), b""),
        (_info("./caps", pax_headers={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
                                      "SCHILY.xattr.user.note": "x"}), b"#!/bin/sh\n"),
    ]
    toc, _ = _roundtrip(_tar(members))
    by = {e.name: e for e in toc.entries}
    assert by[b""].type == toc_pb2.DIR
    assert by[b"bin/hard"].linkname == b"bin/big"
    assert by[b"bin/big"].mode == 0o4755
    assert len(by[b"bin/big"].chunks) > 1
    assert by[b"dev/null"].devmajor == 1 and by[b"dev/null"].devminor == 3
    assert {x.name for x in by[b"caps"].xattrs} == {"security.capability", "user.note"}
    assert by[b"etc/empty"].chunks == []


def test_empty_layer() -> None:
    toc, blob = _roundtrip(_tar([]))
    assert len(toc.entries) == 0
    toc2, _ = _roundtrip(b"")  # a zero-byte layer is a valid (if odd) tar stream
    assert toc2.tar_size == 0
    assert len(blob) > fmt.FOOTER_SIZE


@pytest.mark.parametrize("size", [P.min_size - 1, P.min_size, P.avg_size, P.max_size,
                                  P.max_size + 1, 2 * P.max_size, 3 * P.max_size - 1])
def test_files_at_chunk_boundaries(size: int) -> None:
    data = bytes(size)  # low entropy: cuts fall exactly at max_size
    toc, _ = _roundtrip(_tar([(_info("f"), data)]))
    chunks = toc.entries[0].chunks
    assert sum(c.size for c in chunks) == size
    assert all(c.size <= P.max_size for c in chunks)
    assert len(chunks) == -(-size // P.max_size)


@pytest.mark.parametrize("fmt_", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_and_links(fmt_: int) -> None:
    long = "d" * 120 + "/" + "f" * 150
    members = [
        (_info(long), b"data"),
        (_info("l" * 130, tarfile.SYMTYPE, linkname="t" * 140), b""),
        (_info("h" * 110, tarfile.LNKTYPE, linkname=long), b""),
    ]
    toc, _ = _roundtrip(_tar(members, fmt_))
    assert toc.entries[0].name == long.encode()
    assert toc.entries[1].linkname == b"t" * 140
    assert toc.entries[2].linkname == long.encode()


def test_non_utf8_names() -> None:
    name = b"caf\xe9/na\xefve\xff".decode("utf-8", "surrogateescape")
    members = [(_info(name), b"latin-1 name"),
               (_info("ok", tarfile.SYMTYPE, linkname=name), b"")]
    for f in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        toc, _ = _roundtrip(_tar(members, f))
        assert toc.entries[0].name == b"caf\xe9/na\xefve\xff"
        assert toc.entries[1].linkname == b"caf\xe9/na\xefve\xff"


def test_pax_mtime_fraction_and_big_ids() -> None:
    ti = _info("f", pax_headers={"mtime": "1700000000.123456789", "uid": "3000000000"})
    toc, _ = _roundtrip(_tar([(ti, b"x")]))
    e = toc.entries[0]
    assert (e.mtime, e.mtime_nsec) == (1_700_000_000, 123_456_789)
    assert e.uid == 3_000_000_000


def test_trailing_bytes_after_end_of_archive_are_kept() -> None:
    tar = _tar([(_info("f"), b"abc")]) + b"\0" * 4096 + b"trailing garbage"
    toc, _ = _roundtrip(tar)
    assert toc.tar_size == len(tar)


def test_gnu_sparse_is_refused() -> None:
    h = bytearray(_tar([(_info("sparse"), b"")], tarfile.GNU_FORMAT)[:512])
    h[156:157] = b"S"
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    with pytest.raises(UnsupportedError, match="sparse"):
        convert_tar(io.BytesIO(bytes(h) + bytes(1024)), io.BytesIO())


def test_pax_sparse_is_refused() -> None:
    ti = _info("s", pax_headers={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})
    with pytest.raises(UnsupportedError, match="sparse"):
        convert_tar(io.BytesIO(_tar([(ti, b"x")])), io.BytesIO())


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../../b", "/etc/passwd"])
def test_unsafe_paths_are_refused(name: str) -> None:
    with pytest.raises(FormatError, match=r"absolute|\.\."):
        convert_tar(io.BytesIO(_tar([(_info(name), b"x")])), io.BytesIO())


def test_unsafe_hardlink_target_is_refused() -> None:
    tar = _tar([(_info("h", tarfile.LNKTYPE, linkname="../../x"), b"")])
    with pytest.raises(FormatError, match=r"\.\."):
        convert_tar(io.BytesIO(tar), io.BytesIO())


@pytest.mark.parametrize("cut", [100, 700, 1500])
def test_truncated_tar_is_refused(cut: int) -> None:
    tar = _tar([(_info("f"), bytes(2000))])
    with pytest.raises(FormatError, match="truncated"):
        convert_tar(io.BytesIO(tar[:cut]), io.BytesIO())


def test_corrupt_header_checksum_is_refused() -> None:
    tar = bytearray(_tar([(_info("f"), b"x")]))
    tar[10] ^= 0xFF
    with pytest.raises(FormatError, match="checksum"):
        convert_tar(io.BytesIO(bytes(tar)), io.BytesIO())


def test_base256_size_field_parses() -> None:
    from chunkstore.tarstream import _num

    assert _num(b"\x80" + (5 << 32).to_bytes(11, "big"), "size") == 5 << 32
    assert _num(b"00000000017\0", "size") == 0o17


def test_toc_fields_hold_sizes_over_4_gib() -> None:
    e = toc_pb2.Entry(name=b"huge", size=6 << 30)
    e.chunks.add(file_offset=5 << 30, blob_offset=(5 << 30) + 123, compressed_size=10,
                 size=1 << 20, digest=bytes(32))
    toc = toc_pb2.TOC(version=fmt.TOC_VERSION, tar_size=7 << 30)
    toc.entries.append(e)
    back = fmt.decode_toc(fmt.encode_toc(toc))
    assert back.entries[0].size == 6 << 30
    assert back.entries[0].chunks[0].blob_offset == (5 << 30) + 123
    assert back.tar_size == 7 << 30


def test_identical_files_share_chunk_digests() -> None:
    data = random.Random(9).randbytes(200_000)
    toc, _ = _roundtrip(_tar([(_info("a"), data), (_info("b"), data)]))
    a, b = toc.entries
    assert [c.digest for c in a.chunks] == [c.digest for c in b.chunks]
    assert a.chunks[0].blob_offset != b.chunks[0].blob_offset
