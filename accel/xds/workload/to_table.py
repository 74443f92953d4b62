"""Held workload API state -> ServiceTable, for the agent on node `node_name`.

Per Service one service per (VIP, service_port) on this node's network, TCP (ztunnel's
only protocol). Its endpoints are the workloads listing the service in their `services`
map: HEALTHY ones (any, with health_policy ALLOW_ALL), on this node's network, with an
address of the VIP's family, at the port their own PortList entry gives, else the
service's target_port; weight = the workload's capacity. With load_balancing mode STRICT
only the endpoints matching every routing_preference scope are kept, with FAILOVER those
matching the longest prefix of them that any endpoint matches; the scopes compare with this
node's workloads' locality, cluster and network (they share them). The table is rebuilt on
every change of health, so "the best tier with a healthy endpoint" is exact.

Left on the kernel path (reported in `skipped`, with their VIP:port in `left`): a service
with a waypoint (its L7 policy and routing belong to the waypoint), PASSTHROUGH mode, STRICT
without a local workload to take the locality from, a VIP that cannot be a VIP, a VIP:port
another service already has. What a service in the table leaves out (endpoints and why,
VIPs on other networks) is in `ignored`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from accel.model import (
    DEFAULT_FASTPATH,
    MAX_WEIGHT,
    Endpoint,
    IPAddress,
    IPNetwork,
    Service,
    ServiceTable,
    ValidationError,
    check_vip,
)
from accel.xds.workload.resources import (
    MODE_FAILOVER,
    MODE_PASSTHROUGH,
    MODE_STRICT,
    MODES,
    SCOPES,
    Locality,
    ServiceInfo,
    WorkloadInfo,
)
from accel.xds.workload.state import WorkloadState


@dataclass(frozen=True)
class TableBuild:
    table: ServiceTable
    skipped: Mapping[str, str] = field(default_factory=dict)  # entry -> why left
    left: Mapping[str, tuple[IPAddress, int, str]] = field(default_factory=dict)
    ignored: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # service -> notes


@dataclass(frozen=True)
class Here:
    """Where this node's workloads are: what routing preferences compare with."""

    node: str
    network: str = ""
    cluster: str = ""
    locality: Locality | None = None  # None: no workload here to take it from

    @classmethod
    def of(cls, workloads: Mapping[str, WorkloadInfo], node: str) -> Here:
        local = [w for w in workloads.values() if w.node == node]

        def common(values: list) -> object:
            return Counter(values).most_common(1)[0][0] if values else None

        return cls(node, common([w.network for w in local]) or "",  # type: ignore[arg-type]
                   common([w.cluster_id for w in local]) or "",  # type: ignore[arg-type]
                   common([w.locality for w in local]))  # type: ignore[arg-type]

    def rank(self, w: WorkloadInfo, prefs: tuple[int, ...]) -> int:
        """How many of `prefs`, from the first, `w` shares with this node."""
        loc = self.locality or Locality()
        n = 0
        for scope in prefs:
            name = SCOPES[scope]
            same = {
                "REGION": w.locality.region == loc.region,
                "ZONE": (w.locality.region, w.locality.zone) == (loc.region, loc.zone),
                "SUBZONE": w.locality == loc,
                "NODE": w.node == self.node,
                "CLUSTER": w.cluster_id == self.cluster,
                "NETWORK": w.network == self.network,
            }[name]
            if not same:
                break
            n += 1
        return n


def mesh_addresses(state: WorkloadState, node_name: str) -> tuple[IPNetwork, ...]:
    """This node's workloads' addresses, as host prefixes: the mesh's sockets here."""
    import ipaddress

    addrs = {a for w in state.workloads.values() if w.node == node_name and not w.host_network
             for a in w.addresses}
    return tuple(ipaddress.ip_network(a) for a in sorted(addrs, key=lambda a: (a.version, a)))


def to_table(state: WorkloadState, node_name: str,
             previous: ServiceTable | None = None,
             fastpath: str = DEFAULT_FASTPATH) -> TableBuild:
    """The table for node `node_name`. With the `previous` table, services that did not
    change are its very objects and the table is derived from it, so the map writers
    touch only what changed (ServiceTable.delta). `fastpath`: every service's (the API has
    no field for it: the agent's --fastpath)."""
    here = Here.of(state.workloads, node_name)
    members: dict[str, list[WorkloadInfo]] = {}
    for w in sorted(state.workloads.values(), key=lambda w: w.uid):
        for key, _ in w.services:
            members.setdefault(key, []).append(w)
    skipped: dict[str, str] = {}
    left: dict[str, tuple[IPAddress, int, str]] = {}
    ignored: dict[str, tuple[str, ...]] = {}
    services: list[Service] = []
    taken: dict[tuple[IPAddress, int, str], str] = {}

    def leave(entry: str, why: str, vip: IPAddress | None = None, port: int = 0) -> None:
        skipped[entry] = why
        if vip is not None:
            left[entry] = (vip, port, "TCP")

    for svc in sorted(state.services.values(), key=lambda s: s.key):
        vips = [a for net, a in svc.vips if net == here.network]
        notes = [f"VIP {a} is on network {net!r}, not this node's {here.network!r}"
                 for net, a in svc.vips if net != here.network]
        why = _left_whole(svc, here)
        if not vips and why is None:
            why = "no VIP on this node's network (a headless service): nothing to balance"
        if why is not None:
            for vip in vips or [None]:
                for p in svc.ports or ():
                    leave(_entry(svc, vip, p.service_port, len(vips)), why, vip, p.service_port)
            if not svc.ports or not vips:
                leave(svc.key, why)
            continue
        for vip in vips:
            try:
                check_vip(vip, "vip")
            except ValidationError as e:
                for p in svc.ports:
                    leave(_entry(svc, vip, p.service_port, len(vips)), e.reason, vip,
                          p.service_port)
                continue
            for p in svc.ports:
                name = _entry(svc, vip, p.service_port, len(vips))
                key = (vip, p.service_port, "TCP")
                if key in taken:
                    leave(name, f"{_hostport(vip, p.service_port)} is already taken by "
                          f"service {taken[key]!r}", vip, p.service_port)
                    continue
                eps, why_not = _endpoints(svc, vip, p.service_port, p.target_port,
                                          members.get(svc.key, []), here)
                try:
                    s = Service(name, vip, p.service_port, "TCP", eps, fastpath=fastpath)
                except ValidationError as e:
                    leave(name, f"{e.path}: {e.reason}", vip, p.service_port)
                    continue
                taken[key] = name
                services.append(s)
                if notes or why_not:
                    ignored[name] = tuple(notes + why_not)
    mesh = mesh_addresses(state, node_name)
    if previous is None:
        table = ServiceTable(tuple(services), mesh_cidrs=mesh)
    else:
        names = {s.name for s in services}
        changed = [s for s in services if previous.get(s.name) != s]
        gone = [s.name for s in previous.services if s.name not in names]
        table = previous.derive(changed, gone,
                                mesh_cidrs=None if mesh == previous.mesh_cidrs else mesh)
    return TableBuild(table, skipped, left, ignored)


def _left_whole(svc: ServiceInfo, here: Here) -> str | None:
    if svc.mode not in MODES:
        return f"load_balancing mode {svc.mode} is unknown to meshaccel"
    unknown = [s for s in svc.routing_preference if s not in SCOPES]
    if unknown:
        return f"routing_preference scope {unknown[0]} is unknown to meshaccel"
    if svc.waypoint:
        return "its traffic goes through a waypoint (L7 policy and routing belong to it)"
    if svc.mode == MODE_PASSTHROUGH:
        return "load_balancing mode PASSTHROUGH: connections go to the address dialed"
    if svc.mode == MODE_STRICT and svc.routing_preference and here.locality is None:
        return (f"STRICT routing preference and no workload on node {here.node!r} to "
                "compare localities with")
    return None


def _entry(svc: ServiceInfo, vip: IPAddress | None, port: int, n_vips: int) -> str:
    if vip is None or n_vips <= 1:
        return f"{svc.key}:{port}"
    return f"{svc.key}@{_hostport(vip, port)}"


def _hostport(vip: IPAddress, port: int) -> str:
    return f"[{vip}]:{port}" if vip.version == 6 else f"{vip}:{port}"


def _endpoints(svc: ServiceInfo, vip: IPAddress, service_port: int, target_port: int,
               members: list[WorkloadInfo], here: Here
               ) -> tuple[tuple[Endpoint, ...], list[str]]:
    notes: list[str] = []
    rows: list[tuple[WorkloadInfo, Endpoint]] = []
    seen: set[tuple[IPAddress, int]] = set()
    for w in members:
        if not w.healthy and not svc.allow_unhealthy:
            continue
        if w.capacity == 0:
            continue
        if w.network != here.network:
            notes.append(f"endpoint {w.uid}: on network {w.network!r} (reached through its "
                         "gateway)")
            continue
        addr = next((a for a in w.addresses if a.version == vip.version), None)
        if addr is None:
            notes.append(f"endpoint {w.uid}: no IPv{vip.version} address" +
                         (f" (hostname {w.hostname})" if w.hostname else ""))
            continue
        own = {p.service_port: p.target_port for p in w.ports_for(svc.key) or ()}
        port = own.get(service_port) or target_port
        if not port:
            notes.append(f"endpoint {w.uid}: no target port for service port {service_port}")
            continue
        if (addr, port) in seen:
            notes.append(f"endpoint {w.uid}: {addr}:{port} is another workload's too")
            continue
        seen.add((addr, port))
        rows.append((w, Endpoint(addr, port, min(w.capacity, MAX_WEIGHT))))
    prefs = svc.routing_preference
    if svc.mode in (MODE_STRICT, MODE_FAILOVER) and prefs and rows:
        ranks = [here.rank(w, prefs) for w, _ in rows]
        want = len(prefs) if svc.mode == MODE_STRICT else max(ranks)
        kept = [ep for (_, ep), r in zip(rows, ranks, strict=True) if r == want]
        if len(kept) < len(rows):
            notes.append(f"{len(rows) - len(kept)} endpoint(s) outside the preferred "
                         f"{'/'.join(SCOPES[s] for s in prefs[:want]) or 'tier'}")
        return tuple(kept), notes
    return tuple(ep for _, ep in rows), notes
