"""Multi-range answers: parsing, merged parts, and the client's fallback to one range a
request when a registry answers with the whole blob."""

from __future__ import annotations

import os

import httpx
import pytest

from snapshotter.registry import byteranges as br
from snapshotter.registry.auth import ANONYMOUS
from snapshotter.registry.client import RegistryClient

BLOB = os.urandom(5000)
DIGEST = "sha256:" + "ab" * 32
BOUNDARY = "3d6b6a416f9b5"


def _multipart(ranges: list[tuple[int, int]], boundary: str = BOUNDARY) -> bytes:
    body = b""
    for off, n in ranges:
        body += (f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Range: bytes {off}-{off + n - 1}/{len(BLOB)}\r\n\r\n").encode()
        body += BLOB[off:off + n]
    return body + f"\r\n--{boundary}--\r\n".encode()


def test_range_header_and_content_range() -> None:
    assert br.range_header([(0, 10), (100, 1)]) == "bytes=0-9,100-100"
    assert br.parse_content_range("bytes 100-119/5000") == (100, 120)
    for bad in ("bytes 9-1/10", "items 0-1/2", "bytes 0-/10", ""):
        with pytest.raises(br.ByteRangesError):
            br.parse_content_range(bad)


def test_boundary_of() -> None:
    assert br.boundary_of(f"multipart/byteranges; boundary={BOUNDARY}") == BOUNDARY
    assert br.boundary_of('multipart/byteranges; boundary="a b"') == "a b"
    assert br.boundary_of("application/octet-stream") is None
    with pytest.raises(br.ByteRangesError):
        br.boundary_of("multipart/byteranges")


def test_parts_are_cut_by_length_even_when_data_holds_the_boundary() -> None:
    global BLOB
    saved = BLOB
    BLOB = BLOB[:200] + f"\r\n--{BOUNDARY}\r\n".encode() + BLOB[220:]
    try:
        ranges = [(150, 100), (4000, 17), (0, 3)]
        parts = br.split_multipart(_multipart(ranges), BOUNDARY)
        assert br.pick(parts, ranges) == [BLOB[o:o + n] for o, n in ranges]
    finally:
        BLOB = saved


def test_pick_from_merged_parts_and_missing_ranges() -> None:
    parts = [(100, BLOB[100:400])]
    assert br.pick(parts, [(300, 50), (100, 10)]) == [BLOB[300:350], BLOB[100:110]]
    with pytest.raises(br.ByteRangesError):
        br.pick(parts, [(390, 20)])
    with pytest.raises(br.ByteRangesError):
        br.split_multipart(_multipart([(0, 10)])[:-40], BOUNDARY)  # cut short


def _client(handler: httpx.MockTransport) -> RegistryClient:
    return RegistryClient("registry.test", credentials=ANONYMOUS, transport=handler)


def _ranges_of(request: httpx.Request) -> list[tuple[int, int]]:
    spec = request.headers["Range"].removeprefix("bytes=")
    out = []
    for item in spec.split(","):
        first, last = (int(x) for x in item.split("-"))
        out.append((first, last - first + 1))
    return out


def test_client_reads_several_ranges_in_one_request() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Range"])
        body = _multipart(_ranges_of(request))
        return httpx.Response(206, content=body, headers={
            "Content-Type": f"multipart/byteranges; boundary={BOUNDARY}"})

    client = _client(httpx.MockTransport(handler))
    ranges = [(0, 10), (1000, 500), (4990, 10)]
    assert client.read_ranges("r", DIGEST, ranges) == [BLOB[o:o + n] for o, n in ranges]
    assert len(seen) == 1 and client.multirange is True


def test_client_falls_back_when_the_registry_sends_the_whole_blob() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Range"])
        ranges = _ranges_of(request)
        if len(ranges) > 1:  # like S3: several ranges are not done, here is everything
            return httpx.Response(200, content=BLOB)
        (off, n), = ranges
        return httpx.Response(206, content=BLOB[off:off + n], headers={
            "Content-Range": f"bytes {off}-{off + n - 1}/{len(BLOB)}"})

    client = _client(httpx.MockTransport(handler))
    ranges = [(0, 10), (1000, 500)]
    assert client.read_ranges("r", DIGEST, ranges) == [BLOB[o:o + n] for o, n in ranges]
    assert client.multirange is False
    assert len(seen) == 3  # the refused multi-range request, then one per range
    seen.clear()
    assert client.read_ranges("r", DIGEST, ranges) == [BLOB[o:o + n] for o, n in ranges]
    assert len(seen) == 2  # remembered: no multi-range request any more


def test_client_accepts_a_merged_single_part() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        ranges = _ranges_of(request)
        lo = min(o for o, _ in ranges)
        hi = max(o + n for o, n in ranges)
        return httpx.Response(206, content=BLOB[lo:hi], headers={
            "Content-Range": f"bytes {lo}-{hi - 1}/{len(BLOB)}"})

    client = _client(httpx.MockTransport(handler))
    ranges = [(10, 5), (20, 5)]
    assert client.read_ranges("r", DIGEST, ranges) == [BLOB[10:15], BLOB[20:25]]
