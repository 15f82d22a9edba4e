"""The heap trim after a burst of reads (snapshotter.memory)."""

from __future__ import annotations

from snapshotter.memory import IdleTrim, malloc_trim


def test_trims_once_after_each_burst() -> None:
    counter = [0]
    trims: list[int] = []
    idle = IdleTrim(lambda: counter[0], lambda: trims.append(counter[0]) is None)
    assert not idle.tick()  # nothing happened since start
    counter[0] = 5
    assert not idle.tick()  # busy
    counter[0] = 9
    assert not idle.tick()  # still busy
    assert idle.tick()  # quiet: trim
    assert not idle.tick()  # quiet, already trimmed
    assert trims == [9]
    counter[0] = 12
    assert not idle.tick()
    assert idle.tick()
    assert trims == [9, 12]


def test_malloc_trim_runs_on_glibc() -> None:
    assert malloc_trim()
