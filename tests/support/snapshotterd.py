"""`zest snapshotter` as a subprocess with its own root and socket, and a client for its API.

    with Snapshotterd() as zsd:                     # or zsd = Snapshotterd(); zsd.start()
        sn = zsd.client()
        mounts = sn.prepare("key", "")
        zsd.kill()                                  # SIGKILL, like a crash
        zsd.start()                                 # same root, same socket

`SnapshotsClient` speaks containerd's Snapshots API over gRPC to any socket: the daemon's, or
containerd's own (pass `namespace=` and `snapshotter="overlayfs"`). Failed RPCs raise
grpc.RpcError; `code_of(exc)` gives the status code. `mount_all` and `unmount` mount what an
RPC returned, as containerd would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from snapshotter._pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.support.mounts import remove_tree, unmount_under

REPO = Path(__file__).resolve().parents[2]


def _short_tmp() -> str:
    """A parent dir short enough for a unix socket path (108 bytes)."""
    run_tmp = os.environ.get("ZEST_TEST_RUN_TMP", "")
    return run_tmp if run_tmp and len(run_tmp) < 50 else tempfile.gettempdir()


class SnapshotterdError(RuntimeError):
    """The daemon did not start or stop as expected; the message has its log's tail."""


class Snapshotterd:
    """One `zest snapshotter` process; see the module docstring."""

    def __init__(
        self,
        *,
        root: Path | None = None,
        config_toml: str = "",
        log_level: str = "debug",
        start_timeout: float = 30.0,
    ) -> None:
        self.base_dir = Path(tempfile.mkdtemp(prefix="zsd-", dir=_short_tmp()))
        self.root = root or self.base_dir / "root"
        self.address = self.base_dir / "zest.sock"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "zest.log"
        self.config_path.write_text(config_toml)
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[SnapshotsClient] = []

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "snapshotter",
            "snapshotter",
            "--config",
            str(self.config_path),
            "--root",
            str(self.root),
            "--address",
            str(self.address),
            "--log-level",
            self.log_level,
        ]

    def start(self) -> Snapshotterd:
        if self.running:
            raise SnapshotterdError("already running")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise SnapshotterdError(f"exited with {self.proc.returncode}\n{self.log_tail()}")
            if self.address.exists():
                with (
                    grpc.insecure_channel(f"unix:{self.address}") as ch,
                    contextlib.suppress(grpc.FutureTimeoutError),
                ):
                    grpc.channel_ready_future(ch).result(timeout=1)
                    return
            if time.monotonic() > deadline:
                raise SnapshotterdError(f"not ready after {self.start_timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code (None if it was not started: -1)."""
        self._close_clients()
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                self.proc.kill()
                self.proc.wait(timeout=10)
                msg = f"no exit {timeout}s after SIGTERM\n{self.log_tail()}"
                raise SnapshotterdError(msg) from exc
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would; the socket file stays behind."""
        self._close_clients()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop_fuse(self) -> None:
        """Stop the daemon's FUSE process, which outlives the daemon by design."""
        from snapshotter.fuseproc import FuseConfig, FuseProcess

        fuse = self.root / "fuse"
        FuseProcess(FuseConfig(fuse / "mnt", fuse / "control.sock", self.root / "cache", 1,
                               fuse / "fuse.log")).stop()
        subprocess.run(["umount", "-l", str(fuse / "mnt")], capture_output=True, check=False)

    def remove(self) -> None:
        """Stop if running (and its FUSE process), then delete the dirs (unmounting whatever
        is left under them)."""
        if self.running:
            self.kill()
        self.stop_fuse()
        self._kill_leftovers()
        if not self.root.is_relative_to(self.base_dir):
            unmount_under(self.root)  # a root the caller owns: unmounted, but kept
        remove_tree(self.base_dir)

    def _kill_leftovers(self) -> None:
        """A daemon killed while it was starting a FUSE process leaves a child that stop_fuse
        cannot find yet (forked, not yet running the server) and that mounts afterwards.
        Anything whose command line names this daemon's dirs goes, looked for twice."""
        marks = (str(self.base_dir), str(self.root / "fuse"))
        for _ in range(2):
            time.sleep(0.2)
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == os.getpid():
                    continue
                try:
                    argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                except OSError:
                    continue
                if any(a.startswith(marks) for a in argv):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(entry.name), signal.SIGKILL)

    def client(self) -> SnapshotsClient:
        c = SnapshotsClient(self.address)
        self._clients.append(c)
        return c

    def _close_clients(self) -> None:
        for c in self._clients:
            c.close()
        self._clients = []

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> Snapshotterd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


class SnapshotsClient:
    """containerd.services.snapshots.v1.Snapshots over a unix socket."""

    def __init__(
        self,
        address: str | os.PathLike[str],
        *,
        snapshotter: str = "zest",
        namespace: str | None = None,
        timeout: float = 60,
    ) -> None:
        self.snapshotter = snapshotter
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{os.fspath(address)}")
        self._stub = pb_grpc.SnapshotsStub(self._channel)
        # containerd's own API needs a namespace; a proxy snapshotter ignores it.
        self._metadata = (("containerd-namespace", namespace),) if namespace else ()

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> Any:
        req = pb.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
        )
        return list(self._call("Prepare", req).mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> Any:
        req = pb.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
        )
        return list(self._call("View", req).mounts)

    def mounts(self, key: str) -> Any:
        req = pb.MountsRequest(snapshotter=self.snapshotter, key=key)
        return list(self._call("Mounts", req).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = pb.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=labels or {}
        )
        self._call("Commit", req)

    def remove(self, key: str) -> None:
        self._call("Remove", pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key))

    def stat(self, key: str) -> Any:
        req = pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)
        return self._call("Stat", req).info

    def update(self, info: Any, paths: Sequence[str] = ()) -> Any:
        req = pb.UpdateSnapshotRequest(snapshotter=self.snapshotter, info=info)
        req.update_mask.paths.extend(paths)
        return self._call("Update", req).info

    def usage(self, key: str) -> tuple[int, int]:
        resp = self._call("Usage", pb.UsageRequest(snapshotter=self.snapshotter, key=key))
        return resp.size, resp.inodes

    def list(self, filters: Iterable[str] = ()) -> list[Any]:
        req = pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
        stream = self._stub.List(req, timeout=self.timeout, metadata=self._metadata)
        return [info for resp in stream for info in resp.info]

    def list_batches(self, filters: Iterable[str] = ()) -> list[int]:
        """Sizes of the streamed List responses."""
        req = pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
        stream = self._stub.List(req, timeout=self.timeout, metadata=self._metadata)
        return [len(resp.info) for resp in stream]

    def cleanup(self) -> None:
        self._call("Cleanup", pb.CleanupRequest(snapshotter=self.snapshotter))

    def close(self) -> None:
        self._channel.close()


def code_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a failed RPC."""
    return exc.code() if isinstance(exc, grpc.RpcError) else None  # type: ignore[attr-defined]


def mount_all(mounts: Sequence[Any], target: str | os.PathLike[str]) -> None:
    """Mount what a Prepare/View/Mounts returned at target, as containerd's mount.All does:
    options longer than a page get lowerdirs relative to their common parent (mount_linux.go)."""
    for m in mounts:
        opts = list(m.options)
        cwd = None
        if m.type == "overlay" and len(",".join(opts)) >= os.sysconf("SC_PAGE_SIZE") - 1:
            opts, cwd = _compact_lowerdirs(opts)
        if m.type == "bind":
            # mount(8) makes a read-only bind in two steps (bind, then remount), as containerd does.
            cmd = ["mount", "--no-mtab", "-o", ",".join(opts), m.source, os.fspath(target)]
        else:
            cmd = [
                "mount",
                "--no-mtab",
                "-t",
                m.type,
                "-o",
                ",".join(opts),
                m.source,
                os.fspath(target),
            ]
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=cwd)


def _compact_lowerdirs(opts: list[str]) -> tuple[list[str], str]:
    i = next(n for n, o in enumerate(opts) if o.startswith("lowerdir="))
    lowers = opts[i][len("lowerdir=") :].split(":")
    common = os.path.commonpath(lowers)
    rel = [os.path.relpath(p, common) for p in lowers]
    return [*opts[:i], "lowerdir=" + ":".join(rel), *opts[i + 1 :]], common


def unmount(target: str | os.PathLike[str]) -> None:
    subprocess.run(["umount", os.fspath(target)], check=True, capture_output=True, text=True)
