"""Programs started inside a running container, seen by their first read.

The dynamic loader walks a program's libraries one at a time: open, read the
headers, map, relocate, then the next. On a lazy layer each step is a round trip
(initdb's libraries cost 1.2 s that way at 20 ms). When a read starts at the head
of an ELF file (an exec, or a dlopen), this fetches at once, in parallel, what the
loader will read of it and of every library it needs, found as the loader finds
them. Only for images zest predicted for (no profile): a profile knows better.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from chunkstore.fetch import ChunkRef
from snapshotter.fuse.layers import Layer
from snapshotter.fuse.predict import Found, Predictor

log = logging.getLogger(__name__)

_MAX_WATCHED = 1024  # layers

Fetch = Callable[[list[tuple[Layer, ChunkRef]]], None]


class ExecWatch:
    def __init__(self, fetch: Fetch, workers: int = 2):
        self.fetch = fetch
        # layer (by object: a layer warmed ahead of its add has no name yet) -> the latest
        # prediction of an image it belongs to
        self._predictors: dict[int, Predictor] = {}
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zest-exec")
        self.programs = 0  # ELF files whose libraries were sent for (the stats op shows it)
        self.chunks = 0

    def watch(self, predictor: Predictor) -> None:
        """Watch the layers of an image. A layer shared by several images resolves
        libraries in the last one watched: a guess either way, and only a prefetch."""
        with self._lock:
            for layer in predictor.view.layers:
                self._predictors[id(layer)] = predictor
            while len(self._predictors) > _MAX_WATCHED:  # images whose pull never finished
                del self._predictors[next(iter(self._predictors))]

    def forget(self, name: str) -> None:
        with self._lock:
            self._predictors = {k: p for k, p in self._predictors.items()
                                if all(x.name != name for x in p.view.layers)}
            self._seen = {k for k in self._seen if k[0] != name}

    def opened(self, layer: Layer, local: int) -> None:
        """A read at offset 0. Runs on the FUSE loop: the work goes to a thread."""
        key = (layer.name, local)
        if key in self._seen:
            return
        predictor = self._predictors.get(id(layer))
        if predictor is None:
            return
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        e = layer.tree.entry(local)
        if e is None:
            return
        found = Found("/" + e.name.decode(errors="replace"), layer, local)
        self._pool.submit(self._prefetch, predictor, found)

    def _prefetch(self, predictor: Predictor, found: Found) -> None:
        try:
            if predictor.elf(found) is None:
                return
            libs = predictor.libraries([found])
            chunks = predictor.loader_chunks([found, *libs])
            if chunks:
                self.fetch(chunks)
            with self._lock:
                self.programs += 1
                self.chunks += len(chunks)
            log.debug("exec prefetch", extra={"kv": {"path": found.path, "libraries": len(libs),
                                                     "chunks": len(chunks)}})
        except Exception as exc:  # a guess: reads fetch what it misses
            log.warning("exec prefetch stopped", extra={"kv": {"path": found.path,
                                                               "error": repr(exc)}})

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
