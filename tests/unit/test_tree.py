"""A layer's tree from its TOC entries, in tar order: later entries win, as when the tar is
extracted, whatever the order of directories and what replaces what."""

from __future__ import annotations

from chunkstore._pb import toc_pb2
from snapshotter.fuse.tree import LayerTree


def _tree(*entries: tuple[str, int] | tuple[str, int, str]) -> LayerTree:
    toc = toc_pb2.TOC(version=1)
    for name, kind, *link in entries:
        toc.entries.append(toc_pb2.Entry(name=name.encode(), type=kind, mode=0o755,
                                         linkname=link[0].encode() if link else b""))
    return LayerTree(toc)


REG, DIR, HARDLINK = toc_pb2.REG, toc_pb2.DIR, toc_pb2.HARDLINK


def _kind(tree: LayerTree, path: str) -> str | None:
    ino = tree.resolve(path.encode())
    if ino is None:
        return None
    return "dir" if tree.nodes[ino].children is not None else "file"


def test_a_directory_listed_after_its_files_keeps_them() -> None:
    tree = _tree(("a/b/c", REG), ("a", DIR), ("a/b/d", REG), ("a/b", DIR), ("a/b/e", REG))
    assert [_kind(tree, p) for p in ("a", "a/b", "a/b/c", "a/b/d", "a/b/e")] == [
        "dir", "dir", "file", "file", "file"]
    a = tree.resolve(b"a")
    b = tree.resolve(b"a/b")
    assert a is not None and b is not None
    assert tree.nodes[a].entry == 1 and tree.nodes[b].entry == 3  # their own entries now
    assert tree.nodes[b].parent == a


def test_a_directory_replaced_by_a_file_takes_its_subtree_with_it() -> None:
    tree = _tree(("x/y/f1", REG), ("x/y", REG), ("x/z", REG))
    assert _kind(tree, "x/y") == "file" and _kind(tree, "x/y/f1") is None
    # a later entry under the same path makes it a directory again, without the old files
    tree = _tree(("x/y/f1", REG), ("x/y", REG), ("x/y/f2", REG))
    assert _kind(tree, "x/y") == "dir" and _kind(tree, "x/y/f2") == "file"
    assert _kind(tree, "x/y/f1") is None


def test_a_hard_link_over_a_directory_replaces_it() -> None:
    tree = _tree(("t", REG), ("d/sub/f", REG), ("d/sub", HARDLINK, "t"), ("d/sub2/g", REG))
    assert _kind(tree, "d/sub") == "file" and _kind(tree, "d/sub/f") is None
    assert tree.resolve(b"d/sub") == tree.resolve(b"t")
    assert _kind(tree, "d/sub2/g") == "file"
