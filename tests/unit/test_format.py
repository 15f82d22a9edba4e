"""Footer and TOC framing: frozen bytes and every check a reader makes."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkstore import format as fmt
from chunkstore._pb import toc_pb2
from chunkstore.digest import Digest
from chunkstore.errors import DigestMismatch, FormatError

GOLDEN = Path(__file__).parent.parent / "golden"


def _footer() -> fmt.Footer:
    return fmt.Footer(toc_offset=123456, toc_size=789, toc_digest=Digest(bytes(range(32))))


def test_footer_bytes_unchanged() -> None:
    assert _footer().encode().hex() == (GOLDEN / "footer.hex").read_text().strip()
    assert len(_footer().encode()) == fmt.FOOTER_SIZE == 72


def test_footer_roundtrip() -> None:
    assert fmt.Footer.decode(_footer().encode()) == _footer()


@pytest.mark.parametrize(("offset", "value", "match"), [
    (0, b"\x50", "no zest footer"), (8, b"X", "magic"), (16, b"\x02", "version"),
    (20, b"\x01", "flags"),
])  # fmt: skip
def test_footer_checks(offset: int, value: bytes, match: str) -> None:
    raw = bytearray(_footer().encode())
    raw[offset : offset + len(value)] = value
    with pytest.raises(FormatError, match=match):
        fmt.Footer.decode(bytes(raw))


def test_footer_is_a_skippable_frame() -> None:
    raw = _footer().encode()
    assert int.from_bytes(raw[:4], "little") & 0xFFFFFFF0 == 0x184D2A50
    assert int.from_bytes(raw[4:8], "little") == len(raw) - 8


def test_toc_digest_is_checked() -> None:
    payload = fmt.encode_toc(toc_pb2.TOC(version=1))
    fmt.decode_toc(payload, Digest.of(payload))
    with pytest.raises(DigestMismatch):
        fmt.decode_toc(payload, Digest(bytes(32)))


def test_toc_garbage_and_version() -> None:
    with pytest.raises(FormatError, match="zstd"):
        fmt.decode_toc(b"not zstd")
    with pytest.raises(FormatError, match="version"):
        fmt.decode_toc(fmt.encode_toc(toc_pb2.TOC(version=9)))


def test_annotations_roundtrip() -> None:
    ann = fmt.toc_annotations(_footer())
    assert set(ann) == {"dev.zest.version", "dev.zest.toc.offset", "dev.zest.toc.size",
                        "dev.zest.toc.digest", "containerd.io/snapshot/zest.toc"}
    assert fmt.footer_from_annotations(ann) == _footer()
    assert fmt.footer_from_annotations({}) is None
    with pytest.raises(FormatError):
        fmt.footer_from_annotations({**ann, "dev.zest.toc.size": "x"})


def test_the_toc_hint_label_is_read_leniently() -> None:
    """containerd passes the `containerd.io/snapshot/` annotation to Prepare as a label: a
    head start for the TOC fetch, so a bad one is ignored, never an error."""
    ann = fmt.toc_annotations(_footer())
    assert fmt.toc_hint(ann) == _footer()
    assert fmt.toc_hint({}) is None
    for bad in ("1,2", "x,2,sha256:" + "0" * 64, "1,2,md5:00", "-1,2,sha256:" + "0" * 64,
                f"1,{fmt.MAX_TOC_SIZE + 1},sha256:" + "0" * 64, "1,0,sha256:" + "0" * 64):
        assert fmt.toc_hint({fmt.LABEL_TOC: bad}) is None, bad


def test_summary_counts_what_the_prefetch_list_fetches() -> None:
    from chunkstore.toc import summarize

    toc = toc_pb2.TOC(tar_size=10_000)
    for i, name in enumerate((b"a", b"b")):
        e = toc.entries.add(name=name, type=toc_pb2.REG, size=2000)
        for j in range(2):
            e.chunks.add(file_offset=j * 1000, blob_offset=i * 4000 + j * 2000,
                         compressed_size=100 * (i * 2 + j + 1), size=1000,
                         digest=bytes([i * 2 + j]) * 32)
    toc.prefetch.extend([6000, 0, 6000, 12345])  # a repeat, and an offset of no chunk
    s = summarize(toc)
    assert (s.chunks, s.prefetch, s.prefetch_bytes) == (4, 4, 400 + 100)
