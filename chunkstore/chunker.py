"""Content-defined chunking (FastCDC with a gear hash and normalized chunking).

The byte loop is native (`_native.fastcdc`); buffering and parameters live here,
together with the pure-Python reference the native loop is tested against. The
gear table and masks are part of the format: changing them changes every cut
point, so tests/golden freezes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

from chunkstore.errors import FormatError

_fastcdc: ModuleType | None
try:
    from _native import fastcdc as _fastcdc
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _fastcdc = None


def _gear_table() -> list[int]:
    """256 pseudo-random 64-bit values: little-endian first 8 bytes of sha256("zest-gear" + i)."""
    return [
        int.from_bytes(hashlib.sha256(b"zest-gear" + bytes([i])).digest()[:8], "little")
        for i in range(256)
    ]


GEAR = _gear_table()
_U64 = (1 << 64) - 1

if _fastcdc is not None:
    _fastcdc.set_gear(GEAR)


def _top_bits(n: int) -> int:
    """A mask of the n highest bits of a 64-bit word: those depend on the last 64 bytes."""
    return ((1 << n) - 1) << (64 - n)


@dataclass(frozen=True)
class ChunkerParams:
    min_size: int = 64 * 1024
    avg_size: int = 256 * 1024
    max_size: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not (0 < self.min_size <= self.avg_size <= self.max_size):
            raise ValueError("chunker sizes must satisfy 0 < min <= avg <= max")
        if self.avg_size & (self.avg_size - 1):
            raise ValueError("chunker avg_size must be a power of two")
        if self.max_size >= 1 << 32:
            raise ValueError("chunker max_size must be below 4 GiB")

    @property
    def mask_s(self) -> int:
        """Harder to match before avg_size (normalization level 2)."""
        return _top_bits(self.avg_size.bit_length() - 1 + 2)

    @property
    def mask_l(self) -> int:
        """Easier to match after avg_size."""
        return _top_bits(self.avg_size.bit_length() - 1 - 2)


DEFAULT_PARAMS = ChunkerParams()


def _cut_py(data: memoryview, min_size: int, avg_size: int, max_size: int,
            mask_s: int, mask_l: int) -> int:
    n = len(data)
    if n <= min_size:
        return n
    limit = min(n, max_size)
    normal = min(avg_size, limit)
    fp = 0
    i = min_size
    gear = GEAR
    while i < normal:
        fp = ((fp << 1) + gear[data[i]]) & _U64
        i += 1
        if not fp & mask_s:
            return i
    while i < limit:
        fp = ((fp << 1) + gear[data[i]]) & _U64
        i += 1
        if not fp & mask_l:
            return i
    return limit


def cut_points_py(data: bytes | bytearray | memoryview, p: ChunkerParams, eof: bool) -> list[int]:
    """Reference implementation of `_native.fastcdc.cut_points`."""
    view = memoryview(data)
    out: list[int] = []
    pos = 0
    n = len(view)
    while pos < n:
        if not eof and n - pos < p.max_size:
            break
        pos += _cut_py(view[pos:], p.min_size, p.avg_size, p.max_size, p.mask_s, p.mask_l)
        out.append(pos)
    return out


def cut_points(data: bytes | bytearray | memoryview, p: ChunkerParams, eof: bool) -> list[int]:
    if _fastcdc is None:
        return cut_points_py(data, p, eof)
    cuts: list[int] = _fastcdc.cut_points(
        data, p.min_size, p.avg_size, p.max_size, p.mask_s, p.mask_l, eof
    )
    return cuts


def native_available() -> bool:
    return _fastcdc is not None


_READ_SIZE = 4 * 1024 * 1024


def iter_chunks(
    read: Callable[[int], bytes], length: int, params: ChunkerParams = DEFAULT_PARAMS
) -> Iterator[bytes]:
    """Yield the chunks of exactly `length` bytes read from `read`.

    The buffer always holds at least max_size bytes (or the rest of the data)
    before a cut is chosen, so cut points do not depend on read sizes.
    """
    remaining = length
    buf = b""
    while True:
        if remaining > 0:
            want = min(remaining, max(_READ_SIZE, params.max_size))
            piece = read(want)
            if len(piece) != want:
                raise FormatError(f"unexpected end of data: wanted {want} bytes, got {len(piece)}")
            remaining -= want
            buf = buf + piece if buf else piece
        eof = remaining == 0
        if not buf:
            return
        start = 0
        for end in cut_points(buf, params, eof):
            yield buf[start:end]
            start = end
        buf = buf[start:]
        if eof:
            return
