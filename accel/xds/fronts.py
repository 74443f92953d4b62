"""What a Listener (with its RouteConfiguration) and a Cluster say about a service, at L4:
the VIP:port, protocol and name, the cluster traffic goes to, where its endpoints come from,
and which of the resource's features the kernel path ignores.

A valid resource is never an error for what the kernel cannot do. Filters before the
proxy (istio.stats, metadata exchange, rbac, wasm, ...), listener filters, TLS contexts are
ignored and named (`Front.ignored`); a listener whose plain-TCP traffic does not end in one
cluster (L7 routing, an unknown proxy, a matcher tree) is a `Skipped` with the reason, left
to the kernel path. Only malformed input (a bad address or port, a missing required field)
raises ValidationError, which NACKs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.udp_proxy.v3 import udp_proxy_pb2

from accel.model import (
    ANY_PORT,
    DEFAULT_FASTPATH,
    NO_LIMITS,
    IPAddress,
    Limits,
    ValidationError,
    check_fastpath,
    check_vip,
)
from accel.xds.decode import socket_address, typed
from accel.xds.kinds import HCM, META_KEY, TCP_PROXY, UDP_PROXY
from accel.xds.qos import is_ratelimit, limits_of, meta_bandwidth

_TCP, _UDP = address_pb2.SocketAddress.TCP, address_pb2.SocketAddress.UDP


# Where a listener sends traffic: one cluster, or several sharing it by weight
# (weighted_clusters: Kuma's splits, Istio's canaries), as (cluster, weight) pairs.
Split = tuple[tuple[str, int], ...]
Target = str | Split


class Skip(Exception):  # noqa: N818 -- not an error: a valid resource the kernel path leaves
    """Valid, but no L4 service the kernel path can take: left to the kernel, reported."""


@dataclass(frozen=True)
class Skipped:
    """A listener (or one of its virtual hosts) left on the kernel path, and why; its
    VIP:port when it names one."""

    listener: str
    reason: str
    vip: IPAddress | None = None
    port: int = 0
    protocol: str = "TCP"


@dataclass(frozen=True)
class Front:
    """What a listener contributes: its VIP and where it sends traffic."""

    listener: str
    vip: IPAddress
    port: int
    protocol: str
    cluster: Target | None  # None: behind an RDS route config not yet known
    route: str | None  # RDS name when the cluster comes from a RouteConfiguration
    service: str | None  # from metadata
    edge: bool
    fastpath: str = DEFAULT_FASTPATH  # from metadata
    ignored: tuple[str, ...] = ()  # features the kernel path does not apply (reported)
    # A wildcard listener (0.0.0.0_PORT): its services are the virtual hosts whose domains
    # name an IP; `vip` is the unspecified address until the route config expands it.
    wildcard: bool = False
    # A chain of a transparent (original_dst) listener: its prefixes are destinations, so a
    # chain to the original destination (passthrough) is no VIP left to the kernel path.
    transparent: bool = False
    limits: Limits = NO_LIMITS  # local_ratelimit in its chain, bandwidth in its metadata


def front(name: str, lst: listener_pb2.Listener) -> list[Front | Skipped]:
    """The listener's services, and a Skipped for each part that has none the kernel path
    can take; [] for listeners that are not about a VIP at all (gRPC proxyless,
    internal)."""
    where = f"Listener[{name}]"
    if lst.HasField("api_listener") or lst.address.WhichOneof("address") is None:
        return []  # gRPC proxyless and internal listeners: no VIP for the datapath
    if lst.address.WhichOneof("address") != "socket_address":
        # A pipe or an internal listener has no VIP:port the datapath could match.
        return []
    sa = lst.address.socket_address
    service, edge, fastpath = _meta(lst, where)
    if sa.protocol not in (_TCP, _UDP):
        raise ValidationError(f"{where}.address.socket_address.protocol",
                              f"unsupported protocol {sa.protocol}")
    protocol = "UDP" if sa.protocol == _UDP else "TCP"
    if lst.traffic_direction == base_pb2.INBOUND:
        # The proxy's own ingress (Kuma's inbound:POD_IP:PORT to localhost, Consul's
        # public_listener): its address is this workload, not a service clients dial.
        socket_address(sa, f"{where}.address.socket_address")
        return [Skipped(name, "an INBOUND listener: the workload's own ingress, not a "
                        "service")]
    if lst.use_original_dst.value or _has_original_dst(lst):
        # Transparent (Consul's outbound listener, Istio's virtualOutbound): the address is
        # where traffic is redirected to, the services are its chains' destinations.
        socket_address(sa, f"{where}.address.socket_address")
        return _transparent(name, lst, where, protocol, edge, fastpath)
    try:
        wildcard = ipaddress.ip_address(sa.address).is_unspecified
    except ValueError:
        wildcard = False  # socket_address says what is wrong with it
    vip, port = socket_address(sa, f"{where}.address.socket_address")
    if not wildcard:
        try:
            check_vip(vip, "")
        except ValidationError as e:
            # Valid for Envoy (Kuma's and Consul's explicit upstreams listen on 127.0.0.1:PORT
            # in the app's own pod), but no address the kernel may balance in every pod.
            return [Skipped(name, f"its address {e.reason}", None, port, protocol)]
    try:
        (cluster, route), ignored = _listener_target(lst, where, protocol, vip, port)
        if wildcard and route is None:
            raise Skip(f"a wildcard address ({vip}) without a route configuration: no VIP")
    except Skip as e:
        return [Skipped(name, str(e), None if wildcard else vip, port, protocol)]
    return [Front(name, vip, port, protocol, cluster, route, service, edge, fastpath, ignored,
                  wildcard, limits=_limits(lst, where, protocol, wildcard))]


def _limits(lst: listener_pb2.Listener, where: str, protocol: str, wildcard: bool) -> Limits:
    """The service's QoS (accel/xds/qos.py): the plain chain's local rate limit, the
    metadata's bandwidth. A wildcard listener's chain serves many services: none taken."""
    meta = lst.metadata.filter_metadata.get(META_KEY)
    bandwidth = meta_bandwidth(meta, f"{where}.metadata.filter_metadata.{META_KEY}") \
        if meta is not None else 0
    chain = None
    if protocol == "TCP" and not wildcard:
        chain, where = _plain_chain(lst, where)
    return limits_of(chain, where, bandwidth)


def _transparent(name: str, lst: listener_pb2.Listener, where: str, protocol: str, edge: bool,
                 fastpath: str) -> list[Front | Skipped]:
    """Each chain matching host prefixes (/32, /128), for plain connections, is a service
    per prefix: VIP:port -> the chain's cluster with a destination_port, the VIP on every
    port (ANY_PORT) without one (Consul's upstreams: `prefix_ranges` of the service's
    virtual IP and ClusterIP). A chain for a wider range (passthrough) is not a service;
    nor is a chain whose cluster is the original destination (checked with the cluster)."""
    out: list[Front | Skipped] = []
    for i, chain in enumerate(lst.filter_chains):
        m = chain.filter_chain_match
        cw = f"{where}.filter_chains[{i}]"
        hosts = []
        for j, pr in enumerate(m.prefix_ranges):
            try:
                full = 128 if ":" in pr.address_prefix else 32  # no prefix_len: one host
                plen = pr.prefix_len.value if pr.HasField("prefix_len") else full
                net = ipaddress.ip_network(f"{pr.address_prefix}/{plen}", strict=False)
            except ValueError:
                raise ValidationError(f"{cw}.filter_chain_match.prefix_ranges[{j}]",
                                      f"{pr.address_prefix!r} is not a CIDR") from None
            if net.num_addresses == 1:
                hosts.append(net.network_address)
        if not hosts:
            continue  # passthrough and catch-all chains: destinations, not services
        if m.server_names or m.application_protocols or \
                m.transport_protocol not in ("", "raw_buffer"):
            continue  # the TLS or HTTP twin of a plain chain
        port = m.destination_port.value if m.HasField("destination_port") else ANY_PORT
        if m.HasField("destination_port") and not 1 <= port <= 65535:
            raise ValidationError(f"{cw}.filter_chain_match.destination_port",
                                  f"port {port} is out of range 1-65535")
        several = len(hosts) > 1
        if _by_source(m):
            out.extend(Skipped(_label(name, chain.name or i, h, several), "the chain "
                               "matches some sources only, and the kernel balances every "
                               "client alike", h, port, protocol) for h in hosts)
            continue
        try:
            (cluster, route), ignored = _chain_target(chain, cw, hosts[0], port,
                                                      _listener_filters(lst))
        except Skip as e:
            out.extend(Skipped(_label(name, chain.name or i, h, several), str(e), h, port,
                               protocol) for h in hosts)
            continue
        tag = chain.name or (cluster if isinstance(cluster, str) or cluster is None
                             else cluster[0][0]) or route or i
        chain_edge = edge
        if edge and port == ANY_PORT:
            chain_edge, ignored = False, (*ignored, "edge (the XDP edge balances a VIP:port)")
        for host in hosts:
            if host.is_loopback or host.is_multicast or host.is_unspecified:
                out.append(Skipped(_label(name, tag, host, several),
                                   f"{host} is not a service address"))
                continue
            out.append(Front(_label(name, tag, host, several), host, port, protocol, cluster,
                             route, None, chain_edge, fastpath, ignored, transparent=True))
    if not out:
        out.append(Skipped(name, "an original_dst (transparent) listener without "
                           "chains for a VIP:port: its destinations are not services"))
    return out


def _label(listener: str, tag: object, host: IPAddress, several: bool) -> str:
    """A transparent chain's name in reports: its own name, else its cluster's (stable as
    chains come and go), else its index; per host when it matches several."""
    return f"{listener}/{tag}" + (f"@{host}" if several else "")


def _has_original_dst(lst: listener_pb2.Listener) -> bool:
    return any(lf.name == "envoy.filters.listener.original_dst"
               or lf.typed_config.type_url.endswith(".OriginalDst")
               for lf in lst.listener_filters)


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


def _listener_target(lst: listener_pb2.Listener, where: str, protocol: str, vip: IPAddress,
                     port: int) -> tuple[tuple[Target | None, str | None], tuple[str, ...]]:
    """((cluster, rds name), ignored features) of the filter chain a plain TCP connection
    (or the UDP proxy) would take. Raises Skip when that is not one cluster."""
    ignored = _listener_filters(lst)
    if protocol == "UDP":
        for i, lf in enumerate(lst.listener_filters):
            if lf.HasField("typed_config") and lf.typed_config.type_url == UDP_PROXY:
                up = typed(lf.typed_config, udp_proxy_pb2.UdpProxyConfig,
                            f"{where}.listener_filters[{i}].typed_config")
                if not up.cluster:
                    raise Skip("a udp_proxy routing by matcher, not to one cluster")
                return (up.cluster, None), tuple(ignored)
        # Network filter chains on UDP are QUIC's (HTTP/3); a dns_filter answers itself.
        raise Skip("a UDP listener without a udp_proxy to one cluster"
                   + (f" ({', '.join(i.removeprefix('listener filter ') for i in ignored)})"
                      if ignored else ""))
    if lst.HasField("filter_chain_matcher"):
        raise Skip("filter_chain_matcher: its match tree is not evaluated for L4")
    chain, cwhere = _plain_chain(lst, where, prefer_http=vip.is_unspecified)
    return _chain_target(chain, cwhere, vip, port, ignored)


def _listener_filters(lst: listener_pb2.Listener) -> list[str]:
    """The listener filters the kernel path does not apply (all but udp_proxy), named."""
    return [f"listener filter {lf.name or lf.typed_config.type_url}"
            for lf in lst.listener_filters
            if not (lf.HasField("typed_config") and lf.typed_config.type_url == UDP_PROXY)]


def _chain_target(chain: listener_components_pb2.FilterChain, cwhere: str,
                  vip: IPAddress, port: int, ignored: list[str]
                  ) -> tuple[tuple[Target | None, str | None], tuple[str, ...]]:
    """Where one filter chain's last filter sends a connection; filters before it and
    the chain's TLS are ignored (named in the result)."""
    if chain.HasField("transport_socket"):
        ignored.append(f"transport_socket {chain.transport_socket.name or 'TLS'}")
    fpath = f"{cwhere}.filters"
    filters = chain.filters
    if not filters:
        raise Skip("the filter chain a plain connection takes has no filters")
    for i, flt in enumerate(filters):
        fw = f"{fpath}[{i}]"
        if not flt.HasField("typed_config") and not flt.HasField("config_discovery"):
            raise ValidationError(f"{fw}.typed_config", f"filter {flt.name!r} has no "
                                  "typed_config")
        if i < len(filters) - 1:
            if is_ratelimit(flt):
                continue  # applied: the service's connection limit (accel/xds/qos.py)
            # Stats, metadata exchange, rbac, wasm, ...: the kernel path applies none.
            ignored.append(f"network filter {flt.name or flt.typed_config.type_url}")
            continue
        if flt.HasField("config_discovery"):
            raise Skip(f"its last filter {flt.name!r} comes from filter config discovery "
                       "(ECDS)")
        t = flt.typed_config.type_url
        if t == TCP_PROXY:
            tp = typed(flt.typed_config, tcp_proxy_pb2.TcpProxy, f"{fw}.typed_config")
            return (_tcp_proxy_cluster(tp, f"{fw}.typed_config"), None), tuple(ignored)
        if t == HCM:
            hcm = typed(flt.typed_config, hcm_pb2.HttpConnectionManager, f"{fw}.typed_config")
            names = [h.name for h in hcm.http_filters if h.name != "envoy.filters.http.router"]
            if names:
                ignored.append("http filters " + ", ".join(names))
            return _hcm_target(hcm, f"{fw}.typed_config", vip, port), tuple(ignored)
        raise Skip(f"its filter chain ends in {flt.name or t!r}, not a tcp_proxy or an "
                   "HTTP connection manager")
    raise AssertionError("unreachable")


def _by_source(m: listener_components_pb2.FilterChainMatch) -> bool:
    """A match some clients fail by where they connect from."""
    return bool(m.source_prefix_ranges or m.direct_source_prefix_ranges or m.source_ports
                or m.source_type != listener_components_pb2.FilterChainMatch.ANY)


def _not_every_plain_connection(m: listener_components_pb2.FilterChainMatch) -> bool:
    """A match that plain TCP to the VIP may fail: by TLS, ALPN, SNI, or addresses."""
    return bool(m.server_names or m.application_protocols
                or m.transport_protocol not in ("", "raw_buffer") or m.prefix_ranges
                or _by_source(m))


def _plain_chain(lst: listener_pb2.Listener, where: str, prefer_http: bool = False
                 ) -> tuple[listener_components_pb2.FilterChain, str]:
    """The chain a plain TCP connection (no TLS, no ALPN, no SNI) matches: the one for
    transport_protocol raw_buffer without application protocols, else the one with no
    match at all, else default_filter_chain. Raises Skip when there is none.

    `prefer_http` (a wildcard listener, Istio's 0.0.0.0_PORT): its services are those of
    the HTTP chain's routes, which an HTTP client's plain connection reaches (ALPN
    http/1.1 or h2c, as http_inspector sniffs it), so that chain comes first."""
    chains = list(lst.filter_chains)
    seen: dict[bytes, int] = {}
    for i, c in enumerate(chains):
        key = c.filter_chain_match.SerializeToString(deterministic=True)
        if key in seen:  # Envoy refuses such a listener too
            raise ValidationError(f"{where}.filter_chains[{i}].filter_chain_match",
                                  f"the same match as filter_chains[{seen[key]}]")
        seen[key] = i
    if prefer_http:
        for i, c in enumerate(chains):
            m = c.filter_chain_match
            if c.filters and c.filters[-1].typed_config.type_url == HCM and \
                    set(m.application_protocols) <= {"http/1.1", "h2c", "http/1.0"} and \
                    not m.server_names and m.transport_protocol in ("", "raw_buffer"):
                return c, f"{where}.filter_chains[{i}]"
    best: tuple[int, int] | None = None  # (rank, index): lower rank wins
    for i, c in enumerate(chains):
        m = c.filter_chain_match
        if _not_every_plain_connection(m):
            continue  # TLS/ALPN/SNI or by-address chains: not every plain connection
        port = lst.address.socket_address.port_value
        if m.HasField("destination_port") and m.destination_port.value != port:
            continue
        rank = 0 if m.transport_protocol == "raw_buffer" else 1
        if best is None or rank < best[0]:
            best = (rank, i)
    if best is not None:
        return chains[best[1]], f"{where}.filter_chains[{best[1]}]"
    if lst.HasField("default_filter_chain"):
        return lst.default_filter_chain, f"{where}.default_filter_chain"
    if not chains:
        raise ValidationError(f"{where}.filter_chains", "no filter chain and no "
                              "default_filter_chain")
    raise Skip("no filter chain a plain TCP connection matches (TLS, SNI or source "
               "matches only)")


def _tcp_proxy_cluster(tp: tcp_proxy_pb2.TcpProxy, where: str) -> Target:
    if tp.WhichOneof("cluster_specifier") == "weighted_clusters":
        return weighted(tp.weighted_clusters.clusters, f"{where}.weighted_clusters")
    if not tp.cluster:
        raise ValidationError(f"{where}.cluster", "tcp_proxy names no cluster")
    return tp.cluster


def weighted(clusters, where: str) -> Target:
    """weighted_clusters (a tcp_proxy's or a route's) as one cluster, or a Split that keeps
    the weights; a cluster named twice gets both weights, weight 0 gets no traffic."""
    if not clusters:
        raise ValidationError(f"{where}.clusters", "empty")
    out: dict[str, int] = {}
    for i, wc in enumerate(clusters):
        if not wc.name:
            if getattr(wc, "cluster_header", ""):
                raise Skip("a weighted cluster is named by a request header")
            raise ValidationError(f"{where}.clusters[{i}].name", "empty cluster name")
        # A route's weight is a UInt32Value (unset: 0, as Envoy reads it), tcp_proxy's a
        # plain uint32.
        w = wc.weight.value if hasattr(wc.weight, "value") else wc.weight
        out[wc.name] = out.get(wc.name, 0) + w
    if len(out) == 1:
        return next(iter(out))  # one cluster: all the traffic, whatever its weight says
    live = tuple((n, w) for n, w in out.items() if w > 0)
    if not live:
        raise Skip("every weighted cluster has weight 0")
    return live[0][0] if len(live) == 1 else live


def _hcm_target(hcm: hcm_pb2.HttpConnectionManager, where: str, vip: IPAddress,
                port: int) -> tuple[str | None, str | None]:
    kind = hcm.WhichOneof("route_specifier")
    if kind == "rds":
        if not hcm.rds.route_config_name:
            raise ValidationError(f"{where}.rds.route_config_name", "missing")
        return None, hcm.rds.route_config_name
    if kind == "route_config":
        if vip.is_unspecified:
            raise Skip("a wildcard listener with an inline route config (not followed)")
        return route_cluster(hcm.route_config, f"{where}.route_config", vip, port), None
    if kind is None:
        raise ValidationError(f"{where}.route_specifier", "missing: give rds or route_config")
    raise Skip(f"its routes come from {kind}, which meshaccel does not follow")


def route_cluster(rc: route_pb2.RouteConfiguration, where: str | None = None,
                  vip: IPAddress | None = None, port: int = 0) -> Target:
    """The cluster(s) the route config sends every request for this VIP to: the virtual
    host whose domains name the VIP (bare or with the port), else the catch-all "*" one.
    Raises Skip when requests are split by L7 attributes (the kernel sees no request)."""
    where = where or f"RouteConfiguration[{rc.name}]"
    if rc.HasField("vhds"):
        raise Skip("its virtual hosts come from VHDS, which meshaccel does not follow")
    i = _vhost_for(rc, vip, port)
    if i is None:
        raise Skip("no virtual host matches " + (f"{_host(vip, port)} or " if vip else "")
                   + "\"*\"")
    return vhost_cluster(rc.virtual_hosts[i], f"{where}.virtual_hosts[{i}]")


def _host(vip: IPAddress | None, port: int) -> str:
    return f"[{vip}]:{port}" if vip is not None and vip.version == 6 else f"{vip}:{port}"


def _vhost_for(rc: route_pb2.RouteConfiguration, vip: IPAddress | None, port: int) -> int | None:
    wild = None
    for i, vh in enumerate(rc.virtual_hosts):
        if vip is not None and any(domain_vip(d, port) == vip for d in vh.domains):
            return i
        if "*" in vh.domains and wild is None:
            wild = i
    return wild


def domain_vip(domain: str, port: int) -> IPAddress | None:
    """The IP a virtual host domain names for a listener on `port` ("10.0.0.1",
    "10.0.0.1:9080", "[fd00::1]:9080"); None for host names and other ports."""
    host, has_port, p = domain, False, ""
    if domain.startswith("["):
        host, _, rest = domain[1:].partition("]")
        has_port, p = rest.startswith(":"), rest[1:]
    elif domain.count(":") == 1:
        host, _, p = domain.partition(":")
        has_port = True
    if has_port and p != str(port):
        return None
    try:
        a = ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if a.is_unspecified or a.is_multicast or a.is_loopback else a


def vhost_cluster(vh: route_components_pb2.VirtualHost, vw: str) -> Target:
    """The cluster (or weighted clusters) every request of this virtual host goes to;
    Skip when requests are told apart by L7 attributes."""
    if not vh.routes:
        raise Skip(f"virtual host {vh.name!r} has no routes")
    cluster = None
    for i, r in enumerate(vh.routes):
        action = r.WhichOneof("action")
        if action != "route":
            raise Skip(f"virtual host {vh.name!r} route {i} is a {action}, not a route to a "
                       "cluster")
        c = _route_action_cluster(r.route, f"{vw}.routes[{i}].route")
        if r.route.request_mirror_policies:
            raise Skip(f"virtual host {vh.name!r} mirrors requests to another cluster")
        if cluster is not None and c != cluster:
            raise Skip(f"virtual host {vh.name!r} sends requests to {cluster!r} and {c!r} "
                       "by L7 attributes")
        cluster = c
        m = r.match
        if m.WhichOneof("path_specifier") in ("prefix", "path_separated_prefix") and \
                m.prefix in ("", "/") and not m.headers and not m.query_parameters:
            return cluster  # the catch-all: later routes are never reached
    raise Skip(f"virtual host {vh.name!r} has no catch-all route (prefix \"/\"): "
               "requests it does not match are not sent to a cluster")


def _route_action_cluster(ra: route_components_pb2.RouteAction, where: str) -> Target:
    kind = ra.WhichOneof("cluster_specifier")
    if kind == "cluster":
        if not ra.cluster:
            raise ValidationError(f"{where}.cluster", "empty cluster name")
        return ra.cluster
    if kind == "weighted_clusters":
        return weighted(ra.weighted_clusters.clusters, f"{where}.weighted_clusters")
    raise Skip(f"the cluster comes from {kind or 'nothing'} (header or plugin), not a name")


_STATIC_TYPES = (cluster_pb2.Cluster.STATIC, cluster_pb2.Cluster.STRICT_DNS,
                 cluster_pb2.Cluster.LOGICAL_DNS)


def cluster_eds_name(c: cluster_pb2.Cluster) -> str | None:
    """The ClusterLoadAssignment name an EDS cluster needs, None for inline endpoints.
    Raises Skip for clusters whose endpoints are not a list of IPs (ORIGINAL_DST, custom
    types such as aggregate clusters)."""
    if c.WhichOneof("cluster_discovery_type") == "cluster_type":
        raise Skip(f"custom cluster type {c.cluster_type.name!r}")
    if c.type == cluster_pb2.Cluster.EDS:
        return c.eds_cluster_config.service_name or c.name
    if c.type in _STATIC_TYPES:
        return None
    # An open enum: a newer control plane may send a value this build has no name for.
    kind = cluster_pb2.Cluster.DiscoveryType.DESCRIPTOR.values_by_number.get(c.type)
    raise Skip(f"cluster type {kind.name if kind else c.type}: no list of endpoints")


def cluster_ignored(c: cluster_pb2.Cluster) -> tuple[str, ...]:
    """A cluster's TLS, named for the report: the proxies' mTLS to the endpoints, which the
    kernel path does not do (a connection goes to the endpoint in plain TCP)."""
    out = []
    if c.HasField("transport_socket"):
        out.append(f"cluster {c.name}: transport_socket {c.transport_socket.name or 'TLS'}")
    if c.transport_socket_matches:
        out.append(f"cluster {c.name}: transport_socket_matches "
                   + ", ".join(m.name or str(i) for i, m in enumerate(c.transport_socket_matches)))
    return tuple(out)


def cluster_eds_names(clusters: Mapping[str, cluster_pb2.Cluster]) -> set[str]:
    """What to ask EDS for; clusters this mapping cannot use are skipped, not errors."""
    out = set()
    for c in clusters.values():
        try:
            n = cluster_eds_name(c)
        except Skip:
            continue
        if n:
            out.add(n)
    return out


def listener_rds_names(listeners: Mapping[str, listener_pb2.Listener]) -> set[str]:
    out = set()
    for name, lst in listeners.items():
        try:
            got = front(name, lst)
        except ValidationError:
            continue  # NACKed by the translation: subscribe to nothing for it
        out.update(f.route for f in got if isinstance(f, Front) and f.route)
    return out
