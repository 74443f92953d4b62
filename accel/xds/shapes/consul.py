"""xDS in the shape Consul (1.1x, transparent proxy) sends a sidecar, over Delta xDS:
built here from the published shapes, not captured.

- one `outbound_listener:127.0.0.1:15001` (OUTBOUND) with the `original_dst` listener
  filter and a default chain tcp_proxy to `original-destination` (ORIGINAL_DST); a chain per
  upstream matching `prefix_ranges` of the upstream's virtual IP (240.0.0.0/4) and its
  Kubernetes ClusterIP, each /32, without `destination_port` (every port): a tcp_proxy
  (`stat_prefix` upstream.NAME.default.default.dc1), or for HTTP upstreams an HTTP
  connection manager with an inline route configuration (a service-splitter's
  weighted_clusters, or a service-router's path matches); chains for terminating-gateway
  destinations with `destination_port`; passthrough chains for upstream pod IPs to
  `passthrough~NAME.default.dc1.internal.TRUST.consul` (ORIGINAL_DST);
- explicit upstream listeners `NAME:127.0.0.1:PORT`, `public_listener:0.0.0.0:20000`
  (INBOUND, rbac, DownstreamTlsContext), `virtual_dns:127.0.0.1:8653` (UDP, dns_filter);
- EDS clusters `NAME.default.dc1.internal.TRUST.consul` with mTLS (UpstreamTlsContext,
  SNI, spiffe SAN), whose endpoints are the upstream's sidecars (pod IP:20000) HEALTHY;
  `local_app` (STATIC 127.0.0.1:8080).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, health_check_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rcp
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.dns_filter.v3 import dns_filter_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from accel.xds import translate as tr
from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, pack, sock

TRUST = "11111111-2222-3333-4444-555555555555"
OUTBOUND = "outbound_listener:127.0.0.1:15001"
PUBLIC_PORT = 20000  # where each sidecar's public listener takes mTLS from its peers
TCP_PROXY = "envoy.filters.network.tcp_proxy"

# name -> ([virtual IP, ClusterIP, ...], [(sidecar IP, port)]): an upstream on every port.
Upstreams = dict[str, tuple[list[str], list[tuple[str, int]]]]


def sni(name: str) -> str:
    """Consul's cluster name (and SNI) of an upstream service."""
    return f"{name}.default.dc1.internal.{TRUST}.consul"


def _tcp(cluster: str, stat: str) -> lc.Filter:
    return lc.Filter(name=TCP_PROXY, typed_config=pack(
        tcp_proxy_pb2.TcpProxy(stat_prefix=stat, cluster=cluster)))


def _http(route_name: str, vhost: str, routes: list[rcp.Route]) -> lc.Filter:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"upstream.{vhost}")
    hcm.http_filters.add(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))
    hcm.tracing.random_sampling.SetInParent()
    hcm.upgrade_configs.add(upgrade_type="websocket")
    hcm.route_config.name = route_name
    hcm.route_config.virtual_hosts.add(name=vhost, domains=["*"], routes=routes)
    return lc.Filter(name="envoy.filters.network.http_connection_manager",
                     typed_config=pack(hcm))


def _match(chain: lc.FilterChain, ips: list[str], port: int | None = None) -> None:
    for ip in ips:
        pr = chain.filter_chain_match.prefix_ranges.add(address_prefix=ip)
        pr.prefix_len.value = 128 if ":" in ip else 32
    if port is not None:
        chain.filter_chain_match.destination_port.value = port


def route(cluster: str | list[tuple[str, int]], prefix: str = "/") -> rcp.Route:
    r = rcp.Route(match=rcp.RouteMatch(prefix=prefix))
    if isinstance(cluster, str):
        r.route.cluster = cluster
    else:  # a service-splitter
        for name, weight in cluster:
            r.route.weighted_clusters.clusters.add(name=name).weight.value = weight
    return r


def mtls_cluster(name: str, service: str) -> cluster_pb2.Cluster:
    c = eds_cluster(name)
    c.eds_cluster_config.eds_config.resource_api_version = config_source_pb2.V3
    c.alt_stat_name = name
    c.connect_timeout.seconds = 5
    c.circuit_breakers.SetInParent()
    c.outlier_detection.SetInParent()
    c.common_lb_config.healthy_panic_threshold.SetInParent()
    tls = tls_pb2.UpstreamTlsContext(sni=name)
    ctx = tls.common_tls_context
    ctx.tls_params.SetInParent()
    leaf = ctx.tls_certificate_sds_secret_configs.add(name="connect-leaf")
    leaf.sds_config.ads.SetInParent()
    san = ctx.validation_context.match_typed_subject_alt_names.add()
    san.san_type = san.URI
    san.matcher.exact = f"spiffe://{TRUST}.consul/ns/default/dc/dc1/svc/{service}"
    c.transport_socket.name = "tls"
    c.transport_socket.typed_config.CopyFrom(pack(tls))
    return c


def sidecars(name: str, eps: list[tuple[str, int]]):
    out = []
    for ip, port in eps:
        e = lbe(ip, port, 1, health_check_pb2.HEALTHY)
        out.append(e)
    return cla(name, locality(*out))


def sidecar_config(tcp: Upstreams, http: Upstreams | None = None,
                   split: dict[str, tuple[list[str], dict[str, tuple[int, list]]]] | None = None,
                   routed: Upstreams | None = None,
                   destinations: dict[str, tuple[str, int, list[tuple[str, int]]]] | None = None,
                   passthrough: dict[str, list[str]] | None = None) -> tr.Resources:
    """A transparent proxy's resources. tcp/http/routed: name -> (its IPs, its sidecars);
    split: name -> (its IPs, {subset: (weight, sidecars)}); destinations: name -> (IP,
    port, gateway endpoints); passthrough: name -> the pod IPs dialed directly."""
    out = listener_pb2.Listener(name=OUTBOUND, address=sock("127.0.0.1", 15001),
                                traffic_direction=base_pb2.OUTBOUND)
    out.listener_filters.add(name="envoy.filters.listener.original_dst",
                             typed_config=pack(original_dst_pb2.OriginalDst()))
    out.default_filter_chain.filters.append(_tcp("original-destination",
                                                 "upstream.original-destination"))
    res = tr.Resources({}, {}, {}, {})

    def add(name: str, service: str, eps: list[tuple[str, int]]) -> None:
        res.clusters[name] = mtls_cluster(name, service)
        res.endpoints[name] = sidecars(name, eps)

    for name, (ips, eps) in tcp.items():
        add(sni(name), name, eps)
        _match(out.filter_chains.add(filters=[_tcp(sni(name),
                                                   f"upstream.{name}.default.default.dc1")]), ips)
    for name, (ips, eps) in (http or {}).items():
        add(sni(name), name, eps)
        _match(out.filter_chains.add(filters=[_http(name, f"{name}.default.default.dc1",
                                                    [route(sni(name))])]), ips)
    for name, (ips, subsets) in (split or {}).items():
        parts = []
        for sub, (weight, eps) in subsets.items():
            add(sni(f"{sub}.{name}"), name, eps)
            parts.append((sni(f"{sub}.{name}"), weight))
        _match(out.filter_chains.add(filters=[_http(name, f"{name}.default.default.dc1",
                                                    [route(parts)])]), ips)
    for name, (ips, eps) in (routed or {}).items():  # a service-router: /admin elsewhere
        add(sni(name), name, eps)
        add(sni(f"{name}-admin"), f"{name}-admin", eps)
        _match(out.filter_chains.add(filters=[_http(name, f"{name}.default.default.dc1", [
            route(sni(f"{name}-admin"), "/admin"), route(sni(name))])]), ips)
    for name, (ip, port, eps) in (destinations or {}).items():
        cname = f"destination.{ip.replace('.', '-')}.{name}.default.dc1.internal.{TRUST}.consul"
        add(cname, name, eps)
        _match(out.filter_chains.add(filters=[_tcp(cname, f"upstream.{cname}")]), [ip], port)
    for name, ips in (passthrough or {}).items():
        cname = f"passthrough~{name}.default.dc1.internal.{TRUST}.consul"
        res.clusters[cname] = cluster_pb2.Cluster(
            name=cname, type=cluster_pb2.Cluster.ORIGINAL_DST,
            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
        _match(out.filter_chains.add(filters=[_tcp(cname, f"upstream.{name}")]), ips)
    res.listeners[out.name] = out
    res.clusters["original-destination"] = cluster_pb2.Cluster(
        name="original-destination", type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)

    # An explicit upstream (the app dials 127.0.0.1:9191), the public listener, the DNS.
    first = next(iter(tcp))
    explicit = listener_pb2.Listener(name=f"{first}:127.0.0.1:9191",
                                     address=sock("127.0.0.1", 9191),
                                     traffic_direction=base_pb2.OUTBOUND)
    explicit.filter_chains.add(filters=[_tcp(sni(first), f"upstream.{first}")])
    public = listener_pb2.Listener(name=f"public_listener:0.0.0.0:{PUBLIC_PORT}",
                                   address=sock("0.0.0.0", PUBLIC_PORT),
                                   traffic_direction=base_pb2.INBOUND)
    chain = public.filter_chains.add(filters=[
        lc.Filter(name="envoy.filters.network.rbac",
                  typed_config=pack(rbac_pb2.RBAC(stat_prefix="connect_authz"))),
        _tcp("local_app", "public_listener")])
    chain.transport_socket.name = "tls"
    chain.transport_socket.typed_config.CopyFrom(pack(tls_pb2.DownstreamTlsContext(
        require_client_certificate={"value": True})))
    dns = listener_pb2.Listener(name="virtual_dns:127.0.0.1:8653",
                                address=sock("127.0.0.1", 8653, udp=True),
                                traffic_direction=base_pb2.OUTBOUND)
    dns.udp_listener_config.SetInParent()
    table = dns_filter_pb2.DnsFilterConfig(stat_prefix="consul_virtual_dns")
    vd = table.server_config.inline_dns_table.virtual_domains.add(
        name=f"{first}.virtual.default.ns.default.ap.dc1.dc.consul")
    vd.endpoint.address_list.address.append(tcp[first][0][0])
    dns.listener_filters.add(name="envoy.filters.udp.dns_filter", typed_config=pack(table))
    for lst in (explicit, public, dns):
        res.listeners[lst.name] = lst
    res.clusters["local_app"] = cluster_pb2.Cluster(
        name="local_app", type=cluster_pb2.Cluster.STATIC,
        load_assignment=cla("local_app", locality(lbe("127.0.0.1", 8080))))
    return res
