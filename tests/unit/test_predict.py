"""The predictor's parsers on this machine's own files, and merged lookups across layers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from chunkstore import format as fmt
from chunkstore.convert import convert_tar
from chunkstore.elf import parse_elf
from chunkstore.toc import load_toc, read_footer
from snapshotter.fuse.layers import FileSource, Layer
from snapshotter.fuse.predict import MergedView, parse_ld_so_cache
from snapshotter.fuse.tree import LayerTree


def _reader(path: str):  # type: ignore[no-untyped-def]
    data = Path(path).read_bytes()
    return lambda off, n: data[off : off + n]


@pytest.mark.skipif(not Path("/bin/ls").exists(), reason="needs /bin/ls")
def test_parse_elf_of_a_real_binary() -> None:
    elf = parse_elf(_reader("/bin/ls"))
    assert elf is not None
    assert elf.interp and "ld-linux" in elf.interp
    assert "libc.so.6" in elf.needed


def test_parse_elf_rejects_non_elf() -> None:
    assert parse_elf(lambda off, n: b"#!/bin/sh\n" + bytes(100)) is None


@pytest.mark.skipif(not Path("/etc/ld.so.cache").exists(), reason="needs /etc/ld.so.cache")
def test_parse_ld_so_cache_of_this_machine() -> None:
    cache = parse_ld_so_cache(Path("/etc/ld.so.cache").read_bytes())
    assert "libc.so.6" in cache
    assert Path(cache["libc.so.6"]).exists()


def _layer(tmp: Path, name: str, slot: int, members: list[tarfile.TarInfo]) -> Layer:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti in members:
            tf.addfile(ti, io.BytesIO(b"x" * ti.size) if ti.isreg() else None)
    out = io.BytesIO()
    convert_tar(io.BytesIO(buf.getvalue()), out)  # type: ignore[arg-type]
    blob = out.getvalue()

    def rr(o: int, n: int) -> bytes:
        return blob[o : o + n]

    toc = load_toc(rr, read_footer(rr, len(blob)))
    assert toc.version == fmt.TOC_VERSION
    (tmp / name).write_bytes(blob)
    return Layer(name, slot, LayerTree(toc), FileSource(tmp / name), name)


def _ti(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 1) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, link
    ti.size = size if kind == tarfile.REGTYPE else 0
    return ti


def test_merged_view_follows_links_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    lower = _layer(tmp_path, "lower", 1, [
        _ti("lib", tarfile.SYMTYPE, "usr/lib"), _ti("usr/lib/libc.so.6"),
        _ti("usr/lib/libgone.so"), _ti("opt/old/file"), _ti("bin/tool"),
    ])  # fmt: skip
    upper = _layer(tmp_path, "upper", 2, [
        _ti("usr/lib/.wh.libgone.so", size=0), _ti("opt/old/.wh..wh..opq", size=0),
        _ti("opt/old/new"), _ti("bin/tool", size=5),
    ])  # fmt: skip
    view = MergedView([lower, upper])
    libc = view.lookup("/lib/libc.so.6")
    assert libc is not None and libc.path == "/usr/lib/libc.so.6" and libc.layer is lower
    assert view.lookup("/lib/libgone.so") is None  # whited out above
    assert view.lookup("/opt/old/file") is None  # below an opaque directory
    assert view.lookup("/opt/old/new") is not None
    tool = view.lookup("/bin/tool")
    assert tool is not None and tool.layer is upper and tool.entry.size == 5
    assert view.lookup("/nope") is None
