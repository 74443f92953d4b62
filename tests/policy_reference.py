"""Istio's L4 authorization evaluated the slow, direct way, for one connection at a time,
straight from the wire messages (istio.workload.Workload, istio.security.Authorization):
the reference the compiled Verdicts are compared with. Written from ztunnel's published
semantics (src/rbac.rs, src/state.rs), sharing no code with accel.policy."""

from __future__ import annotations

import ipaddress

from accel.xds.gen.istio import security_pb2 as sec
from accel.xds.gen.istio import workload_pb2 as wl


def _ip(raw: bytes):
    a = ipaddress.ip_address(raw)
    if a.version == 6 and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def owner(workloads: list[wl.Workload], addr) -> wl.Workload | None:
    """The one workload with this address (not host network), else None."""
    hits = [w for w in workloads if w.network_mode != wl.HOST_NETWORK
            and any(_ip(a) == addr for a in w.addresses)]
    return hits[0] if len(hits) == 1 else None


def _string(m: sec.StringMatch, value: str) -> bool:
    kind = m.WhichOneof("match_type")
    if kind == "exact":
        return value == m.exact
    if kind == "prefix":
        return value.startswith(m.prefix)
    if kind == "suffix":
        return value.endswith(m.suffix)
    return value != ""


def _in(a: sec.Address, ip) -> bool:
    net = ipaddress.ip_network((_ip(a.address), a.length - (96 if len(a.address) == 16 and
                                                            _ip(a.address).version == 4 else 0)),
                               strict=False)
    return ip.version == net.version and ip in net


def _field(pos, neg, pred) -> bool:
    if pos and not any(pred(v) for v in pos):
        return False
    return not (neg and any(pred(v) for v in neg))


def decide(workloads: list[wl.Workload], policies: list[sec.Authorization], node: str,
           src, dst, port: int) -> tuple[str, str | None] | None:
    """(verdict name, deciding policy "ns/name" or None), or None: no policy governs dst."""
    d = owner(workloads, dst)
    if d is None or d.node != node:
        return None
    key = lambda p: f"{p.namespace}/{p.name}"  # noqa: E731
    pols = sorted(policies, key=key)
    applicable = [p for p in pols if p.scope == sec.GLOBAL
                  or (p.scope == sec.NAMESPACE and p.namespace == d.namespace)
                  or key(p) in d.authorization_policies]
    if not applicable:
        return None
    s = owner(workloads, src)
    ns = s.namespace if s else ""
    sa = (s.service_account or "default") if s else None
    principal = f"{s.trust_domain or 'cluster.local'}/ns/{ns}/sa/{sa}" if s else None

    def match(m: sec.Match) -> bool:
        if m.ByteSize() == 0:
            return False
        return (_field(m.namespaces, m.not_namespaces, lambda v: _string(v, ns))
                and _field(m.service_accounts, m.not_service_accounts,
                           lambda v: s is not None and (v.namespace, v.service_account) == (ns, sa))
                and _field(m.principals, m.not_principals,
                           lambda v: principal is not None and _string(v, principal))
                and _field(m.source_ips, m.not_source_ips, lambda v: _in(v, src))
                and _field(m.destination_ips, m.not_destination_ips, lambda v: _in(v, dst))
                and _field(m.destination_ports, m.not_destination_ports, lambda v: v == port))

    def matches(p: sec.Authorization) -> bool:
        return any(all(not r.matches or any(match(m) for m in r.matches) for r in g.rules)
                   for g in p.groups)

    def first(action: int, dry: bool) -> tuple[list, str | None]:
        those = [p for p in applicable if p.action == action and p.dry_run == dry]
        hit = next((key(p) for p in those if matches(p)), None)
        return those, hit

    _, deny = first(sec.DENY, False)
    if deny:
        return "DENY", deny
    allows, allow = first(sec.ALLOW, False)
    if allows and allow is None:
        return "DENY", None
    _, dry_deny = first(sec.DENY, True)
    if dry_deny:
        return "DRY_RUN_DENY", dry_deny
    dry_allows, dry_allow = first(sec.ALLOW, True)
    if not allows and dry_allows and dry_allow is None:
        return "DRY_RUN_DENY", key(dry_allows[0])
    return "ALLOW", allow
