"""xDS in the shape istiod sends a sidecar (Istio 1.18-1.2x): built here from the published
shapes, not captured. Per-VIP TCP listeners with istio.metadata_exchange and istio.stats
before the tcp_proxy; protocol-sniffing listeners (an HTTP chain for ALPN http/1.1/h2c, a
TCP chain for raw_buffer, a TLS passthrough chain); 0.0.0.0_PORT HTTP listeners whose RDS
route configuration has one virtual host per service (host names and the ClusterIP as
domains) plus allow_any; virtualOutbound (use_original_dst); outbound|port||host EDS
clusters with Istio mTLS transport_socket_matches; PassthroughCluster, BlackHoleCluster,
InboundPassthroughCluster."""

from __future__ import annotations

import ipaddress

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rcp
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2, duration_pb2

from accel.xds import translate as tr
from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, pack, sock

NS = "default"


def host(name: str) -> str:
    return f"{name}.{NS}.svc.cluster.local"


def outbound(name: str, port: int) -> str:
    return f"outbound|{port}||{host(name)}"


def _opaque(type_url: str, value: bytes = b"") -> any_pb2.Any:
    """A filter config this build has no message for (Istio's own extensions)."""
    return any_pb2.Any(type_url=type_url, value=value)


def _istio_tcp_filters(cluster: str) -> list[lc.Filter]:
    return [
        lc.Filter(name="istio.metadata_exchange", typed_config=_opaque(
            "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
            b"\n\x0fistio-peer-exchange")),
        lc.Filter(name="istio.stats", typed_config=_opaque(
            "type.googleapis.com/stats.PluginConfig")),
        lc.Filter(name="envoy.filters.network.tcp_proxy", typed_config=pack(
            tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster,
                                   idle_timeout=duration_pb2.Duration(seconds=3600)))),
    ]


def _hcm(rds: str) -> lc.Filter:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="outbound_0.0.0.0_" + rds)
    hcm.rds.route_config_name = rds
    hcm.rds.config_source.ads.SetInParent()
    for name in ("istio.metadata_exchange", "envoy.filters.http.grpc_stats",
                 "envoy.filters.http.fault", "envoy.filters.http.cors", "istio.stats",
                 "envoy.filters.http.router"):
        hcm.http_filters.add(name=name)
    return lc.Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))


def _listener_filters(lst: listener_pb2.Listener, http: bool) -> None:
    for name in ("envoy.filters.listener.tls_inspector",) + (
            ("envoy.filters.listener.http_inspector",) if http else ()):
        lst.listener_filters.add(name=name, typed_config=_opaque(
            "type.googleapis.com/envoy.extensions.filters.listener."
            + name.rsplit(".", 1)[1] + ".v3." + ("TlsInspector" if "tls" in name
                                                 else "HttpInspector")))


def tcp_service_listener(name: str, vip: str, port: int) -> listener_pb2.Listener:
    """A TCP service: `<vip>_<port>`, bind_to_port false, one chain, stats before proxy."""
    lst = listener_pb2.Listener(name=f"{vip}_{port}", address=sock(vip, port),
                                traffic_direction=base_pb2.OUTBOUND)
    lst.bind_to_port.value = False
    _listener_filters(lst, http=False)
    lst.filter_chains.add(filters=_istio_tcp_filters(outbound(name, port)))
    return lst


def sniffing_listener(name: str, vip: str, port: int) -> listener_pb2.Listener:
    """A port of unknown protocol: HTTP by ALPN, TCP for raw_buffer, TLS passed through."""
    lst = listener_pb2.Listener(name=f"{vip}_{port}", address=sock(vip, port),
                                traffic_direction=base_pb2.OUTBOUND)
    lst.bind_to_port.value = False
    _listener_filters(lst, http=True)
    http = lst.filter_chains.add(filters=[_hcm(f"{host(name)}:{port}")])
    http.filter_chain_match.transport_protocol = "raw_buffer"
    http.filter_chain_match.application_protocols.extend(["http/1.1", "h2c"])
    tcp = lst.filter_chains.add(filters=_istio_tcp_filters(outbound(name, port)))
    tcp.filter_chain_match.transport_protocol = "raw_buffer"
    tls = lst.filter_chains.add(filters=_istio_tcp_filters(outbound(name, port)))
    tls.filter_chain_match.transport_protocol = "tls"
    return lst


def http_port_listener(port: int) -> listener_pb2.Listener:
    """`0.0.0.0_<port>`: every HTTP service on this port, by the route's virtual hosts."""
    lst = listener_pb2.Listener(name=f"0.0.0.0_{port}", address=sock("0.0.0.0", port),
                                traffic_direction=base_pb2.OUTBOUND)
    lst.bind_to_port.value = False
    _listener_filters(lst, http=True)
    ch = lst.filter_chains.add(filters=[_hcm(str(port))])
    ch.filter_chain_match.transport_protocol = "raw_buffer"
    ch.filter_chain_match.application_protocols.extend(["http/1.1", "h2c"])
    lst.default_filter_chain.filters.extend(_istio_tcp_filters("PassthroughCluster"))
    return lst


def _route_to(cluster: str) -> rcp.Route:
    r = rcp.Route(name="default", match=rcp.RouteMatch(prefix="/"))
    r.route.cluster = cluster
    r.route.timeout.seconds = 0
    r.route.retry_policy.retry_on = "connect-failure,refused-stream,unavailable,cancelled"
    r.route.retry_policy.num_retries.value = 2
    r.route.max_stream_duration.max_stream_duration.seconds = 0
    r.decorator.operation = f"{cluster.rsplit('|', 1)[-1]}/*"
    return r


def http_routes(port: int, services: list[tuple[str, str]],
                split: dict[str, str] | None = None) -> route_pb2.RouteConfiguration:
    """RDS `<port>`: a virtual host per (service, vip) with Istio's domains, and allow_any.
    `split`: service -> a second cluster /v2 goes to (a VirtualService by path)."""
    rc = route_pb2.RouteConfiguration(name=str(port))
    rc.validate_clusters.value = False
    for name, vip in services:
        vh = rc.virtual_hosts.add(name=f"{host(name)}:{port}", include_request_attempt_count=True)
        vh.domains.extend([host(name), f"{host(name)}:{port}", name, f"{name}:{port}",
                           f"{name}.{NS}.svc", f"{name}.{NS}.svc:{port}", f"{name}.{NS}",
                           f"{name}.{NS}:{port}", vip, f"{vip}:{port}"])
        if split and name in split:
            r = vh.routes.add(match=rcp.RouteMatch(prefix="/v2"))
            r.route.cluster = split[name]
        vh.routes.append(_route_to(outbound(name, port)))
    allow = rc.virtual_hosts.add(name="allow_any", domains=["*"])
    allow.routes.append(_route_to("PassthroughCluster"))
    return rc


def virtual_outbound() -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name="virtualOutbound", address=sock("0.0.0.0", 15001),
                                traffic_direction=base_pb2.OUTBOUND)
    lst.use_original_dst.value = True
    lst.filter_chains.add(name="virtualOutbound-catchall-tcp",
                          filters=_istio_tcp_filters("PassthroughCluster"))
    return lst


def mtls_eds_cluster(name: str) -> cluster_pb2.Cluster:
    c = eds_cluster(name, service_name=name)
    c.connect_timeout.seconds = 10
    m = c.transport_socket_matches.add(name="tlsMode-istio")
    m.match.update({"tlsMode": "istio"})
    m.transport_socket.name = "envoy.transport_sockets.tls"
    m.transport_socket.typed_config.CopyFrom(_opaque(
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"))
    c.transport_socket_matches.add(name="tlsMode-disabled").transport_socket.name = \
        "envoy.transport_sockets.raw_buffer"
    c.metadata.filter_metadata["istio"].update({"services": [{"host": name}]})
    return c


def istio_builtin_clusters() -> list[cluster_pb2.Cluster]:
    passthrough = cluster_pb2.Cluster(name="PassthroughCluster",
                                      type=cluster_pb2.Cluster.ORIGINAL_DST,
                                      lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    blackhole = cluster_pb2.Cluster(name="BlackHoleCluster", type=cluster_pb2.Cluster.STATIC)
    inbound = cluster_pb2.Cluster(name="InboundPassthroughClusterIpv4",
                                  type=cluster_pb2.Cluster.ORIGINAL_DST,
                                  lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    return [passthrough, blackhole, inbound]


def sidecar_config(tcp: dict[str, tuple[str, int, list[str]]],
                   sniffed: dict[str, tuple[str, int, list[str]]],
                   http: dict[str, tuple[str, int, list[str]]],
                   split: dict[str, str] | None = None) -> tr.Resources:
    """service -> (vip, port, endpoint IPs), per kind of service, as a sidecar sees them."""
    listeners = [virtual_outbound()]
    clusters = istio_builtin_clusters()
    assignments = []
    routes = []
    for kind, services in (("tcp", tcp), ("sniffed", sniffed), ("http", http)):
        for name, (vip, port, eps) in services.items():
            if kind == "tcp":
                listeners.append(tcp_service_listener(name, vip, port))
            elif kind == "sniffed":
                listeners.append(sniffing_listener(name, vip, port))
            c = outbound(name, port)
            clusters.append(mtls_eds_cluster(c))
            assignments.append(cla(c, locality(*(lbe(ip, port) for ip in eps))))
    by_port: dict[int, list[tuple[str, str]]] = {}
    for name, (vip, port, _) in http.items():
        by_port.setdefault(port, []).append((name, vip))
    for port, svcs in sorted(by_port.items()):
        listeners.append(http_port_listener(port))
        routes.append(http_routes(port, svcs, split))
    for name, (vip, port, _) in sniffed.items():  # the sniffed HTTP chain's RDS
        routes.append(http_routes(port, [(name, vip)]))
        routes[-1].name = f"{host(name)}:{port}"
    return tr.Resources({x.name: x for x in listeners}, {x.name: x for x in routes},
                        {x.name: x for x in clusters},
                        {x.cluster_name: x for x in assignments})


def sniffed_mesh(services: int, endpoints: int, port: int = 8080
                 ) -> tuple[tr.Resources, dict[str, tuple[str, int, list[str]]]]:
    """A large Istio mesh as one sidecar sees it: S services with a protocol-sniffing
    listener per ClusterIP:port (Istio's shape for ports without a declared protocol), an
    mTLS EDS cluster and E endpoints each. Also returns service -> (vip, port, endpoints)."""
    vip0 = int(ipaddress.IPv4Address("10.96.0.0"))
    ep0 = int(ipaddress.IPv4Address("10.128.0.0"))
    sniffed = {f"svc-{i}": (str(ipaddress.IPv4Address(vip0 + i)), port,
                            [str(ipaddress.IPv4Address(ep0 + i * endpoints + j))
                             for j in range(endpoints)])
               for i in range(services)}
    return sidecar_config({}, sniffed, {}), sniffed
