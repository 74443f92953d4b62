#!/bin/sh
# Regenerate accel/api/gen/ from proto/ (needs grpcio-tools: pip install -e '.[dev]').
# The generated code is committed; tests/test_api_proto.py fails when it is out of date.
#
# protoc names the output after the proto package (accel/agent/v1/...), which would
# collide with the accel.agent module, so the files are moved flat into accel/api/gen/
# and the one import between them is rewritten. The descriptor keeps its canonical name
# accel/agent/v1/agent.proto (what reflection clients see).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-accel/api/gen}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m grpc_tools.protoc -I proto \
    --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
    proto/accel/agent/v1/agent.proto
mkdir -p "$OUT"
for f in agent_pb2.py agent_pb2.pyi agent_pb2_grpc.py; do
    sed 's/^from accel\.agent\.v1 import agent_pb2 as/from accel.api.gen import agent_pb2 as/' \
        "$tmp/accel/agent/v1/$f" > "$OUT/$f"
done
[ -f "$OUT/__init__.py" ] || printf '"""Generated from proto/accel/agent/v1/agent.proto by scripts/gen-proto.sh: do not edit."""\n' > "$OUT/__init__.py"
