"""What a Listener (with its RouteConfiguration) and a Cluster say about a service: the
VIP:port, protocol and name, the cluster traffic goes to, and where its endpoints come from.
Anything the kernel path could not honour (extra filters, matchers, VHDS, ...) is an error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.udp_proxy.v3 import udp_proxy_pb2

from accel.model import DEFAULT_FASTPATH, IPAddress, ValidationError, check_fastpath
from accel.xds.decode import socket_address, typed
from accel.xds.kinds import HCM, META_KEY, TCP_PROXY, UDP_PROXY

_TCP, _UDP = address_pb2.SocketAddress.TCP, address_pb2.SocketAddress.UDP


@dataclass(frozen=True)
class Front:
    """What a listener contributes: its VIP and where it sends traffic."""

    listener: str
    vip: IPAddress
    port: int
    protocol: str
    cluster: str | None  # None: behind an RDS route config not yet known
    route: str | None  # RDS name when the cluster comes from a RouteConfiguration
    service: str | None  # from metadata
    edge: bool
    fastpath: str = DEFAULT_FASTPATH  # from metadata


def front(name: str, lst: listener_pb2.Listener) -> Front | None:
    where = f"Listener[{name}]"
    if lst.HasField("api_listener") or lst.address.WhichOneof("address") is None:
        return None  # gRPC proxyless and internal listeners: no VIP for the datapath
    if lst.address.WhichOneof("address") != "socket_address":
        # A pipe or an internal listener has no VIP:port the datapath could match.
        return None
    sa = lst.address.socket_address
    vip, port = socket_address(sa, f"{where}.address.socket_address", vip=True)
    if sa.protocol not in (_TCP, _UDP):
        raise ValidationError(f"{where}.address.socket_address.protocol",
                              f"unsupported protocol {sa.protocol}")
    protocol = "UDP" if sa.protocol == _UDP else "TCP"
    service, edge, fastpath = _meta(lst, where)
    cluster, route = _listener_target(lst, where, protocol)
    return Front(name, vip, port, protocol, cluster, route, service, edge, fastpath)


def _meta(lst: listener_pb2.Listener, where: str) -> tuple[str | None, bool, str]:
    """The listener's `meshaccel` metadata: service name, edge, fastpath."""
    if META_KEY not in lst.metadata.filter_metadata:
        return None, False, DEFAULT_FASTPATH
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
    fastpath = DEFAULT_FASTPATH
    if "fastpath" in meta.fields:
        v = meta.fields["fastpath"]
        fastpath = check_fastpath(v.string_value if v.WhichOneof("kind") == "string_value"
                                  else v, f"{path}.fastpath")
    return service, edge, fastpath


def _listener_target(lst: listener_pb2.Listener, where: str,
                     protocol: str) -> tuple[str | None, str | None]:
    """(cluster, rds name) from the listener's one filter chain or its UDP proxy."""
    if protocol == "UDP":
        for i, lf in enumerate(lst.listener_filters):
            if lf.HasField("typed_config") and lf.typed_config.type_url == UDP_PROXY:
                up = typed(lf.typed_config, udp_proxy_pb2.UdpProxyConfig,
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
            tp = typed(flt.typed_config, tcp_proxy_pb2.TcpProxy, f"{fw}.typed_config")
            return _tcp_proxy_cluster(tp, f"{fw}.typed_config"), None
        hcm = typed(flt.typed_config, hcm_pb2.HttpConnectionManager, f"{fw}.typed_config")
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
        return route_cluster(hcm.route_config, f"{where}.route_config"), None
    raise ValidationError(f"{where}.route_specifier", f"{kind or 'no route'} is not "
                          "supported; use an inline route_config or rds")


def route_cluster(rc: route_pb2.RouteConfiguration, where: str | None = None) -> str:
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


def cluster_eds_name(c: cluster_pb2.Cluster) -> str | None:
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
            n = cluster_eds_name(c)
        except ValidationError:
            continue
        if n:
            out.add(n)
    return out


def listener_rds_names(listeners: Mapping[str, listener_pb2.Listener]) -> set[str]:
    out = set()
    for name, lst in listeners.items():
        f = front(name, lst)
        if f and f.route:
            out.add(f.route)
    return out
