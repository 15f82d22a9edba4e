"""Starting, finding and talking to the FUSE process, from the daemon's side.

The FUSE process is started in its own session so that it outlives a restart
(or a kill -9) of the daemon; the daemon finds it again through the control
socket. If it died, the mount it left is cleared and a new one is started;
the daemon then adds every remote layer back from its metadata.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.fuse import protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FuseConfig:
    mountpoint: Path
    control: Path
    cache_dir: Path
    cache_size: int
    log_file: Path
    background_prefetch: bool = True
    prefetch_parallel: int = 4
    readahead: int = 512 * 1024
    whole_file: int = 64 << 20
    directory: int = 512 << 10
    page_readahead_kb: int = -1
    log_level: str = "info"


class FuseProcess:
    def __init__(self, cfg: FuseConfig):
        self.cfg = cfg

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        return protocol.call(str(self.cfg.control), {"op": op, **kw})

    def alive(self) -> bool:
        try:
            self.call("ping")
            return True
        except protocol.ControlError:
            return False

    def ensure(self, timeout: float = 30.0) -> bool:
        """Connect to a running FUSE process or start one. True when a new one was started
        (its layers must then be added again)."""
        if self.alive():
            return False
        self.start(timeout)
        return True

    def start(self, timeout: float = 30.0) -> None:
        cfg = self.cfg
        cfg.log_file.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "snapshotter.fuse.server",
               "--mountpoint", str(cfg.mountpoint), "--control", str(cfg.control),
               "--cache-dir", str(cfg.cache_dir), "--cache-size", str(cfg.cache_size),
               "--prefetch-parallel", str(cfg.prefetch_parallel),
               "--readahead", str(cfg.readahead), "--whole-file", str(cfg.whole_file),
               "--directory", str(cfg.directory),
               "--page-readahead-kb", str(cfg.page_readahead_kb),
               "--profile-dir", str(cfg.cache_dir.parent / "profiles"),
               "--log-level", cfg.log_level, "--ready-fd", str(write_fd)]
        if not cfg.background_prefetch:
            cmd.append("--no-background-prefetch")
        with open(cfg.log_file, "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        deadline = time.monotonic() + timeout
        try:
            os.set_blocking(read_fd, False)
            buf = b""
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(read_fd, 64)
                except BlockingIOError:
                    chunk = None
                if chunk:
                    buf += chunk
                    if b"ready" in buf:
                        break
                if proc.poll() is not None:
                    raise RuntimeError(f"FUSE process exited with {proc.returncode}; see "
                                       f"{cfg.log_file}")
                time.sleep(0.02)
            else:
                proc.kill()
                raise RuntimeError(f"FUSE process did not start in {timeout}s; see {cfg.log_file}")
        finally:
            os.close(read_fd)
        log.info("FUSE process started", extra={"kv": {"pid": proc.pid,
                                                      "mountpoint": cfg.mountpoint}})

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the FUSE process to unmount and exit (only on an operator's request: a daemon
        restart leaves it running)."""
        try:
            pid = int(self.call("ping")["pid"])
        except protocol.ControlError:
            found = _find_by_control(self.cfg.control)  # its socket is gone, not its process
            if found is None:
                return
            pid = found
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.05)
        os.kill(pid, 9)


def _find_by_control(control: Path) -> int | None:
    """The pid of a FUSE process started for this control socket path, if one still runs."""
    want = ["--control", str(control)]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "snapshotter.fuse.server" in argv and any(
                argv[i : i + 2] == want for i in range(len(argv) - 1)):
            return int(entry.name)
    return None


def _running(pid: int) -> bool:
    """False once the process is gone (reaped here if it is our child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
