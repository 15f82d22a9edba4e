"""Wiring of `zest snapshotter`: config -> root -> metadata -> snapshotter -> gRPC; signals.

Start-up, in order: take the root's lock (one daemon per root), refuse a socket a live daemon
answers on, open the metadata, mount remote layers again, and only then listen. SIGTERM or
SIGINT stops accepting RPCs, lets in-flight ones finish (grpc.shutdown_timeout), closes the
database and removes the socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc

from snapshotter import service
from snapshotter.config import Config, GrpcConfig
from snapshotter.fuseproc import FuseConfig, FuseProcess
from snapshotter.memory import tune_malloc
from snapshotter.metadata import MetaStore
from snapshotter.metrics_http import serve_metrics
from snapshotter.registry.client import warm_up
from snapshotter.remote import RemoteLayers
from snapshotter.snapshots import Snapshotter

log = logging.getLogger(__name__)

LOCK_FILE = "zest.lock"
DB_FILE = "metadata.db"


class StartupError(Exception):
    """The daemon cannot start; the message tells the operator why."""


def run(config: Config) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    tune_malloc()
    stop = threading.Event()
    with _root_lock(config.root):
        _claim_socket(config.grpc.address)
        store = MetaStore(config.root / DB_FILE, synchronous=config.metadata.synchronous)
        fuse = _fuse_process(config) if config.remote.enabled else None
        metrics = None
        try:
            snapshotter = _snapshotter(config, store, fuse)
            if fuse is not None:
                threading.Thread(target=warm_up, name="zest-warm-up", daemon=True).start()
                fuse.ensure()  # up before the first Prepare: a pull should not wait for it
            snapshotter.restore()
            _install_signal_handlers(stop)
            server = _serve(snapshotter, config.grpc)
            if config.remote.metrics_address:
                metrics = serve_metrics(config.remote.metrics_address, fuse)
            log.info(
                "serving",
                extra={"kv": {"address": config.grpc.address, "root": config.root}},
            )
            while not stop.wait(3600):
                pass
            log.info("stopping", extra={"kv": {"grace_s": config.grpc.shutdown_timeout}})
            server.stop(config.grpc.shutdown_timeout).wait()
            if fuse is not None and config.remote.stop_fuse_on_exit:
                fuse.stop()
        finally:
            if metrics is not None:
                metrics.shutdown()
            store.close()
            with contextlib.suppress(FileNotFoundError):
                config.grpc.address.unlink()
    log.info("stopped")
    return 0


def _fuse_process(config: Config) -> FuseProcess:
    """The FUSE process of this root (started when the first lazy layer needs it)."""
    fuse_dir = config.root / "fuse"
    return FuseProcess(FuseConfig(
        mountpoint=fuse_dir / "mnt", control=fuse_dir / "control.sock",
        cache_dir=config.root / "cache", cache_size=config.remote.cache_size_mb << 20,
        log_file=fuse_dir / "fuse.log", background_prefetch=config.remote.background_prefetch,
        prefetch_parallel=config.remote.prefetch_parallel,
        readahead=config.remote.readahead_kb << 10, whole_file=config.remote.whole_file_mb << 20,
        directory=config.remote.directory_kb << 10,
        page_readahead_kb=config.remote.page_readahead_kb, log_level=config.log_level))


def _snapshotter(config: Config, store: MetaStore, fuse: FuseProcess | None) -> Snapshotter:
    index_off = {"auto": None, "on": True, "off": False}[config.snapshots.overlay_index_off]
    mounter = None
    if fuse is not None:
        mounter = RemoteLayers(config.root, fuse, plain_http_hosts=config.remote.plain_http,
                               hosts_dir=config.remote.hosts_dir,
                               unpack=config.remote.unpack, predict=config.remote.predict,
                               unpack_parallel=config.remote.unpack_parallel)
    return Snapshotter(
        config.root,
        store,
        mounter=mounter,
        async_remove=config.snapshots.async_remove,
        index_off=index_off,
    )


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    """Create the root if needed, prove it writable, and hold its lock while we run."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"root {root} is not writable: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            msg = f"root {root} is in use by another zest daemon (pid {owner})"
            raise StartupError(msg) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            raise StartupError(f"root {root} is not writable: {exc.strerror or exc}") from exc
        yield
    finally:
        os.close(fd)


def _claim_socket(path: Path) -> None:
    """Refuse a socket a live daemon answers on; remove a stale one left by a crash."""
    try:
        path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot use socket directory {path.parent}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            log.info("removing stale socket", extra={"kv": {"address": path}})
            path.unlink()
            return
    raise StartupError(f"socket {path} is in use by a live daemon")


def _serve(snapshotter: Snapshotter, cfg: GrpcConfig) -> grpc.Server:
    pool = futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="rpc")
    server = grpc.server(pool)
    service.add_to_server(snapshotter, server)
    old_umask = os.umask(0o777 & ~cfg.socket_mode)  # never a moment with wider permissions
    try:
        server.add_insecure_port(f"unix:{cfg.address}")
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {cfg.address}: {exc}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(cfg.address, cfg.socket_mode)
    server.start()
    return server


def _install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("signal", extra={"kv": {"signal": signal.Signals(signum).name}})
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
