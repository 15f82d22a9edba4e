"""A client for containerd's own gRPC API: the calls `zest pull` makes, made as containerd's Go
client makes them.

Every call carries the `containerd-namespace` header; calls that create something also carry
`containerd-lease` when given a lease, so that garbage collection keeps what a pull has written
until the image record references it. gRPC failures become `ContainerdError` subclasses whose
message says what failed and what to do; nothing else in zest sees grpc.RpcError from here.

Concurrency: one `Containerd` may be used from many threads (a gRPC channel is thread-safe and
the object holds no other mutable state). `write_content` runs its chunk iterator on a gRPC
thread; the iterator must not be shared with other threads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from snapshotter._pb.containerd.services.content.v1 import content_pb2 as content_pb
from snapshotter._pb.containerd.services.content.v1 import content_pb2_grpc as content_grpc
from snapshotter._pb.containerd.services.diff.v1 import diff_pb2 as diff_pb
from snapshotter._pb.containerd.services.diff.v1 import diff_pb2_grpc as diff_grpc
from snapshotter._pb.containerd.services.images.v1 import images_pb2 as images_pb
from snapshotter._pb.containerd.services.images.v1 import images_pb2_grpc as images_grpc
from snapshotter._pb.containerd.services.leases.v1 import leases_pb2 as leases_pb
from snapshotter._pb.containerd.services.leases.v1 import leases_pb2_grpc as leases_grpc
from snapshotter._pb.containerd.services.snapshots.v1 import snapshots_pb2 as snapshots_pb
from snapshotter._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as snapshots_grpc
from snapshotter._pb.containerd.types import descriptor_pb2, mount_pb2

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
MAX_MESSAGE = 16 << 20  # containerd's default gRPC message limit


class ContainerdError(Exception):
    """A containerd API call failed; the message names the call and what to do."""


class ContainerdUnavailableError(ContainerdError):
    """containerd (or the snapshotter it proxies to) cannot be reached."""


class ContainerdNotFoundError(ContainerdError):
    """The object does not exist in the namespace."""


class ContainerdAlreadyExistsError(ContainerdError):
    """The object exists already (for a Prepare with a target: the layer is served remotely)."""


@dataclass(frozen=True)
class Descriptor:
    """An OCI descriptor (containerd.types.Descriptor)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Descriptor:
        annotations = doc.get("annotations") or {}
        return cls(str(doc["mediaType"]), str(doc["digest"]), int(doc["size"]), dict(annotations))

    @classmethod
    def from_pb(cls, msg: descriptor_pb2.Descriptor) -> Descriptor:
        return cls(msg.media_type, msg.digest, msg.size, dict(msg.annotations))

    def to_pb(self) -> descriptor_pb2.Descriptor:
        return descriptor_pb2.Descriptor(
            media_type=self.media_type,
            digest=self.digest,
            size=self.size,
            annotations=dict(self.annotations),
        )


@dataclass(frozen=True)
class Mount:
    """One mount(2) a snapshot needs (containerd.types.Mount)."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()

    @classmethod
    def from_pb(cls, msg: mount_pb2.Mount) -> Mount:
        return cls(msg.type, msg.source, msg.target, tuple(msg.options))

    def to_pb(self) -> mount_pb2.Mount:
        return mount_pb2.Mount(
            type=self.type, source=self.source, target=self.target, options=list(self.options)
        )


class Containerd:
    """containerd's Content, Leases, Snapshots, Diff and Images services in one namespace."""

    def __init__(
        self, address: str | os.PathLike[str], namespace: str, *, timeout: float = 60.0
    ) -> None:
        self.address = os.fspath(address)
        self.namespace = namespace
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            f"unix:{self.address}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        # The generated stubs are untyped; requests and responses are typed by the _pb2 stubs.
        ch = self._channel
        self._content: Any = content_grpc.ContentStub(ch)  # type: ignore[no-untyped-call]
        self._leases: Any = leases_grpc.LeasesStub(ch)  # type: ignore[no-untyped-call]
        self._snapshots: Any = snapshots_grpc.SnapshotsStub(ch)  # type: ignore[no-untyped-call]
        self._diff: Any = diff_grpc.DiffStub(ch)  # type: ignore[no-untyped-call]
        self._images: Any = images_grpc.ImagesStub(ch)  # type: ignore[no-untyped-call]

    def connect(self, wait: float = 5.0) -> None:
        """Fail now, with a clear message, when nothing answers at the address."""
        hint = "start containerd, or pass --address with its socket"
        if not Path(self.address).exists():
            raise ContainerdUnavailableError(
                f"containerd is not running at {self.address} (no such socket); {hint}"
            )
        try:
            grpc.channel_ready_future(self._channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            raise ContainerdUnavailableError(
                f"containerd is not running at {self.address} (no answer within {wait:g}s); {hint}"
            ) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _metadata(self, lease: str | None = None) -> tuple[tuple[str, str], ...]:
        md = ((NAMESPACE_HEADER, self.namespace),)
        return (*md, (LEASE_HEADER, lease)) if lease else md

    def _call(
        self,
        what: str,
        method: Any,
        request: Any,
        *,
        lease: str | None = None,
        timeout: float | None = -1.0,
        snapshotter: str = "",
    ) -> Any:
        try:
            return method(
                request,
                metadata=self._metadata(lease),
                timeout=self.timeout if timeout == -1.0 else timeout,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, what, snapshotter) from None

    # ---------------------------------------------------------------- leases

    def create_lease(self, lease_id: str, labels: Mapping[str, str]) -> str:
        request = leases_pb.CreateRequest(id=lease_id, labels=dict(labels))
        response = self._call(f"create lease {lease_id}", self._leases.Create, request)
        return str(response.lease.id)

    def delete_lease(self, lease_id: str) -> None:
        request = leases_pb.DeleteRequest(id=lease_id)
        self._call(f"delete lease {lease_id}", self._leases.Delete, request)

    # ---------------------------------------------------------------- content

    def content_labels(self, digest: str) -> dict[str, str] | None:
        """The labels of a blob in the content store, or None when it is not there."""
        try:
            info = self._call(
                f"content {digest}", self._content.Info, content_pb.InfoRequest(digest=digest)
            ).info
        except ContainerdNotFoundError:
            return None
        return dict(info.labels)

    def update_content_labels(
        self, digest: str, labels: Mapping[str, str], *, lease: str | None = None
    ) -> None:
        """Set (only) these labels on a blob; the others stay as they are."""
        request = content_pb.UpdateRequest(info=content_pb.Info(digest=digest, labels=dict(labels)))
        request.update_mask.paths.extend(f"labels.{key}" for key in labels)
        self._call(f"label content {digest}", self._content.Update, request, lease=lease)

    def write_content(
        self,
        desc: Descriptor,
        chunks: Iterable[bytes],
        *,
        ref: str,
        labels: Mapping[str, str],
        lease: str | None = None,
    ) -> bool:
        """Stream a blob into the content store and commit it with `labels`.

        containerd checks size and digest at commit. Returns False, having written nothing,
        when the store has the blob already. An exception raised by `chunks` ends the write
        (the partial ingest is aborted) and is raised here unchanged.
        """
        what = f"write {desc.digest} to containerd's content store"
        failure: list[Exception] = []
        call = self._content.Write(
            _write_requests(desc, chunks, ref, labels, failure),
            metadata=self._metadata(lease),
        )
        last = None
        try:
            for response in call:
                last = response
        except grpc.RpcError as exc:
            if failure:
                self._abort(ref)
                raise failure[0] from None
            error = self._error(exc, what)
            if isinstance(error, ContainerdAlreadyExistsError):
                return False
            raise error from None
        finally:
            call.cancel()  # a no-op when the stream has ended
        if failure:
            self._abort(ref)
            raise failure[0]
        if last is None or last.action != content_pb.COMMIT or last.digest != desc.digest:
            got = last.digest if last is not None else "nothing"
            raise ContainerdError(f"{what}: containerd committed {got}, not {desc.digest}")
        return True

    def _abort(self, ref: str) -> None:
        try:
            self._call(f"abort ingest {ref}", self._content.Abort, content_pb.AbortRequest(ref=ref))
        except ContainerdError as exc:
            log.debug("abort of ingest failed", extra={"kv": {"ref": ref, "error": exc}})

    # ---------------------------------------------------------------- snapshots

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        request = snapshots_pb.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            self._call(
                f"stat snapshot {key}", self._snapshots.Stat, request, snapshotter=snapshotter
            )
        except ContainerdNotFoundError:
            return False
        return True

    def prepare_snapshot(
        self,
        snapshotter: str,
        key: str,
        parent: str,
        labels: Mapping[str, str],
        *,
        lease: str | None = None,
    ) -> list[Mount]:
        """An active snapshot's mounts; ContainerdAlreadyExistsError when the target exists."""
        request = snapshots_pb.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)
        )
        response = self._call(
            f"prepare snapshot {key!r}",
            self._snapshots.Prepare,
            request,
            lease=lease,
            snapshotter=snapshotter,
        )
        return [Mount.from_pb(m) for m in response.mounts]

    def commit_snapshot(
        self,
        snapshotter: str,
        name: str,
        key: str,
        labels: Mapping[str, str],
        *,
        lease: str | None = None,
    ) -> None:
        request = snapshots_pb.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=dict(labels)
        )
        self._call(
            f"commit snapshot {key!r} as {name}",
            self._snapshots.Commit,
            request,
            lease=lease,
            snapshotter=snapshotter,
        )

    def remove_snapshot(self, snapshotter: str, key: str, *, lease: str | None = None) -> None:
        request = snapshots_pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        self._call(
            f"remove snapshot {key!r}",
            self._snapshots.Remove,
            request,
            lease=lease,
            snapshotter=snapshotter,
        )

    # ---------------------------------------------------------------- diff

    def apply_layer(
        self, desc: Descriptor, mounts: Sequence[Mount], *, lease: str | None = None
    ) -> Descriptor:
        """Unpack a layer blob from the content store onto mounts; the uncompressed descriptor."""
        request = diff_pb.ApplyRequest(diff=desc.to_pb(), mounts=[m.to_pb() for m in mounts])
        response = self._call(
            f"apply layer {desc.digest}", self._diff.Apply, request, lease=lease, timeout=None
        )
        return Descriptor.from_pb(response.applied)

    # ---------------------------------------------------------------- images

    def put_image(
        self,
        name: str,
        target: Descriptor,
        labels: Mapping[str, str],
        *,
        lease: str | None = None,
    ) -> None:
        """Create the image record, or point an existing one at `target` (containerd's
        createNewImage)."""
        image = images_pb.Image(name=name, labels=dict(labels), target=target.to_pb())
        create = images_pb.CreateImageRequest(image=image)
        update = images_pb.UpdateImageRequest(image=image)
        for _ in range(3):
            try:
                self._call(f"create image {name}", self._images.Create, create, lease=lease)
                return
            except ContainerdAlreadyExistsError:
                pass
            try:
                self._call(f"update image {name}", self._images.Update, update, lease=lease)
                return
            except ContainerdNotFoundError:
                continue  # deleted between the two calls: create again
        raise ContainerdError(f"image {name} keeps changing under us; try again")

    def get_image(self, name: str) -> Descriptor | None:
        """The target of an image record, or None."""
        try:
            request = images_pb.GetImageRequest(name=name)
            image = self._call(f"get image {name}", self._images.Get, request).image
        except ContainerdNotFoundError:
            return None
        return Descriptor.from_pb(image.target)

    # ---------------------------------------------------------------- errors

    def _error(self, exc: grpc.RpcError, what: str, snapshotter: str = "") -> ContainerdError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
        message = f"{what}: {details}"
        if code == grpc.StatusCode.UNAVAILABLE:
            if not snapshotter or self.address in details:
                return ContainerdUnavailableError(
                    f"{what}: containerd at {self.address} is unavailable ({details}); "
                    "check that containerd is running"
                )
            return ContainerdUnavailableError(
                f"{what}: containerd cannot reach snapshotter {snapshotter!r} ({details}); "
                "check that `zest snapshotter` is running on the socket containerd's "
                f"[proxy_plugins.{snapshotter}] names"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT and "snapshotter not loaded" in details:
            return ContainerdError(
                f"containerd has no snapshotter {snapshotter!r}: add [proxy_plugins."
                f"{snapshotter}] to containerd's config.toml (`zest config containerd` prints "
                "it) and restart containerd"
            )
        if code == grpc.StatusCode.NOT_FOUND:
            return ContainerdNotFoundError(message)
        if code == grpc.StatusCode.ALREADY_EXISTS:
            return ContainerdAlreadyExistsError(message)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ContainerdUnavailableError(f"{what}: no answer from containerd in time")
        name = code.name if code is not None else "an error"
        return ContainerdError(f"{what}: containerd answered {name}: {details}")


def _write_requests(
    desc: Descriptor,
    chunks: Iterable[bytes],
    ref: str,
    labels: Mapping[str, str],
    failure: list[Exception],
) -> Iterator[content_pb.WriteContentRequest]:
    """The Write stream: data at increasing offsets, then a commit with size, digest and labels.

    Runs on a gRPC thread; an exception from `chunks` is stored in `failure` and ends the stream
    without a commit.
    """
    offset = 0
    try:
        for data in chunks:
            if not data:
                continue
            yield content_pb.WriteContentRequest(
                action=content_pb.WRITE,
                ref=ref,
                total=desc.size,
                expected=desc.digest,
                offset=offset,
                data=data,
            )
            offset += len(data)
    except Exception as exc:  # not GeneratorExit: gRPC closes the iterator when a call ends early
        failure.append(exc)
        return
    yield content_pb.WriteContentRequest(
        action=content_pb.COMMIT,
        ref=ref,
        total=desc.size,
        expected=desc.digest,
        offset=offset,
        labels=dict(labels),
    )
