"""snapshotter.snapshots in process: containerd's overlayfs semantics without mounting anything.

The same behaviour over gRPC and with real mounts: tests/integration/test_snapshotter_conformance.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from snapshotter import labels as L
from snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from snapshotter.metadata import Info, Kind, MetaStore, Usage
from snapshotter.snapshots import Mount, Snapshotter, disk_usage


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    s = MetaStore(tmp_path / "metadata.db")
    yield s
    s.close()


@pytest.fixture
def sn(tmp_path: Path, store: MetaStore) -> Snapshotter:
    return Snapshotter(tmp_path, store, index_off=True)


def _fs(m: Mount) -> Path:
    assert m.type == "bind"
    return Path(m.source)


def _layer(sn: Snapshotter, name: str, parent: str = "", files: Mapping[str, str] = {}) -> None:
    mounts = sn.prepare(f"{name}-a", parent, {})
    if not parent:
        for rel, text in files.items():
            (_fs(mounts[0]) / rel).write_text(text)
    sn.commit(name, f"{name}-a", {})


def _dirs(sn: Snapshotter) -> list[str]:
    return sorted(os.listdir(sn.root / "snapshots"))


# --- kinds, stat, errors -------------------------------------------------------------------------


def test_prepare_commit_view_kinds_and_parents(sn: Snapshotter) -> None:
    sn.prepare("a", "", {})
    assert sn.stat("a").kind == Kind.ACTIVE
    sn.commit("c", "a", {})
    with pytest.raises(NotFound):
        sn.stat("a")
    info = sn.stat("c")
    assert (info.kind, info.parent) == (Kind.COMMITTED, "")
    sn.view("v", "c", {})
    assert (sn.stat("v").kind, sn.stat("v").parent) == (Kind.VIEW, "c")


@pytest.mark.parametrize(
    ("setup", "call", "error"),
    [
        ([], lambda s: s.stat("nope"), NotFound),
        ([], lambda s: s.prepare("k", "nope", {}), NotFound),
        ([], lambda s: s.mounts("nope"), NotFound),
        ([], lambda s: s.usage("nope"), NotFound),
        ([], lambda s: s.remove("nope"), NotFound),
        ([], lambda s: s.commit("x", "nope", {}), NotFound),
        ([], lambda s: s.prepare("", "", {}), InvalidArgument),
        (["active"], lambda s: s.prepare("active", "", {}), AlreadyExists),
        (["active"], lambda s: s.view("active", "", {}), AlreadyExists),
        (["committed"], lambda s: s.prepare("committed", "", {}), AlreadyExists),
        (["active", "committed"], lambda s: s.commit("committed", "active", {}), AlreadyExists),
        (["view"], lambda s: s.commit("x", "view", {}), FailedPrecondition),
        (["committed"], lambda s: s.commit("x", "committed", {}), FailedPrecondition),
        (["committed"], lambda s: s.mounts("committed"), FailedPrecondition),
        (["active"], lambda s: s.prepare("k", "active", {}), InvalidArgument),
        (["view"], lambda s: s.view("k", "view", {}), InvalidArgument),
        (["committed", "child"], lambda s: s.remove("committed"), FailedPrecondition),
        (["active"], lambda s: s.update(Info("active"), ["parent"]), InvalidArgument),
        ([], lambda s: s.update(Info("nope"), []), NotFound),
    ],
)
def test_error_classes(sn: Snapshotter, setup: list[str], call: object, error: type) -> None:
    for what in setup:
        if what == "active":
            sn.prepare("active", "", {})
        elif what == "view":
            sn.view("view", "", {})
        elif what == "committed":
            sn.prepare("tmp", "", {})
            sn.commit("committed", "tmp", {})
        elif what == "child":
            sn.prepare("child", "committed", {})
    with pytest.raises(error):
        call(sn)  # type: ignore[operator]


def test_times_labels_and_commit_resets_created(sn: Snapshotter) -> None:
    t0 = time.time_ns()
    sn.prepare("a", "", {"l": "1", L.GC_ROOT: "x"})
    a = sn.stat("a")
    assert t0 <= a.created_ns == a.updated_ns <= time.time_ns()
    assert a.labels == {"l": "1", L.GC_ROOT: "x"}
    time.sleep(0.001)
    sn.commit("c", "a", {"m": "2"})
    c = sn.stat("c")
    assert c.created_ns == c.updated_ns > a.created_ns
    assert c.labels == {"m": "2"}  # replaced, not inherited


def test_update_by_field_paths_as_containerd_suite(sn: Snapshotter) -> None:
    sn.prepare("a", "", {L.GC_ROOT: "t"})
    created = sn.stat("a").created_ns
    expected = {"l1": "v1", "l2": "v2", "l3": "v3", L.GC_ROOT: "t"}
    info = sn.update(Info("a", parent="ignored", labels=expected), [])
    assert info.labels == expected
    assert info.created_ns == created < info.updated_ns
    assert info.parent == "" and info.kind == Kind.ACTIVE

    info = sn.update(Info("a", labels={"l1": "updated", "l4": "v4"}), ["labels.l1", "labels.l2"])
    assert info.labels == {"l1": "updated", "l3": "v3", L.GC_ROOT: "t"}

    info = sn.update(Info("a", labels={"l4": "v4"}), ["labels"])
    assert info.labels == {"l4": "v4"}
    assert sn.stat("a").labels == {"l4": "v4"}


def test_label_keys_with_dots_update_by_path(sn: Snapshotter) -> None:
    sn.prepare("a", "", {})
    key = "containerd.io/gc.ref"
    info = sn.update(Info("a", labels={key: "x"}), [f"labels.{key}"])
    assert info.labels == {"containerd.io/gc.ref": "x"}


# --- mounts --------------------------------------------------------------------------------------


def test_mounts_like_overlayfs_snapshotter(sn: Snapshotter) -> None:
    root = sn.root / "snapshots"
    assert sn.prepare("a0", "", {}) == [Mount("bind", f"{root}/1/fs", ("rw", "rbind"))]
    sn.commit("l0", "a0", {})
    assert sn.view("v0", "", {}) == [Mount("bind", f"{root}/2/fs", ("ro", "rbind"))]
    # a view of one layer is a read-only bind of that layer
    assert sn.view("v1", "l0", {}) == [Mount("bind", f"{root}/1/fs", ("ro", "rbind"))]
    active = sn.prepare("a1", "l0", {})
    assert active == [
        Mount(
            "overlay",
            "overlay",
            (
                "index=off",
                f"workdir={root}/4/work",
                f"upperdir={root}/4/fs",
                f"lowerdir={root}/1/fs",
            ),
        )
    ]
    sn.commit("l1", "a1", {})
    # a view of two layers: overlay with lowerdirs only, nearest layer first
    assert sn.view("v2", "l1", {}) == [
        Mount("overlay", "overlay", ("index=off", f"lowerdir={root}/4/fs:{root}/1/fs"))
    ]
    assert (root / "4" / "work").is_dir() and not (root / "2" / "work").exists()


def test_index_off_only_when_asked(tmp_path: Path, store: MetaStore) -> None:
    sn = Snapshotter(tmp_path, store, index_off=False)
    _layer(sn, "l0")
    (m,) = sn.prepare("a", "l0", {})
    assert not any(o.startswith("index=") for o in m.options)


def test_mounts_are_computed_not_stored(sn: Snapshotter) -> None:
    first = sn.prepare("a", "", {})
    assert sn.mounts("a") == first


def test_new_upper_is_owned_like_parent_root(sn: Snapshotter) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    mounts = sn.prepare("a", "", {})
    os.chown(_fs(mounts[0]), 1234, 5678)
    sn.commit("c", "a", {})
    (m,) = sn.prepare("b", "c", {})
    upper = next(o.split("=", 1)[1] for o in m.options if o.startswith("upperdir="))
    st = os.stat(upper)
    assert (st.st_uid, st.st_gid) == (1234, 5678)


# --- usage ---------------------------------------------------------------------------------------


def test_usage_measured_for_active_stored_for_committed(sn: Snapshotter) -> None:
    (m,) = sn.prepare("a", "", {})
    empty = sn.usage("a")
    assert empty.inodes == 1
    (_fs(m) / "f").write_bytes(b"x" * 100_000)
    grown = sn.usage("a")
    assert grown.inodes == 2 and grown.size >= empty.size + 100_000
    sn.commit("c", "a", {})
    assert sn.usage("c") == grown
    (_fs(m) / "g").write_bytes(b"y" * 10_000)  # a committed layer does not change its figure
    assert sn.usage("c") == grown
    sn.view("v", "c", {})
    assert sn.usage("v") == Usage()


def test_disk_usage_counts_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"z" * 8192)
    os.link(tmp_path / "d" / "f", tmp_path / "d" / "g")
    os.symlink("f", tmp_path / "d" / "s")
    u = disk_usage(tmp_path / "d")
    assert u.inodes == 3  # dir, f (= g), s


# --- remove, cleanup, crash leftovers -----------------------------------------------------------


def test_remove_deletes_directory_children_first(sn: Snapshotter) -> None:
    _layer(sn, "l0")
    sn.prepare("top", "l0", {})
    assert _dirs(sn) == ["1", "2"]
    with pytest.raises(FailedPrecondition):
        sn.remove("l0")
    sn.remove("top")
    sn.remove("l0")
    assert _dirs(sn) == []


def test_async_remove_leaves_directories_to_cleanup(tmp_path: Path, store: MetaStore) -> None:
    sn = Snapshotter(tmp_path, store, async_remove=True, index_off=True)
    sn.prepare("a", "", {})
    sn.remove("a")
    assert _dirs(sn) == ["1"]
    sn.cleanup()
    assert _dirs(sn) == []


def test_cleanup_removes_only_what_no_record_owns(sn: Snapshotter) -> None:
    _layer(sn, "l0", files={"f": "x"})
    snaps = sn.root / "snapshots"
    (snaps / "new-crashed" / "fs").mkdir(parents=True)  # killed between mkdir and rename
    (snaps / "77" / "fs").mkdir(parents=True)  # renamed, but the transaction never committed
    (snaps / "77" / "fs" / "junk").write_text("j")
    sn.cleanup()
    assert _dirs(sn) == ["1"]
    assert (snaps / "1" / "fs" / "f").read_text() == "x"


def test_create_replaces_a_directory_left_by_an_uncommitted_transaction(sn: Snapshotter) -> None:
    _layer(sn, "l0")
    # The next id was handed out and its directory renamed into place, then the daemon died
    # before the commit: SQLite gives the same id again.
    leftover = sn.root / "snapshots" / "2" / "fs"
    leftover.mkdir(parents=True)
    (leftover / "stale").write_text("s")
    (m,) = sn.prepare("a", "", {})
    assert _fs(m) == leftover
    assert list(leftover.iterdir()) == []


def test_failed_create_leaves_no_directory(sn: Snapshotter) -> None:
    sn.prepare("a", "", {})
    with pytest.raises(AlreadyExists):
        sn.prepare("a", "", {})
    with pytest.raises(NotFound):
        sn.view("v", "missing", {})
    assert _dirs(sn) == ["1"]


# --- walk ----------------------------------------------------------------------------------------


def test_walk_filters(sn: Snapshotter) -> None:
    _layer(sn, "c1")
    sn.prepare("a1", "c1", {"team": "x", "containerd.io/gc.root": "now"})
    sn.view("v1", "c1", {"team": "y"})

    def names(*filters: str) -> list[str]:
        return [i.name for i in sn.walk(filters)]

    assert names() == ["a1", "c1", "v1"]
    assert names("kind==committed") == ["c1"]
    assert names("parent==c1") == ["a1", "v1"]
    assert names("labels.team") == ["a1", "v1"]
    assert names("labels.team==x") == ["a1"]
    assert names("labels.team!=x") == ["c1", "v1"]
    assert names('labels."containerd.io/gc.root"') == ["a1"]
    assert names("kind==view", "name==c1") == ["c1", "v1"]
    assert names("kind==active,labels.team==y") == []
    assert names("name~=^[av]") == ["a1", "v1"]
    with pytest.raises(InvalidArgument):
        names("kind===")


# --- the remote-layer hook -----------------------------------------------------------------------


class FakeMounter:
    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.mounted: dict[Path, Mapping[str, str]] = {}
        self.checked: list[Path] = []
        self.check_error: Exception | None = None

    def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        if self.fail:
            raise RuntimeError("not a zest layer")
        self.mounted[mountpoint] = labels

    def check(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        self.checked.append(mountpoint)
        if self.check_error is not None:
            raise self.check_error

    def unmount(self, mountpoint: Path) -> None:
        del self.mounted[mountpoint]


REMOTE_LABELS = {L.TARGET_SNAPSHOT_REF: "sha256:chain", L.CRI_LAYER_DIGEST: "sha256:layer"}


def test_snapshot_ref_without_mounter_is_an_ordinary_prepare(sn: Snapshotter) -> None:
    (m,) = sn.prepare("extract-1", "", REMOTE_LABELS)
    assert m.type == "bind"
    assert sn.stat("extract-1").kind == Kind.ACTIVE
    with pytest.raises(NotFound):
        sn.stat("sha256:chain")


def test_remote_layer_committed_under_target(tmp_path: Path, store: MetaStore) -> None:
    mounter = FakeMounter()
    sn = Snapshotter(tmp_path, store, mounter=mounter, index_off=True)
    with pytest.raises(AlreadyExists, match="sha256:chain"):
        sn.prepare("extract-1", "", REMOTE_LABELS)
    target = sn.stat("sha256:chain")
    assert target.kind == Kind.COMMITTED
    assert target.labels[L.REMOTE] == L.REMOTE_VALUE
    fs = tmp_path / "snapshots" / "1" / "fs"
    assert list(mounter.mounted) == [fs]

    sn.view("v", "sha256:chain", {})
    sn.mounts("v")
    assert mounter.checked == [fs]
    mounter.check_error = OSError("transport endpoint is not connected")
    with pytest.raises(Unavailable):
        sn.mounts("v")

    sn.remove("v")
    sn.remove("sha256:chain")
    assert mounter.mounted == {}


def test_remote_layer_falls_back_to_unpack(tmp_path: Path, store: MetaStore) -> None:
    sn = Snapshotter(tmp_path, store, mounter=FakeMounter(fail=True), index_off=True)
    (m,) = sn.prepare("extract-1", "", REMOTE_LABELS)
    assert m.type == "bind"
    assert sn.stat("extract-1").kind == Kind.ACTIVE


def test_restore_mounts_remote_layers_again(tmp_path: Path, store: MetaStore) -> None:
    sn = Snapshotter(tmp_path, store, mounter=FakeMounter(), index_off=True)
    with pytest.raises(AlreadyExists):
        sn.prepare("extract-1", "", REMOTE_LABELS)
    again = FakeMounter()
    Snapshotter(tmp_path, store, mounter=again, index_off=True).restore()
    assert list(again.mounted) == [tmp_path / "snapshots" / "1" / "fs"]
