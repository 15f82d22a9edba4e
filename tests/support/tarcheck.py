"""Compares a zest TOC and blob with the original tar, read independently by Python's tarfile."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from typing import BinaryIO

import zstandard

from chunkstore._pb import toc_pb2
from chunkstore.tarstream import clean_name

_TYPES = {
    tarfile.REGTYPE: toc_pb2.REG, tarfile.AREGTYPE: toc_pb2.REG, tarfile.CONTTYPE: toc_pb2.REG,
    tarfile.DIRTYPE: toc_pb2.DIR, tarfile.SYMTYPE: toc_pb2.SYMLINK,
    tarfile.LNKTYPE: toc_pb2.HARDLINK, tarfile.CHRTYPE: toc_pb2.CHAR,
    tarfile.BLKTYPE: toc_pb2.BLOCK, tarfile.FIFOTYPE: toc_pb2.FIFO,
}  # fmt: skip


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def assert_toc_matches_tar(toc: toc_pb2.TOC, tar: BinaryIO) -> dict[bytes, bytes]:
    """Every entry's metadata equals tarfile's reading. Returns regular files' contents
    by name when they are small enough to keep (for chunk checks)."""
    contents: dict[bytes, bytes] = {}
    with tarfile.open(fileobj=tar, mode="r|") as tf:
        members = []
        for m in tf:
            members.append(m)
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                contents[clean_name(_b(m.name))] = f.read()
    assert len(members) == len(toc.entries), "entry count differs from tarfile's"
    for m, e in zip(members, toc.entries, strict=True):
        name = clean_name(_b(m.name))
        assert e.name == name, (e.name, m.name)
        assert e.type == _TYPES[m.type], (name, e.type, m.type)
        assert e.mode == m.mode & 0o7777, name
        assert (e.uid, e.gid) == (m.uid, m.gid), name
        assert (e.uname, e.gname) == (m.uname, m.gname), name
        assert e.size == (m.size if m.isreg() else 0), name
        assert e.mtime + e.mtime_nsec / 1e9 == pytest_approx(m.mtime), name
        if m.issym():
            assert e.linkname == _b(m.linkname), name
        elif m.islnk():
            assert e.linkname == clean_name(_b(m.linkname)), name
        else:
            assert e.linkname == b"", name
        if m.ischr() or m.isblk():
            assert (e.devmajor, e.devminor) == (m.devmajor, m.devminor), name
        xattrs = {k[len("SCHILY.xattr."):]: _b(v) for k, v in m.pax_headers.items()
                  if k.startswith("SCHILY.xattr.")}
        assert {x.name: x.value for x in e.xattrs} == xattrs, name
        if m.isreg():
            data = contents[name]
            assert sum(c.size for c in e.chunks) == len(data), name
    return contents


def pytest_approx(value: float) -> object:
    import pytest

    return pytest.approx(value, abs=1e-6)


def assert_chunks_valid(
    toc: toc_pb2.TOC, read_range: Callable[[int, int], bytes], contents: dict[bytes, bytes]
) -> int:
    """Each chunk, read alone from the blob and decompressed alone, equals the file's bytes at
    its offset and has its digest. Returns the number of chunks checked."""
    dctx = zstandard.ZstdDecompressor()
    n = 0
    for e in toc.entries:
        for c in e.chunks:
            frame = read_range(c.blob_offset, c.compressed_size)
            assert len(frame) == c.compressed_size
            data = dctx.decompress(frame, max_output_size=c.size)
            assert len(data) == c.size, e.name
            assert hashlib.sha256(data).digest() == c.digest, e.name
            if e.name in contents:
                assert contents[e.name][c.file_offset : c.file_offset + c.size] == data, e.name
            n += 1
    return n


def assert_decodes_to(blob: bytes, tar: bytes) -> None:
    """Any zstd decoder, this library's and the zstd CLI's, gives back the original tar."""
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob),
                                                    read_across_frames=True) as r:
        assert r.read() == tar
    if shutil.which("zstd"):
        cli = subprocess.run(["zstd", "-d", "-c"], input=blob, capture_output=True, check=True)
        assert cli.stdout == tar
