"""The read-only inode tree of one layer, built from its TOC in memory.

Inode numbers are stable: entry k of the TOC is local inode k + 2, the layer
root is 1, and directories the tar never listed (common in layers made by
diff tools) get numbers after the last entry, in the order first needed. A
hard link is another name for its target's inode.

Whiteouts are shown the way overlayfs expects them in a lower layer: `.wh.X`
becomes a character device 0/0 named X, and `.wh..wh..opq` is hidden and sets
`trusted.overlay.opaque` on its directory.
"""

from __future__ import annotations

import logging
import stat
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

from chunkstore._pb import toc_pb2
from chunkstore.fetch import ChunkRef
from chunkstore.hot import HotIndex

log = logging.getLogger(__name__)

ROOT = 1
WHITEOUT_PREFIX = b".wh."
OPAQUE_NAME = b".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"

_DIR, _HARDLINK = toc_pb2.DIR, toc_pb2.HARDLINK
_AUFS_PREFIX = WHITEOUT_PREFIX + WHITEOUT_PREFIX
_MODE_BITS = {
    toc_pb2.REG: stat.S_IFREG, toc_pb2.DIR: stat.S_IFDIR, toc_pb2.SYMLINK: stat.S_IFLNK,
    toc_pb2.CHAR: stat.S_IFCHR, toc_pb2.BLOCK: stat.S_IFBLK, toc_pb2.FIFO: stat.S_IFIFO,
}  # fmt: skip


def chunk_ref(c: toc_pb2.Chunk) -> ChunkRef:
    """The fetcher's handle on a chunk the TOC lists."""
    return ChunkRef(c.digest, c.blob_offset, c.compressed_size, c.size)


@dataclass(slots=True)
class Node:
    entry: int  # index into toc.entries, or -1 for a directory the tar did not list
    mode: int  # full st_mode
    parent: int
    children: dict[bytes, int] | None = None  # directories only
    nlink: int = 1
    opaque: bool = False
    whiteout: bool = False


class LayerTree:
    def __init__(self, toc: toc_pb2.TOC):
        self.toc = toc
        self.nodes: dict[int, Node] = {ROOT: Node(-1, stat.S_IFDIR | 0o755, ROOT, {}, 2)}
        self._next_synth = len(toc.entries) + 2
        self._offsets: dict[int, list[int]] = {}
        self._chunk_offsets: array[int] | None = None
        self._chunk_where: array[int] | None = None
        self.hot = HotIndex(toc)  # checked here: a bad TOC is refused at mount, not at a read
        # directory path -> inode while building: most entries share their parent with the
        # one before, and walking from the root for each cost a third of the build
        self._dirs: dict[bytes, int] = {b"": ROOT}
        for k, e in enumerate(toc.entries):
            self._add(k, e)
        del self._dirs

    # -- building ----------------------------------------------------------
    def _dir_of(self, parts: list[bytes]) -> int:
        """Inode of the directory at parts, creating missing ones."""
        ino = ROOT
        for part in parts:
            node = self.nodes[ino]
            assert node.children is not None
            child = node.children.get(part)
            if child is None or self.nodes[child].children is None:
                child = self._next_synth
                self._next_synth += 1
                self.nodes[child] = Node(-1, stat.S_IFDIR | 0o755, ino, {}, 2)
                node.children[part] = child
                node.nlink += 1
            ino = child
        return ino

    def _replacing(self, old: int | None) -> None:
        """A name is about to point elsewhere: if it named a directory, the paths cached under
        it are stale (rare: a later entry replacing a directory with a file or a link)."""
        if old is not None and self.nodes[old].children is not None:
            self._dirs = {b"": ROOT}

    def _add(self, k: int, e: toc_pb2.Entry) -> None:
        # each field read once: a protobuf attribute costs as much as a dict lookup or two
        name, etype = e.name, e.type
        nodes = self.nodes
        if not name:
            if etype == _DIR:
                nodes[ROOT].entry = k
                nodes[ROOT].mode = stat.S_IFDIR | e.mode
            return
        dname, _, base = name.rpartition(b"/")
        parent = self._dirs.get(dname)
        if parent is None:
            parent = self._dirs[dname] = self._dir_of(dname.split(b"/"))
        pnode = nodes[parent]
        children = pnode.children
        assert children is not None
        whiteout = base.startswith(WHITEOUT_PREFIX)
        if whiteout:
            if base == OPAQUE_NAME:
                pnode.opaque = True
                return
            if base.startswith(_AUFS_PREFIX):
                return  # aufs bookkeeping (.wh..wh.plnk etc.), not part of the tree
            base = base[len(WHITEOUT_PREFIX):]
        if etype == _HARDLINK:
            target = self.resolve(e.linkname)
            if target is None or self.nodes[target].children is not None:
                log.warning("hard link target missing; entry skipped",
                            extra={"kv": {"name": e.name, "target": e.linkname}})
                return
            self._replacing(children.get(base))
            children[base] = target
            nodes[target].nlink += 1
            return
        old = children.get(base)
        ino = k + 2
        old_is_dir = old is not None and nodes[old].children is not None
        if etype == _DIR and old_is_dir:
            assert old is not None
            # a directory listed again (or after a synthesized one): keep its children
            oldnode = nodes.pop(old)
            node = Node(k, stat.S_IFDIR | e.mode, parent, oldnode.children, oldnode.nlink,
                        oldnode.opaque)
            assert node.children is not None
            for c in node.children.values():
                if nodes[c].parent == old:
                    nodes[c].parent = ino
            self._dirs[name] = ino
        else:
            if etype == _DIR:
                pnode.nlink += 1
            if whiteout:
                node = Node(k, stat.S_IFCHR, parent, whiteout=True)
            elif etype == _DIR:
                node = Node(k, stat.S_IFDIR | e.mode, parent, {}, 2)
            else:
                node = Node(k, _MODE_BITS[etype] | e.mode, parent)
            if old is not None:
                self._replacing(old)
        nodes[ino] = node
        children[base] = ino

    # -- queries -----------------------------------------------------------
    def resolve(self, path: bytes) -> int | None:
        ino = ROOT
        for part in path.split(b"/") if path else ():
            children = self.nodes[ino].children
            if children is None or part not in children:
                return None
            ino = children[part]
        return ino

    def lookup(self, parent: int, name: bytes) -> int | None:
        node = self.nodes.get(parent)
        if node is None or node.children is None:
            return None
        if name == b".":
            return parent
        if name == b"..":
            return node.parent
        return node.children.get(name)

    def local_of(self, entry: int) -> int | None:
        """The inode that serves TOC entry `entry` (None if a later entry replaced it)."""
        node = self.nodes.get(entry + 2)
        return entry + 2 if node is not None and node.entry == entry else None

    def entry(self, ino: int) -> toc_pb2.Entry | None:
        k = self.nodes[ino].entry
        return self.toc.entries[k] if k >= 0 else None

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        node = self.nodes[ino]
        out: dict[bytes, bytes] = {}
        e = self.entry(ino)
        if e is not None and not node.whiteout:
            out = {x.name.encode(): x.value for x in e.xattrs}
        if node.opaque:
            out[OPAQUE_XATTR] = b"y"
        return out

    def chunks_for(self, ino: int, offset: int, size: int) -> tuple[int, list[ChunkRef]]:
        """The chunks of a regular file that cover [offset, offset+size), and the file
        offset where the first of them starts."""
        e = self.entry(ino)
        if e is None or offset >= e.size or size <= 0 or not e.chunks:
            return 0, []
        offs = self._offsets.get(ino)
        if offs is None:
            offs = self._offsets[ino] = [c.file_offset for c in e.chunks]
        first = bisect_right(offs, offset) - 1
        last = bisect_right(offs, min(offset + size, e.size) - 1) - 1
        return offs[first], [chunk_ref(c) for c in e.chunks[first : last + 1]]

    def _chunk_index(self) -> tuple[array[int], array[int]]:
        """Every distinct chunk's blob offset, sorted, and where the TOC lists it (entry << 24
        | chunk): two flat arrays, 16 bytes a chunk, instead of an object for each."""
        if self._chunk_offsets is None:
            where: dict[int, int] = {}
            for k, e in enumerate(self.toc.entries):
                for j, c in enumerate(e.chunks):
                    where.setdefault(c.blob_offset, k << 24 | j)  # one offset per digest
            offsets = sorted(where)
            self._chunk_where = array("Q", (where[o] for o in offsets))
            self._chunk_offsets = array("Q", offsets)
        assert self._chunk_where is not None
        return self._chunk_offsets, self._chunk_where

    def _ref(self, where: int) -> ChunkRef:
        return chunk_ref(self.toc.entries[where >> 24].chunks[where & 0xFFFFFF])

    @property
    def chunk_count(self) -> int:
        return len(self._chunk_index()[0])

    def chunk_at(self, blob_offset: int) -> ChunkRef | None:
        """The chunk whose frame starts at blob_offset, if any."""
        offsets, where = self._chunk_index()
        i = bisect_left(offsets, blob_offset)
        if i == len(offsets) or offsets[i] != blob_offset:
            return None
        return self._ref(where[i])

    def iter_chunks(self, after: int = -1) -> Iterator[ChunkRef]:
        """Every distinct chunk in blob order, from the first one past blob offset `after`."""
        offsets, where = self._chunk_index()
        for i in range(bisect_right(offsets, after), len(offsets)):
            yield self._ref(where[i])

    def all_chunks(self) -> list[ChunkRef]:
        """Every distinct chunk, in blob order."""
        return list(self.iter_chunks())

    def following(self, last: ChunkRef, nbytes: int) -> list[ChunkRef]:
        """The chunks after `last` in the blob, up to nbytes of compressed data."""
        out: list[ChunkRef] = []
        total = 0
        for ref in self.iter_chunks(last.blob_offset):
            if total >= nbytes:
                break
            out.append(ref)
            total += ref.compressed_size
        return out
