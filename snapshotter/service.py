"""gRPC servicer of containerd's Snapshots API: protobuf <-> domain objects, errors -> status.

It makes no decisions: each RPC converts its request, calls one `Snapshotter` method and
converts the answer. Exceptions become status codes in one place, `status_of`, the
counterpart of containerd's errdefs.ToGRPC, so containerd's errdefs.FromGRPC recovers the
class its own snapshotter would have raised. The `snapshotter` field every request carries
(the proxy plugin's name in containerd's config) is not checked: one daemon, one store.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from snapshotter._pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter._pb.containerd.types import mount_pb2
from snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SnapshotterError,
    Unavailable,
)
from snapshotter.metadata import Info
from snapshotter.snapshots import Mount, Snapshotter

log = logging.getLogger(__name__)

# containerd's proxy sends List results in blocks of this many (contrib/snapshotservice).
LIST_BATCH = 100

_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception; anything unclassified is UNKNOWN, as in containerd."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"


_F = TypeVar("_F", bound=Callable[..., Any])


def _rpc(method: _F) -> _F:
    """Run one unary RPC: log it, and turn any exception into the status containerd expects."""

    @functools.wraps(method)
    def wrapper(self: SnapshotsService, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            return method(self, request, context)
        except Exception as exc:
            _abort(context, method.__name__, request, exc)
        finally:
            if log.isEnabledFor(logging.DEBUG):
                ms = round((time.perf_counter() - start) * 1000, 3)
                kv = {"method": method.__name__, "key": getattr(request, "key", ""), "ms": ms}
                log.debug("rpc", extra={"kv": kv})

    return wrapper  # type: ignore[return-value]


def _abort(context: grpc.ServicerContext, method: str, request: Any, exc: Exception) -> None:
    code, message = status_of(exc)
    kv = {"method": method, "key": getattr(request, "key", ""), "code": code.name, "error": exc}
    if isinstance(exc, SnapshotterError) and not isinstance(exc, Unavailable):
        log.debug("rpc refused", extra={"kv": kv})  # containerd expects these (e.g. exists)
    else:
        log.error("rpc failed", extra={"kv": kv}, exc_info=code == grpc.StatusCode.UNKNOWN)
    context.abort(code, message)


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self._sn = snapshotter

    @_rpc
    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._sn.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    @_rpc
    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._sn.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    @_rpc
    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.MountsResponse(mounts=_mounts_pb(self._sn.mounts(request.key)))

    @_rpc
    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._sn.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.StatSnapshotResponse(info=_info_pb(self._sn.stat(request.key)))

    @_rpc
    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = Info(name=request.info.name, labels=dict(request.info.labels))
        updated = self._sn.update(info, list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=_info_pb(updated))

    @_rpc
    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        usage = self._sn.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._sn.cleanup()
        return empty_pb2.Empty()

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            infos = list(self._sn.walk(list(request.filters)))
        except Exception as exc:
            _abort(context, "List", request, exc)
        for i in range(0, len(infos), LIST_BATCH):
            block = infos[i : i + LIST_BATCH]
            yield pb.ListSnapshotsResponse(info=[_info_pb(x) for x in block])


def add_to_server(snapshotter: Snapshotter, server: grpc.Server) -> None:
    servicer = SnapshotsService(snapshotter)
    pb_grpc.add_SnapshotsServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]


def _mounts_pb(mounts: list[Mount]) -> list[Any]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _info_pb(info: Info) -> Any:
    msg = pb.Info(
        name=info.name,
        parent=info.parent,
        kind=info.kind.name,
        labels=dict(info.labels),
    )
    msg.created_at.FromNanoseconds(info.created_ns)
    msg.updated_at.FromNanoseconds(info.updated_ns)
    return msg
