"""Content-addressed chunk cache on local disk, shared by every layer and image.

Layout: `<root>/chunks/<first 2 hex>/<64 hex>` holds a chunk's uncompressed
bytes; `<root>/tmp/` holds writes in progress. A chunk is written to tmp and
renamed into place, so a reader never sees half a file. There is no fsync per
chunk: every read from disk is verified against the digest in the file's name,
so a file torn by a power cut is detected, deleted and fetched again, which is
cheaper than fsyncing each put.

Each chunk is hashed once per process: `put` is given verified bytes, and the first `get`
from disk checks them. After that `read` serves any part of the chunk with a single
pread, without reading and hashing the whole chunk on every read of a few pages. A file
is only ever replaced whole (by rename), so what was verified stays what is there.

Size is bounded: when the total passes `max_bytes`, the least recently used
chunks are deleted until it is below 90% of it. Recency survives restarts
through the files' mtimes, which `get` bumps (at most once a minute per chunk).

Thread-safe: one lock guards the in-memory index; file I/O happens outside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from chunkstore.digest import Digest

log = logging.getLogger(__name__)

_TOUCH_INTERVAL = 60.0  # seconds between mtime bumps of one chunk
_SIZE_BITS = 32


# An index entry is one int, last use (whole seconds) | size | verified by this process, under
# the raw digest: a node's cache holds a chunk for every small file it has read (23,000 for
# the ten bench images), and a tuple of three objects under a hex string key took 460 bytes a
# chunk against 310 (tracemalloc over 5,000 puts).
def _entry(size: int, used: float, verified: bool) -> int:
    return int(used) << (_SIZE_BITS + 1) | size << 1 | verified


def _size(entry: int) -> int:
    return entry >> 1 & ((1 << _SIZE_BITS) - 1)


def _last_use(entry: int) -> int:
    return entry >> (_SIZE_BITS + 1)


def _verified(entry: int) -> bool:
    return bool(entry & 1)


@dataclass(frozen=True)
class CacheStats:
    chunks: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    corrupt: int


class ChunkCache:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._chunks = self.root / "chunks"
        self._tmp = self.root / "tmp"
        self._chunks.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # raw digest -> _entry(size, last use, verified); ordered oldest first
        self._index: OrderedDict[bytes, int] = OrderedDict()
        self._dirs: set[str] = set()  # fan-out directories known to exist
        self._tmp_names = itertools.count()
        self._total = 0
        self.hits = self.misses = self.evictions = self.corrupt = 0
        self._clean_tmp()
        self._load()

    def _clean_tmp(self) -> None:
        for p in self._tmp.iterdir():
            p.unlink(missing_ok=True)

    def _load(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        for sub in self._chunks.iterdir():
            for p in sub.iterdir() if sub.is_dir() else ():
                try:
                    key = bytes.fromhex(p.name)
                    st = p.stat()
                except (ValueError, FileNotFoundError):
                    continue  # not a chunk's name (left alone), or gone
                if len(key) == 32 and st.st_size < 1 << _SIZE_BITS:
                    found.append((st.st_mtime, key, st.st_size))
        found.sort()
        for mtime, key, size in found:
            self._index[key] = _entry(size, mtime, False)
            self._total += size

    def _path(self, key: bytes) -> Path:
        h = key.hex()
        return self._chunks / h[:2] / h

    def __contains__(self, digest: Digest) -> bool:
        with self._lock:
            return digest.raw in self._index

    def get(self, digest: Digest) -> bytes | None:
        """The chunk's bytes, verified, or None when absent (or found corrupt and dropped)."""
        key = digest.raw
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
                entry = self._index.pop(key, None)
                if entry is not None:
                    self._total -= _size(entry)
            return None
        if hashlib.sha256(data).digest() != digest.raw:
            log.warning("dropping corrupt cached chunk", extra={"kv": {"digest": str(digest)}})
            self._drop(key)
            with self._lock:
                self.corrupt += 1
                self.misses += 1
            return None
        self._used(key, len(data))
        return data

    def _used(self, key: bytes, size: int) -> None:
        """A hit: move the chunk to the young end, mark it verified, and bump its mtime (at
        most once a minute) so that recency survives a restart."""
        now = time.time()
        with self._lock:
            self.hits += 1
            old = self._index.pop(key, None)
            if old is None:
                self._total += size
            touch = old is None or now - _last_use(old) > _TOUCH_INTERVAL
            self._index[key] = _entry(size, now if touch or old is None else _last_use(old),
                                      True)
        if touch:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self._path(key))

    def read(self, digest: Digest, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset+length) of a chunk this process has verified, by one pread;
        None when it has not (then `get` reads and checks it whole) or it is gone."""
        key = digest.raw
        with self._lock:
            entry = self._index.get(key)
            if entry is None or not _verified(entry):
                return None
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            self._drop(key)
            return None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != min(length, max(_size(entry) - offset, 0)):
            self._drop(key)  # replaced or cut short behind our back: fetch it again
            return None
        self._used(key, _size(entry))
        return data

    def put(self, digest: Digest, data: bytes) -> None:
        """Store verified bytes (the caller verified them; they are named by their digest)."""
        if len(data) >> _SIZE_BITS:
            raise ValueError(f"chunk of {len(data)} bytes is larger than the cache indexes")
        key, h = digest.raw, digest.hex
        path = self._path(key)
        with self._lock:
            if key in self._index:
                return
        if h[:2] not in self._dirs:
            path.parent.mkdir(exist_ok=True)
            self._dirs.add(h[:2])
        tmp = self._tmp / f"{h}.{os.getpid()}.{next(self._tmp_names)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
        with self._lock:
            if key not in self._index:
                self._index[key] = _entry(len(data), time.time(), True)
                self._total += len(data)
            over = self._total > self.max_bytes
        if over:
            self._evict(int(self.max_bytes * 0.9))

    def _drop(self, key: bytes) -> None:
        self._path(key).unlink(missing_ok=True)
        with self._lock:
            entry = self._index.pop(key, None)
            if entry is not None:
                self._total -= _size(entry)

    def _evict(self, target: int) -> int:
        victims: list[bytes] = []
        with self._lock:
            while self._total > target and self._index:
                key, entry = self._index.popitem(last=False)
                self._total -= _size(entry)
                victims.append(key)
            self.evictions += len(victims)
        for key in victims:
            self._path(key).unlink(missing_ok=True)
        if victims:
            log.info("evicted chunks", extra={"kv": {"count": len(victims), "bytes": self._total}})
        return len(victims)

    def prune(self, target_bytes: int = 0) -> int:
        """Delete least recently used chunks until at most target_bytes remain."""
        return self._evict(target_bytes)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._index), self._total, self.max_bytes, self.hits,
                              self.misses, self.evictions, self.corrupt)
