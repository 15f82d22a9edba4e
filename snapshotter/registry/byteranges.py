"""Several byte ranges of a blob in one HTTP request (RFC 9110 section 14, multipart/byteranges).

A server may answer a multi-range request with the ranges as parts of a multipart/byteranges
body, with one 206 part when it merged them, or with the whole blob (200) when it does not do
multiple ranges (S3 and most CDNs). Parts are cut by their Content-Range lengths, never by
searching for the boundary, so blob bytes that happen to contain it cannot confuse the parse.
Nothing here is trusted further: every chunk is checked against its digest after the cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Range = tuple[int, int]  # (offset, length)

MAX_RANGES = 64  # per request: keeps the Range header to about 1.5 kB


class ByteRangesError(ValueError):
    """The answer does not hold the ranges asked for."""


def range_header(ranges: Sequence[Range]) -> str:
    return "bytes=" + ",".join(f"{off}-{off + n - 1}" for off, n in ranges)


def parse_content_range(value: str) -> tuple[int, int]:
    """`bytes FIRST-LAST/TOTAL` -> (FIRST, LAST + 1)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if m is None or int(m.group(2)) < int(m.group(1)):
        raise ByteRangesError(f"bad Content-Range {value!r}")
    return int(m.group(1)), int(m.group(2)) + 1


def boundary_of(content_type: str) -> str | None:
    """The boundary of a multipart/byteranges Content-Type; None for any other type."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/byteranges":
        return None
    m = re.search(r'boundary\s*=\s*("([^"]+)"|[^;\s]+)', params, re.IGNORECASE)
    if m is None:
        raise ByteRangesError(f"multipart/byteranges without a boundary: {content_type!r}")
    return m.group(2) or m.group(1)


def split_multipart(body: bytes, boundary: str) -> list[tuple[int, bytes]]:
    """(blob offset, bytes) of each part of a multipart/byteranges body."""
    delim = b"--" + boundary.encode("latin-1")
    parts: list[tuple[int, bytes]] = []
    pos = body.find(delim)
    if pos < 0:
        raise ByteRangesError("multipart body without its boundary")
    while True:
        pos += len(delim)
        if body[pos:pos + 2] == b"--":  # the closing delimiter
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise ByteRangesError("multipart part without the end of its headers")
        content_range = None
        for line in body[pos:head_end].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-range":
                content_range = value
        if content_range is None:
            raise ByteRangesError("multipart part without Content-Range")
        start, end = parse_content_range(content_range)
        data_at = head_end + 4
        data = body[data_at:data_at + end - start]
        if len(data) != end - start:
            raise ByteRangesError(f"part for bytes {start}-{end - 1} is cut short")
        parts.append((start, data))
        pos = body.find(delim, data_at + len(data))
        if pos < 0:
            raise ByteRangesError("multipart body ends without its closing boundary")


def pick(parts: Sequence[tuple[int, bytes]], ranges: Sequence[Range]) -> list[bytes]:
    """The bytes of each asked range, from parts that may be merged or out of order."""
    out = []
    for off, n in ranges:
        for start, data in parts:
            if start <= off and off + n <= start + len(data):
                out.append(data[off - start:off - start + n])
                break
        else:
            raise ByteRangesError(f"the answer lacks bytes {off}-{off + n - 1}")
    return out
