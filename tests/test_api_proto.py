"""The committed generated code (accel/api/gen/) matches proto/accel/agent/v1/agent.proto."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2

from accel.api.gen import agent_pb2

REPO = Path(__file__).resolve().parents[1]
GEN = REPO / "accel" / "api" / "gen"


def test_generated_descriptor_matches_the_proto(tmp_path):
    from grpc_tools import protoc

    out = tmp_path / "agent.pb"
    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{REPO / 'proto'}", f"-I{include}",
                      f"--descriptor_set_out={out}", "accel/agent/v1/agent.proto"])
    assert rc == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for msg in fresh.message_type:  # the Python generator leaves json_name out
        for f in (*msg.field, *(f for n in msg.nested_type for f in n.field)):
            f.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(agent_pb2.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "accel/api/gen/ is stale: run scripts/gen-proto.sh"


def test_gen_script_reproduces_the_committed_files():
    stub = (GEN / "agent_pb2_grpc.py").read_text()
    made_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stub).group(1)
    from importlib.metadata import version

    if version("grpcio-tools") != made_with:
        pytest.skip(f"committed code was made by grpcio-tools {made_with}, "
                    f"{version('grpcio-tools')} is installed")
    with tempfile.TemporaryDirectory(prefix="ha-gen-") as d:
        subprocess.run(["sh", str(REPO / "scripts" / "gen-proto.sh"), d], check=True, cwd=REPO,
                       env={**os.environ, "PYTHON": sys.executable})
        for f in ("agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py"):
            assert (Path(d) / f).read_text() == (GEN / f).read_text(), f
