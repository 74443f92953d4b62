"""Wire -> workload API resources, one processor per type. Malformed input raises
ValidationError naming the resource and the field, e.g.
``Address[default/reviews.default.svc.cluster.local].service.addresses[0].address: 5 bytes
is not an IPv4 or IPv6 address``; what is valid but unusable here (a waypoint, a hostname
only workload) decodes, and the table or compiler reports it. Unknown fields are skipped
by protobuf itself."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from typing import Generic, TypeVar

from google.protobuf import message

from accel.model import IPAddress, IPNetwork, ValidationError, plain_address
from accel.policy.rules import (
    Action,
    Group,
    Match,
    Policy,
    Rule,
    Scope,
    StringMatch,
)
from accel.xds.gen.istio import security_pb2, workload_pb2
from accel.xds.workload.kinds import ADDRESS, AUTHORIZATION, resource_name
from accel.xds.workload.resources import (
    Locality,
    PortMap,
    ServiceInfo,
    WorkloadInfo,
)

Raw = bytes | message.Message
T = TypeVar("T")


def ip_bytes(raw: bytes, where: str) -> IPAddress:
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return plain_address(ipaddress.IPv6Address(raw), where)  # ::ffff:a.b.c.d is a.b.c.d
    raise ValidationError(where, f"{len(raw)} bytes is not an IPv4 or IPv6 address")


def _port(value: int, where: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ValidationError(where, f"port {value} is out of range {low}-65535")
    return value


def _ports(ports, where: str, allow_zero_target: bool = True) -> tuple[PortMap, ...]:
    out: list[PortMap] = []
    seen: set[int] = set()
    for i, p in enumerate(ports):
        sp = _port(p.service_port, f"{where}[{i}].service_port")
        tp = _port(p.target_port, f"{where}[{i}].target_port", allow_zero=allow_zero_target)
        if sp in seen:
            raise ValidationError(f"{where}[{i}].service_port", f"port {sp} is listed twice")
        seen.add(sp)
        out.append(PortMap(sp, tp))
    return tuple(out)


def _parse(cls: type[message.Message], raw: Raw, where: str) -> message.Message:
    if isinstance(raw, message.Message):
        return raw
    msg = cls()
    try:
        msg.ParseFromString(raw)
    except message.DecodeError as e:
        raise ValidationError(where, f"malformed {cls.DESCRIPTOR.name}: {e}") from None
    return msg


class _Processor(Generic[T]):
    """Decodes one type's resources; keeps the last result per name so that a resource
    sent again unchanged is not decoded again."""

    type_url = ""
    kind = ""
    cls: type[message.Message]

    def __init__(self) -> None:
        self._memo: dict[str, tuple[bytes, T]] = {}

    def decode(self, name: str | None, raw: Raw, strict: bool = True) -> T:
        """One resource (wire bytes or a message); `name`, when given, is the name it was
        sent under and must be its own unless not `strict`. Raises ValidationError."""
        msg = _parse(self.cls, raw, f"{self.kind}[{name}]" if name else self.kind)
        own = resource_name(msg)
        if not own.strip("/"):
            raise ValidationError(f"{self.kind}[{name}]" if name else self.kind,
                                  "resource has no name")
        if strict and name and name != own:
            raise ValidationError(f"{self.kind}[{own}]", f"sent under the name {name!r}")
        return self._decode(own, msg, f"{self.kind}[{own}]")

    def decode_all(self, items: Mapping[str, Raw], strict: bool = True) -> dict[str, T]:
        """A response's resources by name, all or nothing (the first error raises)."""
        out: dict[str, T] = {}
        memo: dict[str, tuple[bytes, T]] = {}
        for name, raw in items.items():
            data = raw if isinstance(raw, bytes) else raw.SerializeToString()
            digest = hashlib.blake2b(data, digest_size=16).digest()
            hit = self._memo.get(name)
            value = hit[1] if hit is not None and hit[0] == digest else \
                self.decode(name, data, strict)
            out[name] = value
            memo[name] = (digest, value)
        self._memo.update(memo)
        return out

    def forget(self, names) -> None:
        for n in names:
            self._memo.pop(n, None)

    def _decode(self, name: str, msg: message.Message, where: str) -> T:
        raise NotImplementedError


class AddressProcessor(_Processor[WorkloadInfo | ServiceInfo]):
    """`istio.workload.Address` -> WorkloadInfo (name = uid) or ServiceInfo
    (name = "namespace/hostname")."""

    type_url = ADDRESS
    kind = "Address"
    cls = workload_pb2.Address

    def _decode(self, name: str, msg: message.Message, where: str) -> WorkloadInfo | ServiceInfo:
        assert isinstance(msg, workload_pb2.Address)
        kind = msg.WhichOneof("type")
        if kind == "workload":
            return workload_info(msg.workload, f"{where}.workload")
        if kind == "service":
            return service_info(msg.service, f"{where}.service")
        raise ValidationError(where, "neither a workload nor a service")


def workload_info(w: workload_pb2.Workload, where: str) -> WorkloadInfo:
    if not w.uid:
        raise ValidationError(f"{where}.uid", "missing required field")
    addresses = tuple(ip_bytes(a, f"{where}.addresses[{i}]") for i, a in enumerate(w.addresses))
    services = []
    for key in sorted(w.services):
        at = f"{where}.services[{key}]"
        ns, _, host = key.partition("/")
        if not ns or not host:
            raise ValidationError(at, "the key must be namespace/hostname")
        services.append((key, _ports(w.services[key].ports, f"{at}.ports")))
    capacity = w.capacity.value if w.HasField("capacity") else 1
    return WorkloadInfo(
        uid=w.uid, name=w.name, namespace=w.namespace, addresses=addresses,
        hostname=w.hostname, network=w.network, service_account=w.service_account,
        trust_domain=w.trust_domain, node=w.node, cluster_id=w.cluster_id,
        locality=Locality(w.locality.region, w.locality.zone, w.locality.subzone),
        healthy=w.status == workload_pb2.HEALTHY, services=tuple(services),
        policies=tuple(w.authorization_policies),
        waypoint=w.HasField("waypoint"),
        host_network=w.network_mode == workload_pb2.HOST_NETWORK, capacity=capacity)


def service_info(s: workload_pb2.Service, where: str) -> ServiceInfo:
    for f in ("namespace", "hostname"):
        if not getattr(s, f):
            raise ValidationError(f"{where}.{f}", "missing required field")
    vips = tuple((a.network, ip_bytes(a.address, f"{where}.addresses[{i}].address"))
                 for i, a in enumerate(s.addresses))
    # Enum values a newer istiod may add are valid input: the table leaves such a service
    # to the kernel path (an unknown mode or scope), or takes the safe reading (health).
    lb = s.load_balancing
    return ServiceInfo(
        name=s.name, namespace=s.namespace, hostname=s.hostname, vips=vips,
        ports=_ports(s.ports, f"{where}.ports"), waypoint=s.HasField("waypoint"),
        mode=lb.mode, routing_preference=tuple(lb.routing_preference),
        allow_unhealthy=lb.health_policy == workload_pb2.LoadBalancing.ALLOW_ALL)


class AuthorizationProcessor(_Processor[Policy]):
    """`istio.security.Authorization` -> accel.policy.rules.Policy (name "namespace/name")."""

    type_url = AUTHORIZATION
    kind = "Authorization"
    cls = security_pb2.Authorization

    def _decode(self, name: str, msg: message.Message, where: str) -> Policy:
        assert isinstance(msg, security_pb2.Authorization)
        return policy_of(msg, where)


def policy_of(a: security_pb2.Authorization, where: str) -> Policy:
    for f in ("name", "namespace"):
        if not getattr(a, f):
            raise ValidationError(f"{where}.{f}", "missing required field")
    try:
        scope = Scope(a.scope)
    except ValueError:
        raise ValidationError(f"{where}.scope", f"unknown scope {a.scope}") from None
    try:
        action = Action(a.action)
    except ValueError:
        raise ValidationError(f"{where}.action", f"unknown action {a.action}") from None
    groups: list[Group] = []
    for gi, g in enumerate(a.groups):
        rules: list[Rule] = []
        for ri, r in enumerate(g.rules):
            rules.append(tuple(match_of(m, f"{where}.groups[{gi}].rules[{ri}].matches[{mi}]")
                               for mi, m in enumerate(r.matches)))
        groups.append(tuple(rules))
    return Policy(a.name, a.namespace, scope, action, tuple(groups), a.dry_run)


def match_of(m: security_pb2.Match, where: str) -> Match:
    def strings(field: str) -> tuple[StringMatch, ...]:
        out = []
        for i, sm in enumerate(getattr(m, field)):
            kind = sm.WhichOneof("match_type")
            if kind is None:
                # ztunnel drops it, which widens the match: refuse it instead
                raise ValidationError(f"{where}.{field}[{i}]", "StringMatch sets no "
                                      "exact, prefix, suffix or presence")
            out.append(StringMatch(kind, "" if kind == "presence" else getattr(sm, kind)))
        return tuple(out)

    def nets(field: str) -> tuple[IPNetwork, ...]:
        return tuple(cidr(a, f"{where}.{field}[{i}]") for i, a in enumerate(getattr(m, field)))

    def ports(field: str) -> tuple[int, ...]:
        return tuple(_port(p, f"{where}.{field}[{i}]") for i, p in enumerate(getattr(m, field)))

    def accounts(field: str) -> tuple[tuple[str, str], ...]:
        return tuple((sa.namespace, sa.service_account) for sa in getattr(m, field))

    return Match(
        namespaces=strings("namespaces"), not_namespaces=strings("not_namespaces"),
        service_accounts=accounts("service_accounts"),
        not_service_accounts=accounts("not_service_accounts"),
        principals=strings("principals"), not_principals=strings("not_principals"),
        source_ips=nets("source_ips"), not_source_ips=nets("not_source_ips"),
        destination_ips=nets("destination_ips"), not_destination_ips=nets("not_destination_ips"),
        destination_ports=ports("destination_ports"),
        not_destination_ports=ports("not_destination_ports"))


def cidr(a: security_pb2.Address, where: str) -> IPNetwork:
    addr = ip_bytes(a.address, f"{where}.address")
    bits = 32 if addr.version == 4 else 128
    if len(a.address) == 16 and addr.version == 4:  # ::ffff:a.b.c.d/len: the v4 part
        length = a.length - 96
        if length < 0:
            raise ValidationError(f"{where}.length", f"/{a.length} of a v4-mapped address "
                                  "reaches outside ::ffff:0:0/96")
    else:
        length = a.length
    if length > bits:
        raise ValidationError(f"{where}.length", f"/{a.length} is longer than the address")
    return ipaddress.ip_network((addr, length), strict=False)
