"""xDS in the shape Kuma's control plane sends a sidecar in transparent-proxy mode (Kuma
2.x on Kubernetes): built here from the published shapes, not captured.

- `outbound:IP:PORT` listeners (bind_to_port false, OUTBOUND, metadata `io.kuma.tags`),
  IP = the service's ClusterIP or Kuma VIP (240.0.0.0/4): a `tcp_proxy` to one cluster or
  to `weighted_clusters` (TrafficSplit / MeshTCPRoute), or an HTTP connection manager with
  an inline route configuration `outbound:<service>` (MeshHTTPRoute: weighted backends, or
  matches by path to different clusters);
- EDS clusters named by the `kuma.io/service` tag (`backend_kuma-demo_svc_3001`, subsets
  with a hash suffix), Kuma mTLS (UpstreamTlsContext, ALPN `kuma`, SDS secrets, SNI
  `service{mesh=...}`), HTTP/2 protocol options; endpoints with `envoy.lb` and
  `envoy.transport_socket_match` metadata;
- `outbound:passthrough:ipv4` (0.0.0.0:15001, use_original_dst, ORIGINAL_DST cluster),
  `inbound:passthrough:ipv4` and `inbound:POD_IP:PORT` (INBOUND, DownstreamTlsContext,
  rbac, to the STATIC `localhost:PORT` cluster), the admin listener on 127.0.0.1.
"""

from __future__ import annotations

import hashlib

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rcp
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2

from accel.xds import translate as tr
from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, pack, sock

MESH = "default"
NS = "kuma-demo"
TCP_PROXY = "envoy.filters.network.tcp_proxy"

# name -> (VIP, port, [(endpoint IP, port, weight)]): the services a test meshes.
Endpoints = list[tuple[str, int, int]]
Spec = dict[str, tuple[str, int, Endpoints]]
# name -> (VIP, port, {version: (the version's weight, its endpoints)}): split services.
SplitSpec = dict[str, tuple[str, int, dict[str, tuple[int, Endpoints]]]]


def service(name: str, port: int) -> str:
    """Kuma's `kuma.io/service` tag of a Kubernetes Service port, its cluster's name."""
    return f"{name}_{NS}_svc_{port}"


def subset(name: str, port: int, version: str) -> str:
    """A subset cluster (a split by tags): the service's name and a hash of the tags."""
    return f"{service(name, port)}-{hashlib.sha256(version.encode()).hexdigest()[:16]}"


def _tags(svc: str) -> base_pb2.Metadata:
    m = base_pb2.Metadata()
    s = struct_pb2.Struct()
    s.update({"kuma.io/service": svc})
    m.filter_metadata["io.kuma.tags"].CopyFrom(s)
    return m


def _outbound(vip: str, port: int, svc: str, flt: lc.Filter) -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name=f"outbound:{vip}:{port}", address=sock(vip, port),
                                traffic_direction=base_pb2.OUTBOUND, metadata=_tags(svc),
                                filter_chains=[lc.FilterChain(filters=[flt])])
    lst.bind_to_port.value = False
    return lst


def _access_log(svc: str) -> file_pb2.FileAccessLog:
    log = file_pb2.FileAccessLog(path="/dev/stdout")
    log.log_format.text_format_source.inline_string = \
        f"[%START_TIME%] {MESH} %UPSTREAM_HOST%({svc}) took %DURATION%ms\n"
    return log


def tcp_outbound(vip: str, port: int, svc: str,
                 split: list[tuple[str, int]] | None = None) -> listener_pb2.Listener:
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix=svc, idle_timeout=duration_pb2.Duration())
    tp.access_log.add(name="envoy.access_loggers.file", typed_config=pack(_access_log(svc)))
    if split:  # TrafficSplit / MeshTCPRoute backendRefs with weights
        for cluster, weight in split:
            tp.weighted_clusters.clusters.add(name=cluster, weight=weight)
    else:
        tp.cluster = svc
    return _outbound(vip, port, svc, lc.Filter(name=TCP_PROXY, typed_config=pack(tp)))


def http_outbound(vip: str, port: int, svc: str, routes: list[rcp.Route]
                  ) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=svc,
                                        normalize_path=wrappers_pb2.BoolValue(value=True))
    hcm.common_http_protocol_options.idle_timeout.SetInParent()
    hcm.http_filters.add(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))
    rc = hcm.route_config
    rc.name = f"outbound:{svc}"
    rc.validate_clusters.value = False
    hdr = rc.request_headers_to_add.add().header
    hdr.key, hdr.value = "x-kuma-tags", "&kuma.io/service=demo-app_kuma-demo_svc_5000&"
    rc.virtual_hosts.add(name=svc, domains=["*"], routes=routes)
    return _outbound(vip, port, svc, lc.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm)))


def route_to(cluster: str | list[tuple[str, int]], prefix: str = "/",
             path: str = "") -> rcp.Route:
    r = rcp.Route(match=rcp.RouteMatch(path=path) if path else rcp.RouteMatch(prefix=prefix))
    r.route.timeout.SetInParent()
    if isinstance(cluster, str):
        r.route.cluster = cluster
    else:  # MeshHTTPRoute backendRefs with weights
        for name, weight in cluster:
            r.route.weighted_clusters.clusters.add(name=name).weight.value = weight
    return r


def kuma_cluster(name: str, svc: str) -> cluster_pb2.Cluster:
    c = eds_cluster(name)
    c.eds_cluster_config.eds_config.initial_fetch_timeout.SetInParent()
    c.eds_cluster_config.eds_config.resource_api_version = config_source_pb2.V3
    c.connect_timeout.seconds = 5
    tls = tls_pb2.UpstreamTlsContext(sni=f"{svc}{{mesh={MESH}}}")
    ctx = tls.common_tls_context
    ctx.alpn_protocols.append("kuma")
    cert = ctx.tls_certificate_sds_secret_configs.add(name=f"identity_cert:secret:{MESH}")
    cert.sds_config.ads.SetInParent()
    cv = ctx.combined_validation_context
    san = cv.default_validation_context.match_typed_subject_alt_names.add()
    san.san_type = san.URI
    san.matcher.exact = f"spiffe://{MESH}/{svc}"
    cv.validation_context_sds_secret_config.name = f"mesh_ca:secret:{MESH}"
    cv.validation_context_sds_secret_config.sds_config.ads.SetInParent()
    c.transport_socket.name = "envoy.transport_sockets.tls"
    c.transport_socket.typed_config.CopyFrom(pack(tls))
    opts = hpo.HttpProtocolOptions()
    opts.explicit_http_config.http2_protocol_options.SetInParent()
    c.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(pack(opts))
    return c


def kuma_cla(name: str, eps: list[tuple[str, int, int]], version: str = "v1"):
    out = []
    for ip, port, weight in eps:
        e = lbe(ip, port, weight)
        tags = struct_pb2.Struct()
        tags.update({"version": version, "kuma.io/zone": "zone-1"})
        e.metadata.filter_metadata["envoy.lb"].CopyFrom(tags)
        e.metadata.filter_metadata["envoy.transport_socket_match"].CopyFrom(tags)
        out.append(e)
    return cla(name, locality(*out, zone="zone-1"))


def _passthrough(direction: str, port: int) -> listener_pb2.Listener:
    """`outbound:passthrough:ipv4` (15001) or `inbound:passthrough:ipv4` (15006): the
    redirected traffic, to the ORIGINAL_DST cluster of the same name."""
    name = f"{direction}:passthrough:ipv4"
    lst = listener_pb2.Listener(name=name, address=sock("0.0.0.0", port),
                                traffic_direction=base_pb2.TrafficDirection.Value(
                                    direction.upper()))
    lst.use_original_dst.value = True
    lst.filter_chains.add(filters=[lc.Filter(name=TCP_PROXY, typed_config=pack(
        tcp_proxy_pb2.TcpProxy(stat_prefix=name.replace(":", "_"), cluster=name)))])
    return lst


def passthrough_and_inbound(pod_ip: str, port: int) -> tuple[list[listener_pb2.Listener],
                                                               list[cluster_pb2.Cluster]]:
    """What every Kuma sidecar has besides its outbounds: none of it is a service."""
    out, inp = _passthrough("outbound", 15001), _passthrough("inbound", 15006)
    inbound = listener_pb2.Listener(name=f"inbound:{pod_ip}:{port}", address=sock(pod_ip, port),
                                    traffic_direction=base_pb2.INBOUND)
    chain = inbound.filter_chains.add(filters=[
        lc.Filter(name="envoy.filters.network.rbac",
                  typed_config=pack(rbac_pb2.RBAC(stat_prefix="inbound"))),
        lc.Filter(name=TCP_PROXY, typed_config=pack(tcp_proxy_pb2.TcpProxy(
            stat_prefix=f"localhost_{port}", cluster=f"localhost:{port}")))])
    chain.transport_socket.name = "envoy.transport_sockets.tls"
    chain.transport_socket.typed_config.CopyFrom(pack(tls_pb2.DownstreamTlsContext()))
    admin = listener_pb2.Listener(name="kuma:envoy:admin", address=sock("127.0.0.1", 9901))
    admin.filter_chains.add(filters=[lc.Filter(name=TCP_PROXY, typed_config=pack(
        tcp_proxy_pb2.TcpProxy(stat_prefix="admin", cluster="kuma:envoy:admin")))])
    clusters = []
    for name in ("outbound:passthrough:ipv4", "inbound:passthrough:ipv4"):
        clusters.append(cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.ORIGINAL_DST,
                                            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED))
    local = cluster_pb2.Cluster(name=f"localhost:{port}", type=cluster_pb2.Cluster.STATIC,
                                load_assignment=cla(f"localhost:{port}",
                                                    locality(lbe("127.0.0.1", port))))
    admin_c = cluster_pb2.Cluster(name="kuma:envoy:admin", type=cluster_pb2.Cluster.STATIC,
                                  load_assignment=cla("kuma:envoy:admin",
                                                      locality(lbe("127.0.0.1", 9902))))
    return [out, inp, inbound, admin], clusters + [local, admin_c]


def sidecar_config(tcp: Spec, http: Spec, tcp_split: SplitSpec | None = None,
                   http_split: SplitSpec | None = None, by_path: Spec | None = None,
                   pod_ip: str = "10.244.0.5") -> tr.Resources:
    """A sidecar's resources: plain TCP and HTTP outbounds, weighted splits of either kind,
    and HTTP services whose MeshHTTPRoute sends /v2 to a subset (by_path)."""
    lsts, clusters = passthrough_and_inbound(pod_ip, 5000)
    res = tr.Resources({lst.name: lst for lst in lsts}, {},
                       {c.name: c for c in clusters}, {})

    def add_cluster(name: str, svc: str, eps: list[tuple[str, int, int]], version: str) -> None:
        res.clusters[name] = kuma_cluster(name, svc)
        res.endpoints[name] = kuma_cla(name, eps, version)

    for name, (vip, port, eps) in tcp.items():
        svc = service(name, port)
        add_cluster(svc, svc, eps, "v1")
        lst = tcp_outbound(vip, port, svc)
        res.listeners[lst.name] = lst
    for name, (vip, port, eps) in http.items():
        svc = service(name, port)
        add_cluster(svc, svc, eps, "v1")
        lst = http_outbound(vip, port, svc, [route_to(svc)])
        res.listeners[lst.name] = lst
    for kind, splits in (("tcp", tcp_split or {}), ("http", http_split or {})):
        for name, (vip, port, versions) in splits.items():
            svc = service(name, port)
            parts = []
            for version, (weight, eps) in versions.items():
                cname = subset(name, port, version)
                add_cluster(cname, svc, eps, version)
                parts.append((cname, weight))
            lst = tcp_outbound(vip, port, svc, split=parts) if kind == "tcp" else \
                http_outbound(vip, port, svc, [route_to(parts)])
            res.listeners[lst.name] = lst
    for name, (vip, port, eps) in (by_path or {}).items():
        svc, v2 = service(name, port), subset(name, port, "v2")
        add_cluster(svc, svc, eps, "v1")
        add_cluster(v2, svc, eps, "v2")
        lst = http_outbound(vip, port, svc, [route_to(v2, path="/v2"),
                                             route_to(v2, prefix="/v2/"), route_to(svc)])
        res.listeners[lst.name] = lst
    return res
