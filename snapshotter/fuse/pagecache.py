"""The kernel's side of a mount: its readahead, and hot data placed in its page cache.

A recorded workload's hot frames (chunkstore/hot.py) arrive verified; pushing their pages
into the kernel's page cache (FUSE_NOTIFY_STORE) means the workload's page faults and reads
of those pages never become FUSE requests at all. While hot frames stream in, the mount's
readahead is off: a read that gets ahead of the stream then asks for the pages it needs
(which the next hot frame holds) instead of a 128 KiB neighbourhood (which only chunks
fetched from the registry would fill). Files keep the readahead they were opened with.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pyfuse3

from snapshotter.fuse.layers import Layer, join_ino

log = logging.getLogger(__name__)

_STORE_PIECE = 256 * 1024  # bytes per notify message


def _mount_device(mountpoint: Path) -> str | None:
    """The mount's "major:minor" from /proc/self/mountinfo: a stat() would be a FUSE
    request, which waits for a main loop that is not running yet."""
    want = os.path.abspath(mountpoint)  # resolve() would stat the mount itself
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            path = fields[4].replace("\\040", " ")
            if path == want:
                found = fields[2]  # the last one is on top
    return found


def _readahead_path(mountpoint: Path) -> Path | None:
    dev = _mount_device(mountpoint)
    if dev is None:
        log.warning("cannot find the mount in /proc/self/mountinfo; reads keep the kernel's "
                    "readahead", extra={"kv": {"mountpoint": mountpoint}})
        return None
    return Path(f"/sys/class/bdi/{dev}/read_ahead_kb")


def set_page_readahead(mountpoint: Path, kb: int) -> int | None:
    """Sets how far the kernel reads ahead on the mount; returns what it was. The kernel's
    default (128 KiB, centred on each page fault of a mapped file) turns a program's
    scattered page faults into reads of whole neighbourhoods, which on a cold layer means
    fetching chunks nothing needs."""
    path = _readahead_path(mountpoint)
    if path is None:
        return None
    try:
        before = int(path.read_text())
        path.write_text(str(kb))
    except (OSError, ValueError) as e:
        log.warning("cannot set the kernel's readahead on the mount; reads keep the kernel's "
                    "default", extra={"kv": {"path": path, "error": e}})
        return None
    log.info("kernel readahead set", extra={"kv": {"path": path, "kb": kb, "was": before}})
    return before


class PageCache:
    """Pushes hot data into the kernel's page cache and keeps readahead off meanwhile.
    Called from prefetch threads, never the FUSE loop: a store waits on any page a FUSE read
    holds locked, and only the loop can answer that read."""

    def __init__(self, mountpoint: Path):
        self.mountpoint = mountpoint
        self._lock = threading.Lock()
        self._streams = 0
        self._restore: int | None = None

    def begin(self) -> None:
        """A layer's hot frames start to stream in."""
        with self._lock:
            self._streams += 1
            if self._streams == 1:
                self._restore = set_page_readahead(self.mountpoint, 0)

    def end(self) -> None:
        with self._lock:
            self._streams -= 1
            if self._streams == 0 and self._restore is not None:
                set_page_readahead(self.mountpoint, self._restore)
                self._restore = None

    def _known(self, layer: Layer, local: int, name: bytes) -> bool:
        """Makes the kernel look the file up (a store needs an inode it knows): a stat through
        the mount, which this process's own FUSE loop answers."""
        if local in layer.kernel_knows:
            return True
        try:
            os.stat(self.mountpoint / layer.name / os.fsdecode(name))
        except OSError as exc:
            log.debug("hot file not found through the mount", extra={"kv": {
                "layer": layer.what, "name": name, "error": exc}})
            return False
        layer.kernel_knows.add(local)
        return True

    def push(self, layer: Layer, frame: int, data: bytes) -> int:
        """Stores one verified hot frame's runs in the page cache; returns the bytes stored."""
        tree = layer.tree
        stored = 0
        for entry, offset, length, at in tree.hot.by_frame[frame]:
            if layer.recording:
                return stored  # `zest optimize` records: every read must reach us
            local = tree.local_of(entry)
            e = tree.toc.entries[entry]
            if local is None or not self._known(layer, local, e.name):
                continue
            ino = join_ino(layer.slot, local)
            for pos in range(0, length, _STORE_PIECE):
                n = min(_STORE_PIECE, length - pos)
                try:
                    pyfuse3.notify_store(ino, offset + pos, data[at + pos : at + pos + n])
                except OSError as exc:
                    if exc.errno == errno.ENOENT:  # the kernel forgot the inode: ask again
                        layer.kernel_knows.discard(local)
                    log.debug("page cache store failed", extra={"kv": {
                        "layer": layer.what, "name": e.name, "error": exc}})
                    break
                stored += n
        return stored
