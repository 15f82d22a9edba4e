"""FastCDC: the native loop equals the Python reference, and cut points are frozen."""

from __future__ import annotations

import hashlib
import io
import random

import pytest

from chunkstore import chunker
from chunkstore.chunker import ChunkerParams, cut_points, cut_points_py, iter_chunks

SMALL = ChunkerParams(min_size=2048, avg_size=8192, max_size=32768)


def _data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_native_extension_is_built() -> None:
    assert chunker.native_available(), "run pip install -e . to build _native.fastcdc"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eof", [True, False])
def test_native_equals_reference(seed: int, eof: bool) -> None:
    data = _data(seed, 300_000 + seed * 7919)
    assert cut_points(data, SMALL, eof) == cut_points_py(data, SMALL, eof)


def test_native_equals_reference_default_params() -> None:
    data = _data(42, 3 * 1024 * 1024 + 17)
    assert cut_points(data, chunker.DEFAULT_PARAMS, True) == cut_points_py(
        data, chunker.DEFAULT_PARAMS, True
    )


def test_low_entropy_input_cuts_at_max() -> None:
    data = bytes(5 * SMALL.max_size + 5)
    cuts = cut_points(data, SMALL, True)
    assert cuts[:5] == [SMALL.max_size * (i + 1) for i in range(5)]
    assert cuts[-1] == len(data)


def test_sizes_respect_bounds() -> None:
    data = _data(7, 2_000_000)
    cuts = cut_points(data, SMALL, True)
    sizes = [b - a for a, b in zip([0, *cuts], cuts, strict=False)]
    assert all(SMALL.min_size <= s <= SMALL.max_size for s in sizes[:-1])
    assert 0 < sizes[-1] <= SMALL.max_size
    avg = sum(sizes) / len(sizes)
    assert SMALL.avg_size / 2 < avg < SMALL.avg_size * 2


@pytest.mark.parametrize("read_size", [1000, 4096, 65536, 10**6])
def test_iter_chunks_independent_of_read_size(read_size: int) -> None:
    data = _data(3, 700_000)
    expected = [b - a for a, b in zip([0, *cut_points(data, SMALL, True)],
                                      cut_points(data, SMALL, True), strict=False)]
    src = io.BytesIO(data)

    def read(n: int) -> bytes:
        return src.read(n)

    got = list(iter_chunks(read, len(data), SMALL))
    assert b"".join(got) == data
    assert [len(c) for c in got] == expected
    assert read_size  # the reader asks for what it needs; the split must not matter


def test_iter_chunks_on_short_and_empty_input() -> None:
    assert list(iter_chunks(io.BytesIO(b"").read, 0)) == []
    assert list(iter_chunks(io.BytesIO(b"abc").read, 3)) == [b"abc"]


def test_cut_points_resume_without_eof() -> None:
    data = _data(11, 500_000)
    whole = cut_points(data, SMALL, True)
    partial = cut_points(data[:200_000], SMALL, False)
    assert partial == whole[: len(partial)]
    assert 200_000 - partial[-1] < SMALL.max_size


# Frozen: changing the gear table, masks or the algorithm changes every converted
# image's chunk boundaries and breaks cross-version deduplication.


def _golden() -> dict[str, str]:
    from pathlib import Path

    path = Path(__file__).parent.parent / "golden" / "chunker.txt"
    return dict(line.split("=", 1) for line in path.read_text().split())


def test_gear_table_unchanged() -> None:
    table = b"".join(g.to_bytes(8, "little") for g in chunker.GEAR)
    assert hashlib.sha256(table).hexdigest() == _golden()["gear_sha256"]


def test_cut_points_unchanged() -> None:
    data = _data(1234, 4 * 1024 * 1024)
    cuts = cut_points(data, chunker.DEFAULT_PARAMS, True)
    assert ",".join(map(str, cuts)) == _golden()["cuts_seed1234_4mib"]
