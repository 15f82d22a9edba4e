"""Reading a source layer blob: verify its digest and size as it streams, undo its compression.

The manifest's word is checked, not trusted: the compressed bytes must hash to
the descriptor's digest and have its size, and decompression errors name the layer.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from typing import BinaryIO

import zstandard

from chunkstore.errors import FormatError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class VerifyingReader(io.RawIOBase):
    """Counts and hashes what passes through; `check()` compares with the descriptor."""

    def __init__(self, raw: BinaryIO, digest: str, size: int, what: str):
        self._raw = raw
        self._hash = hashlib.sha256()
        self._count = 0
        self._digest = digest
        self._size = size
        self._what = what
        self._peek = b""

    def readable(self) -> bool:
        return True

    def peek(self, n: int) -> bytes:
        while len(self._peek) < n:
            more = self._raw.read(n - len(self._peek))
            if not more:
                break
            self._hash.update(more)
            self._count += len(more)
            self._peek += more
        return self._peek[:n]

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self._peek:
            n = min(len(buf), len(self._peek))
            buf[:n] = self._peek[:n]
            self._peek = self._peek[n:]
            return n
        data = self._raw.read(len(buf))
        if self._count + len(data) > self._size:
            raise FormatError(f"{self._what}: blob is larger than the {self._size} bytes "
                              "its descriptor says")
        self._hash.update(data)
        self._count += len(data)
        buf[: len(data)] = data
        return len(data)

    def check(self) -> None:
        """Read to the end, then compare size and digest with the descriptor."""
        while self.read(1024 * 1024):
            pass
        if self._count != self._size:
            raise FormatError(f"{self._what}: blob has {self._count} bytes, its descriptor "
                              f"says {self._size}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest:
            raise FormatError(f"{self._what}: blob digest is {actual}, its descriptor says "
                              f"{self._digest}")


class _Translating(io.RawIOBase):
    """Turns decompressor exceptions into FormatError naming the layer."""

    def __init__(self, inner: BinaryIO, kind: str, what: str):
        self._inner = inner
        self._kind = kind
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        try:
            data = self._inner.read(len(buf))
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise FormatError(f"{self._what}: corrupt {self._kind} data: {exc}") from exc
        buf[: len(data)] = data
        return len(data)


class _ZstdStrict(io.RawIOBase):
    """zstd stream reader that fails on a frame cut short (the library returns EOF quietly)."""

    def __init__(self, raw: BinaryIO):
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._raw = raw
        self._out = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        while not self._out and not self._eof:
            data = self._raw.read(256 * 1024)
            if not data:
                self._eof = True
                if not self._obj.eof and self._obj.unused_data == b"" and self._started:
                    raise zstandard.ZstdError("unexpected end of input (truncated zstd frame)")
                break
            self._feed(data)
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    _started = False

    def _feed(self, data: bytes) -> None:
        out = []
        while data:
            self._started = True
            out.append(self._obj.decompress(data))
            if self._obj.eof:
                data = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
                self._started = False
            else:
                data = b""
        self._out += b"".join(out)


def open_tar_stream(blob: VerifyingReader, what: str) -> tuple[BinaryIO, str]:
    """The uncompressed tar inside a layer blob, and the compression found by magic bytes."""
    head = blob.peek(4)
    buffered = io.BufferedReader(blob, buffer_size=1024 * 1024)
    inner: BinaryIO
    if head[:2] == GZIP_MAGIC:
        kind = "gzip"
        inner = gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[assignment]
    elif head[:4] == ZSTD_MAGIC:
        kind = "zstd"
        inner = io.BufferedReader(_ZstdStrict(buffered), buffer_size=1024 * 1024)
    else:
        kind = "tar"
        inner = buffered
    return io.BufferedReader(_Translating(inner, kind, what), buffer_size=1024 * 1024), kind
