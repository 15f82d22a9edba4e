"""Background fetching: a layer's hot frames or prefetch list first, then (optionally) the
rest of it.

On-demand reads never wait behind this: prefetch runs in its own few threads,
bounded by a semaphore shared by all layers, while reads use their own worker
threads; a read that wants a chunk prefetch already asked for joins that fetch
(the Fetcher's single flight) instead of fetching it again.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from chunkstore.fetch import ChunkRef, Fetcher, MultiRangeSource, RangeSource
from snapshotter.fuse.layers import Layer
from snapshotter.fuse.pagecache import PageCache

log = logging.getLogger(__name__)
T = TypeVar("T")

_BATCH_BYTES = 4 * 1024 * 1024  # one range request per batch of the prefetch list
_BACKGROUND_BATCH_BYTES = 1024 * 1024  # smaller: a read never waits long behind one
_WAVE_BYTES = 2 * 1024 * 1024  # prefetch-list chunks planned together (then by offset)
_FIRST_WAVE_BYTES = 256 * 1024  # with multi-range requests: one request a wave
_LAST_WAVE_BYTES = 4 * 1024 * 1024
_QUIET_SECONDS = 2.0  # background fetching waits until on-demand reads paused this long


def _runs(items: Iterable[T], size: Callable[[T], int], limit: int,
          grow_to: int | None = None) -> Iterator[list[T]]:
    """Consecutive runs of at most `limit` compressed bytes (a run holds one item at least).
    With `grow_to`, the limit doubles after each run up to that: the first chunks arrive after
    a short transfer, and a long list still takes few requests. Lazy: a run is handed out as
    soon as the next item does not fit in it."""
    run: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if run and total + n > limit:
            yield run
            run, total = [], 0
            if grow_to is not None:
                limit = min(limit * 2, grow_to)
        run.append(item)
        total += n
    if run:
        yield run


def _split(refs: Iterable[ChunkRef], limit: int,
           grow_to: int | None = None) -> list[list[ChunkRef]]:
    return list(_runs(refs, _compressed, limit, grow_to))


def _compressed(ref: ChunkRef) -> int:
    return ref.compressed_size


def plan_waves(refs: list[ChunkRef], max_gap: int, wave_bytes: int = _WAVE_BYTES,
               max_request: int = _BATCH_BYTES) -> list[tuple[int, list[ChunkRef]]]:
    """Range requests for a prefetch list, each with its wave number: waves of `wave_bytes`
    in first-touch order; inside a wave, chunks sorted by blob offset and neighbours (gap <=
    max_gap) joined into one request. Early chunks come first; round trips stay few."""
    out: list[tuple[int, list[ChunkRef]]] = []
    for n, wave in enumerate(_split(refs, wave_bytes)):
        group: list[ChunkRef] = []
        for r in sorted(wave, key=lambda c: c.blob_offset):
            if group and (r.blob_offset - group[-1].end > max_gap
                          or r.end - group[0].blob_offset > max_request):
                out.append((n, group))
                group = []
            group.append(r)
        if group:
            out.append((n, group))
    return out


class _RankedPool:
    """Worker threads that take the queued job of lowest rank first (FIFO among equals):
    wave n of every layer goes before wave n+1 of any, so no layer's list waits behind
    another's whole list (the base layer's libc is what every program needs first)."""

    def __init__(self, workers: int, name: str):
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]] = (
            queue.PriorityQueue())
        self._seq = itertools.count()
        for i in range(workers):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()
        self._workers = workers

    def submit(self, rank: int, fn: Callable[..., object], *args: object,
               **kw: object) -> Future[object]:
        fut: Future[object] = Future()

        def job() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args, **kw))
            except BaseException as exc:
                fut.set_exception(exc)

        self._queue.put((rank, next(self._seq), job))
        return fut

    def _work(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            job()

    def shutdown(self) -> None:
        for _ in range(self._workers):
            self._queue.put((1 << 62, next(self._seq), None))


class Prefetcher:
    def __init__(self, fetcher: Fetcher, *, parallel: int = 4, background: bool = True,
                 quiet_seconds: float = _QUIET_SECONDS, pages: PageCache | None = None):
        self.fetcher = fetcher
        self.pages = pages  # where hot frames go once here: the kernel's page cache
        self.background = background
        self.quiet_seconds = quiet_seconds
        self._pool = _RankedPool(parallel, "zest-prefetch")
        # the background rest goes one request at a time, so a read waits behind one at most
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zest-bg")
        self._stopped: set[str] = set()
        self._lock = threading.Lock()

    def start(self, layer: Layer) -> None:
        with self._lock:
            self._stopped.discard(layer.name)
        layer.prefetch_planned = False
        threading.Thread(target=self._run, args=(layer,), name=f"prefetch-{layer.name}",
                         daemon=True).start()

    def fetch_files(self, wanted: list[tuple[Layer, ChunkRef]]) -> None:
        """Fetch these chunks now, at prefetch-list priority, in the background: in the order
        given across layers (waves), each wave coalesced per layer blob."""
        def run() -> None:
            try:
                # what another fetch brings is left to it: a prefetch thread waiting for it
                # would hold back the rest of the list
                todo = [(layer, r) for layer, r in wanted if not self.fetcher.is_coming(r)]
                jobs = []
                first = 0  # the list's order holds across waves: a later wave ranks after
                for wave in _runs(todo, lambda pair: pair[1].compressed_size, _WAVE_BYTES):
                    # by layer object: a layer warmed ahead of its add has no name yet
                    by_layer: dict[int, tuple[Layer, list[ChunkRef]]] = {}
                    for layer, r in wave:
                        by_layer.setdefault(id(layer), (layer, []))[1].append(r)
                    last = first
                    for layer, refs in by_layer.values():
                        for rank, batch in self._requests(layer.source, refs):
                            last = max(last, first + rank)
                            jobs.append(self._pool.submit(first + rank, self._fetch_batch,
                                                          layer, batch, False, 0.0))
                    first = last + 1
                for job in jobs:
                    job.result()
            except Exception as exc:  # best effort, like all prefetching
                log.warning("predicted prefetch stopped", extra={"kv": {"error": exc}})

        threading.Thread(target=run, name="prefetch-predicted", daemon=True).start()

    def warm(self, source: RangeSource, refs: list[ChunkRef], what: str,
             stream: bool = False) -> None:
        """Fetch a layer's hot frames (`stream`) or prefetch list before the layer is served
        (containerd has not asked for it yet): they land in the cache, where the layer's own
        prefetch finds them."""
        def run() -> None:
            try:
                if stream:
                    for _ in self.fetcher.stream(source, refs, f"{what} (hot)"):
                        pass
                    return
                todo = [r for r in refs if not self.fetcher.is_cached(r)]
                jobs = [self._pool.submit(rank, self.fetcher.prefetch, source, batch,
                                          f"{what} (prefetch)")
                        for rank, batch in self._requests(source, todo)]
                for job in jobs:
                    job.result()
            except Exception as exc:  # best effort: the layer's own prefetch tries again
                log.warning("early prefetch stopped", extra={"kv": {"layer": what,
                                                                    "error": exc}})

        threading.Thread(target=run, name="prefetch-early", daemon=True).start()

    def stop(self, name: str) -> None:
        with self._lock:
            self._stopped.add(name)

    def shutdown(self) -> None:
        self._pool.shutdown()
        self._background.shutdown(wait=False, cancel_futures=True)

    def _run(self, layer: Layer) -> None:
        mounted = time.monotonic()
        try:
            tree = layer.tree
            hot = tree.hot.refs
            # hot frames hold the recorded pages themselves: the chunk list would fetch them
            # again, with their neighbours, so it goes with the rest
            first = [] if hot else [
                r for r in map(tree.chunk_at, dict.fromkeys(layer.prefetch_list)) if r]
            layer.prefetch_total = len(hot) + (
                tree.chunk_count if self.background else len(first))
            layer.prefetch_planned = True
            self._fetch_hot(layer, hot)
            self._fetch_first(layer, first)
            if self.background:
                self._fetch_rest(layer, {r.blob_offset for r in first}, mounted)
            log.info("prefetch finished", extra={"kv": {"layer": layer.what,
                                                        "chunks": layer.prefetch_done}})
        except Exception as exc:  # prefetch is best effort; reads fetch on demand
            log.warning("prefetch stopped", extra={"kv": {"layer": layer.what, "error": exc}})
        finally:
            layer.prefetch_planned = True

    def _fetch_first(self, layer: Layer, refs: list[ChunkRef]) -> None:
        """The prefetch list, fetched at once, several requests in parallel."""
        todo = []
        for r in refs:
            if self.fetcher.is_cached(r):
                layer.prefetch_done += 1
            else:
                todo.append(r)
        futures = [self._pool.submit(rank, self._fetch_batch, layer, batch, False, 0.0)
                   for rank, batch in self._requests(layer.source, todo)]
        for f in futures:
            f.result()

    def _fetch_hot(self, layer: Layer, refs: list[ChunkRef]) -> None:
        """The hot frames; each one's pages go into the page cache as soon as it is here
        (cached frames too: the pages may not be)."""
        if not refs:
            return
        index = {r.blob_offset: i for i, r in enumerate(refs)}
        if self.pages is not None:
            self.pages.begin()
        try:  # one stream, in first-touch order: each frame is used the moment it is in
            for ref, data in self.fetcher.stream(layer.source, refs, f"{layer.what} (hot)"):
                if self.pages is not None:
                    self.pages.push(layer, index[ref.blob_offset], data)
                layer.prefetch_done += 1  # once its pages are in the page cache too
        finally:
            if self.pages is not None:
                self.pages.end()
        log.info("hot frames in", extra={"kv": {"layer": layer.what, "frames": len(refs)}})

    def _fetch_rest(self, layer: Layer, skip: set[int], mounted: float) -> None:
        """The rest of the layer in blob order, one request of all layers' at a time and only
        while reads are quiet (a shared link is the bottleneck). The chunk list is walked, not
        built: ten mounted layers would otherwise hold an object for each of their chunks."""
        def pending() -> Iterator[ChunkRef]:
            for r in layer.tree.iter_chunks():
                if r.blob_offset in skip:
                    continue
                if self.fetcher.is_cached(r):
                    layer.prefetch_done += 1
                    continue
                yield r

        for batch in _runs(pending(), _compressed, _BACKGROUND_BATCH_BYTES):
            self._background.submit(self._fetch_batch, layer, batch, True, mounted).result()
            with self._lock:
                if layer.name in self._stopped:
                    return

    def _requests(self, source: RangeSource,
                  refs: list[ChunkRef]) -> list[tuple[int, list[ChunkRef]]]:
        """The chunks of each request, in first-touch order: a wave in one multi-range request
        where the source does those, else one request per run of neighbouring chunks."""
        multi = isinstance(source, MultiRangeSource)
        if multi and getattr(source, "multirange", None) is not False:
            return list(enumerate(_split(refs, _FIRST_WAVE_BYTES, _LAST_WAVE_BYTES)))
        return plan_waves(refs, self.fetcher.max_gap)

    def _fetch_batch(self, layer: Layer, batch: list[ChunkRef], background: bool,
                     mounted: float) -> None:
        while background:  # wait for the link to be ours: no read for quiet_seconds
            with self._lock:
                if layer.name in self._stopped:
                    return
            quiet = min(self.fetcher.quiet_for(), time.monotonic() - mounted)
            if quiet >= self.quiet_seconds:
                break
            time.sleep(max(0.05, self.quiet_seconds - quiet))
        with self._lock:
            if layer.name in self._stopped:
                return
        self.fetcher.prefetch(layer.source, batch, f"{layer.what} (prefetch)")
        layer.prefetch_done += len(batch)
