"""What the dynamic loader reads of an ELF file: interpreter, DT_NEEDED, RPATH/RUNPATH and
the file ranges it maps before the program runs.

The converter records these in the TOC (`Entry.elf`) while it has the file's bytes at hand,
so a snapshotter learns a program's libraries without fetching its headers; the snapshotter
parses files from layers converted before that with the same code.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chunkstore._pb import toc_pb2

_PF_X, _PF_W = 1, 2
LOADER_CAP = 4 << 20  # of one segment: past that, a table is read sparsely
# what a TOC may claim of one file; more is not a loader's view of a real program
_MAX_NAMES = 1024
_MAX_RANGES = 256


@dataclass
class Elf:
    interp: str | None
    needed: list[str]
    runpath: list[str]
    # file ranges the dynamic loader reads or relocates before the program runs: the headers,
    # the first segment when it holds no code (symbol, string, hash and relocation tables in
    # today's layouts), the dynamic section and the writable segments
    loader: list[tuple[int, int]] = field(default_factory=list)

    def to_proto(self) -> toc_pb2.Elf:
        return toc_pb2.Elf(interp=self.interp or "", needed=self.needed, runpath=self.runpath,
                           loader=[x for pair in self.loader for x in pair])

    @classmethod
    def from_proto(cls, msg: toc_pb2.Elf, size: int) -> Elf:
        """From a TOC, which only the image's author vouches for: lists are capped and ranges
        kept inside the file."""
        flat = list(msg.loader[: 2 * _MAX_RANGES])
        loader = [(off, min(n, size - off)) for off, n in zip(flat[::2], flat[1::2],
                                                               strict=False) if off < size]
        return cls(msg.interp or None, list(msg.needed[:_MAX_NAMES]),
                   list(msg.runpath[:_MAX_NAMES]), loader)


def parse_elf(read: Callable[[int, int], bytes]) -> Elf | None:
    """Interpreter, DT_NEEDED, RPATH/RUNPATH and loader ranges of a 64-bit little-endian ELF
    file; None for anything else."""
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
    interp = None
    dynamic = None
    for i in range(phnum):
        p_type, p_flags, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", ph, i * phentsize)
        if p_type == 1:
            if (not loads and not p_flags & _PF_X) or p_flags & _PF_W:
                loader.append((p_offset, min(p_filesz, LOADER_CAP)))
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 3:
            interp = read(p_offset, min(p_filesz, 4096)).split(b"\0")[0].decode(
                errors="replace")
        elif p_type == 2:
            dynamic = (p_offset, min(p_filesz, 1 << 20))
            loader.append(dynamic)
    if dynamic is None:
        return Elf(interp, [], [], loader)
    dyn = read(*dynamic)
    tags: list[tuple[int, int]] = []
    for i in range(0, len(dyn) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dyn, i)
        if tag == 0:
            break
        tags.append((tag, val))
    strtab = next((v for t, v in tags if t == 5), None)
    if strtab is None:
        return Elf(interp, [], [], loader)
    off = next((o + strtab - va for va, o, sz in loads if va <= strtab < va + sz), None)
    if off is None:
        return Elf(interp, [], [], loader)

    def string(i: int) -> str:
        # one name at a time: a C++ library's string table runs to megabytes
        raw = read(off + i, 4096)
        end = raw.find(b"\0")
        return raw[:end if end >= 0 else len(raw)].decode(errors="replace")

    needed = [string(v) for t, v in tags if t == 1][:_MAX_NAMES]
    runpath = [p for t, v in tags if t in (15, 29) for p in string(v).split(":") if p]
    return Elf(interp, needed, runpath[:_MAX_NAMES], loader)


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
