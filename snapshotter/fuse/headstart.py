"""Range requests started before anyone can check their bytes.

A profiled layer's hot frames sit right after its TOC, and the layer descriptor says where
(`dev.zest.hot`), so the TOC's own range request runs on into them (`op_toc`; with frames
before the TOC, as older blobs have them, their stream starts the moment the TOC's bytes are
in), before this process has parsed the TOC that names them (15-40 ms for a base layer's on
two cores, while the daemon parses it too). The bytes wait here, in memory, until the
fetcher's stream for the frames opens a range inside this one: it verifies each frame
against the TOC as it would any other response, so nothing here is trusted. A head start
nobody takes is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import BinaryIO, cast

log = logging.getLogger("snapshotter.fuse.headstart")

# Bytes all head starts may hold at once; one beyond this is not started (the frames are
# then fetched when the TOC names them, as without a head start).
MAX_BYTES = 64 << 20
# A head start not taken this long after it began is dropped with its bytes.
MAX_AGE = 60.0
_PIECE = 64 * 1024

Opener = Callable[[int, int], BinaryIO]  # (offset, length) -> the range's body


class _Early:
    """One range being received into memory by its own thread."""

    def __init__(self, key: str, offset: int, length: int):
        self.key, self.offset, self.length = key, offset, length
        self.started = time.monotonic()
        self._cond = threading.Condition()
        self._pieces: deque[bytes] = deque()
        self._received = 0
        self._error: BaseException | None = None
        self._closed = False

    def receive(self, open_range: Opener) -> None:
        try:
            with open_range(self.offset, self.length) as f:
                read1 = getattr(f, "read1", f.read)  # what has arrived, not a full buffer
                while self._received < self.length:
                    piece = read1(min(_PIECE, self.length - self._received))
                    if not piece:
                        raise EOFError(f"range ended after {self._received} of "
                                       f"{self.length} bytes")
                    with self._cond:
                        if self._closed:
                            return  # its reader gave up or it was dropped
                        self._pieces.append(piece)
                        self._received += len(piece)
                        self._cond.notify_all()
        except BaseException as exc:  # handed to the reader, which fetches again
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def read(self, n: int) -> bytes:
        """Up to n bytes, at least one unless the range is over: blocks until they arrive."""
        with self._cond:
            while not self._pieces and not self._closed:
                if self._error is not None:
                    raise OSError(f"head start failed: {self._error}") from self._error
                if self._received >= self.length:
                    return b""
                self._cond.wait()
            if not self._pieces:
                return b""
            piece = self._pieces.popleft()
            if len(piece) > n:
                self._pieces.appendleft(piece[n:])
                piece = piece[:n]
            return piece

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pieces.clear()
            self._cond.notify_all()

    @property
    def held(self) -> int:
        with self._cond:
            return 0 if self._closed else self.length


class _Reader:
    """The file object `take` returns: from `skip` bytes into the early range, `length`
    bytes, read as they arrive."""

    def __init__(self, early: _Early, skip: int, length: int):
        self._early, self._skip, self._left = early, skip, length

    def read(self, n: int = -1) -> bytes:
        while self._skip:
            dropped = self._early.read(self._skip)
            if not dropped:
                return b""
            self._skip -= len(dropped)
        want = self._left if n < 0 else min(n, self._left)
        parts: list[bytes] = []
        got = 0
        while got < want:  # whole reads, as a buffered stream gives them
            piece = self._early.read(want - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        self._left -= got
        return b"".join(parts)

    def close(self) -> None:
        self._early.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HeadStarts:
    """The head starts of one FUSE process, by blob."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_age: float = MAX_AGE):
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._lock = threading.Lock()
        self._by_key: dict[str, _Early] = {}

    def start(self, key: str, offset: int, length: int, open_range: Opener) -> bool:
        """Begin receiving `length` bytes at `offset` of blob `key`; False when one is
        already on its way for that blob or memory is spoken for."""
        if offset < 0 or length <= 0:
            raise ValueError(f"bad head start range offset={offset} length={length}")
        with self._lock:
            if not self._fits(key, length):
                return False
            early = self._by_key[key] = _Early(key, offset, length)
        threading.Thread(target=early.receive, args=(open_range,), name="zest-head-start",
                         daemon=True).start()
        return True

    def room(self, key: str, length: int) -> bool:
        """Whether a head start of `length` bytes for blob `key` would start now."""
        with self._lock:
            return self._fits(key, length)

    def _fits(self, key: str, length: int) -> bool:
        """Under the lock: none for this blob yet, and memory for this one."""
        self._expire()
        held = sum(e.held for e in self._by_key.values())
        return key not in self._by_key and held + length <= self.max_bytes

    def take(self, key: str, offset: int, length: int) -> BinaryIO | None:
        """The bytes at [offset, offset+length) of blob `key` if a head start covers them
        (it is used once), else None."""
        with self._lock:
            early = self._by_key.get(key)
            if early is None or offset < early.offset or (
                    offset + length > early.offset + early.length):
                return None
            del self._by_key[key]
        log.info("head start used", extra={"kv": {"blob": key, "offset": early.offset,
                                                  "bytes": early.length}})
        return cast(BinaryIO, _Reader(early, offset - early.offset, length))

    def _expire(self) -> None:
        now = time.monotonic()
        for key, early in list(self._by_key.items()):
            if now - early.started > self.max_age:
                early.close()
                del self._by_key[key]
                log.info("head start dropped unused", extra={"kv": {"blob": key}})
