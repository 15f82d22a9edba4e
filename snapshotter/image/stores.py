"""Where images live: a registry repository, an OCI layout directory or an OCI archive.

`open_store(location)` parses a location (see reference.py) and returns the
matching ImageStore with the tag or digest to use in it. All three stores share
the ImageStore contract: `get_manifest` checks the digest of the bytes,
`put_blob` checks the streamed bytes' digest and size before they become
visible, and errors are snapshotter.registry.errors classes naming the path or
repository and the object.

OCI layout writes are atomic (temp file in the same directory, fsync, rename;
index.json last). An archive being written is a layout in a temporary directory
next to the target, turned into the tar on `close()`. A tag is the commit
point, as in a registry: `close()` writes the tar only if a manifest was stored
under a tag (the converter tags last), so a conversion that failed half-way, an
archive never closed, or one closed after an exception inside `with` leaves the
target untouched. An existing archive is replaced, not extended, as skopeo does.

Concurrency: blobs may be read and written from several threads; index.json
updates are serialised by a lock inside each store (not across processes).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from chunkstore.digest import Digest
from snapshotter.image.reference import DEFAULT_TAG, Kind, parse_reference
from snapshotter.image.store import OCI_INDEX, ImageStore, Manifest
from snapshotter.registry.client import MAX_MANIFEST_SIZE, RegistryClient, manifest_media_type
from snapshotter.registry.digests import CHUNK_SIZE, verified_chunks
from snapshotter.registry.errors import DigestMismatchError, NotFoundError, RegistryError

log = logging.getLogger(__name__)

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
REF_NAME = "org.opencontainers.image.ref.name"
_LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}


def open_store(
    location: str, *, plain_http: bool = False, for_writing: bool = False
) -> tuple[ImageStore, str]:
    """The store for an image location and the tag or digest within it.

    Without a tag, a layout or archive being read resolves to "latest" or, when it
    holds a single image, to that image's digest; one being written gets "latest".
    """
    ref = parse_reference(location)
    store: RegistryStore | OciLayoutStore | OciArchiveStore
    if ref.kind is Kind.REGISTRY:
        store = RegistryStore(RegistryClient(ref.api_host, plain_http=plain_http), ref.repository)
        return store, ref.reference or DEFAULT_TAG
    if ref.kind is Kind.OCI:
        store = OciLayoutStore(ref.path, create=for_writing)
    else:
        store = OciArchiveStore(ref.path, for_writing=for_writing)
    if ref.reference:
        return store, ref.reference
    if for_writing:
        return store, DEFAULT_TAG
    try:
        return store, store.default_reference()
    except BaseException:
        store.close()
        raise


class RegistryStore:
    """One repository of a registry, over a RegistryClient this store owns and closes."""

    def __init__(self, client: RegistryClient, repository: str) -> None:
        self.client = client
        self.repository = repository

    def get_manifest(self, reference: str) -> Manifest:
        return self.client.get_manifest(self.repository, reference)

    def open_blob(self, digest: str) -> BinaryIO:
        return self.client.open_blob(self.repository, digest)

    def has_blob(self, digest: str) -> bool:
        return self.client.head_blob(self.repository, digest) is not None

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        return self.client.read_range(self.repository, digest, offset, length)

    def put_blob(self, fileobj: BinaryIO, digest: str, size: int) -> None:
        self.client.put_blob(self.repository, fileobj, digest, size)

    def put_manifest(self, manifest: Manifest, tag: str | None) -> None:
        self.client.put_manifest(self.repository, tag or manifest.digest, manifest)

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------- OCI layouts


class _LayoutReader:
    """Reading an OCI layout through `_open(relpath)`; subclasses say where the files are."""

    name: str  # for messages: "OCI layout /path" or "OCI archive /file"

    def _open(self, relpath: str) -> BinaryIO:
        """The file's bytes; FileNotFoundError when it is missing."""
        raise NotImplementedError

    def _exists(self, relpath: str) -> bool:
        raise NotImplementedError

    # -- ImageStore, reading side

    def get_manifest(self, reference: str) -> Manifest:
        desc = self._find(reference)
        digest = desc["digest"] if desc else reference
        if not digest.startswith("sha256:"):
            raise NotFoundError(
                f"tag {reference!r} not found in {self.name}; it has tags "
                f"{', '.join(self.tags()) or '(none)'}: name one as PATH:TAG"
            )
        path = _blob_path(digest)
        try:
            with self._open(path) as f:
                data = f.read(MAX_MANIFEST_SIZE + 1)
        except FileNotFoundError:
            raise NotFoundError(f"manifest {digest} not found in {self.name} ({path})") from None
        if len(data) > MAX_MANIFEST_SIZE:
            raise RegistryError(f"manifest {digest} in {self.name} is too large for a manifest")
        if str(Digest.of(data)) != digest:
            raise DigestMismatchError(
                f"manifest {digest} in {self.name} is corrupt: its bytes have digest "
                f"{Digest.of(data)}; restore the layout from a good copy"
            )
        media_type = desc.get("mediaType") if desc else None
        if not isinstance(media_type, str) or not media_type:
            media_type = manifest_media_type("", data, f"manifest {digest} in {self.name}")
        return Manifest(media_type, data, digest)

    def open_blob(self, digest: str) -> BinaryIO:
        path = _blob_path(digest)
        try:
            return self._open(path)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found in {self.name} ({path})") from None

    def has_blob(self, digest: str) -> bool:
        return self._exists(_blob_path(digest))

    # -- tags

    def index(self) -> dict[str, Any]:
        """index.json, checked to be an OCI layout's."""
        try:
            with self._open(LAYOUT_FILE) as f:
                layout = json.loads(f.read())
            with self._open(INDEX_FILE) as f:
                index = json.loads(f.read())
        except FileNotFoundError as exc:
            raise RegistryError(
                f"{self.name} is not an OCI image layout (no {Path(str(exc.filename)).name}); "
                "point at a directory or archive written by zest, skopeo or umoci"
            ) from None
        except ValueError as exc:
            raise RegistryError(
                f"{self.name}: corrupt {LAYOUT_FILE} or {INDEX_FILE}: {exc}"
            ) from exc
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
            raise RegistryError(f"{self.name}: unsupported {LAYOUT_FILE} {layout!r}")
        if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
            raise RegistryError(f"{self.name}: {INDEX_FILE} is not an image index")
        return index

    def tags(self) -> list[str]:
        return _tags(self.index())

    def default_reference(self) -> str:
        """ "latest" if tagged so, else the digest of the only image; NotFoundError otherwise."""
        index = self.index()
        manifests, tags = index.get("manifests", []), _tags(index)
        if DEFAULT_TAG in tags:
            return DEFAULT_TAG
        if len(manifests) == 1:
            return str(manifests[0]["digest"])
        raise NotFoundError(
            f"{self.name} holds {len(manifests)} images and none is tagged {DEFAULT_TAG!r}; "
            f"name one as PATH:TAG (tags: {', '.join(tags) or 'none'})"
        )

    def _find(self, reference: str) -> dict[str, Any] | None:
        """The index.json descriptor for a tag or digest, if listed."""
        by_digest = reference.startswith("sha256:")
        for desc in self.index().get("manifests", []):
            if by_digest and desc.get("digest") == reference:
                return dict(desc)
            if not by_digest and (desc.get("annotations") or {}).get(REF_NAME) == reference:
                return dict(desc)
        return None


def _tags(index: dict[str, Any]) -> list[str]:
    return [
        tag
        for desc in index.get("manifests", [])
        if (tag := (desc.get("annotations") or {}).get(REF_NAME))
    ]


def _blob_path(digest: str) -> str:
    return f"blobs/sha256/{Digest.parse(digest).hex}"


class OciLayoutStore(_LayoutReader):
    """An OCI image layout directory; `create=True` makes one when the path is new or empty."""

    def __init__(self, path: Path | str, *, create: bool = False) -> None:
        self.path = Path(path)
        self.name = f"OCI layout {self.path}"
        self._lock = threading.Lock()
        if create:
            self._init_layout()
        elif not self.path.is_dir():
            raise NotFoundError(f"{self.name} does not exist or is not a directory")
        self.index()  # refuse anything that is not a layout now, not at first use

    def _open(self, relpath: str) -> BinaryIO:
        return open(self.path / relpath, "rb")  # the caller closes it

    def _exists(self, relpath: str) -> bool:
        return (self.path / relpath).is_file()

    def _init_layout(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RegistryError(f"{self.name}: exists and is not a directory; choose another path")
        if (self.path / LAYOUT_FILE).exists():
            return
        if self.path.exists() and any(self.path.iterdir()):
            raise RegistryError(
                f"{self.name}: directory is not empty and has no {LAYOUT_FILE}; "
                "choose a new or empty directory"
            )
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        empty_index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        _write_atomic(self.path / INDEX_FILE, _json_bytes(empty_index))
        _write_atomic(self.path / LAYOUT_FILE, _json_bytes(_LAYOUT_VERSION))

    # -- writing

    def put_blob(self, fileobj: BinaryIO, digest: str, size: int) -> None:
        """Stream into a temp file beside the blob; renamed into place once verified."""
        what = f"blob {digest} for {self.name}"
        target = self.path / _blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_file(target) as out:
            for chunk in verified_chunks(fileobj, digest, size, what):
                out.write(chunk)

    def put_manifest(self, manifest: Manifest, tag: str | None) -> None:
        """Store the manifest as a blob; with a tag, list it in index.json under that name."""
        if str(Digest.of(manifest.data)) != manifest.digest:
            raise DigestMismatchError(
                f"manifest for {self.name}: bytes do not have digest {manifest.digest}"
            )
        self.put_blob(io.BytesIO(manifest.data), manifest.digest, len(manifest.data))
        if tag is None:
            return
        desc = {
            "mediaType": manifest.media_type,
            "digest": manifest.digest,
            "size": len(manifest.data),
            "annotations": {REF_NAME: tag},
        }
        with self._lock:
            index = self.index()
            others = [
                d
                for d in index.get("manifests", [])
                if (d.get("annotations") or {}).get(REF_NAME) != tag
            ]
            index["manifests"] = [*others, desc]
            _write_atomic(self.path / INDEX_FILE, _json_bytes(index))

    def close(self) -> None:
        """Nothing to release: every write is complete when its call returns."""


# ---------------------------------------------------------------- OCI archives


class _TarLayout(_LayoutReader):
    """An OCI layout read in place from an uncompressed tar: blobs are slices of the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"OCI archive {path}"
        self._members: dict[str, tuple[int, int]] = {}  # name -> (data offset, size)
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        name = os.path.normpath(member.name).lstrip("/")
                        self._members[name] = (member.offset_data, member.size)
        except FileNotFoundError:
            raise NotFoundError(f"{self.name} does not exist") from None
        except tarfile.ReadError as exc:
            raise RegistryError(
                f"{self.name} is not an uncompressed tar ({exc}); "
                "decompress it first, e.g. with gunzip or zstd -d"
            ) from exc

    def _open(self, relpath: str) -> BinaryIO:
        try:
            offset, size = self._members[relpath]
        except KeyError:
            raise FileNotFoundError(2, "not in archive", relpath) from None
        return io.BufferedReader(_FileSlice(self.path, offset, size), CHUNK_SIZE)

    def _exists(self, relpath: str) -> bool:
        return relpath in self._members


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset+size) of a file, seekable, through a descriptor of its own."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._start = offset
        self._size = size
        self._pos = 0  # within the slice

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._start + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class OciArchiveStore:
    """A tar of an OCI layout: read in place, or written as a whole on close()."""

    def __init__(self, path: Path | str, *, for_writing: bool = False) -> None:
        self.path = Path(path)
        self.name = f"OCI archive {self.path}"
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._tagged = False  # the commit point: see the module docstring
        self._layout: _LayoutReader
        if for_writing:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmpdir = tempfile.TemporaryDirectory(
                dir=self.path.parent, prefix=f".{self.path.name}.layout-"
            )
            self._layout = OciLayoutStore(self._tmpdir.name, create=True)
        else:
            self._layout = _TarLayout(self.path)
            self._layout.index()

    def __enter__(self) -> OciArchiveStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def get_manifest(self, reference: str) -> Manifest:
        return self._layout.get_manifest(reference)

    def open_blob(self, digest: str) -> BinaryIO:
        return self._layout.open_blob(digest)

    def has_blob(self, digest: str) -> bool:
        return self._layout.has_blob(digest)

    def tags(self) -> list[str]:
        return self._layout.tags()

    def default_reference(self) -> str:
        return self._layout.default_reference()

    def put_blob(self, fileobj: BinaryIO, digest: str, size: int) -> None:
        self._writer().put_blob(fileobj, digest, size)

    def put_manifest(self, manifest: Manifest, tag: str | None) -> None:
        self._writer().put_manifest(manifest, tag)
        self._tagged = self._tagged or tag is not None

    def close(self) -> None:
        """Write the archive (atomically replacing the target) if something was tagged."""
        if self._tmpdir is None:
            return
        if not self._tagged:
            log.info("nothing tagged, archive not written", extra={"kv": {"path": self.path}})
            self.abort()
            return
        try:
            with _atomic_file(self.path) as out, tarfile.open(fileobj=out, mode="w") as tar:
                _add_layout(tar, Path(self._tmpdir.name))
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop what was written so far; the target stays as it was."""
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def _writer(self) -> OciLayoutStore:
        if not isinstance(self._layout, OciLayoutStore) or self._tmpdir is None:
            raise RegistryError(f"{self.name} was opened for reading or is closed; cannot write")
        return self._layout


def _add_layout(tar: tarfile.TarFile, root: Path) -> None:
    """oci-layout, index.json, then the blobs in name order; owner and times zeroed."""
    names = [LAYOUT_FILE, INDEX_FILE, "blobs", "blobs/sha256"]
    names += sorted(f"blobs/sha256/{p.name}" for p in (root / "blobs" / "sha256").iterdir())
    for name in names:
        path = root / name
        info = tar.gettarinfo(str(path), arcname=name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755 if info.isdir() else 0o644
        if info.isfile():
            with path.open("rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)


# ---------------------------------------------------------------- atomic files


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[BinaryIO]:
    """A temp file beside `target`, fsynced and renamed over it when the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _write_atomic(target: Path, data: bytes) -> None:
    with _atomic_file(target) as out:
        out.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=2).encode() + b"\n"
