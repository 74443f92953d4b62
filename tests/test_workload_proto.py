"""The workload API's messages (proto/accel/istio/): the committed generated code matches
the .proto files, and the wire format is Istio's (istio/ztunnel proto/workload.proto and
proto/authorization.proto, istio/istio pkg/workloadapi): every field number meshaccel
reads, written down from the published files and checked against the descriptors."""

from __future__ import annotations

from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2

from accel.xds.gen.istio import security_pb2, workload_pb2

REPO = Path(__file__).resolve().parents[1]
STALE = "accel/xds/gen/istio/ is stale: run scripts/gen-proto.sh"


def _shape(fd: descriptor_pb2.FileDescriptorProto) -> dict:
    """Messages (nested too) with their fields and enums with their values: the meaning."""
    out: dict = {}

    def walk(prefix: str, messages, enums) -> None:
        for e in enums:
            out[f"{prefix}{e.name}"] = sorted((v.name, v.number) for v in e.value)
        for m in messages:
            out[f"{prefix}{m.name}"] = sorted(
                (f.name, f.number, f.type, f.label, f.type_name,
                 f.oneof_index if f.HasField("oneof_index") else None) for f in m.field)
            walk(f"{prefix}{m.name}.", m.nested_type, m.enum_type)

    walk("", fd.message_type, fd.enum_type)
    return out


@pytest.mark.parametrize("module,proto", [(workload_pb2, "accel/istio/workload.proto"),
                                          (security_pb2, "accel/istio/security.proto")])
def test_generated_code_is_current(module, proto, tmp_path):
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{REPO / 'proto'}", f"-I{include}",
                        f"--descriptor_set_out={out}", proto]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(committed)
    assert _shape(fresh) == _shape(committed), STALE


# (message, field, number) as Istio publishes them.
WORKLOAD_FIELDS = [
    ("Address", "workload", 1), ("Address", "service", 2),
    ("Service", "name", 1), ("Service", "namespace", 2), ("Service", "hostname", 3),
    ("Service", "addresses", 4), ("Service", "ports", 5), ("Service", "subject_alt_names", 6),
    ("Service", "waypoint", 7), ("Service", "load_balancing", 8), ("Service", "ip_families", 9),
    ("LoadBalancing", "routing_preference", 1), ("LoadBalancing", "mode", 2),
    ("LoadBalancing", "health_policy", 3),
    ("Workload", "uid", 20), ("Workload", "name", 1), ("Workload", "namespace", 2),
    ("Workload", "addresses", 3), ("Workload", "hostname", 21), ("Workload", "network", 4),
    ("Workload", "tunnel_protocol", 5), ("Workload", "trust_domain", 6),
    ("Workload", "service_account", 7), ("Workload", "waypoint", 8),
    ("Workload", "network_gateway", 19), ("Workload", "node", 9),
    ("Workload", "workload_type", 12), ("Workload", "services", 22),
    ("Workload", "authorization_policies", 16), ("Workload", "status", 17),
    ("Workload", "cluster_id", 18), ("Workload", "locality", 24),
    ("Workload", "network_mode", 25), ("Workload", "capacity", 27),
    ("Locality", "region", 1), ("Locality", "zone", 2), ("Locality", "subzone", 3),
    ("PortList", "ports", 1), ("Port", "service_port", 1), ("Port", "target_port", 2),
    ("GatewayAddress", "hostname", 1), ("GatewayAddress", "address", 2),
    ("GatewayAddress", "hbone_mtls_port", 3),
    ("NetworkAddress", "network", 1), ("NetworkAddress", "address", 2),
    ("NamespacedHostname", "namespace", 1), ("NamespacedHostname", "hostname", 2),
]
SECURITY_FIELDS = [
    ("Authorization", "name", 1), ("Authorization", "namespace", 2),
    ("Authorization", "scope", 3), ("Authorization", "action", 4),
    ("Authorization", "groups", 5), ("Authorization", "dry_run", 6),
    ("Group", "rules", 1), ("Rules", "matches", 2),
    ("Match", "namespaces", 1), ("Match", "not_namespaces", 2), ("Match", "principals", 3),
    ("Match", "not_principals", 4), ("Match", "source_ips", 5), ("Match", "not_source_ips", 6),
    ("Match", "destination_ips", 7), ("Match", "not_destination_ips", 8),
    ("Match", "destination_ports", 9), ("Match", "not_destination_ports", 10),
    ("Match", "service_accounts", 11), ("Match", "not_service_accounts", 12),
    ("Address", "address", 1), ("Address", "length", 2),
    ("ServiceAccountMatch", "namespace", 1), ("ServiceAccountMatch", "service_account", 2),
    ("StringMatch", "exact", 1), ("StringMatch", "prefix", 2), ("StringMatch", "suffix", 3),
    ("StringMatch", "presence", 4),
]


@pytest.mark.parametrize("module,table", [(workload_pb2, WORKLOAD_FIELDS),
                                          (security_pb2, SECURITY_FIELDS)])
def test_field_numbers_are_istios(module, table):
    for message, name, number in table:
        d = module.DESCRIPTOR.message_types_by_name[message]
        assert d.fields_by_name[name].number == number, f"{message}.{name}"


def test_enum_numbers_are_istios():
    assert dict(workload_pb2.WorkloadStatus.items()) == {"HEALTHY": 0, "UNHEALTHY": 1}
    assert dict(workload_pb2.NetworkMode.items()) == {"STANDARD": 0, "HOST_NETWORK": 1}
    lb = workload_pb2.LoadBalancing
    assert dict(lb.Mode.items()) == {"UNSPECIFIED_MODE": 0, "STRICT": 1, "FAILOVER": 2,
                                     "PASSTHROUGH": 3}
    assert dict(lb.Scope.items()) == {"UNSPECIFIED_SCOPE": 0, "REGION": 1, "ZONE": 2,
                                      "SUBZONE": 3, "NODE": 4, "CLUSTER": 5, "NETWORK": 6}
    assert dict(lb.HealthPolicy.items()) == {"ONLY_HEALTHY": 0, "ALLOW_ALL": 1}
    assert dict(security_pb2.Scope.items()) == {"GLOBAL": 0, "NAMESPACE": 1,
                                                "WORKLOAD_SELECTOR": 2}
    assert dict(security_pb2.Action.items()) == {"ALLOW": 0, "DENY": 1}
