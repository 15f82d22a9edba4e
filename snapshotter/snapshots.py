"""containerd snapshot semantics over the metadata store and plain directories.

This is containerd's overlayfs snapshotter (snapshots/overlay/overlay.go, release 1.6/1.7)
rewritten over `metadata.MetaStore`: same checks, same error classes, same mounts, same
on-disk layout, so zest can be a node's default snapshotter.

    <root>/metadata.db                 the MetaStore
    <root>/snapshots/<id>/fs           the snapshot's files (overlay upperdir, or a lower layer)
    <root>/snapshots/<id>/work         overlay workdir; active snapshots only
    <root>/snapshots/new-XXXXXXXX      a snapshot being created (renamed to <id> on success)

Crash safety, metadata first and files second: a snapshot directory is built under a temporary
name inside the write transaction and renamed into place just before the commit; Remove commits
first and deletes the directory afterwards. A kill -9 at any point therefore leaves at worst a
directory no record owns, which Cleanup removes. Mounts are computed from the record, never
stored.

Remote (lazy) layers are seen only through the `LayerMounter` Protocol. With no mounter, a
Prepare that carries `containerd.io/snapshot.ref` is an ordinary Prepare, exactly as in
containerd's overlayfs snapshotter.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from snapshotter import labels as L
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable
from snapshotter.filters import Adaptor, Filter, parse_all
from snapshotter.metadata import Info, Kind, MetaStore, Snapshot, Txn, Usage

log = logging.getLogger(__name__)

_TEMP_PREFIX = "new-"


@dataclass(frozen=True)
class Mount:
    """One mount(2) for containerd: containerd.types.Mount without a target."""

    type: str
    source: str
    options: tuple[str, ...]


class LayerMounter(Protocol):
    """Serves a committed layer from elsewhere (a registry, lazily) at a directory.

    `mount` raises when it cannot serve the layer; the Prepare then goes on as an ordinary one
    and containerd unpacks the layer itself. `check` raises Unavailable when a mounted layer no
    longer answers. All three are called from gRPC worker threads.
    """

    def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> None: ...

    def check(self, mountpoint: Path, labels: Mapping[str, str]) -> None: ...

    def unmount(self, mountpoint: Path) -> None: ...


class Snapshotter:
    """The Snapshotter interface of containerd, one method per RPC."""

    def __init__(
        self,
        root: Path,
        store: MetaStore,
        *,
        mounter: LayerMounter | None = None,
        async_remove: bool = False,
        index_off: bool | None = None,
    ) -> None:
        self.root = root
        self._store = store
        self._mounter = mounter
        self._async_remove = async_remove
        self._index_off = overlay_index_supported() if index_off is None else index_off
        self._snapshots_dir = root / "snapshots"
        self._snapshots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- queries

    def stat(self, key: str) -> Info:
        with self._store.read() as tx:
            return tx.require(key).info

    def usage(self, key: str) -> Usage:
        """Committed and view snapshots: the stored figure; active ones: measured on disk."""
        with self._store.read() as tx:
            snap = tx.require(key)
        if snap.info.kind != Kind.ACTIVE:
            return snap.usage
        return disk_usage(self._fs(snap.id))

    def mounts(self, key: str) -> list[Mount]:
        with self._store.read() as tx:
            snap = tx.require(key)
            if snap.info.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPrecondition(f"snapshot {key} is not active or view")
            parents = tx.parent_ids(snap)
            self._check_remote(tx, parents)
        return self._mounts(snap, parents)

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """Snapshots matching any of the filters (containerd syntax), ordered by name."""
        flt: Filter = parse_all(filters)
        with self._store.read() as tx:
            infos = [s.info for s in tx.walk()]
        for info in infos:
            if flt.match(_adaptor(info)):
                yield info

    # -- mutations

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        mounts = self._create(Kind.ACTIVE, key, parent, labels)
        target = labels.get(L.TARGET_SNAPSHOT_REF)
        if self._mounter is not None and target and self._prepare_remote(key, target, labels):
            raise AlreadyExists(f"target snapshot {target!r}")
        return mounts

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        with self._store.read() as tx:
            snap = tx.require(key)
        usage = disk_usage(self._fs(snap.id))  # outside the write lock: may take a while
        with self._store.write() as tx:
            current = tx.get(key)
            if current is not None and current.id != snap.id:  # replaced meanwhile: measure again
                usage = disk_usage(self._fs(current.id))
            tx.commit_active(key, name, usage, labels, time.time_ns())

    def remove(self, key: str) -> None:
        with self._store.write() as tx:
            snap = tx.remove(key)
        if snap.remote and self._mounter is not None:
            self._mounter.unmount(self._fs(snap.id))
        if not self._async_remove:
            _rmtree(self._snapshots_dir / str(snap.id))

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        """Labels are the only mutable field: "labels" replaces all, "labels.<k>" sets one
        (an empty value deletes it); no field path means all mutable fields."""
        with self._store.write() as tx:
            current = tx.require(info.name).info
            new = dict(current.labels)
            if not fieldpaths:
                new = dict(info.labels)
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path[len("labels.") :]
                    new[k] = info.labels.get(k, "")
                elif path == "labels":
                    new = dict(info.labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {info.name!r}")
            return tx.set_labels(info.name, new, time.time_ns()).info

    def cleanup(self) -> None:
        """Remove every directory under snapshots/ that no record owns."""
        with self._store.write() as tx:  # exclusive: no creation is halfway through
            orphans = self._orphans(tx.ids())
        for path in orphans:
            log.info("cleanup: removing orphan directory", extra={"kv": {"path": path}})
            _rmtree(path)

    def restore(self) -> None:
        """Mount the remote layers again after a restart, before serving containerd."""
        with self._store.read() as tx:
            remote = tx.remote_snapshots()
        for snap in remote:
            if self._mounter is None:
                log.error(
                    "remote snapshot but no layer mounter configured",
                    extra={"kv": {"snapshot": snap.info.name}},
                )
                continue
            self._mounter.mount(self._fs(snap.id), snap.info.labels)

    # -- internals

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        with self._store.write() as tx:
            temp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self._snapshots_dir))
            try:
                (temp / "fs").mkdir(mode=0o755)
                if kind == Kind.ACTIVE:
                    (temp / "work").mkdir(mode=0o711)
                snap = tx.create(kind, key, parent, labels, time.time_ns())
                parents = tx.parent_ids(snap)
                if parents:  # the new upper starts owned like its parent's root
                    st = os.stat(self._fs(parents[0]))
                    os.lchown(temp / "fs", st.st_uid, st.st_gid)
                final = self._snapshots_dir / str(snap.id)
                if final.exists():  # left by a crash before its record was committed
                    _rmtree(final)
                temp.rename(final)
            except BaseException:
                _rmtree(temp)
                raise
        return self._mounts(snap, parents)

    def _prepare_remote(self, key: str, target: str, labels: Mapping[str, str]) -> bool:
        """Try to serve the layer remotely and commit it as `target`; False: unpack it."""
        assert self._mounter is not None
        with self._store.read() as tx:
            snap = tx.require(key)
        fs = self._fs(snap.id)
        try:
            self._mounter.mount(fs, labels)
        except Exception as exc:  # any failure: containerd unpacks the layer instead
            log.info(
                "layer not served remotely",
                extra={"kv": {"target": target, "reason": exc}},
            )
            return False
        committed = {**labels, L.REMOTE: L.REMOTE_VALUE}
        # a layer the mounter unpacked into the directory uses disk here; a mounted one not
        usage = Usage() if os.path.ismount(fs) else disk_usage(fs)
        try:
            with self._store.write() as tx:
                tx.commit_active(key, target, usage, committed, time.time_ns(), remote=True)
        except AlreadyExists:
            self._mounter.unmount(fs)  # someone else committed the target first
        return True

    def _check_remote(self, tx: Txn, ids: Sequence[int]) -> None:
        if self._mounter is None or not ids:
            return
        remote = {s.id: s for s in tx.remote_snapshots()}
        for sid in ids:
            if sid in remote:
                try:
                    self._mounter.check(self._fs(sid), remote[sid].info.labels)
                except Unavailable:
                    raise
                except Exception as exc:
                    raise Unavailable(f"remote layer {remote[sid].info.name}: {exc}") from exc

    def _mounts(self, snap: Snapshot, parents: Sequence[int]) -> list[Mount]:
        """overlay.go mounts(): bind for zero or one layer, overlay otherwise."""
        base = os.fspath(self._snapshots_dir)  # plain strings: chains can be hundreds deep
        if not parents:
            mode = "ro" if snap.info.kind == Kind.VIEW else "rw"
            return [Mount("bind", f"{base}/{snap.id}/fs", (mode, "rbind"))]
        options: list[str] = ["index=off"] if self._index_off else []
        if snap.info.kind == Kind.ACTIVE:
            options += [f"workdir={base}/{snap.id}/work", f"upperdir={base}/{snap.id}/fs"]
        elif len(parents) == 1:
            return [Mount("bind", f"{base}/{parents[0]}/fs", ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(f"{base}/{p}/fs" for p in parents))
        return [Mount("overlay", "overlay", tuple(options))]

    def _orphans(self, ids: set[int]) -> list[Path]:
        owned = {str(i) for i in ids}
        try:
            names = os.listdir(self._snapshots_dir)
        except OSError as exc:
            raise Unavailable(f"cannot list {self._snapshots_dir}: {exc}") from exc
        return [self._snapshots_dir / n for n in sorted(names) if n not in owned]

    def _fs(self, sid: int) -> Path:
        return self._snapshots_dir / str(sid) / "fs"


def _adaptor(info: Info) -> Adaptor:
    """The field paths containerd's storage.adaptSnapshot offers to filters."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            kinds = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}
            return (kinds[info.kind], True) if info.kind in kinds else ("", False)
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels:
                return "", False
            key = ".".join(path[1:])
            return (info.labels[key], True) if key in info.labels else ("", False)
        return "", False

    return field


def disk_usage(path: Path) -> Usage:
    """containerd's fs.DiskUsage: blocks of every distinct inode under path, path included."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [os.fspath(path)]
    try:
        st = os.lstat(stack[0])
    except FileNotFoundError:
        return Usage()
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    while stack:
        try:
            it = os.scandir(stack.pop())
        except FileNotFoundError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))


def overlay_index_supported() -> bool:
    """containerd adds index=off when the kernel's overlay module has the `index` parameter."""
    return Path("/sys/module/overlay/parameters/index").exists()


def _rmtree(path: Path) -> None:
    """Remove a directory tree; what is already gone is fine, other failures are logged."""

    def onexc(func: object, p: str, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
            return
        log.warning("cannot remove", extra={"kv": {"path": p, "error": exc}})

    if not os.path.lexists(path):
        return
    shutil.rmtree(path, onerror=lambda f, p, ei: onexc(f, p, ei[1]))
