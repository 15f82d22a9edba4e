"""A small client for the Kubernetes CRI ImageService, as the kubelet calls it.

    with CriClient(ctrd.address) as cri:              # containerd's main socket serves CRI
        image_ref = cri.pull_image("127.0.0.1:5000/app:1")    # "sha256:<config digest>"
        img = cri.image_status("127.0.0.1:5000/app:1")        # an Image message, or None
        cri.list_images(); cri.remove_image(image_ref)

Speaks `runtime.v1` (tests/support/_cri, generated from proto/k8s/cri/api.proto) over gRPC on
`unix://SOCKET`. containerd's CRI plugin works in its own namespace (`k8s.io`); no namespace
header is sent. Failed RPCs raise grpc.RpcError.
"""

from __future__ import annotations

import os
from types import TracebackType

import grpc

from tests.support._cri import api_pb2 as pb
from tests.support._cri import api_pb2_grpc as pb_grpc

CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin keeps its images in


class CriClient:
    """CRI ImageService calls over one gRPC channel; see the module docstring."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 300) -> None:
        self.target = f"unix://{os.fspath(socket_path)}"
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.target)
        self._stub = pb_grpc.ImageServiceStub(self._channel)

    def pull_image(self, ref: str, *, annotations: dict[str, str] | None = None) -> str:
        """Pulls `ref` as the kubelet does; returns the runtime's image ref (the image ID)."""
        spec = pb.ImageSpec(image=ref, annotations=annotations or {})
        resp = self._stub.PullImage(pb.PullImageRequest(image=spec), timeout=self.timeout)
        return str(resp.image_ref)

    def image_status(self, ref: str, *, verbose: bool = False) -> pb.Image | None:
        """The image `ref` names (a reference or an ID), or None when the runtime has none."""
        req = pb.ImageStatusRequest(image=pb.ImageSpec(image=ref), verbose=verbose)
        resp = self._stub.ImageStatus(req, timeout=self.timeout)
        return resp.image if resp.HasField("image") else None

    def list_images(self, ref: str = "") -> list[pb.Image]:
        """Every image the runtime has, or only those matching `ref`."""
        req = pb.ListImagesRequest()
        if ref:
            req.filter.image.image = ref
        return list(self._stub.ListImages(req, timeout=self.timeout).images)

    def remove_image(self, ref: str) -> None:
        """Removes the image; idempotent, as the CRI requires."""
        req = pb.RemoveImageRequest(image=pb.ImageSpec(image=ref))
        self._stub.RemoveImage(req, timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
