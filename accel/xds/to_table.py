"""Envoy resources -> ServiceTable: listeners matched to clusters and endpoints, services
named, VIPs waiting for their targets held back (or at their last good definition), and
the per-resource memo that lets a client re-translate only what changed."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import message

from accel import config
from accel.model import (
    ANY_PORT,
    DEFAULT_FASTPATH,
    Endpoint,
    Guard,
    IPAddress,
    IPNetwork,
    Service,
    ServiceTable,
    ValidationError,
    endpoint_loops,
)
from accel.structs import struct_to_data
from accel.xds.endpoints import endpoints_of, merge_weighted
from accel.xds.fronts import (
    Front,
    Skip,
    Skipped,
    Target,
    cluster_eds_name,
    cluster_ignored,
    domain_vip,
    front,
    route_cluster,
    vhost_cluster,
)
from accel.xds.kinds import MESH_CLUSTER, META_KEY, Resources, raw_items, raw_of


@dataclass(frozen=True)
class Translation:
    """A table plus what it still waits for.

    `pending` maps listener names whose route config, cluster or endpoints have not
    arrived to what they wait for: their VIP is left out, or held at its `previous`
    definition. `eds_names`/`rds_names` are what a
    client must subscribe to next.
    """

    table: ServiceTable
    pending: Mapping[str, str] = field(default_factory=dict)
    eds_names: frozenset[str] = frozenset()
    rds_names: frozenset[str] = frozenset()
    # For update_endpoints: the services made from each ClusterLoadAssignment, the
    # ClusterLoadAssignments pending listeners wait for, and each service's listener.
    by_eds: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    eds_waiting: frozenset[str] = frozenset()
    listeners: Mapping[str, str] = field(default_factory=dict)
    # What the kernel path leaves: listener (or listener/virtual host) -> why; and per
    # service the resource features it does not apply (filters, TLS, ...).
    skipped: Mapping[str, str] = field(default_factory=dict)
    ignored: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The VIP:port/protocol of skipped entries that name one (for `accel services`).
    left: Mapping[str, tuple[IPAddress, int, str]] = field(default_factory=dict)
    # Services made from several weighted clusters: update_endpoints leaves them to a full
    # translation (one ClusterLoadAssignment is only a part of their endpoints).
    multi: frozenset[str] = frozenset()


def to_table(
    res: Resources,
    *,
    strict: bool = True,
    cds_seen: bool = True,
    check_clusters: Iterable[str] | None = None,
    previous: ServiceTable | None = None,
    memo: Memo | None = None,
) -> Translation:
    """Map resources to a ServiceTable.

    strict: every reference must resolve (controller side, round trip tests).
    Otherwise (the agent's client): a missing route config or ClusterLoadAssignment holds
    the service back; a missing cluster holds it back too, except for the listeners named
    in `check_clusters` once CDS has been seen, for which it is an error: that is how an
    LDS/RDS update pointing at an unknown cluster gets NACKed while a CDS update that
    removes a cluster ahead of its listener (make-before-break) does not.
    memo: reuse per-resource work from the previous call (a client passes the same Memo).
    """
    memo = memo if memo is not None else Memo()
    memo.begin()
    tr = _to_table(res, strict, cds_seen, check_clusters, previous, memo)
    memo.commit()
    return tr


def update_endpoints(prev: Translation,
                     changed: Mapping[str, endpoint_pb2.ClusterLoadAssignment]
                     ) -> Translation | None:
    """The translation after ClusterLoadAssignments alone changed (no listener, route or
    cluster did): only the services made from them are rebuilt and the table is derived
    from the previous one, so one changed endpoint among 10,000 services costs about what
    one service does. Same result and errors as to_table; None when a changed assignment is
    awaited by a pending listener (that changes which services exist: to_table's job)."""
    if prev.eds_waiting & changed.keys():
        return None
    if prev.multi and any(set(prev.by_eds.get(n, ())) & prev.multi for n in changed):
        return None  # a part of a weighted service's endpoints: translate it whole
    upsert = []
    for eds_name, cla in changed.items():
        users = prev.by_eds.get(eds_name, ())
        if not users:
            continue  # subscribed for a cluster no listener uses (yet)
        where = f"ClusterLoadAssignment[{eds_name}]"
        endpoints = endpoints_of(cla, where)
        for name in users:
            old = prev.table.get(name)
            assert old is not None, name
            try:
                svc = Service(name, old.vip, old.port, old.protocol, endpoints, old.edge,
                              old.fastpath, old.limits)
            except ValidationError as e:
                raise ValidationError(f"{where} (service {name!r}).{e.path}", e.reason) from None
            for i, ep in enumerate(endpoints):  # endpoint_loops, for this service alone
                other = prev.table.service_at(ep.address, ep.port, svc.protocol) or \
                    prev.table.service_at(ep.address, ANY_PORT, svc.protocol)
                if other is not None and other.name != name:
                    via = f" (Listener[{prev.listeners[other.name]}])" \
                        if other.name in prev.listeners else ""
                    raise ValidationError(f"{where} (service {name!r}).endpoints[{i}]",
                                          f"{ep} is the VIP:port of service {other.name!r}"
                                          f"{via}; endpoints must be backends, not VIPs")
            upsert.append(svc)
    if not upsert:
        return prev
    return dataclasses.replace(prev, table=prev.table.derive(upsert))


class Memo:
    """Per-resource results of the last successful build, keyed by the resource's bytes,
    so a client re-translates only what changed (10,000 services: seconds -> a fraction).
    Services are kept too, so unchanged ones are the same objects table after table (the
    map writers skip them by identity)."""

    _MISS = object()

    def __init__(self) -> None:
        self._old: dict = {}
        self._new: dict = {}
        self._open = False

    def begin(self) -> None:
        """Start a round, unless one is open: a client may look up listeners' fronts
        (listener_fronts) before the translation that reuses them."""
        if not self._open:
            self._new = {}
            self._open = True

    def commit(self) -> None:
        self._old, self._new, self._open = self._new, {}, False

    def get(self, where: str, msg: message.Message | bytes, fn):
        """fn()'s result for this resource (its wire bytes, or a message), kept by a 128-bit
        digest of the bytes: the bytes themselves would double the client's state."""
        raw = msg if isinstance(msg, bytes) else msg.SerializeToString()
        return self.keep((where, hashlib.blake2b(raw, digest_size=16).digest()), fn)

    def keep(self, key: tuple, fn):
        value = self._new.get(key, self._MISS)
        if value is self._MISS:
            value = self._old.get(key, self._MISS)
            if value is self._MISS:
                value = fn()
            self._new[key] = value
        return value


def listener_fronts(memo: Memo, name: str, raw: bytes) -> list[Front | Skipped]:
    """fronts.front() of a listener's wire bytes, through the memo (in a round)."""
    return memo.get("L", raw, lambda: front(name, listener_pb2.Listener.FromString(raw)))


def _to_table(res: Resources, strict: bool, cds_seen: bool,
              check_clusters: Iterable[str] | None, previous: ServiceTable | None,
              memo: Memo) -> Translation:
    gone: dict[str, Skipped] = {}  # listener (or listener/virtual host) not taken, and why
    fronts: list[Front] = []
    for name, raw in raw_items(res.listeners):
        for f in listener_fronts(memo, name, raw):
            if isinstance(f, Skipped):
                gone[f.listener] = f
            else:
                fronts.append(f)
    _check_fronts([f for f in fronts if not f.wildcard])
    taken = {(f.vip, f.port, f.protocol): f.listener for f in fronts if not f.wildcard}
    must_resolve = set(check_clusters or ())
    rds_names = frozenset(f.route for f in fronts if f.route)
    targets: list[tuple[Front, Target]] = []  # listeners whose cluster name is known
    pending: dict[str, str] = {}
    waiting: list[Front] = []
    for f in fronts:
        if f.route is None:
            assert f.cluster is not None
            targets.append((f, f.cluster))
            continue
        rc = res.routes.get(f.route)
        if rc is None:
            if strict:
                raise ValidationError(f"Listener[{f.listener}]", f"route_config_name "
                                      f"{f.route!r} names no RouteConfiguration")
            pending[f.listener] = f"RouteConfiguration {f.route!r}"
            if not f.wildcard:
                waiting.append(f)
            continue
        if f.wildcard:
            found = _virtual_host_targets(f, rc, taken, gone)
            if not found and not any(k.startswith(f"{f.listener}/") for k in gone):
                gone[f.listener] = Skipped(f.listener, f"a wildcard listener whose virtual "
                                           f"hosts in RouteConfiguration {f.route!r} name no "
                                           "IP: no VIP")
            targets += found
            continue
        try:
            targets.append((f, route_cluster(rc, vip=f.vip, port=f.port)))
        except Skip as e:
            gone[f.listener] = Skipped(f.listener, f"RouteConfiguration {f.route!r}: {e}",
                                       f.vip, f.port, f.protocol)

    eds: set[str] = set()
    eds_waiting: set[str] = set()
    by_eds: dict[str, list[str]] = {}
    services: list[Service] = []
    origin: dict[str, tuple[str, str]] = {}  # service -> (its endpoints' resource, listener)
    ignored: dict[str, tuple[str, ...]] = {}
    multi: set[str] = set()  # services made from several weighted clusters
    for (f, target), name in zip(targets, _service_names(targets), strict=True):
        parts = [(target, 1)] if isinstance(target, str) else list(target)
        got: list[tuple[tuple[Endpoint, ...], int, str | None, str]] = []
        tls: list[str] = []  # the clusters' features the kernel path does not apply
        for cluster, weight in parts:
            r = _cluster_endpoints(res, memo, f, cluster, strict, cds_seen, must_resolve)
            if isinstance(r, tuple):
                got.append((r[0], weight, r[1], r[2]))
                tls += r[3]
                if r[1] is not None:
                    eds.add(r[1])
                continue
            kind, why, eds_name = r.kind, r.reason, r.eds_name
            if eds_name:
                eds.add(eds_name)
            if kind == "pending":
                pending[f.listener] = why
                waiting.append(f)
                if eds_name:
                    eds_waiting.add(eds_name)
            else:
                # A transparent chain to the original destination (Consul's passthrough~
                # chains for pod IPs) names destinations, not a VIP left to the kernel.
                vip = None if f.transparent and r.passthrough else f.vip
                gone[f.listener] = Skipped(f.listener, why, vip, f.port, f.protocol)
            break
        if len(got) != len(parts):
            continue
        if len(got) == 1:
            endpoints, where = got[0][0], got[0][3]
        else:
            # Weights kept: each cluster's share of the traffic, split by endpoint weight.
            multi.add(name)
            where = " + ".join(g[3] for g in got)
            endpoints = memo.keep(("split", tuple(id(g[0]) for g in got),
                                   tuple(g[1] for g in got)),
                                  lambda g=got: merge_weighted([(e, w) for e, w, _, _ in g]))
        try:
            # Keyed by the endpoints tuple's identity (the memo holds it): what did not
            # change comes back as the very same Service object.
            services.append(memo.keep(
                ("service", name, f.vip, f.port, f.protocol, f.edge, f.fastpath, f.limits,
                 id(endpoints)),
                lambda n=name, f=f, e=endpoints: Service(n, f.vip, f.port, f.protocol, e, f.edge,
                                                         f.fastpath, f.limits)))
        except ValidationError as e:
            raise ValidationError(f"{where} (service {name!r}).{e.path}", e.reason) from None
        for _, _, used, _ in got:
            if used is not None:
                by_eds.setdefault(used, []).append(name)
        origin[name] = (where, f.listener)
        if f.ignored or tls:
            ignored[name] = f.ignored + tuple(tls)

    held = _hold(services, waiting, previous)
    for svc, i, other in endpoint_loops(services + list(held)):
        if svc.name not in origin:  # held at its last good definition: the new VIP is to blame
            raise ValidationError(f"Listener[{origin[other.name][1]}].address", f"VIP:port "
                                  f"{svc.endpoints[i]} is an endpoint of service {svc.name!r}")
        via = f" (Listener[{origin[other.name][1]}])" if other.name in origin else ""
        raise ValidationError(f"{origin[svc.name][0]} (service {svc.name!r}).endpoints[{i}]",
                              f"{svc.endpoints[i]} is the VIP:port of service {other.name!r}"
                              f"{via}; endpoints must be backends, not VIPs")
    cidrs, guard, fastpath = memo.get("M", res.clusters[MESH_CLUSTER],
                                      lambda: mesh_settings(res.clusters[MESH_CLUSTER])) \
        if MESH_CLUSTER in res.clusters else ((), Guard(), DEFAULT_FASTPATH)
    table = ServiceTable(tuple(services) + held, mesh_cidrs=cidrs, guard=guard,
                         fastpath=fastpath)
    return Translation(table, pending, frozenset(eds), rds_names,
                       {k: tuple(v) for k, v in by_eds.items()}, frozenset(eds_waiting),
                       {n: lst for n, (_, lst) in origin.items()},
                       {k: g.reason for k, g in gone.items()}, ignored,
                       {k: (g.vip, g.port, g.protocol) for k, g in gone.items()
                        if g.vip is not None},
                       frozenset(multi))


@dataclass(frozen=True)
class Unresolved:
    """A cluster a service cannot use yet ("pending": not arrived) or at all ("skip")."""

    kind: str
    reason: str
    eds_name: str | None = None
    passthrough: bool = False  # an ORIGINAL_DST cluster: traffic goes where it was sent


def _cluster_endpoints(res: Resources, memo: Memo, f: Front, cluster: str, strict: bool,
                       cds_seen: bool, must_resolve: set[str]
                       ) -> tuple[tuple[Endpoint, ...], str | None, str, tuple[str, ...]] \
        | Unresolved:
    """(endpoints, their ClusterLoadAssignment's name or None, where they come from, the
    cluster's features the kernel path does not apply) of one cluster a service sends
    traffic to; raises ValidationError for malformed input."""
    c = res.clusters.get(cluster)
    if c is None:
        where = f"Listener[{f.listener}]" + (f" via RouteConfiguration[{f.route}]"
                                             if f.route else "")
        if strict or (cds_seen and f.listener in must_resolve):
            raise ValidationError(where, f"references unknown cluster {cluster!r}")
        return Unresolved("pending", f"Cluster {cluster!r}")
    try:
        eds_name = cluster_eds_name(c)
    except Skip as e:
        return Unresolved("skip", f"cluster {cluster!r}: {e}",
                          passthrough=c.type == cluster_pb2.Cluster.ORIGINAL_DST)
    cla: message.Message | bytes | None
    if eds_name is None:
        cla = c.load_assignment
        where = f"Cluster[{cluster}].load_assignment"
    else:
        cla = raw_of(res.endpoints, eds_name)  # parsed below only if it changed
        where = f"ClusterLoadAssignment[{eds_name}]"
        if cla is None:
            if strict:
                raise ValidationError(f"Cluster[{cluster}]", f"no ClusterLoadAssignment "
                                      f"{eds_name!r}")
            return Unresolved("pending", f"ClusterLoadAssignment {eds_name!r}", eds_name)
    try:
        endpoints = memo.get(where, cla, lambda c=cla, w=where: endpoints_of(
            endpoint_pb2.ClusterLoadAssignment.FromString(c) if isinstance(c, bytes)
            else c, w))
    except ValidationError as e:
        if c.type not in (cluster_pb2.Cluster.STRICT_DNS, cluster_pb2.Cluster.LOGICAL_DNS):
            raise
        # Host names are what DNS clusters hold: valid, but nothing to balance to here.
        return Unresolved("skip", f"cluster {cluster!r} resolves names by DNS ({e.reason})")
    return endpoints, eds_name, where, cluster_ignored(c)


def _virtual_host_targets(f: Front, rc: route_pb2.RouteConfiguration,
                          taken: dict[tuple, str], gone: dict[str, Skipped]
                          ) -> list[tuple[Front, Target]]:
    """A wildcard listener's services (Istio's 0.0.0.0_PORT): one per IP a virtual host's
    domains name, to the cluster every request of that host goes to. A VIP:port a listener
    of its own serves is that listener's."""
    out = []
    for i, vh in enumerate(rc.virtual_hosts):
        vips = list(dict.fromkeys(v for d in vh.domains
                                  if (v := domain_vip(d, f.port)) is not None))
        if not vips:
            continue  # host names only (a headless service): nothing to match in the kernel
        where = f"{f.listener}/{vh.name or i}"
        try:
            cluster = vhost_cluster(vh, f"RouteConfiguration[{rc.name}].virtual_hosts[{i}]")
        except Skip as e:
            gone[where] = Skipped(where, str(e), vips[0] if len(vips) == 1 else None, f.port,
                                  f.protocol)
            continue
        for vip in vips:
            key = (vip, f.port, f.protocol)
            if key in taken:
                gone[f"{where}@{vip}"] = Skipped(f"{where}@{vip}", f"{vip}:{f.port} is served by "
                                                 f"Listener[{taken[key]}]")
                continue
            taken[key] = where
            # The listener's metadata service name would name them all alike: per host.
            out.append((dataclasses.replace(f, listener=where if len(vips) == 1
                                            else f"{where}@{vip}", vip=vip, wildcard=False,
                                            service=None), cluster))
    return out


def mesh_settings(c: cluster_pb2.Cluster) -> tuple[tuple[IPNetwork, ...], Guard, str]:
    where = f"Cluster[{c.name}].metadata.filter_metadata.{META_KEY}"
    raw = struct_to_data(c.metadata.filter_metadata[META_KEY])
    unknown = set(raw) - {"mesh_cidrs", "guard", "fastpath"}
    if unknown:
        raise ValidationError(where, f"unknown field(s) {', '.join(sorted(unknown))}; "
                              "allowed: fastpath, guard, mesh_cidrs")
    try:
        t = config.table_from_dict(raw)
    except ValidationError as e:
        raise ValidationError(f"{where}.{e.path}", e.reason) from None
    return t.mesh_cidrs, t.guard, t.fastpath


def _hold(services: list[Service], waiting: list[Front],
          previous: ServiceTable | None) -> tuple[Service, ...]:
    """A VIP waiting for its new target keeps its last good definition (make-before-break),
    unless the new table already uses that name."""
    if not previous or not waiting:
        return ()
    old = {s.key: s for s in previous.services}
    names = {s.name for s in services}
    keys = {s.key for s in services}
    held = []
    for f in waiting:
        svc = old.get((f.vip, f.port, f.protocol))
        if svc and svc.name not in names and svc.key not in keys:
            held.append(svc)
            names.add(svc.name)
            keys.add(svc.key)
    return tuple(held)


def _service_names(pairs: list[tuple[Front, Target]]) -> list[str]:
    """metadata service > cluster name > (cluster shared by several listeners) listener name."""
    by_cluster: dict[Target, int] = {}
    for f, cluster in pairs:
        if not f.service:
            by_cluster[cluster] = by_cluster.get(cluster, 0) + 1
    names: list[str] = []
    seen: dict[str, str] = {}
    for f, cluster in pairs:
        name = f.service or (cluster if isinstance(cluster, str) and by_cluster[cluster] == 1
                             else f.listener)
        if name in seen:
            raise ValidationError(
                f"Listener[{f.listener}]",
                f"service name {name!r} is also used by Listener[{seen[name]}]; set "
                f"metadata.filter_metadata.{META_KEY}.service to tell them apart",
            )
        seen[name] = f.listener
        names.append(name)
    return names


def _check_fronts(fronts: list[Front]) -> None:
    keys: dict[tuple[IPAddress, int, str], str] = {}
    for f in fronts:
        key = (f.vip, f.port, f.protocol)
        if key in keys:
            host = f"[{f.vip}]" if f.vip.version == 6 else str(f.vip)
            raise ValidationError(f"Listener[{f.listener}].address",
                                  f"duplicate VIP {host}:{f.port}/{f.protocol}, already "
                                  f"used by Listener[{keys[key]}]")
        keys[key] = f.listener
