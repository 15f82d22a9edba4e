"""snapshotter.service over a real in-process gRPC server: wire format and status codes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from snapshotter import service
from snapshotter._pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from snapshotter.metadata import MetaStore
from snapshotter.snapshots import Snapshotter
from tests.support.snapshotterd import SnapshotsClient, code_of


@pytest.fixture
def client(tmp_path: Path) -> Iterator[SnapshotsClient]:
    sockdir = Path(tempfile.mkdtemp(prefix="zsvc-"))  # short: unix socket paths are limited
    store = MetaStore(tmp_path / "metadata.db", synchronous="normal")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service.add_to_server(Snapshotter(tmp_path, store, index_off=True), server)
    server.add_insecure_port(f"unix:{sockdir}/s.sock")
    server.start()
    c = SnapshotsClient(sockdir / "s.sock", timeout=10)
    yield c
    c.close()
    server.stop(None).wait()
    store.close()
    shutil.rmtree(sockdir)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (NotImplementedError("x"), grpc.StatusCode.UNIMPLEMENTED),
        (ValueError("x"), grpc.StatusCode.UNKNOWN),
    ],
)
def test_status_of(exc: Exception, code: grpc.StatusCode) -> None:
    assert service.status_of(exc)[0] == code


def test_round_trip_and_codes_on_the_wire(client: SnapshotsClient) -> None:
    (m,) = client.prepare("a", "", {"l": "v"})
    assert (m.type, list(m.options)) == ("bind", ["rw", "rbind"])
    with pytest.raises(grpc.RpcError) as err:
        client.prepare("a")
    assert code_of(err.value) == grpc.StatusCode.ALREADY_EXISTS
    client.commit("c", "a", {"x": "y"})
    info = client.stat("c")
    assert (info.name, info.parent, info.kind) == ("c", "", pb.COMMITTED)
    assert dict(info.labels) == {"x": "y"}
    assert info.created_at == info.updated_at and info.created_at.seconds > 0
    with pytest.raises(grpc.RpcError) as err:
        client.stat("a")
    assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        client.mounts("c")
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    (ov,) = client.prepare("b", "c")
    assert ov.type == "overlay"
    assert client.mounts("b") == [ov]
    with pytest.raises(grpc.RpcError) as err:
        client.remove("c")
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    size, inodes = client.usage("b")
    assert inodes == 1 and size >= 0
    client.remove("b")
    client.remove("c")
    client.cleanup()
    assert client.list() == []


def test_update_with_field_mask(client: SnapshotsClient) -> None:
    client.prepare("a", "", {"l1": "v1", "l2": "v2"})
    info = pb.Info(name="a", labels={"l1": "new", "l3": "v3"})
    updated = client.update(info, ["labels.l1", "labels.l2"])
    assert dict(updated.labels) == {"l1": "new"}
    assert updated.kind == pb.ACTIVE
    assert (updated.updated_at.seconds, updated.updated_at.nanos) > (
        updated.created_at.seconds,
        updated.created_at.nanos,
    )
    assert dict(client.update(info).labels) == {"l1": "new", "l3": "v3"}
    with pytest.raises(grpc.RpcError) as err:
        client.update(info, ["kind"])
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_list_streams_in_blocks_of_100_and_filters(client: SnapshotsClient) -> None:
    for i in range(250):
        client.view(f"v{i:03d}", "", {"even": "yes"} if i % 2 == 0 else {})
    assert client.list_batches() == [100, 100, 50]
    assert [i.name for i in client.list()][:3] == ["v000", "v001", "v002"]
    assert len(client.list(["labels.even==yes"])) == 125
    assert [i.name for i in client.list(["name==v007", "name==v009"])] == ["v007", "v009"]
    with pytest.raises(grpc.RpcError) as err:
        client.list(["name=="])
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
