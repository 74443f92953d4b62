"""ServiceTable (with its policies) -> workload API resources, as istiod would serve them
to ztunnel: a Workload per workload (the endpoints of one name, else of one address), a
Service per table service, an Authorization per policy.

Mapping: service `S` -> Service namespace `default`, hostname `S` (resource `default/S`),
its VIP on the default network, service_port = its port and target_port 0, each endpoint
workload saying its own port in `services["default/S"]`; a workload's uid is
`meshaccel//Endpoint/NAMESPACE/NAME` (NAME: the endpoint name, else its address), its
identity the endpoints' namespace and service account, `capacity` their weight, status
HEALTHY unless an endpoint of it is unhealthy, `node` what `node_of` says of its address,
`authorization_policies` the selector policies that pick it. What the API cannot say is
reported, not served: UDP services (ztunnel carries TCP), a second port of one workload in
one service.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf import empty_pb2, wrappers_pb2

from accel.model import Endpoint, IPAddress, IPNetwork, ServiceTable
from accel.policy.from_table import selected
from accel.policy.rules import Match, Policy, StringMatch
from accel.xds.gen.istio import security_pb2 as sec
from accel.xds.gen.istio import workload_pb2 as wl

SERVICE_NAMESPACE = "default"
UID_PREFIX = "meshaccel//Endpoint"


@dataclass(frozen=True)
class Served:
    addresses: dict[str, wl.Address] = field(default_factory=dict)  # by resource name
    authorizations: dict[str, sec.Authorization] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # what was not served, and why


def _packed(addr: IPAddress) -> bytes:
    return addr.packed


def _net(n: IPNetwork) -> sec.Address:
    return sec.Address(address=n.network_address.packed, length=n.prefixlen)


def _string(m: StringMatch) -> sec.StringMatch:
    if m.kind == "presence":
        return sec.StringMatch(presence=empty_pb2.Empty())
    return sec.StringMatch(**{m.kind: m.value})


def match_message(m: Match) -> sec.Match:
    def accounts(pairs):
        return [sec.ServiceAccountMatch(namespace=ns, service_account=sa) for ns, sa in pairs]

    return sec.Match(
        namespaces=[_string(s) for s in m.namespaces],
        not_namespaces=[_string(s) for s in m.not_namespaces],
        service_accounts=accounts(m.service_accounts),
        not_service_accounts=accounts(m.not_service_accounts),
        principals=[_string(s) for s in m.principals],
        not_principals=[_string(s) for s in m.not_principals],
        source_ips=[_net(n) for n in m.source_ips],
        not_source_ips=[_net(n) for n in m.not_source_ips],
        destination_ips=[_net(n) for n in m.destination_ips],
        not_destination_ips=[_net(n) for n in m.not_destination_ips],
        destination_ports=list(m.destination_ports),
        not_destination_ports=list(m.not_destination_ports))


def authorization(p: Policy) -> sec.Authorization:
    return sec.Authorization(
        name=p.name, namespace=p.namespace, scope=int(p.scope), action=int(p.action),
        dry_run=p.dry_run,
        groups=[sec.Group(rules=[sec.Rules(matches=[match_message(m) for m in rule])
                                 for rule in group]) for group in p.groups])


def _workload_key(ep: Endpoint) -> object:
    return (ep.namespace, ep.name) if ep.name else ep.address


def workload_resources(table: ServiceTable, node_of: Callable[[IPAddress], str] = lambda _: "",
                       cluster_id: str = "meshaccel") -> Served:
    out = Served()
    groups: dict[object, list[tuple[str, Endpoint]]] = {}
    for svc in table.services:
        if svc.protocol != "TCP":
            out.skipped[f"services[{svc.name}]"] = (f"{svc.protocol}: the workload API "
                                                    "carries TCP services only")
            continue
        key = f"{SERVICE_NAMESPACE}/{svc.name}"
        out.addresses[key] = wl.Address(service=wl.Service(
            name=svc.name, namespace=SERVICE_NAMESPACE, hostname=svc.name,
            addresses=[wl.NetworkAddress(network="", address=_packed(svc.vip))],
            ports=[wl.Port(service_port=svc.port, target_port=0)]))
        for ep in svc.endpoints:
            groups.setdefault(_workload_key(ep), []).append((key, ep))
    for members in groups.values():
        first = members[0][1]
        name = first.name or str(first.address)
        uid = f"{UID_PREFIX}/{first.namespace}/{name}"
        w = wl.Workload(
            uid=uid, name=name, namespace=first.namespace,
            addresses=[_packed(a) for a in dict.fromkeys(ep.address for _, ep in members)],
            service_account=first.service_account, node=node_of(first.address),
            cluster_id=cluster_id, workload_type=wl.POD, workload_name=name,
            status=wl.HEALTHY if all(ep.healthy for _, ep in members) else wl.UNHEALTHY,
            authorization_policies=[p.key for p in table.policies
                                    if selected(p, first.namespace, first.name, first.labels)])
        w.capacity.CopyFrom(wrappers_pb2.UInt32Value(value=first.weight))
        for key, ep in members:
            ports = w.services[key].ports
            if any(p.target_port != ep.port for p in ports):
                out.skipped[f"{key} endpoint {ep}"] = (
                    f"workload {uid} is already an endpoint of {key} at port "
                    f"{ports[0].target_port}: the API gives a workload one port per service "
                    "port")
                continue
            if not ports:
                ports.add(service_port=_service_port(table, key), target_port=ep.port)
        out.addresses[uid] = wl.Address(workload=w)
    for p in table.policies:
        out.authorizations[p.key] = authorization(p)
    return out


def _service_port(table: ServiceTable, key: str) -> int:
    svc = table.get(key.split("/", 1)[1])
    assert svc is not None
    return svc.port
