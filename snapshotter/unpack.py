"""Layers not in zest's format: fetched by the daemon, checked, and unpacked into a snapshot.

containerd downloads every layer after the first one a snapshotter does not
answer ALREADY_EXISTS, one at a time; so the daemon serves ordinary layers too:
the blobs of all such layers of an image are downloaded in parallel as soon as
the first of them is prepared, and each is unpacked into its snapshot directory
in the overlayfs layout (whiteouts as 0/0 character devices, opaque directories
as `trusted.overlay.opaque`), its DiffID checked against the image config.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

from chunkstore import tarstream
from chunkstore.digest import Digest
from chunkstore.errors import FormatError
from snapshotter.image.layers import VerifyingReader, open_tar_stream

log = logging.getLogger(__name__)

_OPAQUE_XATTR = "trusted.overlay.opaque"


class UnpackError(Exception):
    """The layer could not be unpacked; containerd's ordinary path may still manage it."""


class BlobOpener(Protocol):
    def open_blob(self, repo: str, digest: str) -> BinaryIO: ...


class BlobDownloads:
    """Downloads layer blobs into `<dir>/<hex>` in parallel, verified, once per digest."""

    def __init__(self, directory: Path, parallel: int = 3):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="zest-blob")
        self._lock = threading.Lock()
        self._jobs: dict[str, Future[Path]] = {}

    def path(self, digest: str) -> Path:
        return self.dir / Digest.parse(digest).hex

    def start(self, client: BlobOpener, repo: str, digest: str, size: int) -> Future[Path]:
        with self._lock:
            fut = self._jobs.get(digest)
            if fut is None or (fut.done() and fut.exception() is not None):
                fut = self._jobs[digest] = self._pool.submit(self._download, client, repo,
                                                             digest, size)
            return fut

    def forget(self, digest: str) -> None:
        """Drop a blob once its layer is unpacked."""
        with self._lock:
            self._jobs.pop(digest, None)
        self.path(digest).unlink(missing_ok=True)

    def _download(self, client: BlobOpener, repo: str, digest: str, size: int) -> Path:
        final = self.path(digest)
        if final.exists():
            return final
        tmp = self.dir / f".{final.name}.{uuid.uuid4().hex}"
        try:
            with client.open_blob(repo, digest) as src, open(tmp, "wb") as dst:
                reader = VerifyingReader(src, digest, size, f"layer {digest}")
                while chunk := reader.read(1 << 20):
                    dst.write(chunk)
                reader.check()
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final


def _safe_parent(root: Path, name: bytes) -> Path:
    """The parent directory of `name` under root, created if missing; refuses symlinked parents
    (a layer must not write through a link out of its own directory)."""
    parts = name.split(b"/")[:-1]
    cur = root
    for part in parts:
        cur = cur / os.fsdecode(part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise UnpackError(f"tar entry {name!r} goes through symlink {cur}")
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(cur)
            os.mkdir(cur, 0o755)
    return cur


def _remove(path: Path, keep_dir: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return
        import shutil

        shutil.rmtree(path)
    else:
        os.unlink(path)


def apply_tar(stream: BinaryIO, root: Path) -> Digest:
    """Unpack a tar stream into root in overlayfs' layout; returns the DiffID (tar SHA-256)."""
    h = hashlib.sha256()
    reader = tarstream.TarReader(stream, on_bytes=h.update)
    dir_times: list[tuple[Path, int]] = []
    while True:
        _, e = reader.next()
        if e is None:
            while reader.read_rest(1 << 20):
                pass
            break
        if not e.name:
            os.chown(root, e.uid, e.gid)
            os.chmod(root, e.mode)
            dir_times.append((root, e.mtime * 1_000_000_000 + e.mtime_nsec))
            continue
        parent = _safe_parent(root, e.name)
        base = os.fsdecode(e.name.rsplit(b"/", 1)[-1])
        path = parent / base
        if base == ".wh..wh..opq":
            os.setxattr(parent, _OPAQUE_XATTR, b"y")
            continue
        if base.startswith(".wh."):
            target = parent / base[4:]
            _remove(target, keep_dir=False)
            os.mknod(target, stat.S_IFCHR | 0o000, 0)
            continue
        _remove(path, keep_dir=e.type == tarstream.DIR)
        if e.type == tarstream.DIR:
            if not path.exists():
                os.mkdir(path, 0o700)
        elif e.type == tarstream.REG:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                left = e.size
                while left:
                    piece = reader.read_data(min(left, 1 << 20))
                    f.write(piece)
                    left -= len(piece)
        elif e.type == tarstream.SYMLINK:
            os.symlink(e.linkname, path)
        elif e.type == tarstream.HARDLINK:
            target = _safe_parent(root, e.linkname) / os.fsdecode(e.linkname.rsplit(b"/", 1)[-1])
            os.link(target, path, follow_symlinks=False)
            continue  # the link shares the target's inode and attributes
        elif e.type in (tarstream.CHAR, tarstream.BLOCKDEV):
            kind = stat.S_IFCHR if e.type == tarstream.CHAR else stat.S_IFBLK
            os.mknod(path, kind | e.mode, os.makedev(e.devmajor, e.devminor))
        elif e.type == tarstream.FIFO:
            os.mkfifo(path, e.mode)
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
        for xname, xvalue in e.xattrs.items():
            try:
                os.setxattr(path, xname, xvalue, follow_symlinks=False)
            except OSError as exc:
                log.warning("xattr not set", extra={"kv": {"path": path, "xattr": xname,
                                                           "error": exc}})
        if e.type != tarstream.SYMLINK:
            os.chmod(path, e.mode)  # after chown, which clears setuid/setgid
        ns = e.mtime * 1_000_000_000 + e.mtime_nsec
        if e.type == tarstream.DIR:
            dir_times.append((path, ns))
        else:
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
    for path, ns in reversed(dir_times):
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    return Digest(h.digest())


def unpack_blob(blob: Path, root: Path, diff_id: str | None, what: str) -> None:
    """Decompress and unpack a downloaded layer blob, checking its DiffID."""
    size = blob.stat().st_size
    with open(blob, "rb") as f:
        digest = "sha256:" + blob.name
        tar, _ = open_tar_stream(VerifyingReader(f, digest, size, what), what)
        try:
            got = apply_tar(tar, root)
        except (FormatError, OSError) as exc:
            raise UnpackError(f"{what}: {exc}") from exc
    if diff_id and str(got) != diff_id:
        raise UnpackError(f"{what}: unpacked DiffID {got} does not match the config's {diff_id}")
