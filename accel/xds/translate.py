"""Envoy v3 xDS resources <-> ServiceTable.

The agent reads a defined subset of xDS (see README.md, "xDS mapping"); the controller
writes resources that both the agent and gRPC's proxyless xDS client understand.
Errors name the resource and the field, e.g.
``Listener[reviews.vip].address.socket_address.port_value: port 0 is out of range 1-65535``.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.udp_proxy.v3 import udp_proxy_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format, message, struct_pb2, wrappers_pb2

from accel import config
from accel.model import (
    MAX_WEIGHT,
    Endpoint,
    Guard,
    IPAddress,
    IPNetwork,
    Service,
    ServiceTable,
    ValidationError,
    endpoint_loops,
    plain_address,
)

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
# Make-before-break: a cluster and its endpoints exist before a listener points at them.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
WILDCARD_TYPES = (LISTENER, CLUSTER)

KIND = {LISTENER: "Listener", ROUTE: "RouteConfiguration", CLUSTER: "Cluster",
        ENDPOINT: "ClusterLoadAssignment"}
MESSAGE = {LISTENER: listener_pb2.Listener, ROUTE: route_pb2.RouteConfiguration,
           CLUSTER: cluster_pb2.Cluster, ENDPOINT: endpoint_pb2.ClusterLoadAssignment}

TCP_PROXY = _PREFIX + tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name
UDP_PROXY = _PREFIX + udp_proxy_pb2.UdpProxyConfig.DESCRIPTOR.full_name
HCM = _PREFIX + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
ROUTER = _PREFIX + router_pb2.Router.DESCRIPTOR.full_name
_RESOURCE_WRAPPER = _PREFIX + discovery_pb2.Resource.DESCRIPTOR.full_name

META_KEY = "meshaccel"  # listener.metadata.filter_metadata["meshaccel"]
# A STATIC cluster without endpoints whose metadata carries the table-wide settings
# (mesh_cidrs, guard): valid for Envoy, never requested by gRPC clients.
MESH_CLUSTER = "meshaccel.mesh"
USED_HEALTH = (health_check_pb2.HEALTHY, health_check_pb2.UNKNOWN)
_TCP, _UDP = address_pb2.SocketAddress.TCP, address_pb2.SocketAddress.UDP


def resource_name(msg: message.Message) -> str:
    return msg.cluster_name if isinstance(msg, endpoint_pb2.ClusterLoadAssignment) else msg.name


# --------------------------------------------------------------------------- decoding


def unpack(type_url: str, raw: Iterable[any_pb2.Any]) -> dict[str, message.Message]:
    """Decode one response's resources; the names must be unique and the types right."""
    kind = KIND.get(type_url)
    if kind is None:
        raise ValidationError("type_url", f"{type_url!r} is not a type meshaccel subscribes to")
    out: dict[str, message.Message] = {}
    for i, any_ in enumerate(raw):
        where = f"{kind} resources[{i}]"
        if any_.type_url == _RESOURCE_WRAPPER:  # servers may wrap resources in a Resource
            wrapper = discovery_pb2.Resource()
            _parse(wrapper, any_.value, where)
            any_ = wrapper.resource
        if any_.type_url != type_url:
            raise ValidationError(where, f"type_url {any_.type_url!r} does not match the "
                                  f"response type {type_url!r}")
        msg = MESSAGE[type_url]()
        _parse(msg, any_.value, where)
        name = resource_name(msg)
        if not name:
            raise ValidationError(where, "resource has no name")
        if name in out:
            raise ValidationError(f"{kind}[{name}]", f"duplicate {kind} name in one response")
        out[name] = msg
    return out


def _parse(msg: message.Message, data: bytes, where: str) -> None:
    try:
        msg.ParseFromString(data)
    except message.DecodeError as e:
        raise ValidationError(where, f"malformed Any ({msg.DESCRIPTOR.name}): {e}") from None


def _typed(any_: any_pb2.Any, cls: type[message.Message], where: str) -> message.Message:
    msg = cls()
    _parse(msg, any_.value, where)
    return msg


# --------------------------------------------------------------------------- resources -> table


@dataclass
class Resources:
    """The four resource kinds by name, as a client holds them or a server serves them."""

    listeners: dict[str, listener_pb2.Listener] = field(default_factory=dict)
    routes: dict[str, route_pb2.RouteConfiguration] = field(default_factory=dict)
    clusters: dict[str, cluster_pb2.Cluster] = field(default_factory=dict)
    endpoints: dict[str, endpoint_pb2.ClusterLoadAssignment] = field(default_factory=dict)

    def of(self, type_url: str) -> dict[str, message.Message]:
        return {LISTENER: self.listeners, ROUTE: self.routes, CLUSTER: self.clusters,
                ENDPOINT: self.endpoints}[type_url]  # type: ignore[return-value]

    def replace(self, type_url: str, items: Mapping[str, message.Message]) -> Resources:
        parts = {LISTENER: self.listeners, ROUTE: self.routes, CLUSTER: self.clusters,
                 ENDPOINT: self.endpoints}
        parts[type_url] = dict(items)  # type: ignore[assignment]
        return Resources(parts[LISTENER], parts[ROUTE], parts[CLUSTER], parts[ENDPOINT])


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


@dataclass(frozen=True)
class _Front:
    """What a listener contributes: its VIP and where it sends traffic."""

    listener: str
    vip: IPAddress
    port: int
    protocol: str
    cluster: str | None  # None: behind an RDS route config not yet known
    route: str | None  # RDS name when the cluster comes from a RouteConfiguration
    service: str | None  # from metadata
    edge: bool


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
                svc = Service(name, old.vip, old.port, old.protocol, endpoints, old.edge)
            except ValidationError as e:
                raise ValidationError(f"{where} (service {name!r}).{e.path}", e.reason) from None
            for i, ep in enumerate(endpoints):  # endpoint_loops, for this service alone
                other = prev.table.service_at(ep.address, ep.port, svc.protocol)
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

    def begin(self) -> None:
        self._new = {}

    def commit(self) -> None:
        self._old, self._new = self._new, {}

    def get(self, where: str, msg: message.Message, fn):
        return self.keep((where, msg.SerializeToString()), fn)

    def keep(self, key: tuple, fn):
        value = self._new.get(key, self._MISS)
        if value is self._MISS:
            value = self._old.get(key, self._MISS)
            if value is self._MISS:
                value = fn()
            self._new[key] = value
        return value


def _to_table(res: Resources, strict: bool, cds_seen: bool,
              check_clusters: Iterable[str] | None, previous: ServiceTable | None,
              memo: Memo) -> Translation:
    fronts = [memo.get("L", lst, lambda n=name, x=lst: _front(n, x))
              for name, lst in sorted(res.listeners.items())]
    fronts = [f for f in fronts if f is not None]
    _check_fronts(fronts)
    must_resolve = set(check_clusters or ())
    rds_names = frozenset(f.route for f in fronts if f.route)
    targets: list[tuple[_Front, str]] = []  # listeners whose cluster name is known
    pending: dict[str, str] = {}
    waiting: list[_Front] = []
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
            waiting.append(f)
            continue
        targets.append((f, _route_cluster(rc)))

    eds: set[str] = set()
    eds_waiting: set[str] = set()
    by_eds: dict[str, list[str]] = {}
    services: list[Service] = []
    origin: dict[str, tuple[str, str]] = {}  # service -> (its endpoints' resource, listener)
    for (f, cluster), name in zip(targets, _service_names(targets), strict=True):
        c = res.clusters.get(cluster)
        if c is None:
            where = f"Listener[{f.listener}]" + (f" via RouteConfiguration[{f.route}]"
                                                 if f.route else "")
            if strict or (cds_seen and f.listener in must_resolve):
                raise ValidationError(where, f"references unknown cluster {cluster!r}")
            pending[f.listener] = f"Cluster {cluster!r}"
            waiting.append(f)
            continue
        eds_name = _cluster_eds_name(c)
        if eds_name is None:
            cla = c.load_assignment
            where = f"Cluster[{cluster}].load_assignment"
        else:
            eds.add(eds_name)
            cla = res.endpoints.get(eds_name)
            where = f"ClusterLoadAssignment[{eds_name}]"
            if cla is None:
                if strict:
                    raise ValidationError(f"Cluster[{cluster}]", f"no ClusterLoadAssignment "
                                          f"{eds_name!r}")
                pending[f.listener] = f"ClusterLoadAssignment {eds_name!r}"
                waiting.append(f)
                eds_waiting.add(eds_name)
                continue
        endpoints = memo.get(where, cla, lambda c=cla, w=where: endpoints_of(c, w))
        try:
            # Keyed by the endpoints tuple's identity (the memo holds it): what did not
            # change comes back as the very same Service object.
            services.append(memo.keep(
                ("service", name, f.vip, f.port, f.protocol, f.edge, id(endpoints)),
                lambda n=name, f=f, e=endpoints: Service(n, f.vip, f.port, f.protocol, e, f.edge)))
        except ValidationError as e:
            raise ValidationError(f"{where} (service {name!r}).{e.path}", e.reason) from None
        if eds_name is not None:
            by_eds.setdefault(eds_name, []).append(name)
        origin[name] = (where, f.listener)

    held = _hold(services, waiting, previous)
    for svc, i, other in endpoint_loops(services + list(held)):
        if svc.name not in origin:  # held at its last good definition: the new VIP is to blame
            raise ValidationError(f"Listener[{origin[other.name][1]}].address", f"VIP:port "
                                  f"{svc.endpoints[i]} is an endpoint of service {svc.name!r}")
        via = f" (Listener[{origin[other.name][1]}])" if other.name in origin else ""
        raise ValidationError(f"{origin[svc.name][0]} (service {svc.name!r}).endpoints[{i}]",
                              f"{svc.endpoints[i]} is the VIP:port of service {other.name!r}"
                              f"{via}; endpoints must be backends, not VIPs")
    cidrs, guard = memo.get("M", res.clusters[MESH_CLUSTER],
                            lambda: mesh_settings(res.clusters[MESH_CLUSTER])) \
        if MESH_CLUSTER in res.clusters else ((), Guard())
    table = ServiceTable(tuple(services) + held, mesh_cidrs=cidrs, guard=guard)
    return Translation(table, pending, frozenset(eds), rds_names,
                       {k: tuple(v) for k, v in by_eds.items()}, frozenset(eds_waiting),
                       {n: lst for n, (_, lst) in origin.items()})


def mesh_settings(c: cluster_pb2.Cluster) -> tuple[tuple[IPNetwork, ...], Guard]:
    where = f"Cluster[{c.name}].metadata.filter_metadata.{META_KEY}"
    raw = json_format.MessageToDict(c.metadata.filter_metadata[META_KEY])
    unknown = set(raw) - {"mesh_cidrs", "guard"}
    if unknown:
        raise ValidationError(where, f"unknown field(s) {', '.join(sorted(unknown))}; "
                              "allowed: guard, mesh_cidrs")
    try:
        t = config.table_from_dict(_integral(raw))
    except ValidationError as e:
        raise ValidationError(f"{where}.{e.path}", e.reason) from None
    return t.mesh_cidrs, t.guard


def _integral(v):
    """Struct numbers are doubles: 1000.0 means 1000."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _integral(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_integral(x) for x in v]
    return v


def _hold(services: list[Service], waiting: list[_Front],
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


def _service_names(pairs: list[tuple[_Front, str]]) -> list[str]:
    """metadata service > cluster name > (cluster shared by several listeners) listener name."""
    by_cluster: dict[str, int] = {}
    for f, cluster in pairs:
        if not f.service:
            by_cluster[cluster] = by_cluster.get(cluster, 0) + 1
    names: list[str] = []
    seen: dict[str, str] = {}
    for f, cluster in pairs:
        name = f.service or (cluster if by_cluster[cluster] == 1 else f.listener)
        if name in seen:
            raise ValidationError(
                f"Listener[{f.listener}]",
                f"service name {name!r} is also used by Listener[{seen[name]}]; set "
                f"metadata.filter_metadata.{META_KEY}.service to tell them apart",
            )
        seen[name] = f.listener
        names.append(name)
    return names


def _check_fronts(fronts: list[_Front]) -> None:
    keys: dict[tuple[IPAddress, int, str], str] = {}
    for f in fronts:
        key = (f.vip, f.port, f.protocol)
        if key in keys:
            host = f"[{f.vip}]" if f.vip.version == 6 else str(f.vip)
            raise ValidationError(f"Listener[{f.listener}].address",
                                  f"duplicate VIP {host}:{f.port}/{f.protocol}, already "
                                  f"used by Listener[{keys[key]}]")
        keys[key] = f.listener


def _front(name: str, lst: listener_pb2.Listener) -> _Front | None:
    where = f"Listener[{name}]"
    if lst.HasField("api_listener") or lst.address.WhichOneof("address") is None:
        return None  # gRPC proxyless and internal listeners: no VIP for the datapath
    if lst.address.WhichOneof("address") != "socket_address":
        # A pipe or an internal listener has no VIP:port the datapath could match.
        return None
    sa = lst.address.socket_address
    vip, port = _socket_address(sa, f"{where}.address.socket_address", vip=True)
    if sa.protocol not in (_TCP, _UDP):
        raise ValidationError(f"{where}.address.socket_address.protocol",
                              f"unsupported protocol {sa.protocol}")
    protocol = "UDP" if sa.protocol == _UDP else "TCP"
    service, edge = _meta(lst, where)
    cluster, route = _listener_target(lst, where, protocol)
    return _Front(name, vip, port, protocol, cluster, route, service, edge)


def _socket_address(sa: address_pb2.SocketAddress, where: str,
                    vip: bool = False) -> tuple[IPAddress, int]:
    if sa.WhichOneof("port_specifier") == "named_port":
        raise ValidationError(f"{where}.named_port", "named ports are not supported; "
                              "use port_value")
    if sa.resolver_name:
        raise ValidationError(f"{where}.resolver_name", "custom resolvers are not supported; "
                              "give an IP address")
    try:
        addr = _ip(sa.address)
    except ValueError:
        raise ValidationError(f"{where}.address", f"{sa.address!r} is not an IPv4 or IPv6 "
                              "address (hostnames need DNS, which meshaccel does not do)"
                              ) from None
    addr = plain_address(addr, f"{where}.address")  # ::ffff:a.b.c.d is a.b.c.d in the kernel
    if vip and (addr.is_unspecified or addr.is_multicast):
        raise ValidationError(f"{where}.address", f"{addr} cannot be a service VIP")
    if not 1 <= sa.port_value <= 65535:
        raise ValidationError(f"{where}.port_value",
                              f"port {sa.port_value} is out of range 1-65535")
    return addr, sa.port_value


@functools.lru_cache(maxsize=1 << 16)
def _ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def _meta(lst: listener_pb2.Listener, where: str) -> tuple[str | None, bool]:
    if META_KEY not in lst.metadata.filter_metadata:
        return None, False
    meta = lst.metadata.filter_metadata[META_KEY]
    path = f"{where}.metadata.filter_metadata.{META_KEY}"
    service = None
    if "service" in meta.fields:
        v = meta.fields["service"]
        if v.WhichOneof("kind") != "string_value" or not v.string_value.strip():
            raise ValidationError(f"{path}.service", "expected a non-empty string")
        service = v.string_value
    edge = False
    if "edge" in meta.fields:
        v = meta.fields["edge"]
        if v.WhichOneof("kind") != "bool_value":
            raise ValidationError(f"{path}.edge", "expected true or false")
        edge = v.bool_value
    return service, edge


def _listener_target(lst: listener_pb2.Listener, where: str,
                     protocol: str) -> tuple[str | None, str | None]:
    """(cluster, rds name) from the listener's one filter chain or its UDP proxy."""
    if protocol == "UDP":
        for i, lf in enumerate(lst.listener_filters):
            if lf.HasField("typed_config") and lf.typed_config.type_url == UDP_PROXY:
                up = _typed(lf.typed_config, udp_proxy_pb2.UdpProxyConfig,
                            f"{where}.listener_filters[{i}].typed_config")
                if not up.cluster:
                    raise ValidationError(f"{where}.listener_filters[{i}].typed_config.cluster",
                                          "a udp_proxy must name one cluster (matcher "
                                          "routing is not supported)")
                return up.cluster, None
    chains = list(lst.filter_chains)
    if lst.HasField("default_filter_chain"):
        chains.append(lst.default_filter_chain)
    if lst.HasField("filter_chain_matcher"):
        raise ValidationError(f"{where}.filter_chain_matcher", "not supported: meshaccel "
                              "maps one VIP:port to one cluster")
    if not chains:
        raise ValidationError(f"{where}.filter_chains", "no filter chain: expected one "
                              "ending in envoy.filters.network.tcp_proxy or an "
                              "HttpConnectionManager")
    if len(chains) > 1:
        raise ValidationError(f"{where}.filter_chains", f"{len(chains)} filter chains; "
                              "meshaccel maps one VIP:port to exactly one filter chain")
    fpath = f"{where}.filter_chains[0].filters" if lst.filter_chains else \
        f"{where}.default_filter_chain.filters"
    filters = chains[0].filters
    if not filters:
        raise ValidationError(fpath, "empty filter chain")
    # The kernel path skips every filter, so only a chain that is nothing but a proxy
    # to one cluster can be accelerated without silently dropping policy.
    for i, flt in enumerate(filters):
        fw = f"{fpath}[{i}]"
        if flt.HasField("config_discovery"):
            raise ValidationError(f"{fw}.config_discovery", "filter config discovery (ECDS) "
                                  "is not supported")
        if not flt.HasField("typed_config"):
            raise ValidationError(f"{fw}.typed_config", f"filter {flt.name!r} has no "
                                  "typed_config")
        t = flt.typed_config.type_url
        last = i == len(filters) - 1
        if t not in (TCP_PROXY, HCM):
            raise ValidationError(f"{fw}.typed_config", f"unknown filter type {t!r} "
                                  f"({flt.name!r}); expected {TCP_PROXY} or {HCM}")
        if not last:
            raise ValidationError(fw, f"{flt.name!r} must be the last filter of the chain")
        if t == TCP_PROXY:
            tp = _typed(flt.typed_config, tcp_proxy_pb2.TcpProxy, f"{fw}.typed_config")
            return _tcp_proxy_cluster(tp, f"{fw}.typed_config"), None
        hcm = _typed(flt.typed_config, hcm_pb2.HttpConnectionManager, f"{fw}.typed_config")
        return _hcm_target(hcm, f"{fw}.typed_config")
    raise AssertionError("unreachable")


def _tcp_proxy_cluster(tp: tcp_proxy_pb2.TcpProxy, where: str) -> str:
    if tp.WhichOneof("cluster_specifier") == "weighted_clusters":
        clusters = tp.weighted_clusters.clusters
        if len(clusters) == 1 and clusters[0].name:
            return clusters[0].name
        raise ValidationError(f"{where}.weighted_clusters", f"{len(clusters)} weighted "
                              "clusters; meshaccel maps a VIP to exactly one cluster")
    if not tp.cluster:
        raise ValidationError(f"{where}.cluster", "tcp_proxy names no cluster")
    return tp.cluster


def _hcm_target(hcm: hcm_pb2.HttpConnectionManager, where: str) -> tuple[str | None, str | None]:
    kind = hcm.WhichOneof("route_specifier")
    if kind == "rds":
        if not hcm.rds.route_config_name:
            raise ValidationError(f"{where}.rds.route_config_name", "missing")
        return None, hcm.rds.route_config_name
    if kind == "route_config":
        return _route_cluster(hcm.route_config, f"{where}.route_config"), None
    raise ValidationError(f"{where}.route_specifier", f"{kind or 'no route'} is not "
                          "supported; use an inline route_config or rds")


def _route_cluster(rc: route_pb2.RouteConfiguration, where: str | None = None) -> str:
    """The one cluster that a catch-all single-virtual-host route config sends everything to."""
    where = where or f"RouteConfiguration[{rc.name}]"
    if rc.HasField("vhds"):
        raise ValidationError(f"{where}.vhds", "VHDS is not supported")
    if len(rc.virtual_hosts) != 1:
        raise ValidationError(f"{where}.virtual_hosts", f"{len(rc.virtual_hosts)} virtual "
                              "hosts; meshaccel needs exactly one with domains [\"*\"]")
    vh = rc.virtual_hosts[0]
    vw = f"{where}.virtual_hosts[0]"
    if "*" not in vh.domains:
        raise ValidationError(f"{vw}.domains", f"{list(vh.domains)} does not include \"*\": "
                              "the kernel path cannot match on HTTP host names")
    if not vh.routes:
        raise ValidationError(f"{vw}.routes", "no routes")
    cluster = None
    catch_all = False
    for i, r in enumerate(vh.routes):
        rw = f"{vw}.routes[{i}]"
        if r.WhichOneof("action") != "route":
            raise ValidationError(rw, f"action {r.WhichOneof('action')!r} is not supported; "
                                  "expected route to a cluster")
        c = _route_action_cluster(r.route, f"{rw}.route")
        if cluster is not None and c != cluster:
            raise ValidationError(f"{rw}.route", f"routes to {c!r} while an earlier route "
                                  f"goes to {cluster!r}; all traffic must go to one cluster")
        cluster = c
        m = r.match
        if m.WhichOneof("path_specifier") == "prefix" and m.prefix in ("", "/") and \
                not m.headers and not m.query_parameters:
            catch_all = True
    if not catch_all:
        raise ValidationError(f"{vw}.routes", "no catch-all route (match prefix \"\" or "
                              "\"/\"): the kernel path cannot match on requests")
    assert cluster is not None
    return cluster


def _route_action_cluster(ra: route_components_pb2.RouteAction, where: str) -> str:
    kind = ra.WhichOneof("cluster_specifier")
    if kind == "cluster" and ra.cluster:
        return ra.cluster
    if kind == "weighted_clusters" and len(ra.weighted_clusters.clusters) == 1:
        return ra.weighted_clusters.clusters[0].name
    raise ValidationError(f"{where}.{kind or 'cluster'}", "expected exactly one cluster")


_STATIC_TYPES = (cluster_pb2.Cluster.STATIC, cluster_pb2.Cluster.STRICT_DNS,
                 cluster_pb2.Cluster.LOGICAL_DNS)


def _cluster_eds_name(c: cluster_pb2.Cluster) -> str | None:
    """The ClusterLoadAssignment name an EDS cluster needs, None for inline endpoints."""
    where = f"Cluster[{c.name}]"
    if c.WhichOneof("cluster_discovery_type") == "cluster_type":
        raise ValidationError(f"{where}.cluster_type", f"custom cluster type "
                              f"{c.cluster_type.name!r} is not supported")
    if c.type == cluster_pb2.Cluster.EDS:
        return c.eds_cluster_config.service_name or c.name
    if c.type in _STATIC_TYPES:
        return None
    # An open enum: a newer control plane may send a value this build has no name for.
    kind = cluster_pb2.Cluster.DiscoveryType.DESCRIPTOR.values_by_number.get(c.type)
    raise ValidationError(f"{where}.type", f"{kind.name if kind else c.type} is not supported; "
                          "use EDS or STATIC/STRICT_DNS with IP addresses")


def cluster_eds_names(clusters: Mapping[str, cluster_pb2.Cluster]) -> set[str]:
    """What to ask EDS for; clusters this mapping cannot use are skipped, not errors."""
    out = set()
    for c in clusters.values():
        try:
            n = _cluster_eds_name(c)
        except ValidationError:
            continue
        if n:
            out.add(n)
    return out


def listener_rds_names(listeners: Mapping[str, listener_pb2.Listener]) -> set[str]:
    out = set()
    for name, lst in listeners.items():
        f = _front(name, lst)
        if f and f.route:
            out.add(f.route)
    return out


def endpoints_of(cla: endpoint_pb2.ClusterLoadAssignment, where: str) -> tuple[Endpoint, ...]:
    """Flatten localities and priorities into weighted endpoints (README: "xDS mapping")."""
    rows = []  # (priority, locality index, address, port, weight, healthy, path)
    loc_weights: dict[int, int | None] = {}
    for li, loc in enumerate(cla.endpoints):
        lw = f"{where}.endpoints[{li}]"
        if loc.HasField("leds_cluster_locality_config"):
            raise ValidationError(f"{lw}.leds_cluster_locality_config", "LEDS is not supported")
        loc_weights[li] = loc.load_balancing_weight.value if \
            loc.HasField("load_balancing_weight") else None
        for ei, lbe in enumerate(loc.lb_endpoints):
            ew = f"{lw}.lb_endpoints[{ei}]"
            if lbe.WhichOneof("host_identifier") != "endpoint":
                raise ValidationError(f"{ew}.endpoint_name", "named endpoints are not supported")
            ep_addr = lbe.endpoint.address
            if ep_addr.WhichOneof("address") != "socket_address":
                raise ValidationError(f"{ew}.endpoint.address", "expected a socket_address")
            addr, port = _socket_address(ep_addr.socket_address,
                                         f"{ew}.endpoint.address.socket_address")
            weight = lbe.load_balancing_weight.value if \
                lbe.HasField("load_balancing_weight") else 1
            if weight < 1:
                raise ValidationError(f"{ew}.load_balancing_weight", "must be >= 1")
            rows.append((loc.priority, li, addr, port, weight,
                         lbe.health_status in USED_HEALTH, ew))
    if not rows:
        return ()
    healthy_prios = sorted({r[0] for r in rows if r[5]})
    active = healthy_prios[0] if healthy_prios else min(r[0] for r in rows)
    act = [r for r in rows if r[0] == active]
    weighted_mode = any(loc_weights[li] is not None for li in {r[1] for r in act})
    live_locs = {li for li in {r[1] for r in act} if not weighted_mode or loc_weights[li]}

    weights: dict[int, int] = {}
    healthy: dict[int, bool] = {}
    for i, r in enumerate(rows):
        healthy[i] = r[5] and r[0] == active and r[1] in live_locs
        weights[i] = r[4]
    if weighted_mode and len(live_locs) > 1:
        # Each locality gets its weight's share of traffic, split inside by endpoint weight
        # (Envoy's locality-weighted LB and gRPC's weighted_target both work this way).
        sums: dict[int, int] = {}
        for i, r in enumerate(rows):
            if healthy[i]:
                sums[r[1]] = sums.get(r[1], 0) + r[4]
        shares = {i: Fraction(loc_weights[rows[i][1]] * rows[i][4], sums[rows[i][1]])
                  for i in range(len(rows)) if healthy[i]}
        if shares:
            lcm = math.lcm(*(f.denominator for f in shares.values()))
            ints = {i: int(f * lcm) for i, f in shares.items()}
            g = math.gcd(*ints.values())
            weights.update({i: v // g for i, v in ints.items()})
    top = max(weights.values())
    if top > MAX_WEIGHT:  # keep the ratios as well as 16 bits allow
        weights = {i: max(1, round(w * MAX_WEIGHT / top)) for i, w in weights.items()}

    out: dict[tuple[IPAddress, int], Endpoint] = {}
    paths: dict[tuple[IPAddress, int], str] = {}
    for i, r in enumerate(rows):
        key = (r[2], r[3])
        ep = Endpoint(r[2], r[3], weights[i], healthy[i])
        if key in out:
            # The same address in a standby priority is only a fallback: the active one wins.
            if out[key].healthy and healthy[i]:
                raise ValidationError(r[6], f"duplicate endpoint {ep} (also at {paths[key]})")
            if healthy[i]:
                out[key], paths[key] = ep, r[6]
            continue
        out[key], paths[key] = ep, r[6]
    return tuple(out.values())


# --------------------------------------------------------------------------- table -> resources


def _pack(msg: message.Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _sockaddr(addr: IPAddress, port: int, protocol: str = "TCP") -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(
        address=str(addr), port_value=port,
        protocol=_UDP if protocol == "UDP" else _TCP))


def vip_listener(svc: Service) -> listener_pb2.Listener:
    # Like a sidecar's outbound listener: Envoy matches the VIP without binding it.
    lst = listener_pb2.Listener(name=f"{svc.name}.vip",
                                address=_sockaddr(svc.vip, svc.port, svc.protocol),
                                bind_to_port=wrappers_pb2.BoolValue(value=False),
                                traffic_direction=base_pb2.OUTBOUND)
    if svc.protocol == "UDP":
        # Envoy proxies UDP with a listener filter, not a network filter chain.
        lst.listener_filters.append(listener_components_pb2.ListenerFilter(
            name="envoy.filters.udp_listener.udp_proxy",
            typed_config=_pack(udp_proxy_pb2.UdpProxyConfig(stat_prefix=svc.name,
                                                            cluster=svc.name))))
    else:
        lst.filter_chains.append(listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.tcp_proxy",
                typed_config=_pack(tcp_proxy_pb2.TcpProxy(stat_prefix=svc.name,
                                                          cluster=svc.name)))]))
    if svc.edge:
        lst.metadata.filter_metadata[META_KEY].CopyFrom(
            struct_pb2.Struct(fields={"edge": struct_pb2.Value(bool_value=True)}))
    return lst


def api_listener(svc: Service) -> listener_pb2.Listener:
    """What gRPC's proxyless client resolves for xds:///<service>."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=svc.name,
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=f"{svc.name}.route"),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                                         typed_config=_pack(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=svc.name, api_listener=api_listener_pb2.ApiListener(api_listener=_pack(hcm)))


def route_config(svc: Service) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=f"{svc.name}.route", virtual_hosts=[
        route_components_pb2.VirtualHost(
            name=svc.name, domains=["*"],
            routes=[route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix=""),
                route=route_components_pb2.RouteAction(cluster=svc.name))])])


def cluster(svc: Service) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=svc.name, type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads_source()),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)


def load_assignment(svc: Service) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=svc.name, endpoints=[
        endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(),
            load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(
                        address=_sockaddr(ep.address, ep.port)),
                    health_status=health_check_pb2.HEALTHY if ep.healthy
                    else health_check_pb2.UNHEALTHY,
                    load_balancing_weight=wrappers_pb2.UInt32Value(value=ep.weight))
                for ep in svc.endpoints])])


def service_resources(svc: Service) -> dict[str, list[message.Message]]:
    """Everything one service contributes, by type."""
    return {LISTENER: [vip_listener(svc), api_listener(svc)], ROUTE: [route_config(svc)],
            CLUSTER: [cluster(svc)], ENDPOINT: [load_assignment(svc)]}


def merge(table: ServiceTable, per_service) -> dict[str, dict[str, object]]:
    """Combine per-service items ({type: [(name, item)]}) into {type: {name: item}}; two
    services may not produce the same resource name (e.g. services "a.vip" and "a")."""
    out: dict[str, dict[str, object]] = {t: {} for t in PUSH_ORDER}
    for svc in table.services:
        for t, items in per_service(svc).items():
            for name, item in items:
                if name in out[t]:
                    raise ValidationError(f"services[{svc.name}]", f"{KIND[t]} name {name!r} "
                                          "clashes with another service's")
                out[t][name] = item
    return out


def mesh_cluster(table: ServiceTable) -> cluster_pb2.Cluster | None:
    """The table-wide settings as a cluster (None when they are the defaults)."""
    if not table.mesh_cidrs and table.guard == Guard():
        return None
    g = table.guard
    meta = struct_pb2.Struct()
    meta.update({"mesh_cidrs": [str(n) for n in table.mesh_cidrs],
                 "guard": {"deny": [str(n) for n in g.deny], "syn_rate": g.syn_rate,
                           "syn_burst": g.syn_burst}})
    c = cluster_pb2.Cluster(name=MESH_CLUSTER, type=cluster_pb2.Cluster.STATIC)
    c.metadata.filter_metadata[META_KEY].CopyFrom(meta)
    return c


def merge_mesh(table: ServiceTable, parts: dict, item) -> None:
    """Add the mesh-settings cluster (`item` wraps it as the caller stores resources)."""
    c = mesh_cluster(table)
    if c is None:
        return
    if MESH_CLUSTER in parts[CLUSTER]:
        raise ValidationError(f"services[{MESH_CLUSTER}]", f"the name {MESH_CLUSTER!r} is "
                              "reserved for the mesh-wide settings")
    parts[CLUSTER][MESH_CLUSTER] = item(c)


def to_resources(table: ServiceTable) -> Resources:
    parts = merge(table, lambda svc: {t: [(resource_name(m), m) for m in msgs]
                                      for t, msgs in service_resources(svc).items()})
    merge_mesh(table, parts, lambda c: c)
    return Resources(*(parts[t] for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)))  # type: ignore


def pack_all(items: Mapping[str, message.Message]) -> dict[str, any_pb2.Any]:
    return {name: _pack(msg) for name, msg in items.items()}
