"""The committed generated code (accel/api/gen/) matches proto/accel/agent/v1/agent.proto.

Compared by meaning, not by text, so that it runs whatever grpcio-tools is installed: the
proto compiled now and the descriptor embedded in agent_pb2.py must declare the same
messages, fields (number, type, label, oneof), enums and services; the gRPC stubs and the
.pyi must name the same methods and fields; and the stubs must not require a grpcio newer
than the one installed. A stale generated module fails here with "run scripts/gen-proto.sh".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import grpc_tools
from google.protobuf import descriptor_pb2

from accel.api.gen import agent_pb2, agent_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
GEN = REPO / "accel" / "api" / "gen"
PROTO = "accel/agent/v1/agent.proto"
STALE = "accel/api/gen/ is stale: run scripts/gen-proto.sh"

FDP = descriptor_pb2.FieldDescriptorProto


def compile_proto(root: Path, out: Path) -> descriptor_pb2.FileDescriptorProto:
    """`PROTO` under `root`, compiled now by the installed grpcio-tools' protoc."""
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{root}", f"-I{include}",
                      f"--descriptor_set_out={out}", PROTO])
    assert rc == 0, f"protoc failed on {root / PROTO}"
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def committed() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(agent_pb2.DESCRIPTOR.serialized_pb)


def _enum(e: descriptor_pb2.EnumDescriptorProto) -> dict[str, int]:
    return {v.name: v.number for v in e.value}


def _message(m: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
    oneofs = [o.name for o in m.oneof_decl]
    return {
        "fields": {f.name: {
            "number": f.number,
            "label": FDP.Label.Name(f.label),
            "type": FDP.Type.Name(f.type),
            "type_name": f.type_name,
            "oneof": oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            "proto3_optional": f.proto3_optional,
            "default": f.default_value,
            "packed": f.options.packed if f.options.HasField("packed") else None,
        } for f in m.field},
        "oneofs": sorted(oneofs),
        "map_entry": m.options.map_entry,
        "messages": {n.name: _message(n) for n in m.nested_type},
        "enums": {e.name: _enum(e) for e in m.enum_type},
        "reserved": sorted((r.start, r.end) for r in m.reserved_range),
        "reserved_names": sorted(m.reserved_name),
    }


def shape(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    """What a FileDescriptorProto declares, without what depends on the generator's version
    (json_name, which protoc fills in and the Python generator leaves out; source info)."""
    return {
        "name": fd.name,
        "package": fd.package,
        "syntax": fd.syntax or "proto2",
        "dependencies": sorted(fd.dependency),
        "messages": {m.name: _message(m) for m in fd.message_type},
        "enums": {e.name: _enum(e) for e in fd.enum_type},
        "services": {s.name: {m.name: {
            "input": m.input_type, "output": m.output_type,
            "client_streaming": m.client_streaming, "server_streaming": m.server_streaming,
        } for m in s.method} for s in fd.service},
    }


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in b:
                out.append(f"{path}/{k}: only in the committed code")
            elif k not in a:
                out.append(f"{path}/{k}: only in the proto")
            else:
                out += differences(a[k], b[k], f"{path}/{k}")
        return out
    return [] if a == b else [f"{path}: committed {a!r}, proto {b!r}"]


def test_generated_descriptor_matches_the_proto(tmp_path):
    fresh = shape(compile_proto(REPO / "proto", tmp_path / "agent.pb"))
    diff = differences(shape(committed()), fresh)
    assert not diff, STALE + "\n" + "\n".join(diff)
    # Not an empty comparison: what the API is known to have is in it.
    assert fresh["services"]["Agent"]["WatchEvents"]["server_streaming"]
    assert fresh["messages"]["Endpoint"]["fields"]["port"]["number"] == 2


def test_the_comparison_sees_a_changed_field_number_method_and_message(tmp_path):
    """The check above would catch a stale module: a proto edited after generation differs."""
    src = (REPO / "proto" / PROTO).read_text()
    edits = {
        "uint32 port = 2;     // 1-65535": "uint32 port = 7;     // 1-65535",
        "rpc SetGuard(SetGuardRequest)": "rpc SetGuards(SetGuardRequest)",
        "\nmessage Endpoint {": "\nmessage Extra { string x = 1; }\n\nmessage Endpoint {",
    }
    for old, new in edits.items():
        assert src.count(old) == 1, old
        src = src.replace(old, new)
    edited = tmp_path / "proto" / PROTO
    edited.parent.mkdir(parents=True)
    edited.write_text(src)
    diff = differences(shape(committed()), shape(compile_proto(tmp_path / "proto",
                                                               tmp_path / "edited.pb")))
    assert diff == [
        "/messages/Endpoint/fields/port/number: committed 2, proto 7",
        "/messages/Extra: only in the proto",
        "/services/Agent/SetGuard: only in the committed code",
        "/services/Agent/SetGuards: only in the proto",
    ]


def version_tuple(v: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", v)
    assert m, f"not a version: {v}"
    return tuple(int(x) for x in m.groups())


def test_stubs_need_no_newer_grpcio_than_installed():
    made_with = agent_pb2_grpc.GRPC_GENERATED_VERSION
    assert version_tuple(made_with) <= version_tuple(grpc.__version__), (
        f"accel/api/gen/ was generated by grpcio-tools {made_with}, which needs grpcio >= "
        f"{made_with}; grpcio {grpc.__version__} is installed (pyproject pins grpcio)")
    floor = re.search(r'"grpcio>=([\d.]+)', (REPO / "pyproject.toml").read_text()).group(1)
    assert version_tuple(made_with) <= version_tuple(floor), (
        f"the stubs need grpcio >= {made_with} but pyproject.toml allows grpcio {floor}")


class RecordingChannel:
    """Stands in for a grpc.Channel: records what AgentStub asks of it."""

    def __init__(self):
        self.methods: dict[str, tuple] = {}

    def _record(self, kind: str):
        def make(path, request_serializer=None, response_deserializer=None, **_kw):
            self.methods[path] = (kind, request_serializer, response_deserializer)
            return object()
        return make

    def __getattr__(self, kind: str):
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._record(kind)
        raise AttributeError(kind)


class RecordingServer:
    def __init__(self):
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers.update({f"/{service}/{name}": h for name, h in handlers.items()})


def kind(client_streaming: bool, server_streaming: bool) -> str:
    return f"{'stream' if client_streaming else 'unary'}_" \
           f"{'stream' if server_streaming else 'unary'}"


def test_grpc_stubs_name_every_method_of_the_descriptor():
    fd = committed()
    want = {}
    for svc in fd.service:
        for m in svc.method:
            want[f"/{fd.package}.{svc.name}/{m.name}"] = m
    channel = RecordingChannel()
    agent_pb2_grpc.AgentStub(channel)
    server = RecordingServer()
    agent_pb2_grpc.add_AgentServicer_to_server(agent_pb2_grpc.AgentServicer(), server)
    assert set(channel.methods) == set(want), STALE
    assert set(server.handlers) == set(want), STALE
    for path, m in want.items():
        request = getattr(agent_pb2, m.input_type.rsplit(".", 1)[1])
        response = getattr(agent_pb2, m.output_type.rsplit(".", 1)[1])
        assert channel.methods[path] == (kind(m.client_streaming, m.server_streaming),
                                         request.SerializeToString, response.FromString), path
        h = server.handlers[path]
        assert (h.request_streaming, h.response_streaming) == (m.client_streaming,
                                                               m.server_streaming), path
        assert (h.request_deserializer, h.response_serializer) == (
            request.FromString, response.SerializeToString), path


def test_pyi_declares_every_message_and_field():
    pyi = (GEN / "agent_pb2.pyi").read_text()
    names = set(re.findall(r"class (\w+)\(_message\.Message\):", pyi))
    slots = {tuple(re.findall(r'"(\w+)"', s)) for s in re.findall(r"__slots__ = \(([^)]*)\)", pyi)}

    def walk(msgs):
        for m in msgs:
            yield m
            yield from walk(m.nested_type)

    for m in walk(committed().message_type):
        assert m.name in names, f"{m.name} missing from agent_pb2.pyi: " + STALE
        assert tuple(f.name for f in m.field) in slots, \
            f"{m.name}'s fields {[f.name for f in m.field]} not in agent_pb2.pyi: " + STALE
