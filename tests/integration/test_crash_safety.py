"""Crash safety and the daemon's life cycle: kill -9 at any moment, restart, nothing to repair.

- kill -9 in the middle of a containerd pull, restart on the same root: the pull succeeds when
  tried again, the image runs, and after containerd's garbage collection (which ends with
  Cleanup) no directory is left.
- kill -9 while many clients create, commit and remove snapshots: the database is intact,
  every record has its directory, and Cleanup removes exactly the directories no record owns.
- start-up refuses a root in use, a socket in use and a root it cannot write; SIGTERM lets an
  in-flight RPC finish.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tests.conftest import ImageCache
from tests.support.containerd import Containerd, proxy_plugin_toml
from tests.support.snapshotterd import REPO, SnapshotsClient, Snapshotterd, code_of

pytestmark = pytest.mark.integration

OPT = {"containerd.io/gc.root": "crash-test"}
VIEW = 1  # the kind column: containerd's enum value


@pytest.fixture
def zest() -> Iterator[Snapshotterd]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with Snapshotterd(log_level="info") as zsd:
        yield zsd


def _entries(zsd: Snapshotterd) -> list[str]:
    try:
        return os.listdir(zsd.root / "snapshots")
    except FileNotFoundError:
        return []


def _db_state(zsd: Snapshotterd) -> tuple[str, dict[int, int]]:
    """(integrity_check, {id: kind}), read straight from the file of a dead daemon."""
    conn = sqlite3.connect(f"file:{zsd.root / 'metadata.db'}?mode=ro", uri=True)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        kinds = dict(conn.execute("SELECT id, kind FROM snapshots").fetchall())
    finally:
        conn.close()
    return check, kinds


# --- kill -9 during a pull -----------------------------------------------------------------------


@pytest.mark.parametrize(("kill_at", "delay"), [(1, 0.0), (1, 0.3), (2, 0.0), (2, 0.3)])
def test_kill_during_pull_then_pull_again(
    kill_at: int,
    delay: float,
    zest: Snapshotterd,
    containerd_factory: Callable[..., Containerd],
    image_cache: ImageCache,
) -> None:
    """kill -9 `delay` seconds after `kill_at` snapshot directories exist (1: the first layer's
    Prepare has begun, 2: the second's); the image's layers are 50 and 17 MB."""
    ctrd = containerd_factory(extra_toml=proxy_plugin_toml("zest", zest.address))
    ref = image_cache.push("debian-python")
    cmd = ["ctr", "--address", str(ctrd.address), "--namespace", ctrd.namespace]
    pull = subprocess.Popen(
        [*cmd, "images", "pull", "--plain-http", "--snapshotter", "zest", ref],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while len(_entries(zest)) < kill_at and pull.poll() is None:
            assert time.monotonic() < deadline, "pull never reached the kill point"
            time.sleep(0.002)
        time.sleep(delay)
        assert pull.poll() is None, "the pull ended before the kill point"
        zest.kill()
        pull.communicate(timeout=300)
    finally:
        if pull.poll() is None:
            pull.kill()
    assert pull.returncode != 0, "a pull cannot succeed without its snapshotter"

    assert _db_state(zest)[0] == "ok"
    zest.start()  # same root and socket: opens without repair, replaces the stale socket
    _wait_until_containerd_reconnects(ctrd)
    ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "zest", ref, timeout=600)
    recipe = image_cache.recipe("debian-python")
    cid = f"crash-{uuid.uuid4().hex[:8]}"
    out = ctrd.ctr("run", "--snapshotter", "zest", "--rm", ref, cid, *recipe.cmd, timeout=300)
    assert out.stdout.strip() == recipe.expected_output

    ctrd.ctr("images", "rm", "--sync", ref)  # GC: Remove what containerd no longer uses, Cleanup
    assert zest.client().list() == []
    assert _entries(zest) == []


def _wait_until_containerd_reconnects(ctrd: Containerd) -> None:
    """containerd's gRPC client redials a lost proxy with exponential backoff (up to 2 min) and
    fails calls fast meanwhile; a user would retry, so does the test. `snapshots prepare`
    reaches the proxy (`ls` and `stat` answer from containerd's own metadata)."""
    sn = ("snapshots", "--snapshotter", "zest")
    deadline = time.monotonic() + 150
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    while ctrd.ctr(*sn, "prepare", probe, check=False).returncode != 0:
        assert time.monotonic() < deadline, "containerd did not reconnect to zest"
        time.sleep(0.2)
    ctrd.ctr(*sn, "rm", probe)


# --- kill -9 under concurrent load ---------------------------------------------------------------


def _churn(client: SnapshotsClient, worker: str, stop: threading.Event) -> None:
    """Build and tear down small chains until the daemon dies under us."""
    n = 0
    while not stop.is_set():
        n += 1
        base = f"w{worker}-{n}"
        try:
            client.prepare(f"{base}-a0", "", OPT)
            client.commit(f"{base}-c0", f"{base}-a0", OPT)
            client.prepare(f"{base}-a1", f"{base}-c0", OPT)
            client.view(f"{base}-v", f"{base}-c0", OPT)
            if n % 2:
                client.remove(f"{base}-v")
                client.remove(f"{base}-a1")
                client.remove(f"{base}-c0")
        except grpc.RpcError as exc:
            if code_of(exc) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                return
            raise
        except ValueError as exc:  # kill() closed our channel between two calls
            if "closed channel" in str(exc):
                return
            raise


def test_kill_under_load_leaves_a_consistent_store(zest: Snapshotterd) -> None:
    rng = random.Random(1234)
    for _round in range(4):
        stop = threading.Event()
        clients = [zest.client() for _ in range(4)]
        with futures.ThreadPoolExecutor(len(clients)) as pool:
            jobs = [pool.submit(_churn, c, f"{_round}.{i}", stop) for i, c in enumerate(clients)]
            time.sleep(rng.uniform(0.2, 0.8))
            zest.kill()
            stop.set()
            for job in jobs:
                job.result(timeout=60)

        check, kinds = _db_state(zest)
        assert check == "ok"
        ids = set(kinds)
        snaps = zest.root / "snapshots"
        for sid, kind in kinds.items():  # every record's directory is complete
            assert (snaps / str(sid) / "fs").is_dir(), sid
            # views have no workdir; active snapshots do, and keep it once committed
            assert (snaps / str(sid) / "work").is_dir() == (kind != VIEW), sid

        zest.start()
        client = zest.client()
        names = {i.name for i in client.list()}
        assert len(names) == len(ids)
        client.cleanup()
        assert set(_entries(zest)) == {str(i) for i in ids}
        # the store keeps working: the same keys can be used again where they are free
        client.prepare(f"after-{_round}", "", OPT)
        client.remove(f"after-{_round}")


# --- start-up checks and graceful stop -----------------------------------------------------------


def _run_daemon(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`zest snapshotter ARGS` in the foreground, with an empty configuration file."""
    config = tmp_path / "empty.toml"
    config.write_text("")
    return subprocess.run(
        [sys.executable, "-m", "snapshotter", "snapshotter", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_refuses_a_root_in_use(zest: Snapshotterd, tmp_path: Path) -> None:
    other = str(tmp_path / "other.sock")
    done = _run_daemon(tmp_path, "--root", str(zest.root), "--address", other)
    assert done.returncode == 1
    assert "in use by another zest daemon" in done.stderr
    assert str(zest.pid) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_refuses_a_socket_in_use(zest: Snapshotterd, tmp_path: Path) -> None:
    done = _run_daemon(tmp_path, "--root", str(tmp_path / "root"), "--address", str(zest.address))
    assert done.returncode == 1
    assert "in use by a live daemon" in done.stderr
    assert zest.client().list() == []  # the live daemon is untouched


def test_refuses_a_root_it_cannot_write(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a read-only mount")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", ro, ro], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", ro], check=True)
        sock = str(tmp_path / "z.sock")
        done = _run_daemon(tmp_path, "--root", str(ro / "root"), "--address", sock)
    finally:
        subprocess.run(["umount", ro], check=True)
    assert done.returncode == 1
    assert "not writable" in done.stderr and "Read-only file system" in done.stderr


def test_socket_mode_and_stale_socket(zest: Snapshotterd) -> None:
    assert zest.address.stat().st_mode & 0o777 == 0o660
    zest.kill()
    assert zest.address.exists()  # left behind by the crash
    zest.start()
    assert zest.client().list() == []
    assert zest.stop() == 0
    assert not zest.address.exists()


def test_sigterm_lets_an_in_flight_rpc_finish(zest: Snapshotterd) -> None:
    client = zest.client()
    (m,) = client.prepare("big", "", OPT)
    fd = os.open(m.source, os.O_RDONLY | os.O_DIRECTORY)
    try:  # 150k names: Commit stats every one of them (about 0.5 s), a slow RPC
        for j in range(5):
            os.close(os.open(f"f{j}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            for i in range(30_000):
                os.link(f"f{j}", f"l{j}-{i}", src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    with futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(client.commit, "big-c", "big", OPT)
        time.sleep(0.1)
        assert zest.proc is not None
        zest.proc.terminate()
        job.result(timeout=60)  # finished, not cut off
        assert zest.proc.wait(timeout=60) == 0
    zest.start()
    assert zest.client().stat("big-c").name == "big-c"
