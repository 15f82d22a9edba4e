"""Prefetch without a profile, beyond the entrypoint: the loader's share of ELF files, the
commands of a `sh -c` script, programs seen as they start (execwatch), and a directory's small
files after a miss in one of them. Real ELF files of this machine in converted layers."""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chunkstore.cache import ChunkCache
from chunkstore.chunker import ChunkerParams
from chunkstore.convert import convert_tar
from chunkstore.elf import Elf, named_paths, parse_elf
from chunkstore.fetch import ChunkRef, Fetcher
from chunkstore.toc import load_toc, read_footer
from snapshotter.fuse.execwatch import ExecWatch
from snapshotter.fuse.layers import Layer
from snapshotter.fuse.predict import MergedView, Predictor, shell_commands
from snapshotter.fuse.reader import Reader
from snapshotter.fuse.tree import LayerTree, chunk_ref
from tests.support import ocibuild as ob
from tests.unit.test_fetch import MultiBlob

LIBDIR = "/lib/x86_64-linux-gnu"
SMALL_CHUNKS = ChunkerParams(min_size=16 * 1024, avg_size=64 * 1024, max_size=256 * 1024)
Fetched = list[tuple[Layer, ChunkRef]]


def _host(name: str) -> bytes:
    return Path(os.path.realpath(f"{LIBDIR}/{name}")).read_bytes()


needs_host_libs = pytest.mark.skipif(
    not all(Path(f"{LIBDIR}/{n}").exists() for n in ("libc.so.6", "libselinux.so.1"))
    or not Path("/bin/ls").exists(), reason="needs this machine's ls, libc and libselinux")


@pytest.fixture(params=["scanned", "older-toc"])
def toc_kind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test twice: ELF facts from the TOC, and parsed from the chunks (a TOC written
    before the converter recorded them)."""
    global _SCANNED
    _SCANNED = request.param == "scanned"
    yield
    _SCANNED = True


_SCANNED = True


def _layer(files: dict[str, bytes], executables: tuple[str, ...] = ()) -> Layer:
    """A converted layer of `files`, mode 0644 but for `executables` (0755)."""
    out = io.BytesIO()
    tar = ob.make_tar(files, 0o644, {name: 0o755 for name in executables})
    convert_tar(io.BytesIO(tar), out, params=SMALL_CHUNKS)  # type: ignore[arg-type]
    data = out.getvalue()
    toc = load_toc(lambda o, n: data[o:o + n], read_footer(lambda o, n: data[o:o + n],
                                                           len(data)))
    if not _SCANNED:
        toc.elf_scan_limit = 0
        for e in toc.entries:
            e.ClearField("elf")
    return Layer(name="1", slot=1, tree=LayerTree(toc), source=MultiBlob(data), what="test")


def _predictor(layer: Layer, tmp_path: Path) -> Predictor:
    reader = Reader(Fetcher(ChunkCache(tmp_path / "cache", 10**8)))

    def read(lay: Layer, local: int, off: int, n: int) -> bytes:
        return reader.read(lay, local, off, n, record=False)

    return Predictor(MergedView([layer]), read)


def _elf_layer() -> Layer:
    return _layer({"bin/ls": Path("/bin/ls").read_bytes(),
                   f"{LIBDIR[1:]}/libc.so.6": _host("libc.so.6"),
                   f"{LIBDIR[1:]}/libselinux.so.1": _host("libselinux.so.1"),
                   "etc/motd": b"hello\n"})


def test_shell_commands_of_common_cmd_lines() -> None:
    assert shell_commands('printf "x" > /tmp/a.c && gcc -O2 -o /tmp/a /tmp/a.c && /tmp/a') == [
        "printf", "gcc", "/tmp/a"]
    assert shell_commands("runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D /x"
                          " >/dev/null && echo done") == [
        "runuser", "/usr/lib/postgresql/15/bin/initdb", "echo"]
    assert shell_commands("FOO=1 exec python3 app.py") == ["exec", "python3"]
    assert shell_commands("env A=b node x.js | tee log; if [ -f x ]; then cat x; fi") == [
        "env", "node", "tee", "cat"]
    assert shell_commands('echo "unterminated') == []


@needs_host_libs
def test_loader_ranges_hold_headers_tables_and_writable_data() -> None:
    data = _host("libc.so.6")
    elf = parse_elf(lambda off, n: data[off:off + n])
    assert elf is not None
    starts = [off for off, _ in elf.loader]
    assert 0 in starts  # the ELF and program headers
    assert all(off >= 0 and off + n <= len(data) for off, n in elf.loader)
    # the writable segment (GOT, data) lies in the last part of the file; text does not count
    assert max(starts) > len(data) // 2
    assert sum(n for _, n in elf.loader) < len(data) // 2


@needs_host_libs
def test_the_converter_records_what_the_loader_needs_of_each_elf_file() -> None:
    layer = _elf_layer()
    toc = layer.tree.toc
    assert toc.elf_scan_limit >= 64 << 20
    by_name = {e.name.decode(): e for e in toc.entries}
    for name, data in (("bin/ls", Path("/bin/ls").read_bytes()),
                       (f"{LIBDIR[1:]}/libc.so.6", _host("libc.so.6"))):
        parsed = parse_elf(lambda off, n, d=data: d[off:off + n],  # type: ignore[misc]
                           sections=True)
        assert parsed is not None and by_name[name].HasField("elf")
        parsed.paths = named_paths([data])
        assert Elf.from_proto(by_name[name].elf, len(data)) == parsed
    libc = Elf.from_proto(by_name[f"{LIBDIR[1:]}/libc.so.6"].elf, 0)
    assert "/etc/nsswitch.conf" in libc.paths  # glibc opens it by name
    assert not by_name["etc/motd"].HasField("elf")
    # a file that only starts like ELF converts, without a record
    broken = _layer({"bin/broken": b"\x7fELF" + bytes(40), "bin/ok": b"x"})
    assert not any(e.HasField("elf") for e in broken.tree.toc.entries)


@needs_host_libs
@pytest.mark.usefixtures("toc_kind")
def test_with_the_converters_record_finding_libraries_reads_nothing(tmp_path: Path) -> None:
    layer = _elf_layer()
    pred = _predictor(layer, tmp_path)
    found = [f.path for f in pred.predict(["ls"], ["PATH=/bin"])]
    assert f"{LIBDIR}/libselinux.so.1" in found and f"{LIBDIR}/libc.so.6" in found
    source = layer.source
    assert isinstance(source, MultiBlob)
    reads = len(source.requests) + len(source.multi_calls)
    assert (reads == 0) == _SCANNED  # an older TOC: the headers come from the registry


def test_a_toc_claiming_more_than_a_file_holds_is_kept_inside_it() -> None:
    msg = Elf("/lib/ld.so", ["libc.so.6"], [], [(0, 64), (900, 500), (5000, 10)],
              [(800, 400)], ["/etc/a", "relative", "/x" * 200,
                             *(f"/etc/f{i}" for i in range(100))], text=600,
              code=[(100, 300), (950, 400), (2000, 5)]).to_proto()
    got = Elf.from_proto(msg, 1000)
    assert got.loader == [(0, 64), (900, 100)] and got.cold == [(800, 200)]
    assert got.code == [(100, 300), (950, 50)]
    assert got.needed == ["libc.so.6"] and got.interp == "/lib/ld.so"
    assert got.paths[0] == "/etc/a" and "relative" not in got.paths
    assert all(len(p) < 256 for p in got.paths) and len(got.paths) <= 64


@needs_host_libs
def test_named_paths_are_found_across_chunk_boundaries() -> None:
    data = b"\0/etc/one.conf\0junk\0/usr/share/app/two.js\0/etc/one.conf\0/home/x\0" + (
        b"\0/etc/%s.conf\0/etc/a:/etc/b\0")
    assert named_paths([data]) == ["/etc/one.conf", "/usr/share/app/two.js"]
    for cut in range(1, len(data)):  # every split point, as chunk boundaries fall
        assert named_paths([data[:cut], data[cut:]]) == named_paths([data])
    libc = _host("libc.so.6")
    assert named_paths([libc[i:i + 70_000] for i in range(0, len(libc), 70_000)]) == (
        named_paths([libc]))


@needs_host_libs
def test_a_whole_file_prefetch_leaves_out_the_unwinding_tables(tmp_path: Path) -> None:
    layer = _elf_layer()
    pred = _predictor(layer, tmp_path)
    libc = pred.view.lookup(f"{LIBDIR}/libc.so.6")
    assert libc is not None
    data = _host("libc.so.6")
    elf = parse_elf(lambda off, n: data[off:off + n], sections=True)
    assert elf is not None and elf.cold  # .eh_frame and .eh_frame_hdr at least
    inside = [c for c in libc.entry.chunks if any(
        o <= c.file_offset and c.file_offset + c.size <= o + n for o, n in elf.cold)]
    assert inside  # with 64 KiB chunks, some hold nothing but unwinding tables
    kept, deferred = pred.chunks(libc)
    assert not deferred  # libc's code is small: in file order with the rest
    assert [c.blob_offset for c in kept] == [
        c.blob_offset for c in libc.entry.chunks if c not in inside]
    pred.large_code = 0  # as for libnode
    rest, code = pred.chunks(libc)
    assert sorted(c.blob_offset for c in rest + code) == [c.blob_offset for c in kept]
    # the chunks wholly inside the executable segment come last, the rest in file order
    assert elf.code and code and rest
    assert all(any(o <= c.file_offset and c.file_offset + c.size <= o + n for o, n in elf.code)
               for c in code)
    assert [c.file_offset for c in rest] == sorted(c.file_offset for c in rest)
    assert rest[0].file_offset == 0
    motd = pred.view.lookup("/etc/motd")
    assert motd is not None and pred.chunks(motd) == (list(motd.entry.chunks), [])


@needs_host_libs
@pytest.mark.usefixtures("toc_kind")
def test_loader_chunks_are_a_large_library_in_part_and_a_small_one_whole(
        tmp_path: Path) -> None:
    layer = _elf_layer()
    pred = _predictor(layer, tmp_path)
    libc = pred.view.lookup(f"{LIBDIR}/libc.so.6")
    motd = pred.view.lookup("/etc/motd")
    assert libc is not None and motd is not None
    assert pred.elf(libc) is not None and pred.elf(motd) is None
    got = pred.loader_chunks([libc, motd])
    offsets = {r.blob_offset for _, r in got}
    libc_chunks = {c.blob_offset for c in libc.entry.chunks}
    assert libc.entry.chunks[0].blob_offset in offsets
    assert libc.entry.chunks[-1].blob_offset in offsets or libc.entry.chunks[-2].blob_offset in (
        offsets)  # the writable segment, near the end
    assert len(offsets & libc_chunks) < len(libc_chunks) // 2
    assert not {c.blob_offset for c in motd.entry.chunks} & offsets  # not ELF: not the loader's
    ls = pred.view.lookup("/bin/ls")
    assert ls is not None and ls.entry.size < 1 << 20
    assert not pred.loader_chunks([ls])  # not known as ELF yet: its head is not read for it
    assert pred.elf(ls) is not None
    assert {c.blob_offset for c in ls.entry.chunks} <= {
        r.blob_offset for _, r in pred.loader_chunks([ls])}  # a small ELF file: all of it


@needs_host_libs
@pytest.mark.usefixtures("toc_kind")
def test_predict_fetches_the_files_a_program_names(tmp_path: Path) -> None:
    layer = _layer({"bin/ls": Path("/bin/ls").read_bytes(),
                    f"{LIBDIR[1:]}/libc.so.6": _host("libc.so.6"),
                    f"{LIBDIR[1:]}/libselinux.so.1": _host("libselinux.so.1"),
                    "etc/nsswitch.conf": b"passwd: files\n",  # libc names both
                    "usr/share/locale/x/y": b"",  # /usr/share/locale: a dir with no entry
                    "etc/protocols": os.urandom(2 << 20),  # too big to fetch whole
                    "etc/motd": b"hello\n"})  # named by nobody
    pred = _predictor(layer, tmp_path)
    found = [f.path for f in pred.predict(["ls"], ["PATH=/bin"])]
    # an older TOC has no record of the names: they would cost the whole file to find
    assert ("/etc/nsswitch.conf" in found) == _SCANNED
    assert "/etc/protocols" not in found and "/etc/motd" not in found
    # a library that names many files that exist (libc names each file one of its functions
    # might open) says nothing about this program: none of them
    named = {f"etc/{n}": b"x\n" for n in ("nsswitch.conf", "hosts", "gai.conf", "host.conf",
                                           "networks", "rpc", "shells", "fstab", "ttys")}
    many = _layer({"bin/ls": Path("/bin/ls").read_bytes(),
                   f"{LIBDIR[1:]}/libc.so.6": _host("libc.so.6"),
                   f"{LIBDIR[1:]}/libselinux.so.1": _host("libselinux.so.1"), **named})
    found = [f.path for f in _predictor(many, tmp_path / "many").predict(["ls"], ["PATH=/bin"])]
    assert not any(p.startswith("/etc/") for p in found)


@needs_host_libs
@pytest.mark.usefixtures("toc_kind")
def test_libraries_are_guessed_before_the_loader_cache_is_read(tmp_path: Path) -> None:
    layer = _elf_layer()
    pred = _predictor(layer, tmp_path)
    early: list[str] = []
    pred.predict(["ls"], ["PATH=/bin"], early=lambda fs: early.extend(f.path for f in fs))
    # the program's record (from the TOC, or parsed for the "#!" check) names them; the
    # default directories hold them: no loader cache needed
    assert early[:1] == ["/bin/ls"] and f"{LIBDIR}/libc.so.6" in early
    assert f"{LIBDIR}/libselinux.so.1" in early


@needs_host_libs
@pytest.mark.usefixtures("toc_kind")
def test_predict_follows_the_commands_of_a_shell_cmd(tmp_path: Path) -> None:
    layer = _layer({"bin/sh": b"#!fake shell\n", "usr/bin/gcc": Path("/bin/ls").read_bytes(),
                    "opt/app": b"app", f"{LIBDIR[1:]}/libc.so.6": _host("libc.so.6"),
                    f"{LIBDIR[1:]}/libselinux.so.1": _host("libselinux.so.1")})
    pred = _predictor(layer, tmp_path)
    found = [f.path for f in pred.predict(
        ["/bin/sh", "-c", "printf x > a.c && gcc a.c && runuser -u u -- /opt/app"],
        ["PATH=/usr/bin:/bin"])]
    assert found[0] == "/bin/sh"  # the shell itself first (no runtime files here)
    assert "/usr/bin/gcc" in found and "/opt/app" in found
    assert f"{LIBDIR}/libselinux.so.1" in found  # what gcc (here: ls) needs
    assert not any(p.endswith("printf") for p in found)


def _watch(layer: Layer, tmp_path: Path) -> tuple[ExecWatch, Fetched]:
    fetched: Fetched = []
    watch = ExecWatch(fetched.extend)
    watch.watch(_predictor(layer, tmp_path))
    return watch, fetched


def _local(layer: Layer, path: str) -> int:
    ino = layer.tree.resolve(path.encode())
    assert ino is not None
    return ino


def _settle(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@needs_host_libs
@pytest.mark.usefixtures("toc_kind")
def test_a_program_starting_fetches_its_libraries_loader_chunks(tmp_path: Path) -> None:
    layer = _elf_layer()
    watch, fetched = _watch(layer, tmp_path)
    watch.opened(layer, _local(layer, "bin/ls"))
    _settle(lambda: bool(fetched))
    watch.shutdown()
    time.sleep(0.1)
    files = {layer.tree.nodes[_local(layer, p)].entry: p for p in (
        f"{LIBDIR[1:]}/libc.so.6", f"{LIBDIR[1:]}/libselinux.so.1")}
    by_entry = {c.blob_offset: k for k, e in enumerate(layer.tree.toc.entries) for c in e.chunks}
    touched = {files[by_entry[r.blob_offset]] for _, r in fetched
               if by_entry.get(r.blob_offset) in files}
    assert touched == set(files.values())  # both libraries, found as the loader finds them
    assert watch.programs == 1 and watch.chunks == len(fetched)


@needs_host_libs
@pytest.mark.usefixtures("toc_kind")
def test_execwatch_looks_once_and_only_at_watched_elf_files(tmp_path: Path) -> None:
    layer = _elf_layer()
    watch, fetched = _watch(layer, tmp_path)
    watch.opened(layer, _local(layer, "etc/motd"))  # not ELF: nothing to fetch
    time.sleep(0.3)
    assert fetched == []
    watch.opened(layer, _local(layer, "bin/ls"))
    _settle(lambda: bool(fetched))
    time.sleep(0.3)
    n = len(fetched)
    watch.opened(layer, _local(layer, "bin/ls"))  # seen: no second walk
    time.sleep(0.3)
    assert len(fetched) == n
    watch.forget(layer.name)  # the layer went away: nothing watched
    watch.opened(layer, _local(layer, f"{LIBDIR[1:]}/libselinux.so.1"))
    time.sleep(0.3)
    assert len(fetched) == n
    watch.shutdown()


def _dir_reader(tmp_path: Path, directory: int) -> tuple[Reader, Layer, Fetched]:
    headers = {f"usr/include/h{i}.h": os.urandom(40_000) for i in range(8)}
    layer = _layer({**headers, "usr/lib/other.txt": os.urandom(40_000)})
    fetched: Fetched = []
    reader = Reader(Fetcher(ChunkCache(tmp_path / "cache", 10**8)), 0, whole_file=64 << 20,
                    directory=directory, on_miss=fetched.extend)
    return reader, layer, fetched


def test_a_miss_in_a_small_file_fetches_its_directory(tmp_path: Path) -> None:
    reader, layer, fetched = _dir_reader(tmp_path, 1 << 20)
    h0 = _local(layer, "usr/include/h0.h")
    reader.read(layer, h0, 0, 4096)
    sent = {r.blob_offset for _, r in fetched}
    own = {c.blob_offset for c in layer.tree.entry(h0).chunks}  # type: ignore[union-attr]
    others = {c.blob_offset for i in range(1, 8) for c in layer.tree.entry(
        _local(layer, f"usr/include/h{i}.h")).chunks}  # type: ignore[union-attr]
    elsewhere = {c.blob_offset for c in layer.tree.entry(
        _local(layer, "usr/lib/other.txt")).chunks}  # type: ignore[union-attr]
    assert others - own <= sent
    assert not (elsewhere - others - own) & sent
    n = len(fetched)
    h7 = _local(layer, "usr/include/h7.h")
    reader.read(layer, h7, 0, 4096)  # the dir was sent for: h7's own chunks at most
    own7 = {c.blob_offset for c in layer.tree.entry(h7).chunks}  # type: ignore[union-attr]
    assert {r.blob_offset for _, r in fetched[n:]} <= own7


def test_the_directory_fetch_keeps_to_its_budget_and_can_be_off(tmp_path: Path) -> None:
    reader, layer, fetched = _dir_reader(tmp_path, 100_000)
    h0 = _local(layer, "usr/include/h0.h")
    reader.read(layer, h0, 0, 4096)
    own = {c.blob_offset for c in layer.tree.entry(h0).chunks}  # type: ignore[union-attr]
    assert 0 < sum(r.compressed_size for _, r in fetched if r.blob_offset not in own) <= 100_000
    reader, layer, fetched = _dir_reader(tmp_path / "off", 0)
    h0 = _local(layer, "usr/include/h0.h")
    reader.read(layer, h0, 0, 4096)
    own = {c.blob_offset for c in layer.tree.entry(h0).chunks}  # type: ignore[union-attr]
    assert {r.blob_offset for _, r in fetched} <= own  # the rest of the file at most


@needs_host_libs
@pytest.mark.usefixtures("toc_kind")
def test_a_program_is_fetched_whole_sooner_than_a_large_data_file(tmp_path: Path) -> None:
    libc = _host("libc.so.6")
    # seeded: random bytes of libc's size cut into 23 chunks one run in ~15, too few here
    data = random.Random(1).randbytes(len(libc))
    layer = _layer({f"{LIBDIR[1:]}/libc.so.6": libc, "usr/share/data.bin": data})
    fetched: Fetched = []
    reader = Reader(Fetcher(ChunkCache(tmp_path / "cache", 10**8)), 0, whole_file=64 << 20,
                    directory=0, on_miss=fetched.extend)

    def misses_until_whole(path: str) -> int:
        local = _local(layer, path)
        entry = layer.tree.entry(local)
        assert entry is not None and len(entry.chunks) >= 24
        for n, c in enumerate(entry.chunks[::2], 1):  # reads far apart, each a miss
            reader.read(layer, local, c.file_offset, 100)
            if fetched:
                fetched.clear()
                return n
        return 0

    assert misses_until_whole(f"{LIBDIR[1:]}/libc.so.6") == 2  # code: read through
    # data is read where it is needed (ICU's): a quarter of its chunks first; a layer
    # converted before the converter recorded ELF facts cannot tell, and takes it for code
    chunks = len(layer.tree.entry(_local(layer, "usr/share/data.bin")).chunks)  # type: ignore[union-attr]
    assert misses_until_whole("usr/share/data.bin") == (chunks // 4 if _SCANNED else 2)


@needs_host_libs
@pytest.mark.usefixtures("toc_kind")
def test_a_run_of_misses_in_a_large_data_file_brings_the_next_chunk_along(
        tmp_path: Path) -> None:
    """A miss next to a chunk read before brings the chunk after it in the same request (ICU's
    data read in runs); a lone miss does not (node samples four chunks of ICU's 101)."""
    libc = _host("libc.so.6")
    data = os.urandom(len(libc))
    layer = _layer({f"{LIBDIR[1:]}/libc.so.6": libc, "usr/share/data.bin": data})
    fetcher = Fetcher(ChunkCache(tmp_path / "cache", 10**8))
    reader = Reader(fetcher, 0, whole_file=64 << 20, directory=0, on_miss=lambda _: None)
    source = layer.source
    assert isinstance(source, MultiBlob)
    for path, along in (("usr/share/data.bin", _SCANNED), (f"{LIBDIR[1:]}/libc.so.6", False)):
        local = _local(layer, path)
        chunks = layer.tree.entry(local).chunks  # type: ignore[union-attr]
        reader.read(layer, local, chunks[5].file_offset, 100)  # alone: nothing along
        assert fetcher.is_cached(chunk_ref(chunks[5]))
        assert not fetcher.is_cached(chunk_ref(chunks[6]))
        before = len(source.requests) + len(source.multi_calls)
        reader.read(layer, local, chunks[6].file_offset, 100)  # the next: a run
        assert len(source.requests) + len(source.multi_calls) == before + 1  # one request
        assert fetcher.is_cached(chunk_ref(chunks[7])) == along
        assert not fetcher.is_cached(chunk_ref(chunks[4])) and not fetcher.is_cached(
            chunk_ref(chunks[8]))
    local = _local(layer, "usr/share/data.bin")  # the last chunk: nothing after it to bring
    at = layer.tree.entry(local).chunks[-1].file_offset  # type: ignore[union-attr]
    reader.read(layer, local, layer.tree.entry(local).chunks[-2].file_offset, 1)  # type: ignore[union-attr]
    assert reader.read(layer, local, at, 1 << 20) == data[at:]


@needs_host_libs
def test_a_miss_in_an_executable_leaves_its_directory_alone(tmp_path: Path) -> None:
    tools = {f"usr/bin/tool{i}": os.urandom(30_000) for i in range(4)}
    layer = _layer({"usr/bin/ls": Path("/bin/ls").read_bytes(), **tools,
                    "usr/lib/gcc/crt1.o": b"\x7fELF" + bytes(60), "usr/lib/gcc/crti.o": b"x"},
                   executables=("usr/bin/ls", *tools))
    fetched: Fetched = []
    reader = Reader(Fetcher(ChunkCache(tmp_path / "cache", 10**8)), 0, whole_file=64 << 20,
                    directory=1 << 20, on_miss=fetched.extend)
    reader.read(layer, _local(layer, "usr/bin/ls"), 0, 4096)
    others = {c.blob_offset for name in tools for c in layer.tree.entry(
        _local(layer, name)).chunks}  # type: ignore[union-attr]
    # the other programs of /usr/bin run when they run
    assert not others & {r.blob_offset for _, r in fetched}
    fetched.clear()
    reader.read(layer, _local(layer, "usr/lib/gcc/crt1.o"), 0, 64)  # not executable
    crti = layer.tree.entry(_local(layer, "usr/lib/gcc/crti.o"))
    assert crti is not None and crti.chunks[0].blob_offset in {r.blob_offset for _, r in fetched}
