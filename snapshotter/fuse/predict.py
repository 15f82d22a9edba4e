"""Prefetch without a profile: guess what an image's entrypoint reads first.

From the image config's Entrypoint/Cmd: the binary (found through PATH in the
merged layers), its ELF interpreter and the shared libraries it needs
(DT_NEEDED, searched as the dynamic loader would: RPATH/RUNPATH,
/etc/ld.so.cache, the default directories), the files they name by absolute path
(nodejs's bundled modules, glibc's configuration), and for a Python interpreter
the modules it imports at start. The guess is a list of whole files (less the
unwinding tables of ELF files); the prefetcher fetches them at once, in
parallel, before the workload asks. The
libraries those libraries need are found too (`libraries`) but left to the
ordinary read path. What the loader needs of an ELF file comes from the TOC, where the
converter recorded it; for layers converted before that, reading the headers fetches (and
verifies) the chunks that hold them through the ordinary read path.
"""

from __future__ import annotations

import logging
import posixpath
import re
import shlex
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from chunkstore._pb import toc_pb2
from chunkstore.elf import Elf, parse_elf
from chunkstore.fetch import ChunkRef
from snapshotter.fuse.layers import Layer
from snapshotter.fuse.reader import SMALL_FILE
from snapshotter.fuse.tree import OPAQUE_XATTR

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
_MAX_FILES = 128
# a file an ELF file names (Elf.paths) is fetched whole up to this size; a bigger one (a locale
# archive) is read thinly
_NAMED_FILE_MAX = 1 << 20
# an ELF file naming more files than this that exist is a general-purpose library (the C
# library names every configuration file one of its functions might open): none is fetched
_NAMED_FILES = 8
_PARSE_PARALLEL = 8
# a file with more code than this has it fetched after every file's tables and data: node
# runs a fifth of libnode's 29 MB; a small program's code is wanted at once (gcc's driver,
# dash and libc were slower to start with theirs last)
LARGE_CODE = 8 << 20
# what CPython imports before running user code (site, encodings, io machinery)
_PYTHON_STARTUP = ("abc", "codecs", "encodings/__init__", "encodings/aliases", "encodings/utf_8",
                   "io", "site", "os", "stat", "posixpath", "genericpath", "_collections_abc",
                   "_sitebuiltins", "types", "enum", "functools", "operator", "keyword",
                   "reprlib", "collections/__init__", "re/__init__", "re/_compiler",
                   "re/_parser", "re/_constants", "re/_casefix", "copyreg", "warnings",
                   "sitecustomize", "_distutils_hack/__init__")

# read by the runtime (user lookup) and by libc at start (loader cache, locale, charsets)
_RUNTIME_FILES = ("/etc/passwd", "/etc/group", "/etc/ld.so.cache",
                  "/usr/lib/locale/C.utf8/LC_CTYPE", "/usr/lib/locale/C.UTF-8/LC_CTYPE",
                  "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
                  "/usr/lib/aarch64-linux-gnu/gconv/gconv-modules.cache", "/etc/localtime")

_SHELLS = frozenset({"sh", "bash", "dash", "ash", "busybox"})
# commands that run the command after their options (or after "--")
_WRAPPERS = frozenset({"exec", "env", "nice", "nohup", "runuser", "setpriv", "su-exec", "gosu",
                       "sudo", "timeout", "tini", "dumb-init", "chroot", "stdbuf", "time"})
_BUILTINS = frozenset({"echo", "printf", "cd", "exec", "export", "set", "test", "true", "false",
                       ":", "read", "exit", "shift", "unset", "trap", "wait", "eval", ".",
                       "umask", "ulimit"})
_SHELL_WORDS = frozenset({"if", "then", "else", "elif", "fi", "do", "done", "while", "until",
                          "for", "case", "esac", "!", "{", "}", "(", ")", "[", "[[", "]", "]]"})

ReadFile = Callable[[Layer, int, int, int], bytes]  # (layer, local inode, offset, size)


@dataclass(frozen=True)
class Found:
    path: str  # after symlinks
    layer: Layer
    local: int

    @property
    def entry(self) -> toc_pb2.Entry:
        """The file's TOC entry; a directory the tar has no entry for (its files imply it)
        reads as an empty one."""
        e = self.layer.tree.entry(self.local)
        return e if e is not None else _IMPLIED_DIR


_IMPLIED_DIR = toc_pb2.Entry(type=toc_pb2.DIR)


def _key(f: Found) -> tuple[int, int]:
    """One file of one layer."""
    return id(f.layer), f.local


def _adder(out: list[Found], seen: set[tuple[int, int]]) -> Callable[[Found | None], None]:
    """Appends to `out` each file not yet seen, up to _MAX_FILES."""
    def add(f: Found | None) -> None:
        if f is not None and _key(f) not in seen and len(out) < _MAX_FILES:
            seen.add(_key(f))
            out.append(f)

    return add


class MergedView:
    """Path lookups across an image's lazy layers (bottom first), as overlayfs merges them."""

    def __init__(self, layers: Sequence[Layer]):
        self.layers = list(layers)

    def _find(self, path: str) -> tuple[Layer, int] | None:
        raw = path.strip("/").encode()
        parts = raw.split(b"/") if raw else []
        for layer in reversed(self.layers):
            tree = layer.tree
            ino = tree.resolve(raw)
            if ino is not None:
                node = tree.nodes[ino]
                return None if node.whiteout else (layer, ino)
            # hidden below: an ancestor here is a whiteout (not a dir) or opaque
            for i in range(len(parts), 0, -1):
                anc = tree.resolve(b"/".join(parts[:i]))
                if anc is None:
                    continue
                if tree.nodes[anc].whiteout or OPAQUE_XATTR in tree.xattrs(anc):
                    return None
                break
        return None

    def lookup(self, path: str) -> Found | None:
        """Resolve `path`, following symlinks anywhere in it (at most 40)."""
        todo = [p for p in path.split("/") if p]
        cur = ""
        for _ in range(40 + len(todo)):
            if not todo:
                hit = self._find(cur) if cur else None
                return Found(cur, *hit) if hit else None
            part = todo.pop(0)
            if part == ".":
                continue
            if part == "..":
                cur = posixpath.dirname(cur)
                continue
            nxt = f"{cur}/{part}"
            hit = self._find(nxt)
            if hit is None:
                return None
            e = hit[0].tree.entry(hit[1])
            if e is not None and e.type == toc_pb2.SYMLINK:
                target = e.linkname.decode(errors="replace")
                todo = [p for p in target.split("/") if p] + todo
                cur = "" if target.startswith("/") else cur
                continue
            cur = nxt
        return None


def shell_commands(script: str) -> list[str]:
    """The programs a `sh -c` script runs, in order: the first word of each simple command,
    and the command a wrapper such as runuser or env runs. A guess, not a shell parser."""
    try:
        words = shlex.split(re.sub(r"(&&|\|\||[;|&\n()])", " ; ", script), comments=True)
    except ValueError:
        return []
    out: list[str] = []
    simple: list[str] = []
    for w in [*words, ";"]:
        if w != ";":
            simple.append(w)
            continue
        todo = [x for x in simple if x not in _SHELL_WORDS]
        simple = []
        while todo and ("=" in todo[0].split("/")[0] or todo[0].startswith((">", "<"))):
            todo.pop(0)  # VAR=value, redirections
        while todo and not todo[0].startswith(("$", "-")):
            name = todo.pop(0)
            if name not in out:
                out.append(name)
            if posixpath.basename(name) not in _WRAPPERS:
                break
            # the wrapped command: after "--", else the first word that is no option
            todo = todo[todo.index("--") + 1:] if "--" in todo else [
                x for x in todo if not x.startswith("-") and "=" not in x]
    return out


def parse_ld_so_cache(data: bytes) -> dict[str, str]:
    """library name -> path, from glibc's /etc/ld.so.cache (the "1.1" format)."""
    magic = b"glibc-ld.so.cache1.1"
    start = data.find(magic)
    if start < 0:
        return {}
    nlibs, = struct.unpack_from("<I", data, start + 20)
    out: dict[str, str] = {}
    base = start + 48
    for i in range(min(nlibs, 100_000)):
        off = base + i * 24
        if off + 24 > len(data):
            break
        _, key, value = struct.unpack_from("<iII", data, off)

        def s(at: int) -> str:
            end = data.find(b"\0", at)
            return data[at:end].decode(errors="replace") if 0 <= at < end else ""

        name, path = s(key), s(value)
        if name and path:
            out.setdefault(name, path)
    return out


class Predictor:
    def __init__(self, view: MergedView, read: ReadFile):
        self.view = view
        self.read = read
        self._ldcache: dict[str, str] | None = None
        self._elfs: dict[tuple[int, int], Elf | None] = {}
        self._libs: set[tuple[int, int]] = set()  # found as an interpreter or a library
        self.large_code = LARGE_CODE

    def _bytes(self, f: Found, off: int, n: int) -> bytes:
        return self.read(f.layer, f.local, off, n)

    def _reader_of(self, f: Found) -> Callable[[int, int], bytes]:
        def read(off: int, n: int) -> bytes:
            return self._bytes(f, off, n)

        return read

    def _whole(self, f: Found) -> bytes:
        return self._bytes(f, 0, f.entry.size)

    def _ld_cache(self) -> dict[str, str]:
        if self._ldcache is None:
            f = self.view.lookup("/etc/ld.so.cache")
            self._ldcache = parse_ld_so_cache(self._whole(f)) if f and f.entry.size < (
                16 << 20) else {}
        return self._ldcache

    def which(self, name: str, env: Sequence[str], workdir: str) -> Found | None:
        if "/" in name:
            return self.view.lookup(name if name.startswith("/") else f"{workdir}/{name}")
        path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
        for d in path.split(":"):
            f = self.view.lookup(f"{d}/{name}")
            if f is not None and f.entry.type == toc_pb2.REG:
                return f
        return None

    def library(self, name: str, runpath: Sequence[str], origin: str,
                cache: bool = True) -> Found | None:
        """Where the loader finds `name`. Without `cache`, /etc/ld.so.cache is not read (a
        round trip on a cold layer) and the default directories answer: a guess."""
        for d in runpath:
            f = self.view.lookup(f"{d.replace('$ORIGIN', origin)}/{name}")
            if f is not None:
                return f
        cached = self._ld_cache().get(name) if cache else None
        if cached:
            f = self.view.lookup(cached)
            if f is not None:
                return f
        for d in LIB_DIRS:
            f = self.view.lookup(f"{d}/{name}")
            if f is not None:
                return f
        return None

    def predict(self, argv: Sequence[str], env: Sequence[str], workdir: str = "/",
                early: Callable[[list[Found]], None] | None = None) -> list[Found]:
        """The files the command will read first, in the order it will want them. `early`
        gets the runtime files and the programs as soon as they are known, before the
        libraries are looked for (which reads /etc/ld.so.cache: a round trip)."""
        if not argv:
            return []
        first = self.which(argv[0], env, workdir)
        if first is None:
            return []
        out: list[Found] = [first]
        seen = {_key(first)}
        add = _adder(out, seen)
        runtime: list[Found] = []
        for path in _RUNTIME_FILES:
            hit = self.view.lookup(path)
            if hit is not None and hit.entry.type == toc_pb2.REG and _key(hit) not in seen:
                seen.add(_key(hit))
                runtime.append(hit)

        # an ELF file known from the TOC is not read for a "#!" line
        head = b"" if self.elf(first) is not None else self._bytes(first, 0, 256)
        if head.startswith(b"#!"):  # a script: its interpreter is what runs
            line = head[2:].split(b"\n")[0].decode(errors="replace").split()
            if line:
                add(self.view.lookup(line[0]))
                if line[0].endswith("/env") and len(line) > 1:
                    add(self.which(line[1], env, workdir))
        if len(argv) > 2 and argv[1] == "-c" and posixpath.basename(argv[0]) in _SHELLS:
            for name in shell_commands(argv[2]):  # a Dockerfile's shell-form CMD and the like
                if name not in _BUILTINS:
                    add(self.which(name, env, workdir))
        if early is not None:
            # with the libraries the TOC lets us guess before the loader cache is in
            early(runtime + out + [lib for f in out for lib in self._guess_libraries(f)])
        # the libraries the program itself needs; theirs come from `libraries`
        self._needs(list(out), add)
        for f in list(out):  # the files they name (a runtime's own modules, configuration)
            self._named(f, add)
        m = re.search(r"python(3\.\d+)", out[0].path)
        if m:
            self._python(m.group(1), add)
        return runtime + out  # the runtime reads these before it executes anything

    def _guess_libraries(self, f: Found) -> list[Found]:
        """`f`'s interpreter and libraries found without the loader cache, when the TOC has its
        ELF facts (nothing is fetched for the guess)."""
        elf = self._known_elf(f)
        if elf is None:
            return []
        return [x for x in self._loads(f, elf, cache=False) if x is not None]

    def _known_elf(self, f: Found) -> Elf | None:
        """`elf(f)` when that costs no fetch: parsed before, or recorded in the TOC."""
        if _key(f) in self._elfs or f.entry.size <= f.layer.tree.toc.elf_scan_limit:
            return self.elf(f)
        return None

    def _named(self, f: Found, add: Callable[[Found | None], None]) -> None:
        elf = self._known_elf(f)
        hits = [hit for hit in map(self.view.lookup, elf.paths if elf is not None else [])
                if hit is not None and hit.entry.type == toc_pb2.REG
                and hit.entry.size <= _NAMED_FILE_MAX]
        if len(hits) <= _NAMED_FILES:
            for hit in hits:
                add(hit)

    def chunks(self, f: Found) -> tuple[list[toc_pb2.Chunk], list[toc_pb2.Chunk]]:
        """The chunks of `f` a whole-file prefetch fetches, as (first, last): all but those
        that only hold sections an exception reads (Elf.cold); last, the code of a file with
        more than `large_code` of it. A large program's code is touched in places (node runs
        a fifth of libnode's 29 MB, none of its last 13 MB) while the tables, constants and
        data around it are read through: fetched last, the code it does not run may still be
        on its way when it has done its work."""
        elf = self._known_elf(f)
        if elf is None:
            return list(f.entry.chunks), []

        def within(c: toc_pb2.Chunk, spans: list[tuple[int, int]]) -> bool:
            return any(off <= c.file_offset and c.file_offset + c.size <= off + n
                       for off, n in spans)

        kept = [c for c in f.entry.chunks if not within(c, elf.cold)]
        if sum(n for _, n in elf.code) <= self.large_code:
            return kept, []
        return ([c for c in kept if not within(c, elf.code)],
                [c for c in kept if within(c, elf.code)])

    def libraries(self, found: Sequence[Found]) -> list[Found]:
        """The rest of what the loader maps for `found` (libraries of libraries, as `ldd`
        lists them). `predict` leaves them out: a program reads most of the libraries it
        needs itself but these thinly, and fetched whole they took the bandwidth its reads
        needed (nodejs at 100 Mbit/s, 20 ms: 2.9 s to first output without them, 3.5 s
        with them)."""
        out: list[Found] = []
        add = _adder(out, {_key(f) for f in found})
        queue = [f for f in found if self._may_be_elf(f)]
        while queue:
            before = len(out)
            self._needs(queue, add)
            queue = out[before:]
        return out

    def elf(self, f: Found) -> Elf | None:
        """From the TOC when the converter scanned the file, else parsed from its chunks."""
        key = _key(f)
        if key not in self._elfs:
            e = f.entry
            if e.size <= f.layer.tree.toc.elf_scan_limit:
                self._elfs[key] = Elf.from_proto(e.elf, e.size) if e.HasField("elf") else None
            else:
                self._elfs[key] = parse_elf(self._reader_of(f)) if e.size >= 64 else None
        return self._elfs[key]

    def _needs(self, files: Sequence[Found], add: Callable[[Found | None], None]) -> None:
        """Passes each file's ELF interpreter and DT_NEEDED libraries to `add`. The files are
        parsed in parallel: each parse waits for a chunk or two from the registry, and a
        program's libraries are known only once those are in."""
        todo = [f for f in files if _key(f) not in self._elfs]  # the rest were parsed before
        if len(todo) > 1:
            with ThreadPoolExecutor(max_workers=_PARSE_PARALLEL) as pool:
                list(pool.map(self.elf, todo))
        for f, elf in zip(files, map(self.elf, files), strict=True):
            if elf is None:
                continue
            for lib in self._loads(f, elf):
                if lib is not None:
                    self._libs.add(_key(lib))
                add(lib)

    def _loads(self, f: Found, elf: Elf, cache: bool = True) -> list[Found | None]:
        """What the loader maps for `f`: its interpreter, then its DT_NEEDED libraries (None
        for one not found); `cache` as for `library`."""
        found = [self.view.lookup(elf.interp)] if elf.interp else []
        origin = posixpath.dirname(f.path)
        return found + [self.library(name, elf.runpath, origin, cache) for name in elf.needed]

    def _may_be_elf(self, f: Found) -> bool:
        """Parsed as ELF, or found as a library: the rest (modules, configuration) is not
        read for its headers, which would cost a fetch each."""
        key = _key(f)
        return self._elfs.get(key) is not None or key in self._libs

    def loader_chunks(self, files: Sequence[Found]) -> list[tuple[Layer, ChunkRef]]:
        """The chunks the dynamic loader reads of each ELF file among `files` (those parsed
        or found as libraries) before the program runs its own code (all of a small file):
        a library's text is read thinly, and fetched whole it takes the link from the reads
        that need it."""
        out: dict[tuple[int, int], tuple[Layer, ChunkRef]] = {}
        for f in files:
            elf = self.elf(f) if self._may_be_elf(f) else None
            if elf is None:
                continue
            size = f.entry.size
            spans = [(0, size)] if size <= SMALL_FILE else elf.loader
            for off, n in spans:
                for ref in f.layer.tree.chunks_for(f.local, off, n)[1]:
                    out.setdefault((id(f.layer), ref.blob_offset), (f.layer, ref))
        return list(out.values())

    def _python(self, version: str, add: Callable[[Found | None], None]) -> None:
        tag = version.replace(".", "")
        for prefix in ("/usr/lib", "/usr/local/lib"):
            lib = f"{prefix}/python{version}"
            if self.view.lookup(f"{lib}/os.py") is None:
                continue
            for mod in _PYTHON_STARTUP:
                d, _, base = f"{lib}/{mod}".rpartition("/")
                add(self.view.lookup(f"{d}/__pycache__/{base}.cpython-{tag}.pyc"))
                add(self.view.lookup(f"{d}/{base}.py"))
            return
