"""The FUSE process: one mount serving every lazy layer, and a control socket.

    python -m snapshotter.fuse.server --mountpoint DIR --control SOCK --cache-dir DIR ...

It runs apart from the gRPC service (which starts it in its own session) so
that restarting the service never touches a mounted layer. One trio loop runs
pyfuse3's request loop and the control server; blocking work (TOC parsing,
fetching) runs in worker threads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pyfuse3
import trio

from chunkstore import format as fmt
from chunkstore._pb import toc_pb2
from chunkstore.cache import ChunkCache
from chunkstore.digest import Digest
from chunkstore.fetch import Fetcher, RangeSource
from chunkstore.hot import frame_refs
from snapshotter.fuse import kernelcaps, protocol
from snapshotter.fuse.execwatch import ExecWatch
from snapshotter.fuse.headstart import HeadStarts
from snapshotter.fuse.layers import FileSource, Layer, LayerSet, join_ino
from snapshotter.fuse.ops import Operations
from snapshotter.fuse.pagecache import PageCache, set_page_readahead
from snapshotter.fuse.predict import Found, MergedView, Predictor
from snapshotter.fuse.prefetch import Prefetcher
from snapshotter.fuse.reader import Reader
from snapshotter.fuse.tree import LayerTree, chunk_ref
from snapshotter.registry.client import RegistryClient, warm_up

log = logging.getLogger("snapshotter.fuse.server")

_KEPT_PENDING = 16


class _RegistryBlob:
    """MultiRangeSource over one registry blob."""

    def __init__(self, client: RegistryClient, repo: str, digest: str,
                 early: HeadStarts | None = None):
        self.client, self.repo, self.digest = client, repo, digest
        self.early = early

    def read_range(self, offset: int, length: int) -> bytes:
        return self.client.read_range(self.repo, self.digest, offset, length)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return self.client.read_ranges(self.repo, self.digest, ranges)

    def open_range(self, offset: int, length: int) -> BinaryIO:
        started = self.early.take(self.digest, offset, length) if self.early else None
        return started or self.stream(offset, length)

    def stream(self, offset: int, length: int) -> BinaryIO:
        return self.client.open_range(self.repo, self.digest, offset, length)

    @property
    def multirange(self) -> bool | None:
        return self.client.multirange


class Server:
    def __init__(self, mountpoint: Path, cache: ChunkCache, *, background_prefetch: bool,
                 prefetch_parallel: int, readahead: int = 512 * 1024,
                 whole_file: int = 0, directory: int = 0, profile_dir: Path | None = None):
        self.profile_dir = profile_dir
        self.mountpoint = mountpoint
        self.cache = cache
        self.fetcher = Fetcher(cache)
        self.layers = LayerSet()
        self.pages = PageCache(mountpoint)
        self.prefetcher = Prefetcher(self.fetcher, parallel=prefetch_parallel,
                                     background=background_prefetch, pages=self.pages)
        self._recording = False  # `zest optimize` records: the mount's readahead is off
        self.reader = Reader(self.fetcher, readahead, whole_file=whole_file, directory=directory,
                             on_miss=self.prefetcher.fetch_files)
        self.execwatch = ExecWatch(self.prefetcher.fetch_files)
        self.ops = Operations(self.layers, self.reader, opened=self.execwatch.opened)
        self._clients: dict[tuple[str, bool], RegistryClient] = {}
        self._lock = threading.Lock()  # guards _clients and _trees
        # layers built by `warm` and not yet added, by TOC digest: `add` takes them, and a
        # prediction may start on them before containerd has asked for them all
        self._pending: OrderedDict[str, Layer] = OrderedDict()
        self.head_starts = HeadStarts()

    # -- sources ---------------------------------------------------------------
    def _source(self, spec: dict[str, Any]) -> RangeSource:
        if spec.get("kind") == "file":
            return FileSource(spec["path"])
        if spec.get("kind") != "registry":
            raise ValueError(f"unknown blob source {spec.get('kind')!r}")
        key = (spec["host"], bool(spec.get("plain_http")))
        hosts_dir = spec.get("hosts_dir")
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = RegistryClient.for_host(
                    key[0], Path(hosts_dir) if hosts_dir else None, plain_http=key[1])
        return _RegistryBlob(client, spec["repo"], spec["digest"], self.head_starts)

    def _new_layer(self, req: dict[str, Any], toc: toc_pb2.TOC) -> Layer:
        """An unnamed layer for a `warm` or `add` request; `add` names it."""
        return Layer(name="", slot=0, tree=LayerTree(toc), source=self._source(req["source"]),
                     what=str(req.get("what", "")), digest=str(req["source"].get("digest", "")))

    def _pending_layer(self, req: dict[str, Any], toc: toc_pb2.TOC) -> Layer:
        """The layer `warm` builds ahead of its `add` (unnamed until then), kept by TOC
        digest."""
        with self._lock:
            layer = self._pending.get(req["toc_digest"])
        if layer is None:
            layer = self._new_layer(req, toc)
            with self._lock:
                layer = self._pending.setdefault(req["toc_digest"], layer)
                while len(self._pending) > _KEPT_PENDING:
                    self._pending.popitem(last=False)
        return layer

    @staticmethod
    def _toc(toc_path: str, toc_digest: str) -> toc_pb2.TOC:
        return fmt.decode_toc(Path(toc_path).read_bytes(), Digest.parse(toc_digest))

    # -- control ops -----------------------------------------------------------
    def op_toc(self, req: dict[str, Any]) -> dict[str, Any]:
        """Fetch a layer's TOC for the daemon, into `path` as stored (the daemon checks it).
        When the layer's hot frames follow the TOC (`hot`), one range request brings both:
        the answer comes once the TOC's bytes are in, and the rest of the response goes on
        into a head start for the frames, with no round trip between the two."""
        source = self._source(req["source"])
        offset, size = int(req["toc"][0]), int(req["toc"][1])
        span = req.get("hot")
        hot = fmt.hot_after_toc(offset, size, (int(span[0]), int(span[1])) if span else None)
        path = Path(req["path"])
        if (hot is None or not isinstance(source, _RegistryBlob)
                or not self.head_starts.room(source.digest, hot[1])):
            path.write_bytes(source.read_range(offset, size))
            return {"hot": False}
        stream = source.stream(offset, hot[0] + hot[1] - offset)
        try:
            payload = _read_exactly(stream, size)
            path.write_bytes(payload)
        except BaseException:
            stream.close()
            raise
        gap = hot[0] - offset - size

        def rest(_offset: int, _length: int) -> BinaryIO:
            _read_exactly(stream, gap)  # a pad frame and the first frame's header
            return stream

        if not self.head_starts.start(source.digest, hot[0], hot[1], rest):
            stream.close()  # one is on its way already, or memory is spoken for
            return {"hot": False}
        return {"hot": True}

    def op_warm(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start fetching the hot frames or prefetch list of a layer that containerd will ask
        for next."""
        source, what = self._source(req["source"]), str(req.get("what", ""))
        span = req.get("hot")
        if span and isinstance(source, _RegistryBlob):  # the stream starts before the parse
            self.head_starts.start(source.digest, int(span[0]), int(span[1]), source.stream)
        with self._lock:
            pending = self._pending.get(req["toc_digest"])
        toc = pending.tree.toc if pending else self._toc(req["toc_path"], req["toc_digest"])
        hot = frame_refs(toc)
        if hot:  # before the tree is built: the stream starts 20 ms sooner for a large layer
            self.prefetcher.warm(source, hot, what, stream=True)
        tree = self._pending_layer(req, toc).tree
        if hot:
            return {"chunks": len(hot)}
        offsets = list(toc.prefetch) or [int(x) for x in req.get("profile") or []]
        refs = [r for r in map(tree.chunk_at, offsets) if r is not None]
        if refs:
            self.prefetcher.warm(source, refs, what)
        return {"chunks": len(refs)}

    def op_add(self, req: dict[str, Any]) -> dict[str, Any]:
        name = str(req["name"])
        existing = self.layers.by_name(name)
        if existing is not None:
            return {"slot": existing.slot}
        with self._lock:
            layer = self._pending.pop(req["toc_digest"], None)
        if layer is None:
            layer = self._new_layer(req, self._toc(req["toc_path"], req["toc_digest"]))
        toc = layer.tree.toc
        layer.name, layer.slot, layer.what = name, int(req["slot"]), str(req.get("what", name))
        layer.prefetch_override = [int(x) for x in req.get("profile") or []]
        self.layers.add(layer)
        log.info("layer added", extra={"kv": {"name": name, "layer": layer.what,
                                              "entries": len(toc.entries)}})
        if req.get("prefetch", True):
            self.prefetcher.start(layer)
        return {"slot": layer.slot}

    def op_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        name = str(req["name"])
        self.prefetcher.stop(name)
        self.execwatch.forget(name)
        layer = self.layers.remove(name)
        if layer is not None:
            log.info("layer removed", extra={"kv": {"name": name, "layer": layer.what}})
        return {"removed": layer is not None}

    def op_list(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"layers": [
            {"name": layer.name, "slot": layer.slot, "what": layer.what, "digest": layer.digest,
             "prefetch_done": layer.prefetch_done, "prefetch_total": layer.prefetch_total,
             "prefetch_planned": layer.prefetch_planned}
            for layer in self.layers.all()]}

    def op_predict(self, req: dict[str, Any]) -> dict[str, Any]:
        """Guess what an image's entrypoint reads first and prefetch those files, unless one
        of its layers carries a recorded prefetch list (a profile beats a guess)."""
        asked = [self._predict_layer(x) for x in req["layers"]]
        layers = [x for x in asked if x is not None]
        if len(layers) < len(asked) and req.get("require_all"):
            return {"files": [], "missing": True}  # the daemon asks again once all are added
        if not layers or any(x.prefetch_list for x in layers):
            return {"files": []}
        view = MergedView(layers)

        def read(layer: Layer, local: int, off: int, size: int) -> bytes:
            return self.reader.read(layer, local, off, size, record=False)

        predictor = Predictor(view, read)
        self.execwatch.watch(predictor)  # the programs the entrypoint starts, as they start
        sent: set[tuple[int, int]] = set()  # by layer object: a pending layer has no name yet

        def fetch_whole(files: list[Found]) -> None:
            todo = [f for f in files if (id(f.layer), f.local) not in sent]
            sent.update((id(f.layer), f.local) for f in todo)
            parts = [predictor.chunks(f) for f in todo]
            # every file's first part, then every file's last (a large program's code)
            self.prefetcher.fetch_files([(f.layer, chunk_ref(c)) for i in (0, 1)
                                         for f, part in zip(todo, parts, strict=True)
                                         for c in part[i]])

        found = predictor.predict(req.get("argv") or [], req.get("env") or [],
                                  str(req.get("workdir") or "/"), early=fetch_whole)
        fetch_whole(found)
        deeper = predictor.libraries(found)  # after the fetch is under way: more round trips
        # of those, what the loader reads: the rest they read thinly
        self.prefetcher.fetch_files(predictor.loader_chunks(deeper))
        log.info("predicted prefetch", extra={"kv": {"files": len(found), "argv0": (
            req.get("argv") or ["?"])[0], "libraries": len(deeper)}})
        return {"files": [f.path for f in found], "libraries": [f.path for f in deeper]}

    def _predict_layer(self, spec: str | dict[str, Any]) -> Layer | None:
        """A layer by name (added), or by TOC and blob digest: warmed and not yet added, or
        added under its own name by now."""
        if isinstance(spec, str):
            return self.layers.by_name(spec)
        with self._lock:
            pending = self._pending.get(str(spec["toc_digest"]))
        if pending is not None:
            return pending
        return next((x for x in self.layers.all() if x.digest == spec["digest"]), None)

    def op_profile(self, req: dict[str, Any]) -> dict[str, Any]:
        """Each layer's first-touch chunk order (blob offsets), by layer digest: what was
        recorded since the mount, else what was kept from the layer's first run here."""
        out = []
        if self._recording:
            self._recording = False
            self.pages.end()
        for layer in self.layers.all():
            layer.recording = False
            offsets = list(layer.touched) or self._saved_profile(layer.digest)
            out.append({"name": layer.name, "digest": layer.digest, "offsets": offsets,
                        "pages": layer.page_runs()})
        return {"layers": out}

    # -- profiles learnt at run time ---------------------------------------------
    def _profile_path(self, digest: str) -> Path | None:
        if self.profile_dir is None or not digest.startswith("sha256:"):
            return None
        return self.profile_dir / digest[7:]

    def _saved_profile(self, digest: str) -> list[int]:
        path = self._profile_path(digest)
        if path is None or not path.exists():
            return []
        try:
            return [int(x) for x in json.loads(path.read_text())]
        except (OSError, ValueError):
            return []

    def save_profiles(self, quiet: float = 5.0) -> int:
        """Keep each layer's first run: once its reads have paused for `quiet` seconds, its
        first-touch order is written once and never overwritten."""
        saved = 0
        now = time.monotonic()
        for layer in self.layers.all():
            path = self._profile_path(layer.digest)
            if (path is None or not layer.touched or path.exists()
                    or now - layer.last_touch < quiet):
                continue
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(layer.touched))
                os.replace(tmp, path)
            except OSError as exc:  # a full disk costs the profile, never the mounts
                log.warning("cannot keep a layer's first-run profile; it is tried again",
                            extra={"kv": {"layer": layer.what, "path": path, "error": exc}})
                with contextlib.suppress(OSError):
                    tmp.unlink()
                continue
            saved += 1
        return saved

    def op_profile_reset(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start recording afresh for the layers with these digests: forget what was touched
        and drop their pages from the kernel's cache, so every read of the workload reaches
        us (and is recorded) again."""
        digests = set(req.get("digests") or [])
        layers = [layer for layer in self.layers.all() if layer.digest in digests]
        if layers and not self._recording:
            # pages as the workload asks for them, not 128 KiB around each: what hot frames
            # hold is what the workload read, and the kernel's readahead is set per open file
            self._recording = True
            self.pages.begin()
        for layer in layers:
            layer.start_recording()  # before the pages are dropped: no hot frame refills them
            for local, node in layer.tree.nodes.items():
                if stat.S_ISREG(node.mode):
                    with contextlib.suppress(OSError):
                        pyfuse3.invalidate_inode(join_ino(layer.slot, local), attr_only=False)
        return {"layers": len(layers)}

    def op_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        f, c = self.fetcher.stats, self.cache.stats()
        return {"fetch": dataclasses.asdict(f), "cache": dataclasses.asdict(c),
                "kernel": kernelcaps.status(), "readlinks": self.ops.readlinks,
                "execwatch": {"programs": self.execwatch.programs,
                              "chunks": self.execwatch.chunks},
                "pid": os.getpid()}

    def op_prune(self, req: dict[str, Any]) -> dict[str, Any]:
        target = int(req.get("target_bytes", 0))
        if target == 0:
            self.fetcher.drop_memory()
        return {"removed": self.cache.prune(target)}

    def op_metrics(self, req: dict[str, Any]) -> dict[str, Any]:
        from snapshotter.fuse.metricsfmt import render

        return {"text": render(self)}

    def activity(self) -> int:
        """A counter that moves with every chunk read or fetched."""
        fs = self.fetcher.stats
        return self.cache.hits + self.cache.misses + fs.memory_hits + fs.bytes_fetched

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "mountpoint": str(self.mountpoint)}

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = getattr(self, "op_" + str(req.get("op")), None)
        if op is None:
            return {"ok": False, "error": f"unknown op {req.get('op')!r}"}
        try:
            return {"ok": True, **op(req)}
        except Exception as exc:
            log.warning("control request failed", extra={"kv": {"op": req.get("op"),
                                                                "error": exc}})
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n) if n else b""
    if len(data) != n:
        raise EOFError(f"range ended after {len(data)} of {n} bytes")
    return data


async def _serve_control(server: Server, path: str,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()  # "ready" is sent after this: the socket answers from then on

    async def client(stream: trio.SocketStream) -> None:
        # whatever happens to one client (a daemon killed mid-call hangs up before its
        # reply) stays with it: an exception here would end the process and every mount
        try:
            await _converse(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("control client went away", extra={"kv": {"error": exc}})
        except Exception as exc:
            log.error("control connection failed", extra={"kv": {"error": repr(exc)}})

    async def _converse(stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        req = protocol.decode(line)
                    except ValueError as exc:
                        await stream.send_all(protocol.encode({"ok": False, "error": str(exc)}))
                        continue
                    reply = await trio.to_thread.run_sync(server.handle, req)
                    await stream.send_all(protocol.encode(reply))

    await trio.serve_listeners(client, [listener])


def _unmount_stale(mountpoint: Path) -> None:
    """A mount left by a dead FUSE process answers ENOTCONN; clear it before mounting anew."""
    try:
        os.stat(mountpoint)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
    log.info("clearing the mount of a dead FUSE process", extra={"kv": {"at": mountpoint}})
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def _keep_profiles(server: Server) -> None:
    while True:
        await trio.sleep(2)
        await trio.to_thread.run_sync(server.save_profiles)


async def _trim_heap(server: Server) -> None:
    from snapshotter.memory import IdleTrim

    trim = IdleTrim(server.activity)
    while True:
        await trio.sleep(2)
        await trio.to_thread.run_sync(trim.tick)


async def _main(server: Server, control: str, ready_fd: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        await nursery.start(_serve_control, server, control)
        nursery.start_soon(_keep_profiles, server)
        nursery.start_soon(_trim_heap, server)
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                log.info("FUSE process stopping")
                pyfuse3.terminate()
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zest-fuse", description=__doc__.splitlines()[0])
    ap.add_argument("--mountpoint", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--cache-size", type=int, default=10 * 1024**3)
    ap.add_argument("--no-background-prefetch", action="store_true")
    ap.add_argument("--prefetch-parallel", type=int, default=4)
    ap.add_argument("--readahead", type=int, default=512 * 1024)
    ap.add_argument("--whole-file", type=int, default=64 << 20,
                    help="a miss fetches the rest of files up to this size (0: off)")
    ap.add_argument("--directory", type=int, default=512 << 10,
                    help="a miss in a small file fetches this many compressed bytes of its "
                         "directory's other small files (0: off)")
    ap.add_argument("--page-readahead-kb", type=int, default=-1,
                    help="the kernel's readahead on the mount (-1: leave the kernel's)")
    ap.add_argument("--profile-dir", help="where first-run profiles are kept")
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    from snapshotter.logs import setup_logging
    from snapshotter.memory import tune_malloc

    tune_malloc()
    setup_logging(args.log_level)
    mountpoint = Path(args.mountpoint)
    _unmount_stale(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    server = Server(mountpoint, ChunkCache(args.cache_dir, args.cache_size),
                    background_prefetch=not args.no_background_prefetch,
                    prefetch_parallel=args.prefetch_parallel, readahead=args.readahead,
                    whole_file=args.whole_file, directory=args.directory,
                    profile_dir=Path(args.profile_dir) if args.profile_dir else None)
    options = {"fsname=zest", "subtype=zest", "ro", "allow_other", "default_permissions"}
    pyfuse3.init(server.ops, str(mountpoint), options)
    if args.page_readahead_kb >= 0:
        set_page_readahead(mountpoint, args.page_readahead_kb)
    log.info("FUSE process serving", extra={"kv": {"mountpoint": mountpoint, "pid": os.getpid()}})
    threading.Thread(target=warm_up, name="zest-warm-up", daemon=True).start()
    try:
        trio.run(_main, server, args.control, args.ready_fd)
    finally:
        server.prefetcher.shutdown()
        server.execwatch.shutdown()
        pyfuse3.close(unmount=True)
        if os.path.exists(args.control):
            os.unlink(args.control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
