"""pyfuse3 operations, kept thin: tree lookups, the reader in a worker thread, errors -> errno.

The mount root (inode 1) lists one directory per layer; everything below is
read-only and never changes, so entries and attributes are cached by the
kernel for as long as it likes, and file pages are kept across opens.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import cast

import pyfuse3
import trio

from chunkstore._pb import toc_pb2
from chunkstore.errors import ChunkstoreError
from snapshotter.fuse.layers import MOUNT_ROOT, Layer, LayerSet, join_ino, split_ino
from snapshotter.fuse.reader import Reader
from snapshotter.fuse.tree import ROOT

log = logging.getLogger(__name__)

FOREVER = 365 * 24 * 3600.0  # entry and attribute timeout for immutable layer contents
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, layers: LayerSet, reader: Reader,
                 opened: Callable[[Layer, int], None] | None = None):
        super().__init__()
        self.layers = layers
        self.reader = reader
        self.opened = opened  # told of each read at a file's start (execwatch)
        self._limiter = trio.CapacityLimiter(64)
        self.readlinks = 0  # the kernel caches targets when asked (kernelcaps): few reach us

    # -- helpers ---------------------------------------------------------------
    def _layer(self, ino: int) -> tuple[Layer, int]:
        slot, local = split_ino(ino)
        layer = self.layers.by_slot(slot)
        if layer is None or local not in layer.tree.nodes:
            raise _err(errno.ENOENT)
        return layer, local

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = MOUNT_ROOT
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self.layers.names())
        a.st_blksize = 4096
        a.entry_timeout = a.attr_timeout = 0
        return a

    def _attr(self, layer: Layer, local: int) -> pyfuse3.EntryAttributes:
        node = layer.tree.nodes[local]
        e = layer.tree.entry(local)
        a = pyfuse3.EntryAttributes()
        a.st_ino = join_ino(layer.slot, local)
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_blksize = 4096
        a.entry_timeout = a.attr_timeout = FOREVER
        if e is not None:
            a.st_uid, a.st_gid = e.uid, e.gid
            ns = e.mtime * 1_000_000_000 + e.mtime_nsec
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = ns
            if node.whiteout:
                a.st_rdev = 0
            elif e.type in (toc_pb2.CHAR, toc_pb2.BLOCK):
                a.st_rdev = os.makedev(e.devmajor, e.devminor)
            if stat.S_ISREG(node.mode):
                a.st_size = e.size
            elif stat.S_ISLNK(node.mode):
                a.st_size = len(e.linkname)
        if stat.S_ISDIR(node.mode):
            a.st_size = 4096
        a.st_blocks = (a.st_size + 511) // 512
        return a

    # -- lookups ---------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode == MOUNT_ROOT:
            if name in (b".", b".."):
                return self._root_attr()
            layer = self.layers.by_name(name.decode(errors="replace"))
            if layer is None:
                raise _err(errno.ENOENT)
            return self._attr(layer, ROOT)
        layer, local = self._layer(parent_inode)
        if name == b".." and local == ROOT:
            return self._root_attr()
        child = layer.tree.lookup(local, name)
        if child is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0  # a negative entry the kernel may cache: the layer never changes
            neg.entry_timeout = FOREVER
            return neg
        return self._attr(layer, child)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == MOUNT_ROOT:
            return self._root_attr()
        layer, local = self._layer(inode)
        return self._attr(layer, local)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self.readlinks += 1
        layer, local = self._layer(inode)
        e = layer.tree.entry(local)
        if e is None or e.type != toc_pb2.SYMLINK:
            raise _err(errno.EINVAL)
        return e.linkname

    # -- directories -------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != MOUNT_ROOT:
            layer, local = self._layer(inode)
            if layer.tree.nodes[local].children is None:
                raise _err(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == MOUNT_ROOT:
            entries: list[tuple[bytes, pyfuse3.EntryAttributes]] = []
            for lname, slot in self.layers.names()[start_id:]:
                layer = self.layers.by_slot(slot)
                if layer is not None:
                    entries.append((lname.encode(), self._attr(layer, ROOT)))
        else:
            layer, local = self._layer(fh)
            children = layer.tree.nodes[local].children or {}
            names = list(children.items())[start_id:]
            entries = [(n, self._attr(layer, ino)) for n, ino in names]
        for i, (name, attr) in enumerate(entries, start_id + 1):
            if not pyfuse3.readdir_reply(token, name, attr, i):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files -------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise _err(errno.EROFS)
        layer, local = self._layer(inode)
        if not stat.S_ISREG(layer.tree.nodes[local].mode):
            raise _err(errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        layer, local = self._layer(fh)
        if off == 0 and self.opened is not None:
            self.opened(layer, local)
        try:
            # what is here already is served on the loop: a slice or a pread, no thread hop
            data = self.reader.read_local(layer, local, off, size)
            if data is not None:
                return data
            return cast(bytes, await trio.to_thread.run_sync(
                self.reader.read, layer, local, off, size, limiter=self._limiter))
        except ChunkstoreError as exc:
            log.error("read failed", extra={"kv": {"layer": layer.what, "error": exc}})
            raise _err(errno.EIO) from exc
        except Exception as exc:  # a registry error, a bug: the container sees EIO, we log why
            log.error("read failed", extra={"kv": {"layer": layer.what, "error": repr(exc)}})
            raise _err(errno.EIO) from exc

    async def release(self, fh: int) -> None:
        return None

    # -- extended attributes ----------------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == MOUNT_ROOT:
            raise _err(pyfuse3.ENOATTR)
        layer, local = self._layer(inode)
        value = layer.tree.xattrs(local).get(name)
        if value is None:
            raise _err(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if inode == MOUNT_ROOT:
            return []
        layer, local = self._layer(inode)
        return list(layer.tree.xattrs(local))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inodes are derived from the TOC; nothing to free
