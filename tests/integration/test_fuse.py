"""The FUSE process on a real mount: tree, attributes, data, whiteouts, overlayfs composition."""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkstore.convert import convert_tar
from chunkstore.digest import Digest
from chunkstore.toc import read_footer
from snapshotter.fuseproc import FuseConfig, FuseProcess

pytestmark = pytest.mark.integration

RND = random.Random(1)
# cap_net_raw+ep as a VFS_CAP_REVISION_2 value: magic|effective, then permitted/inheritable words
CAP = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
BIG = RND.randbytes(3 * 1024 * 1024 + 123)


def _info(name: str, type_: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mtime, ti.mode = type_, 1_700_000_000, 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            ti.size = len(data) if ti.isreg() else 0
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


LOWER = _tar([
    (_info("etc", tarfile.DIRTYPE, mode=0o755), b""),
    (_info("etc/passwd"), b"root:x:0:0\n"),
    (_info("etc/gone"), b"will be whited out\n"),
    (_info("var/lib/data", tarfile.DIRTYPE, mode=0o700), b""),  # parents never listed
    (_info("var/lib/data/old"), b"hidden by opaque\n"),
    (_info("bin/big", mode=0o755, uid=12, gid=34), BIG),
    (_info("bin/ping", mode=0o4755,
           pax_headers={"SCHILY.xattr.security.capability":
                                  CAP.decode("utf-8", "surrogateescape")}), b"ELF"),
    (_info("bin/sh", tarfile.SYMTYPE, linkname="big"), b""),
    (_info("bin/hard", tarfile.LNKTYPE, linkname="bin/big"), b""),
    (_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
    (_info("run/fifo", tarfile.FIFOTYPE), b""),
    (_info("empty"), b""),
])  # fmt: skip
UPPER = _tar([
    (_info("etc/.wh.gone"), b""),
    (_info("var/lib/data/.wh..wh..opq"), b""),
    (_info("var/lib/data/new"), b"new data\n"),
    (_info("etc/added"), b"upper file\n"),
])  # fmt: skip


def _blob(tmp: Path, name: str, tar: bytes) -> tuple[Path, Path, str]:
    blob = tmp / f"{name}.blob"
    with open(blob, "wb") as f:
        convert_tar(io.BytesIO(tar), f)  # type: ignore[arg-type]
    data = blob.read_bytes()
    footer = read_footer(lambda o, n: data[o : o + n], len(data))
    toc = tmp / f"{name}.toc"
    toc.write_bytes(data[footer.toc_offset : footer.toc_offset + footer.toc_size])
    return blob, toc, str(footer.toc_digest)


@pytest.fixture
def fuse(tmp_path: Path) -> Iterator[tuple[FuseProcess, Path]]:
    if os.geteuid() != 0:
        pytest.skip("FUSE mounts need root")
    cfg = FuseConfig(mountpoint=tmp_path / "mnt", control=tmp_path / "fuse.sock",
                     cache_dir=tmp_path / "cache", cache_size=1 << 30,
                     log_file=tmp_path / "fuse.log", background_prefetch=False)
    proc = FuseProcess(cfg)
    proc.start()
    try:
        yield proc, cfg.mountpoint
    finally:
        proc.stop()
        subprocess.run(["umount", "-l", str(cfg.mountpoint)], capture_output=True)


def _add(proc: FuseProcess, tmp: Path, name: str, slot: int, tar: bytes) -> Path:
    blob, toc, digest = _blob(tmp, name, tar)
    proc.call("add", name=name, slot=slot, toc_path=str(toc), toc_digest=digest,
              source={"kind": "file", "path": str(blob)}, what=f"test {name}", prefetch=False)
    return blob


def test_tree_attributes_and_data(fuse: tuple[FuseProcess, Path], tmp_path: Path) -> None:
    proc, mnt = fuse
    _add(proc, tmp_path, "lower", 1, LOWER)
    root = mnt / "lower"
    assert sorted(os.listdir(mnt)) == ["lower"]
    assert sorted(os.listdir(root)) == ["bin", "dev", "empty", "etc", "run", "var"]
    assert (root / "etc/passwd").read_bytes() == b"root:x:0:0\n"
    assert (root / "bin/big").read_bytes() == BIG
    with open(root / "bin/big", "rb") as f:  # random access in the middle of a chunk
        f.seek(2_000_001)
        assert f.read(5000) == BIG[2_000_001:2_005_001]
    st = os.stat(root / "bin/big")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12, 34, 0o755)
    assert st.st_mtime == 1_700_000_000 and st.st_size == len(BIG)
    assert os.stat(root / "bin/hard").st_ino == st.st_ino and st.st_nlink == 2
    assert os.readlink(root / "bin/sh") == "big"
    assert stat.S_IMODE(os.stat(root / "bin/ping").st_mode) == 0o4755
    assert os.getxattr(root / "bin/ping", "security.capability") == CAP
    dev = os.stat(root / "dev/null")
    assert stat.S_ISCHR(dev.st_mode) and os.major(dev.st_rdev) == 1 and os.minor(dev.st_rdev) == 3
    assert stat.S_ISFIFO(os.stat(root / "run/fifo").st_mode)
    assert stat.S_IMODE(os.stat(root / "var/lib/data").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / "var").st_mode) == 0o755  # made up: not in the tar
    assert (root / "empty").read_bytes() == b""
    with pytest.raises(OSError):
        open(root / "etc/passwd", "w")  # noqa: SIM115
    ino = os.stat(root / "etc/passwd").st_ino
    proc.call("remove", name="lower")
    _add(proc, tmp_path, "lower", 1, LOWER)
    assert os.stat(root / "etc/passwd").st_ino == ino  # stable inode numbers


def test_whiteouts_compose_with_overlayfs(fuse: tuple[FuseProcess, Path], tmp_path: Path) -> None:
    proc, mnt = fuse
    _add(proc, tmp_path, "lower", 1, LOWER)
    _add(proc, tmp_path, "upper", 2, UPPER)
    wh = os.stat(mnt / "upper/etc/gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(mnt / "upper/var/lib/data", "trusted.overlay.opaque") == b"y"
    assert ".wh..wh..opq" not in os.listdir(mnt / "upper/var/lib/data")
    merged = tmp_path / "merged"
    merged.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={mnt}/upper:{mnt}/lower", str(merged)], check=True)
    try:
        assert sorted(os.listdir(merged / "etc")) == ["added", "passwd"]
        assert sorted(os.listdir(merged / "var/lib/data")) == ["new"]
        assert (merged / "bin/big").read_bytes() == BIG
        assert (merged / "etc/added").read_text() == "upper file\n"
    finally:
        subprocess.run(["umount", str(merged)], check=True)


@pytest.mark.allow_log_errors
def test_corrupt_blob_gives_eio_never_bad_bytes(fuse: tuple[FuseProcess, Path],
                                                tmp_path: Path) -> None:
    proc, mnt = fuse
    blob = _add(proc, tmp_path, "lower", 1, LOWER)
    data = bytearray(blob.read_bytes())
    i = data.find(b"root:x")  # not compressed: tiny frames may be stored raw
    pos = i if i >= 0 else len(data) // 3
    data[pos : pos + 4] = b"EVIL"
    blob.write_bytes(bytes(data))
    with pytest.raises(OSError) as exc:
        (mnt / "lower/etc/passwd").read_bytes()
    assert exc.value.errno == 5
    stats = proc.call("stats")
    # each failing read: the range, then the chunk once more on its own; never a third time
    failures = stats["fetch"]["verify_failures"]
    assert failures >= 2 and failures % 2 == 0


def test_cache_serves_after_blob_is_gone(fuse: tuple[FuseProcess, Path], tmp_path: Path) -> None:
    proc, mnt = fuse
    blob = _add(proc, tmp_path, "lower", 1, LOWER)
    assert (mnt / "lower/bin/big").read_bytes() == BIG
    blob.unlink()
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
    assert (mnt / "lower/bin/big").read_bytes() == BIG
    assert Digest.of(BIG)  # sanity: data compared above came through the chunk cache


def test_stop_finds_a_process_whose_socket_is_gone(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("FUSE mounts need root")
    cfg = FuseConfig(mountpoint=tmp_path / "mnt", control=tmp_path / "fuse.sock",
                     cache_dir=tmp_path / "cache", cache_size=1 << 20,
                     log_file=tmp_path / "fuse.log")
    proc = FuseProcess(cfg)
    proc.start()
    pid = int(proc.call("ping")["pid"])
    cfg.control.unlink()  # e.g. its directory was cleaned away under it
    proc.stop()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
        f"/proc/{pid}/status").read_text().lower()
    subprocess.run(["umount", "-l", str(cfg.mountpoint)], capture_output=True)


def test_kernel_readahead_of_the_mount_is_set(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("FUSE mounts need root")
    cfg = FuseConfig(mountpoint=tmp_path / "mnt", control=tmp_path / "fuse.sock",
                     cache_dir=tmp_path / "cache", cache_size=1 << 30,
                     log_file=tmp_path / "fuse.log", background_prefetch=False,
                     page_readahead_kb=16)
    proc = FuseProcess(cfg)
    proc.start()
    try:
        _add(proc, tmp_path, "lower", 1, LOWER)
        dev = os.stat(cfg.mountpoint).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        assert bdi.read_text().strip() == "16"
        with open(cfg.mountpoint / "lower/bin/big", "rb") as f:  # still reads right
            f.seek(3_000_000)
            assert f.read(70_000) == BIG[3_000_000:3_070_000]
    finally:
        proc.stop()
        subprocess.run(["umount", "-l", str(cfg.mountpoint)], capture_output=True)


def test_a_client_that_hangs_up_before_its_reply_leaves_the_process_serving(
        fuse: tuple[FuseProcess, Path], tmp_path: Path) -> None:
    """A daemon killed mid-call: the FUSE process answers into a closed socket. That once
    ended the process, and with it every mount under running containers."""
    import socket

    proc, mnt = fuse
    _add(proc, tmp_path, "lower", 1, LOWER)
    for _ in range(3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(proc.cfg.control))
            s.sendall(b'{"op": "list"}\n')  # and gone before the answer
    time.sleep(0.5)
    assert proc.alive()
    assert (mnt / "lower/etc/passwd").read_bytes() == b"root:x:0:0\n"


def test_the_kernel_caches_symlink_targets(fuse: tuple[FuseProcess, Path],
                                           tmp_path: Path) -> None:
    proc, mnt = fuse
    _add(proc, tmp_path, "lower", 1, LOWER)
    for _ in range(50):
        assert os.readlink(mnt / "lower/bin/sh") == "big"
    stats = proc.call("stats")
    assert stats["kernel"] == {"loaded": True, "cache_symlinks": True}
    assert stats["readlinks"] == 1  # the first; the kernel answered the other 49


def _hot_layer(tmp: Path, name: str,
               pages: list[tuple[bytes, int, int]]) -> tuple[Path, Path, str]:
    """LOWER with hot frames for `pages` ((path, first page, pages)), as `zest optimize`
    writes them."""
    from chunkstore import hot
    from chunkstore.toc import load_toc

    blob, _, _ = _blob(tmp, name, LOWER)
    data = blob.read_bytes()
    footer = read_footer(lambda o, n: data[o : o + n], len(data))
    toc = load_toc(lambda o, n: data[o : o + n], footer)
    index = {e.name: k for k, e in enumerate(toc.entries)}
    with open(blob, "r+b") as f:
        new = hot.finish_blob(f, footer.toc_offset - 8, toc,
                              [(index[p], first, n) for p, first, n in pages])
    data = blob.read_bytes()
    tocf = tmp / f"{name}.toc"
    tocf.write_bytes(data[new.toc_offset : new.toc_offset + new.toc_size])
    return blob, tocf, str(new.toc_digest)


def _fuse_reads(proc: FuseProcess) -> float:
    text = proc.call("metrics")["text"]
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("zest_fuse_read_seconds_count")))


def _wait_prefetched(proc: FuseProcess, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        layer = next(x for x in proc.call("list")["layers"] if x["name"] == name)
        if layer["prefetch_total"] and layer["prefetch_done"] >= layer["prefetch_total"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"prefetch of {name} did not finish")


def test_hot_frames_go_into_the_page_cache_before_anything_reads(
        fuse: tuple[FuseProcess, Path], tmp_path: Path) -> None:
    proc, mnt = fuse
    blob, toc, digest = _hot_layer(tmp_path, "hot", [(b"bin/big", 100, 3), (b"etc/passwd", 0, 1)])
    proc.call("add", name="hot", slot=1, toc_path=str(toc), toc_digest=digest,
              source={"kind": "file", "path": str(blob)}, what="test hot", prefetch=True)
    _wait_prefetched(proc, "hot")
    before = _fuse_reads(proc)
    with open(mnt / "hot/bin/big", "rb") as f:
        f.seek(100 * 4096)
        assert f.read(3 * 4096) == BIG[100 * 4096 : 103 * 4096]
    assert (mnt / "hot/etc/passwd").read_bytes() == b"root:x:0:0\n"
    assert _fuse_reads(proc) == before  # the kernel had the pages: no read reached us
    with open(mnt / "hot/bin/big", "rb") as f:  # pages nobody recorded still come from chunks
        f.seek(2_000_000)
        assert f.read(5000) == BIG[2_000_000:2_005_000]
    assert _fuse_reads(proc) > before


def test_a_corrupt_hot_frame_is_never_served_and_its_chunks_are(
        fuse: tuple[FuseProcess, Path], tmp_path: Path) -> None:
    from chunkstore import format as fmt

    proc, mnt = fuse
    blob, toc, digest = _hot_layer(tmp_path, "bad", [(b"bin/big", 0, 40)])
    frame = fmt.decode_toc(toc.read_bytes()).hot_frames[0]
    data = bytearray(blob.read_bytes())
    data[frame.blob_offset + frame.compressed_size // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    proc.call("add", name="bad", slot=1, toc_path=str(toc), toc_digest=digest,
              source={"kind": "file", "path": str(blob)}, what="test bad", prefetch=False)
    with open(mnt / "bad/bin/big", "rb") as f:
        assert f.read(40 * 4096) == BIG[: 40 * 4096]
    assert proc.call("stats")["fetch"]["verify_failures"] >= 1  # the hot frame was refused
