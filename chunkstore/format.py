"""Byte layout of a zest layer blob. Bytes in, bytes out; no I/O.

A blob is a valid zstd stream (docs/format.md gives the full spec):

    [zstd frame]...          the original tar, cut at chunk boundaries
    [skippable frame  TOC]   magic 0x184D2A5D, u32le size, zstd(TOC protobuf)
    [skippable frame  footer] magic 0x184D2A5E, u32le 64, payload below

Footer payload, 64 bytes, little-endian:

    off size field
      0    8 magic       b"zest.toc"
      8    4 version     FORMAT_VERSION
     12    4 flags       0 (reserved; readers refuse unknown bits)
     16    8 toc_offset  blob offset of the TOC frame's payload
     24    8 toc_size    length of that payload (zstd-compressed TOC)
     32   32 toc_digest  SHA-256 of that payload
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import zstandard

from chunkstore._pb import toc_pb2
from chunkstore.digest import Digest
from chunkstore.errors import FormatError

FORMAT_VERSION = 1
TOC_VERSION = 1

ZSTD_FRAME_MAGIC = 0xFD2FB528
SKIPPABLE_HOT = 0x184D2A5C  # hot frames (chunkstore/hot.py)
SKIPPABLE_TOC = 0x184D2A5D
SKIPPABLE_FOOTER = 0x184D2A5E
SKIPPABLE_PAD = 0x184D2A5B  # zeros between the TOC and the hot frames that follow it
_SKIPPABLE_HEADER = struct.Struct("<II")  # magic, payload size
SKIPPABLE_HEADER_SIZE = _SKIPPABLE_HEADER.size  # what precedes a skippable frame's payload

FOOTER_MAGIC = b"zest.toc"
_FOOTER = struct.Struct("<8sIIQQ32s")
FOOTER_PAYLOAD_SIZE = _FOOTER.size  # 64
FOOTER_SIZE = _SKIPPABLE_HEADER.size + FOOTER_PAYLOAD_SIZE  # 72

# Layer descriptor annotations: a snapshotter needs one range request for the TOC.
ANNOTATION_PREFIX = "dev.zest."
ANN_VERSION = ANNOTATION_PREFIX + "version"
ANN_TOC_OFFSET = ANNOTATION_PREFIX + "toc.offset"
ANN_TOC_SIZE = ANNOTATION_PREFIX + "toc.size"
ANN_TOC_DIGEST = ANNOTATION_PREFIX + "toc.digest"
# The TOC's place again, under containerd's snapshot-label prefix: containerd hands a layer
# descriptor's annotations that start with it to the snapshotter's Prepare as labels, so the
# TOC can be on its way while the snapshotter fetches the manifest. A hint only: what it
# fetches must match the manifest's dev.zest.toc.digest. Value: "<offset>,<size>,<digest>".
LABEL_TOC = "containerd.io/snapshot/zest.toc"
# Where an optimized layer's hot frames lie: "<offset>,<size>", one range that starts right
# after the TOC's payload (after a pad frame and the first frame's header), so one request
# brings the TOC and then the frames (blobs optimized by earlier builds: the range ends where
# the TOC's frame begins). A hint only: the stream is checked frame by frame against the TOC's
# hot_frames. LABEL_HOT says the same under the snapshot-label prefix, for the first request.
ANN_HOT = ANNOTATION_PREFIX + "hot"
LABEL_HOT = "containerd.io/snapshot/zest.hot"
# At most this many bytes (a pad frame, a frame header) between the TOC and its hot frames
# for one request to bring both
MAX_TOC_HOT_GAP = 4096
# A hot-frame hint larger than this is not followed (the frames are fetched as the TOC says).
MAX_HOT_HINT = 256 * 1024 * 1024

# A TOC larger than this is refused before decompression (protects the daemon's memory).
MAX_TOC_SIZE = 512 * 1024 * 1024


@dataclass(frozen=True)
class Footer:
    toc_offset: int
    toc_size: int
    toc_digest: Digest
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        payload = _FOOTER.pack(
            FOOTER_MAGIC, self.version, 0, self.toc_offset, self.toc_size, self.toc_digest.raw
        )
        return _SKIPPABLE_HEADER.pack(SKIPPABLE_FOOTER, len(payload)) + payload

    @classmethod
    def decode(cls, data: bytes) -> Footer:
        if len(data) != FOOTER_SIZE:
            raise FormatError(f"footer must be {FOOTER_SIZE} bytes, got {len(data)}")
        magic, size = _SKIPPABLE_HEADER.unpack_from(data)
        if magic != SKIPPABLE_FOOTER or size != FOOTER_PAYLOAD_SIZE:
            raise FormatError("not a zest layer: no zest footer at the end of the blob")
        fmagic, version, flags, offset, toc_size, digest = _FOOTER.unpack_from(data, 8)
        if fmagic != FOOTER_MAGIC:
            raise FormatError("not a zest layer: bad footer magic")
        if version != FORMAT_VERSION:
            raise FormatError(f"unsupported zest format version {version} (this zest reads 1)")
        if flags != 0:
            raise FormatError(f"unsupported zest footer flags {flags:#x}")
        if toc_size > MAX_TOC_SIZE:
            raise FormatError(f"TOC of {toc_size} bytes exceeds the {MAX_TOC_SIZE} byte limit")
        return cls(offset, toc_size, Digest(digest), version)


def hot_frame_header(payload_size: int) -> bytes:
    """The 8 bytes that precede a hot frame's zstd frame in the blob."""
    return _SKIPPABLE_HEADER.pack(SKIPPABLE_HOT, payload_size)


def pad_frame(size: int) -> bytes:
    """A skippable frame of exactly `size` bytes (0, or at least the 8-byte header)."""
    if size == 0:
        return b""
    if size < SKIPPABLE_HEADER_SIZE:
        raise ValueError(f"a pad frame takes at least {SKIPPABLE_HEADER_SIZE} bytes, not {size}")
    return _SKIPPABLE_HEADER.pack(SKIPPABLE_PAD, size - SKIPPABLE_HEADER_SIZE) + bytes(
        size - SKIPPABLE_HEADER_SIZE)


def toc_frame_header(payload_size: int) -> bytes:
    """The 8 bytes that precede the compressed TOC in the blob."""
    return _SKIPPABLE_HEADER.pack(SKIPPABLE_TOC, payload_size)


def encode_toc(toc: toc_pb2.TOC, level: int = 9) -> bytes:
    """Serialize and compress a TOC; the result is the TOC frame's payload."""
    return zstandard.ZstdCompressor(level=level).compress(toc.SerializeToString())


def decode_toc(payload: bytes, expected: Digest | None = None) -> toc_pb2.TOC:
    """Verify (when a digest is given), decompress and parse a TOC payload."""
    if expected is not None:
        expected.verify(payload, "TOC")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_TOC_SIZE * 8)
    except zstandard.ZstdError as exc:
        raise FormatError(f"TOC is not valid zstd: {exc}") from exc
    toc = toc_pb2.TOC()
    try:
        toc.ParseFromString(raw)
    except Exception as exc:  # protobuf raises DecodeError, a plain Exception subclass
        raise FormatError(f"TOC is not a valid protobuf message: {exc}") from exc
    if toc.version != TOC_VERSION:
        raise FormatError(f"unsupported TOC version {toc.version} (this zest reads 1)")
    return toc


def toc_annotations(footer: Footer) -> dict[str, str]:
    return {
        ANN_VERSION: str(footer.version),
        ANN_TOC_OFFSET: str(footer.toc_offset),
        ANN_TOC_SIZE: str(footer.toc_size),
        ANN_TOC_DIGEST: str(footer.toc_digest),
        LABEL_TOC: f"{footer.toc_offset},{footer.toc_size},{footer.toc_digest}",
    }


def toc_hint(labels: Mapping[str, str]) -> Footer | None:
    """The TOC's place from a Prepare's labels (LABEL_TOC), or None when there is none or it
    does not parse: it is only a head start, never trusted for more."""
    try:
        offset, size, digest = labels[LABEL_TOC].split(",")
        footer = Footer(int(offset), int(size), Digest.parse(digest))
    except (KeyError, ValueError, FormatError):
        return None
    return footer if footer.toc_offset >= 0 and 0 < footer.toc_size <= MAX_TOC_SIZE else None


def hot_hint(annotations: Mapping[str, str], key: str = ANN_HOT) -> tuple[int, int] | None:
    """The hot frames' (offset, size) from ANN_HOT (or LABEL_HOT in a Prepare's labels), or
    None when absent or malformed."""
    try:
        offset, size = (int(x) for x in annotations[key].split(","))
    except (KeyError, ValueError):
        return None
    return (offset, size) if offset >= 0 and 0 < size <= MAX_HOT_HINT else None


def hot_after_toc(toc_offset: int, toc_size: int,
                  hot: tuple[int, int] | None) -> tuple[int, int] | None:
    """The hot frames' span when it follows the TOC's payload closely enough for one range
    request to bring both, else None."""
    if hot is None:
        return None
    gap = hot[0] - (toc_offset + toc_size)
    return hot if 0 <= gap <= MAX_TOC_HOT_GAP else None


def footer_from_annotations(annotations: dict[str, str]) -> Footer | None:
    """The TOC location from a layer descriptor, or None when it is not a zest layer."""
    if ANN_TOC_DIGEST not in annotations:
        return None
    try:
        version = int(annotations.get(ANN_VERSION, "1"))
        offset = int(annotations[ANN_TOC_OFFSET])
        size = int(annotations[ANN_TOC_SIZE])
    except (KeyError, ValueError) as exc:
        raise FormatError(f"bad zest layer annotations: {exc}") from exc
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported zest format version {version} (this zest reads 1)")
    if size > MAX_TOC_SIZE or offset < 0:
        raise FormatError(f"bad zest layer annotations: TOC offset {offset} size {size}")
    return Footer(offset, size, Digest.parse(annotations[ANN_TOC_DIGEST]), version)
