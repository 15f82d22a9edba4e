"""A byte-exact tar reader: every byte of the input is handed back to the caller.

The converter must reproduce the original tar byte for byte, so this reader
returns header blocks, padding and the end-of-archive area as raw bytes, and
lets the caller read each file's data itself. It understands ustar, GNU
(long names 'L'/'K') and PAX (local 'x' and global 'g') headers, keeps names
as bytes (non-UTF-8 names survive), and refuses what it cannot serve:
sparse files, multi-volume archives, unknown entry types, unsafe paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from chunkstore.errors import FormatError, UnsupportedError

BLOCK = 512
_MAX_EXT_HEADER = 16 * 1024 * 1024  # a PAX or GNU long-name header larger than this is refused

REG, DIR, SYMLINK, HARDLINK, CHAR, BLOCKDEV, FIFO = range(7)
_TYPES = {
    b"0": REG, b"\0": REG, b"7": REG,
    b"1": HARDLINK, b"2": SYMLINK, b"3": CHAR, b"4": BLOCKDEV, b"5": DIR, b"6": FIFO,
}  # fmt: skip


@dataclass
class TarEntry:
    """One member after its extended headers were applied."""

    name: bytes
    type: int
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    size: int  # bytes of data that follow the header (regular files only)
    mtime: int
    mtime_nsec: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    header_offset: int = 0


def _nts(b: bytes) -> bytes:
    """Field up to the first NUL."""
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _num(b: bytes, what: str) -> int:
    """Octal ASCII or GNU base-256 number field."""
    if b and b[0] & 0x80:
        v = int.from_bytes(b[1:], "big")
        if b[0] == 0xFF:
            v -= 1 << (8 * (len(b) - 1))
        elif b[0] != 0x80:
            raise FormatError(f"bad base-256 number in tar header field {what}")
        return v
    s = _nts(b).strip(b" ")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise FormatError(f"bad number {s!r} in tar header field {what}") from None


def _checksum_ok(h: bytes) -> bool:
    stored = _num(h[148:156], "chksum")
    masked = h[:148] + b" " * 8 + h[156:]
    unsigned = sum(masked)
    if stored == unsigned:
        return True
    # some old tars summed signed chars: each byte > 127 counts 256 less
    return stored == unsigned - 256 * sum(1 for x in masked if x > 127)


def clean_name(raw: bytes, what: str = "entry") -> bytes:
    """The path relative to the layer root; refuses absolute paths and "..".

    "./a/b/", "a//b" and "a/./b" become b"a/b"; "./" and "." become b"" (the root).
    """
    if raw.startswith(b"/"):
        raise FormatError(f"tar {what} {raw!r} has an absolute path")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise FormatError(f"tar {what} {raw!r} contains '..'")
    return b"/".join(parts)


def _parse_pax(data: bytes, offset: int) -> dict[bytes, bytes]:
    """Records "LEN KEY=VALUE\\n"; values stay bytes."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise FormatError(f"malformed PAX header at tar offset {offset}") from None
        rec = data[sp + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not rec.endswith(b"\n") or b"=" not in rec:
            raise FormatError(f"malformed PAX record at tar offset {offset}")
        key, _, value = rec[:-1].partition(b"=")
        out[key] = value
        pos += length
    return out


def _pax_time(v: bytes) -> tuple[int, int]:
    text = v.decode("ascii", "replace")
    neg = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    try:
        sec = int(whole or "0")
        nsec = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        raise FormatError(f"bad PAX mtime {text!r}") from None
    if neg:
        sec, nsec = (-sec - 1, 1_000_000_000 - nsec) if nsec else (-sec, 0)
    return sec, nsec


def _xattr_from_libarchive(key: bytes, value: bytes) -> tuple[str, bytes]:
    import base64
    import urllib.parse

    name = urllib.parse.unquote_to_bytes(key).decode("utf-8", "surrogateescape")
    pad = b"=" * (-len(value) % 4)
    return name, base64.b64decode(value + pad)


class TarReader:
    """Walks a tar stream; see the module docstring.

    Protocol: call `next()`; it returns (raw, entry). `raw` holds every byte
    consumed since the last call (padding of the previous file's data, then
    this entry's header blocks). The caller then reads exactly `entry.size`
    bytes with `read_data`. At the end `next()` returns (rest, None) where rest
    is the end-of-archive area and anything after it.
    """

    def __init__(self, stream: BinaryIO, on_bytes: Callable[[bytes], None] | None = None):
        self._stream = stream
        self._on_bytes = on_bytes
        self.offset = 0  # bytes consumed so far
        self._data_left = 0
        self._pad = 0
        self._global: dict[bytes, bytes] = {}
        self._done = False

    def _read(self, n: int) -> bytes:
        out = self._stream.read(n)
        while len(out) < n:
            more = self._stream.read(n - len(out))
            if not more:
                break
            out += more
        if self._on_bytes is not None and out:
            self._on_bytes(out)
        self.offset += len(out)
        return out

    def read_data(self, n: int) -> bytes:
        if n > self._data_left:
            raise ValueError("read past the end of the entry's data")
        out = self._read(n)
        if len(out) != n:
            raise FormatError(
                f"truncated tar: file data ends at offset {self.offset}, "
                f"{self._data_left - len(out)} bytes missing"
            )
        self._data_left -= n
        return out

    def read_rest(self, limit: int) -> bytes:
        """After the end-of-archive: the next piece of trailing bytes (b"" at EOF)."""
        return self._read(limit)

    def next(self) -> tuple[bytes, TarEntry | None]:
        if self._done:
            return b"", None
        if self._data_left:
            raise ValueError("previous entry's data was not read")
        raw = bytearray()
        if self._pad:
            pad = self._read(self._pad)
            raw += pad
            if len(pad) != self._pad:
                raise FormatError(f"truncated tar: padding ends at offset {self.offset}")
            self._pad = 0
        local: dict[bytes, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        start = self.offset
        while True:
            hoff = self.offset
            h = self._read(BLOCK)
            raw += h
            if not h:
                if hoff != start:
                    raise FormatError(f"truncated tar: extended header at offset {start} "
                                      "is not followed by a member")
                self._done = True  # a tar without end-of-archive blocks: accepted, like Go's tar
                return bytes(raw), None
            if len(h) < BLOCK:
                raise FormatError(f"truncated tar: partial header block at offset {hoff}")
            if h == bytes(BLOCK):
                if hoff != start:
                    raise FormatError(f"tar: extended header at offset {start} without a member")
                self._done = True
                return bytes(raw), None
            if not _checksum_ok(h):
                raise FormatError(f"tar header checksum mismatch at offset {hoff} (corrupt tar?)")
            tflag = h[156:157]
            size = _num(h[124:136], "size")
            if tflag in (b"x", b"g", b"L", b"K"):
                if size > _MAX_EXT_HEADER:
                    raise FormatError(f"tar extended header of {size} bytes at offset {hoff}")
                padded = -(-size // BLOCK) * BLOCK
                body = self._read(padded)
                raw += body
                if len(body) != padded:
                    raise FormatError(f"truncated tar: extended header at offset {hoff}")
                data = body[:size]
                if tflag == b"x":
                    local.update(_parse_pax(data, hoff))
                elif tflag == b"g":
                    self._global.update(_parse_pax(data, hoff))
                elif tflag == b"L":
                    longname = _nts(data)
                else:
                    longlink = _nts(data)
                continue
            entry = self._member(h, hoff, start, tflag, size, {**self._global, **local},
                                 longname, longlink)
            if entry.type == REG:
                self._data_left = entry.size
                self._pad = -entry.size % BLOCK
            return bytes(raw), entry

    def _member(self, h: bytes, hoff: int, start: int, tflag: bytes, size: int,
                pax: dict[bytes, bytes], longname: bytes | None,
                longlink: bytes | None) -> TarEntry:
        if tflag == b"S" or any(k.startswith(b"GNU.sparse.") for k in pax):
            raise UnsupportedError(f"tar entry at offset {hoff} is a GNU sparse file; "
                                   "zest does not convert sparse files (re-create the layer "
                                   "without --sparse)")
        if tflag not in _TYPES:
            raise UnsupportedError(f"tar entry at offset {hoff} has unsupported type {tflag!r}")
        name = _nts(h[0:100])
        gnu = h[257:265] == b"ustar  \0"
        if not gnu and h[257:262] == b"ustar":
            prefix = _nts(h[345:500])
            if prefix:
                name = prefix + b"/" + name
        if longname is not None:
            name = longname
        name = pax.get(b"path", name)
        link = pax.get(b"linkpath", longlink if longlink is not None else _nts(h[157:257]))
        etype = _TYPES[tflag]
        if etype == REG and tflag != b"7" and name.endswith(b"/"):
            etype = DIR  # old V7 archives mark directories by a trailing slash
        mtime, mtime_nsec = _num(h[136:148], "mtime"), 0
        if b"mtime" in pax:
            mtime, mtime_nsec = _pax_time(pax[b"mtime"])
        if b"size" in pax:
            try:
                size = int(pax[b"size"])
            except ValueError:
                raise FormatError(f"bad PAX size at tar offset {hoff}") from None
        xattrs: dict[str, bytes] = {}
        for k, v in pax.items():
            if k.startswith(b"SCHILY.xattr."):
                xattrs[k[13:].decode("utf-8", "surrogateescape")] = v
            elif k.startswith(b"LIBARCHIVE.xattr."):
                xname, xval = _xattr_from_libarchive(k[17:], v)
                xattrs.setdefault(xname, xval)

        def pax_int(key: bytes, default: int) -> int:
            try:
                return int(pax[key]) if key in pax else default
            except ValueError:
                raise FormatError(f"bad PAX {key.decode()} at tar offset {hoff}") from None

        cleaned = clean_name(name)
        if etype == HARDLINK:
            link = clean_name(link, f"hard link {name!r} -> target")
            if not link:
                raise FormatError(f"tar hard link {name!r} points at the layer root")
        return TarEntry(
            name=cleaned,
            type=etype,
            mode=_num(h[100:108], "mode") & 0o7777,
            uid=pax_int(b"uid", _num(h[108:116], "uid")),
            gid=pax_int(b"gid", _num(h[116:124], "gid")),
            uname=pax.get(b"uname", _nts(h[265:297])).decode("utf-8", "replace"),
            gname=pax.get(b"gname", _nts(h[297:329])).decode("utf-8", "replace"),
            size=size if etype == REG else 0,
            mtime=mtime,
            mtime_nsec=mtime_nsec,
            linkname=link if etype in (SYMLINK, HARDLINK) else b"",
            devmajor=_num(h[329:337], "devmajor") if etype in (CHAR, BLOCKDEV) else 0,
            devminor=_num(h[337:345], "devminor") if etype in (CHAR, BLOCKDEV) else 0,
            xattrs=xattrs,
            header_offset=start,
        )
