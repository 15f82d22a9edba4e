"""The lazy layers one FUSE process serves, and their blob sources.

Inode numbers across the whole mount: the mount root is 1; layer `slot` s
(s >= 1, chosen by the daemon and stable across restarts) owns the range
`s << 32 | local`, where `local` comes from its LayerTree. So an inode number
alone says which layer it belongs to, with no table to keep in sync.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from chunkstore.fetch import RangeSource
from chunkstore.hot import PAGE
from snapshotter.fuse.tree import LayerTree

SLOT_SHIFT = 32
_MAX_PROFILE = 1_000_000  # chunks recorded per layer at most
_MAX_PAGES = 4_000_000  # pages recorded per layer at most (16 GiB)
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
MOUNT_ROOT = 1


def split_ino(ino: int) -> tuple[int, int]:
    return ino >> SLOT_SHIFT, ino & LOCAL_MASK


def join_ino(slot: int, local: int) -> int:
    return slot << SLOT_SHIFT | local


class FileSource:
    """A blob in a local file (tests, and layers whose blob is already on disk)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read_range(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def open_range(self, offset: int, length: int) -> BinaryIO:
        f = open(self.path, "rb")  # noqa: SIM115 -- the caller closes it
        f.seek(offset)
        return f


@dataclass
class Layer:
    name: str  # directory name under the mount root
    slot: int
    tree: LayerTree
    source: RangeSource
    what: str  # for logs and errors: image reference and layer digest
    digest: str = ""  # the layer blob's digest
    prefetch_done: int = 0
    prefetch_total: int = 0
    # False from the prefetch's start until it has counted its total: until then, done >=
    # total says nothing
    prefetch_planned: bool = True
    # first-touch order of the chunks reads asked for (blob offsets): the layer's profile
    touched: list[int] = field(default_factory=list)
    touched_set: set[int] = field(default_factory=set)
    last_touch: float = 0.0
    # a prefetch list from elsewhere (a profile artifact) when the TOC has none
    prefetch_override: list[int] = field(default_factory=list)
    # files (local inode numbers) whose whole content a read miss already sent for
    whole_files: set[int] = field(default_factory=set)
    file_misses: dict[int, int] = field(default_factory=dict)  # reads that went out, by file
    dirs_fetched: set[int] = field(default_factory=set)  # dirs whose small files were sent for
    # `zest optimize` is recording: the pages reads asked for, as (TOC entry, page), in
    # first-touch order, kept apart from the chunks because hot frames are packed from them
    recording: bool = False
    pages: list[tuple[int, int]] = field(default_factory=list)
    pages_set: set[tuple[int, int]] = field(default_factory=set)
    kernel_knows: set[int] = field(default_factory=set)  # local inodes looked up for stores
    # reads record from the FUSE loop and from worker threads at once
    _record_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def prefetch_list(self) -> list[int]:
        return list(self.tree.toc.prefetch) or self.prefetch_override

    def touch(self, offsets: list[int]) -> None:
        if all(off in self.touched_set for off in offsets):
            return  # the common case: a membership test needs no lock
        with self._record_lock:
            for off in offsets:
                if off not in self.touched_set and len(self.touched) < _MAX_PROFILE:
                    self.touched_set.add(off)
                    self.touched.append(off)
                    self.last_touch = time.monotonic()

    def start_recording(self) -> None:
        """Forget what was touched; record pages too from now on."""
        with self._record_lock:
            self.recording = True
            self.touched.clear()
            self.touched_set.clear()
            self.pages.clear()
            self.pages_set.clear()

    def touch_pages(self, entry: int, offset: int, end: int) -> None:
        with self._record_lock:
            for page in range(offset // PAGE, (end + PAGE - 1) // PAGE):
                key = (entry, page)
                if key not in self.pages_set and len(self.pages) < _MAX_PAGES:
                    self.pages_set.add(key)
                    self.pages.append(key)

    def page_runs(self) -> list[tuple[int, int, int]]:
        """The recorded pages as (entry, first page, pages), neighbours joined."""
        out: list[list[int]] = []
        for entry, page in self.pages:
            if out and out[-1][0] == entry and out[-1][1] + out[-1][2] == page:
                out[-1][2] += 1
            else:
                out.append([entry, page, 1])
        return [(a, b, c) for a, b, c in out]


class LayerSet:
    """Thread-safe name/slot -> Layer table."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_slot: dict[int, Layer] = {}
        self._by_name: dict[str, int] = {}

    def add(self, layer: Layer) -> None:
        with self._lock:
            if layer.name in self._by_name and self._by_name[layer.name] != layer.slot:
                raise ValueError(f"layer name {layer.name!r} is already served at another slot")
            if layer.slot in self._by_slot and self._by_slot[layer.slot].name != layer.name:
                raise ValueError(f"slot {layer.slot} is already used by another layer")
            self._by_slot[layer.slot] = layer
            self._by_name[layer.name] = layer.slot

    def remove(self, name: str) -> Layer | None:
        with self._lock:
            slot = self._by_name.pop(name, None)
            return self._by_slot.pop(slot, None) if slot is not None else None

    def by_slot(self, slot: int) -> Layer | None:
        return self._by_slot.get(slot)

    def by_name(self, name: str) -> Layer | None:
        with self._lock:
            slot = self._by_name.get(name)
            return self._by_slot.get(slot) if slot is not None else None

    def names(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self._by_name.items(), key=lambda kv: kv[1])

    def all(self) -> list[Layer]:
        with self._lock:
            return list(self._by_slot.values())
