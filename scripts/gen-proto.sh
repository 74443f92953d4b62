#!/bin/sh
# Regenerate accel/api/gen/ and accel/xds/gen/ from proto/ (needs grpcio-tools:
# pip install -e '.[dev]'). The generated code is committed; tests/test_api_proto.py fails
# when accel/api/gen/ is out of date, tests/test_workload_proto.py when accel/xds/gen/ is.
#
# protoc names the output after the proto package (accel/agent/v1/...), which would
# collide with the accel.agent module, so the files are moved flat into accel/api/gen/
# and the one import between them is rewritten. The descriptor keeps its canonical name
# accel/agent/v1/agent.proto (what reflection clients see).
#
# The workload API's messages (proto/accel/istio/, Istio ambient's wire format) go to
# accel/xds/gen/istio/; they import nothing of each other.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-accel/api/gen}
XDS_OUT=${2:-accel/xds/gen/istio}
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

"$PY" -m grpc_tools.protoc -I proto --python_out="$tmp" --pyi_out="$tmp" \
    proto/accel/istio/workload.proto proto/accel/istio/security.proto
mkdir -p "$XDS_OUT"
for f in workload_pb2.py workload_pb2.pyi security_pb2.py security_pb2.pyi; do
    cp "$tmp/accel/istio/$f" "$XDS_OUT/$f"
done
[ -f "$XDS_OUT/../__init__.py" ] || printf '"""Generated code for the xDS resource types xds-protos lacks (scripts/gen-proto.sh)."""\n' > "$XDS_OUT/../__init__.py"
[ -f "$XDS_OUT/__init__.py" ] || printf '"""Generated from proto/accel/istio/ by scripts/gen-proto.sh: do not edit."""\n' > "$XDS_OUT/__init__.py"
