#!/usr/bin/env bash
# Regenerates the committed protobuf modules from proto/. Run after editing a .proto file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -Iproto/zest --python_out=chunkstore/_pb --pyi_out=chunkstore/_pb proto/zest/toc.proto

# containerd's APIs (Snapshots; and Content, Images, Leases, Diff for `zest pull`)
# -> snapshotter/_pb/containerd/... . protoc writes absolute imports
# (`from containerd.types import ...`); they are rewritten to live under snapshotter._pb.
# google/protobuf/*.proto come from grpcio-tools' bundled well-known types.
CONTAINERD_PROTOS=(
  containerd/types/mount.proto
  containerd/types/descriptor.proto
  containerd/services/snapshots/v1/snapshots.proto
  containerd/services/content/v1/content.proto
  containerd/services/images/v1/images.proto
  containerd/services/leases/v1/leases.proto
  containerd/services/diff/v1/diff.proto
)
rm -rf snapshotter/_pb/containerd
mkdir -p snapshotter/_pb
"$PY" -m grpc_tools.protoc -Iproto --python_out=snapshotter/_pb --pyi_out=snapshotter/_pb \
  --grpc_python_out=snapshotter/_pb "${CONTAINERD_PROTOS[@]/#/proto/}"
find snapshotter/_pb/containerd -name '*.py*' -exec \
  sed -i -E 's/^from containerd\.([a-z0-9_.]+) import/from snapshotter._pb.containerd.\1 import/' {} +
rm -f snapshotter/_pb/containerd/types/*_pb2_grpc.py
for d in snapshotter/_pb $(find snapshotter/_pb/containerd -type d); do
  [ -f "$d/__init__.py" ] || : >"$d/__init__.py"
done

# A minimal CRI ImageService (Kubernetes' runtime.v1 API) -> tests/support/_cri/, for the tests
# that pull through containerd's CRI plugin. Test support only: product code never imports it.
# Compiled as k8s/cri/api.proto (a unique name in protobuf's descriptor pool), then flattened.
CRI_TMP=$(mktemp -d)
"$PY" -m grpc_tools.protoc -Iproto --python_out="$CRI_TMP" --pyi_out="$CRI_TMP" \
  --grpc_python_out="$CRI_TMP" proto/k8s/cri/api.proto
rm -rf tests/support/_cri
mkdir -p tests/support/_cri
mv "$CRI_TMP"/k8s/cri/api_pb2.py "$CRI_TMP"/k8s/cri/api_pb2.pyi "$CRI_TMP"/k8s/cri/api_pb2_grpc.py \
  tests/support/_cri/
rm -rf "$CRI_TMP"
sed -i -E 's/^from k8s\.cri import api_pb2 as/from tests.support._cri import api_pb2 as/' \
  tests/support/_cri/api_pb2_grpc.py
: >tests/support/_cri/__init__.py
