"""What the dynamic loader reads of an ELF file: interpreter, DT_NEEDED, RPATH/RUNPATH and
the file ranges it maps before the program runs; and, to guide a whole-file prefetch, the
sections only an exception reads and the absolute paths the file names in its data.

The converter records these in the TOC (`Entry.elf`) while it has the file's bytes at hand,
so a snapshotter learns a program's libraries without fetching its headers; the snapshotter
parses files from layers converted before that with the same code.
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chunkstore._pb import toc_pb2

_PF_X, _PF_W = 1, 2
LOADER_CAP = 4 << 20  # of one segment: past that, a table is read sparsely
# what a TOC may claim of one file; more is not a loader's view of a real program
_MAX_NAMES = 1024
_MAX_RANGES = 256
MAX_PATHS = 64
# sections read only to unwind the stack (an exception, a backtrace)
_COLD_SECTIONS = frozenset({b".eh_frame", b".eh_frame_hdr", b".gcc_except_table"})
# a NUL-terminated absolute path under a system directory, as a C string constant looks;
# "%" and ":" mark format strings and search lists, not one file
_PATH = re.compile(rb"\x00(/(?:usr|etc|lib|lib64|opt|var|srv|bin|sbin)/"
                   rb"[A-Za-z0-9._+@=,/-]{1,240})(?=\x00)")


@dataclass
class Elf:
    interp: str | None
    needed: list[str]
    runpath: list[str]
    # file ranges the dynamic loader reads or relocates before the program runs: the headers,
    # the first segment when it holds no code (symbol, string, hash and relocation tables in
    # today's layouts), the dynamic section and the writable segments
    loader: list[tuple[int, int]] = field(default_factory=list)
    # the sections in _COLD_SECTIONS, as file ranges
    cold: list[tuple[int, int]] = field(default_factory=list)
    # absolute paths named in the file (`named_paths`); the converter fills them in
    paths: list[str] = field(default_factory=list)
    text: int = 0  # bytes in executable segments
    code: list[tuple[int, int]] = field(default_factory=list)  # the executable segments

    def to_proto(self) -> toc_pb2.Elf:
        return toc_pb2.Elf(interp=self.interp or "", needed=self.needed, runpath=self.runpath,
                           loader=[x for pair in self.loader for x in pair],
                           cold=[x for pair in self.cold for x in pair], paths=self.paths,
                           text=self.text, code=[x for pair in self.code for x in pair])

    @classmethod
    def from_proto(cls, msg: toc_pb2.Elf, size: int) -> Elf:
        """From a TOC, which only the image's author vouches for: lists are capped and ranges
        kept inside the file."""
        return cls(msg.interp or None, list(msg.needed[:_MAX_NAMES]),
                   list(msg.runpath[:_MAX_NAMES]), _ranges(msg.loader, size),
                   _ranges(msg.cold, size),
                   [p for p in msg.paths[:MAX_PATHS] if p.startswith("/") and len(p) < 256],
                   min(msg.text, size), _ranges(msg.code, size))


def _ranges(flat: Sequence[int], size: int) -> list[tuple[int, int]]:
    pairs = list(flat[: 2 * _MAX_RANGES])
    return [(off, min(n, size - off)) for off, n in zip(pairs[::2], pairs[1::2], strict=False)
            if off < size]


def named_paths(pieces: Sequence[bytes]) -> list[str]:
    """The absolute paths a file names as C strings, in order, each once (at most MAX_PATHS):
    configuration and data a program may open by name. `pieces` is the file, in order."""
    out: dict[str, None] = {}
    tail = b""
    for piece in pieces:
        buf = tail + piece
        for m in _PATH.finditer(buf):
            if m.end() >= len(tail):  # a match wholly in the tail was found last time
                out.setdefault(m.group(1).decode(), None)
                if len(out) >= MAX_PATHS:
                    return list(out)
        tail = buf[-256:]
    return list(out)


def parse_elf(read: Callable[[int, int], bytes], sections: bool = False) -> Elf | None:
    """Interpreter, DT_NEEDED, RPATH/RUNPATH and loader ranges of a 64-bit little-endian ELF
    file; None for anything else. `sections`: the cold sections too, which reads the end of
    the file (the converter has all of it; a snapshotter would pay a fetch)."""
    head = read(0, 64)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    if phentsize < 56 or phnum > 256:
        return None
    ph = read(phoff, phentsize * phnum)
    if len(ph) < phentsize * phnum:
        return None
    loads: list[tuple[int, int, int]] = []
    loader = [(0, phoff + phentsize * phnum)]
    code: list[tuple[int, int]] = []
    interp = None
    dynamic = None
    for i in range(phnum):
        p_type, p_flags, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", ph, i * phentsize)
        if p_type == 1:
            if (not loads and not p_flags & _PF_X) or p_flags & _PF_W:
                loader.append((p_offset, min(p_filesz, LOADER_CAP)))
            loads.append((p_vaddr, p_offset, p_filesz))
            if p_flags & _PF_X:
                code.append((p_offset, p_filesz))
        elif p_type == 3:
            interp = read(p_offset, min(p_filesz, 4096)).split(b"\0")[0].decode(
                errors="replace")
        elif p_type == 2:
            dynamic = (p_offset, min(p_filesz, 1 << 20))
            loader.append(dynamic)
    cold = _cold_sections(read, head) if sections else []
    text = sum(n for _, n in code)
    code = code[:_MAX_RANGES]
    if dynamic is None:
        return Elf(interp, [], [], loader, cold, text=text, code=code)
    dyn = read(*dynamic)
    tags: list[tuple[int, int]] = []
    for i in range(0, len(dyn) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dyn, i)
        if tag == 0:
            break
        tags.append((tag, val))
    strtab = next((v for t, v in tags if t == 5), None)
    if strtab is None:
        return Elf(interp, [], [], loader, cold, text=text, code=code)
    off = next((o + strtab - va for va, o, sz in loads if va <= strtab < va + sz), None)
    if off is None:
        return Elf(interp, [], [], loader, cold, text=text, code=code)

    def string(i: int) -> str:
        # one name at a time: a C++ library's string table runs to megabytes
        raw = read(off + i, 4096)
        end = raw.find(b"\0")
        return raw[:end if end >= 0 else len(raw)].decode(errors="replace")

    needed = [string(v) for t, v in tags if t == 1][:_MAX_NAMES]
    runpath = [p for t, v in tags if t in (15, 29) for p in string(v).split(":") if p]
    return Elf(interp, needed, runpath[:_MAX_NAMES], loader, cold, text=text, code=code)


def _cold_sections(read: Callable[[int, int], bytes], head: bytes) -> list[tuple[int, int]]:
    """File ranges of the sections in _COLD_SECTIONS, from the section headers (at the end of
    the file: only the converter, which has the whole file, should ask)."""
    shoff, = struct.unpack_from("<Q", head, 40)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 58)
    if shoff == 0 or shentsize < 64 or not 0 < shnum <= 4096 or shstrndx >= shnum:
        return []
    sh = read(shoff, shentsize * shnum)
    if len(sh) < shentsize * shnum:
        return []
    secs = [struct.unpack_from("<IIQQQQ", sh, i * shentsize) for i in range(shnum)]
    _, _, _, _, str_off, str_size = secs[shstrndx]
    names = read(str_off, min(str_size, 1 << 16))
    out = []
    for name, sh_type, _, _, off, size in secs:
        end = names.find(b"\0", name)
        if sh_type == 1 and size and names[name:end] in _COLD_SECTIONS:  # SHT_PROGBITS
            out.append((off, size))
    return sorted(out)[:_MAX_RANGES]


def reader_of(pieces: Sequence[bytes]) -> Callable[[int, int], bytes]:
    """read(offset, size) over a file held as consecutive pieces (its chunks)."""
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + len(p))

    def read(offset: int, size: int) -> bytes:
        out = []
        i = bisect.bisect_right(starts, offset) - 1
        while size > 0 and 0 <= i < len(pieces):
            at = offset - starts[i]
            part = pieces[i][at : at + size]
            out.append(part)
            offset += len(part)
            size -= len(part)
            i += 1
        return b"".join(out)

    return read
