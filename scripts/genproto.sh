#!/usr/bin/env bash
# Regenerates the committed protobuf modules from proto/. Run after editing a .proto file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -Iproto/zest --python_out=chunkstore/_pb --pyi_out=chunkstore/_pb proto/zest/toc.proto
if [ -d snapshotter/_pb ]; then
  "$PY" -m grpc_tools.protoc -Iproto --python_out=snapshotter/_pb --pyi_out=snapshotter/_pb \
    --grpc_python_out=snapshotter/_pb $(cd proto && ls containerd/**/*.proto 2>/dev/null || true) || true
fi
