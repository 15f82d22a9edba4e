from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntryType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REG: _ClassVar[EntryType]
    DIR: _ClassVar[EntryType]
    SYMLINK: _ClassVar[EntryType]
    HARDLINK: _ClassVar[EntryType]
    CHAR: _ClassVar[EntryType]
    BLOCK: _ClassVar[EntryType]
    FIFO: _ClassVar[EntryType]
REG: EntryType
DIR: EntryType
SYMLINK: EntryType
HARDLINK: EntryType
CHAR: EntryType
BLOCK: EntryType
FIFO: EntryType

class Chunk(_message.Message):
    __slots__ = ("file_offset", "blob_offset", "compressed_size", "size", "digest")
    FILE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    BLOB_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    file_offset: int
    blob_offset: int
    compressed_size: int
    size: int
    digest: bytes
    def __init__(self, file_offset: _Optional[int] = ..., blob_offset: _Optional[int] = ..., compressed_size: _Optional[int] = ..., size: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class Xattr(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: bytes
    def __init__(self, name: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("name", "type", "mode", "uid", "gid", "uname", "gname", "size", "mtime", "mtime_nsec", "linkname", "devmajor", "devminor", "xattrs", "chunks", "header_offset", "elf")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    UNAME_FIELD_NUMBER: _ClassVar[int]
    GNAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_FIELD_NUMBER: _ClassVar[int]
    MTIME_NSEC_FIELD_NUMBER: _ClassVar[int]
    LINKNAME_FIELD_NUMBER: _ClassVar[int]
    DEVMAJOR_FIELD_NUMBER: _ClassVar[int]
    DEVMINOR_FIELD_NUMBER: _ClassVar[int]
    XATTRS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    HEADER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ELF_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    type: EntryType
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    size: int
    mtime: int
    mtime_nsec: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: _containers.RepeatedCompositeFieldContainer[Xattr]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    header_offset: int
    elf: Elf
    def __init__(self, name: _Optional[bytes] = ..., type: _Optional[_Union[EntryType, str]] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., uname: _Optional[str] = ..., gname: _Optional[str] = ..., size: _Optional[int] = ..., mtime: _Optional[int] = ..., mtime_nsec: _Optional[int] = ..., linkname: _Optional[bytes] = ..., devmajor: _Optional[int] = ..., devminor: _Optional[int] = ..., xattrs: _Optional[_Iterable[_Union[Xattr, _Mapping]]] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., header_offset: _Optional[int] = ..., elf: _Optional[_Union[Elf, _Mapping]] = ...) -> None: ...

class Elf(_message.Message):
    __slots__ = ("interp", "needed", "runpath", "loader", "paths", "cold", "text", "code")
    INTERP_FIELD_NUMBER: _ClassVar[int]
    NEEDED_FIELD_NUMBER: _ClassVar[int]
    RUNPATH_FIELD_NUMBER: _ClassVar[int]
    LOADER_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    COLD_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    interp: str
    needed: _containers.RepeatedScalarFieldContainer[str]
    runpath: _containers.RepeatedScalarFieldContainer[str]
    loader: _containers.RepeatedScalarFieldContainer[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    cold: _containers.RepeatedScalarFieldContainer[int]
    text: int
    code: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, interp: _Optional[str] = ..., needed: _Optional[_Iterable[str]] = ..., runpath: _Optional[_Iterable[str]] = ..., loader: _Optional[_Iterable[int]] = ..., paths: _Optional[_Iterable[str]] = ..., cold: _Optional[_Iterable[int]] = ..., text: _Optional[int] = ..., code: _Optional[_Iterable[int]] = ...) -> None: ...

class HotFrame(_message.Message):
    __slots__ = ("blob_offset", "compressed_size", "size", "digest")
    BLOB_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    blob_offset: int
    compressed_size: int
    size: int
    digest: bytes
    def __init__(self, blob_offset: _Optional[int] = ..., compressed_size: _Optional[int] = ..., size: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class HotRange(_message.Message):
    __slots__ = ("entry", "file_offset", "length", "frame", "frame_offset")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    FILE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    FRAME_OFFSET_FIELD_NUMBER: _ClassVar[int]
    entry: int
    file_offset: int
    length: int
    frame: int
    frame_offset: int
    def __init__(self, entry: _Optional[int] = ..., file_offset: _Optional[int] = ..., length: _Optional[int] = ..., frame: _Optional[int] = ..., frame_offset: _Optional[int] = ...) -> None: ...

class TOC(_message.Message):
    __slots__ = ("version", "entries", "prefetch", "tar_size", "tar_digest", "hot_frames", "hot", "elf_scan_limit")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    TAR_SIZE_FIELD_NUMBER: _ClassVar[int]
    TAR_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HOT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    HOT_FIELD_NUMBER: _ClassVar[int]
    ELF_SCAN_LIMIT_FIELD_NUMBER: _ClassVar[int]
    version: int
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    prefetch: _containers.RepeatedScalarFieldContainer[int]
    tar_size: int
    tar_digest: bytes
    hot_frames: _containers.RepeatedCompositeFieldContainer[HotFrame]
    hot: _containers.RepeatedCompositeFieldContainer[HotRange]
    elf_scan_limit: int
    def __init__(self, version: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., prefetch: _Optional[_Iterable[int]] = ..., tar_size: _Optional[int] = ..., tar_digest: _Optional[bytes] = ..., hot_frames: _Optional[_Iterable[_Union[HotFrame, _Mapping]]] = ..., hot: _Optional[_Iterable[_Union[HotRange, _Mapping]]] = ..., elf_scan_limit: _Optional[int] = ...) -> None: ...
