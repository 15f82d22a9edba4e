"""snapshotter.metadata: schema, transactions and containerd's storage checks, on real SQLite."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from snapshotter.metadata import SCHEMA_VERSION, Kind, MetaStore, Usage


@pytest.fixture
def store(tmp_path: Path) -> MetaStore:
    s = MetaStore(tmp_path / "metadata.db")
    yield s
    s.close()


def _committed(store: MetaStore, name: str, parent: str = "") -> int:
    with store.write() as tx:
        tx.create(Kind.ACTIVE, f"{name}-active", parent, {}, 1)
        return tx.commit_active(f"{name}-active", name, Usage(10, 2), {}, 2).id


def test_schema_version_and_wal(tmp_path: Path, store: MetaStore) -> None:
    conn = sqlite3.connect(tmp_path / "metadata.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(Unavailable, match="newer"):
        MetaStore(tmp_path / "m.db")


def test_reopen_keeps_records(tmp_path: Path) -> None:
    s = MetaStore(tmp_path / "m.db")
    _committed(s, "base")
    s.close()
    s = MetaStore(tmp_path / "m.db")
    with s.read() as tx:
        snap = tx.require("base")
    s.close()
    assert snap.info.kind == Kind.COMMITTED
    assert snap.usage == Usage(10, 2)


def test_create_checks_in_containerd_order(store: MetaStore) -> None:
    with store.write() as tx:
        tx.create(Kind.ACTIVE, "a", "", {}, 1)
    with pytest.raises(NotFound), store.write() as tx:
        tx.create(Kind.ACTIVE, "b", "missing", {}, 1)
    with pytest.raises(InvalidArgument), store.write() as tx:  # parent not committed
        tx.create(Kind.ACTIVE, "b", "a", {}, 1)
    with pytest.raises(AlreadyExists), store.write() as tx:
        tx.create(Kind.VIEW, "a", "", {}, 1)
    with pytest.raises(InvalidArgument), store.write() as tx:
        tx.create(Kind.COMMITTED, "c", "", {}, 1)


def test_commit_keeps_id_renames_and_replaces_labels(store: MetaStore) -> None:
    with store.write() as tx:
        a = tx.create(Kind.ACTIVE, "a", "", {"x": "1", "keep": "no"}, 100)
    with store.write() as tx:
        c = tx.commit_active("a", "c", Usage(4096, 3), {"y": "2"}, 200)
    assert c.id == a.id
    assert c.info.labels == {"y": "2"}
    assert (c.info.created_ns, c.info.updated_ns) == (200, 200)
    with store.read() as tx:
        assert tx.get("a") is None


def test_commit_errors(store: MetaStore) -> None:
    _committed(store, "c1")
    with store.write() as tx:
        tx.create(Kind.ACTIVE, "a", "", {}, 1)
        tx.create(Kind.VIEW, "v", "", {}, 1)
    with pytest.raises(AlreadyExists), store.write() as tx:
        tx.commit_active("a", "c1", Usage(), {}, 1)
    with pytest.raises(NotFound), store.write() as tx:
        tx.commit_active("nope", "c2", Usage(), {}, 1)
    with pytest.raises(FailedPrecondition), store.write() as tx:
        tx.commit_active("v", "c2", Usage(), {}, 1)
    with pytest.raises(FailedPrecondition), store.write() as tx:
        tx.commit_active("c1", "c2", Usage(), {}, 1)


def test_remove_refuses_parent_with_children(store: MetaStore) -> None:
    _committed(store, "base")
    with store.write() as tx:
        tx.create(Kind.VIEW, "child", "base", {}, 1)
    with pytest.raises(FailedPrecondition), store.write() as tx:
        tx.remove("base")
    with store.write() as tx:
        tx.remove("child")
        tx.remove("base")
    with pytest.raises(NotFound), store.write() as tx:
        tx.remove("base")


def test_parent_ids_nearest_first(store: MetaStore) -> None:
    ids = [_committed(store, "l0")]
    for i in range(1, 5):
        ids.append(_committed(store, f"l{i}", f"l{i - 1}"))
    with store.write() as tx:
        top = tx.create(Kind.ACTIVE, "top", "l4", {}, 1)
        assert tx.parent_ids(top) == list(reversed(ids))
        assert tx.require("top").info.parent == "l4"


def test_ids_are_never_reused(store: MetaStore) -> None:
    first = _committed(store, "x")
    with store.write() as tx:
        tx.remove("x")
    assert _committed(store, "y") > first


def test_empty_label_values_are_not_stored(store: MetaStore) -> None:
    with store.write() as tx:
        snap = tx.create(Kind.ACTIVE, "a", "", {"a": "1", "gone": ""}, 1)
        assert snap.info.labels == {"a": "1"}
        snap = tx.set_labels("a", {"b": "2", "c": ""}, 5)
    assert snap.info.labels == {"b": "2"}
    assert snap.info.updated_ns == 5


def test_failed_write_rolls_back(store: MetaStore) -> None:
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.create(Kind.ACTIVE, "a", "", {}, 1)
        raise RuntimeError("boom")
    with store.read() as tx:
        assert tx.get("a") is None


def test_walk_is_ordered_by_name_with_labels(store: MetaStore) -> None:
    with store.write() as tx:
        for name in ["b", "a", "c"]:
            tx.create(Kind.ACTIVE, name, "", {"n": name}, 1)
    with store.read() as tx:
        infos = [s.info for s in tx.walk()]
    assert [i.name for i in infos] == ["a", "b", "c"]
    assert [i.labels for i in infos] == [{"n": "a"}, {"n": "b"}, {"n": "c"}]


def test_threads_share_the_store(store: MetaStore) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                with store.write() as tx:
                    tx.create(Kind.ACTIVE, f"t{n}-{i}", "", {}, 1)
                with store.read() as tx:
                    assert tx.require(f"t{n}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with store.read() as tx:
        assert len(tx.ids()) == 80


def test_close_twice_then_unavailable(store: MetaStore) -> None:
    store.close()
    store.close()
    with pytest.raises(Unavailable), store.read():
        pass
