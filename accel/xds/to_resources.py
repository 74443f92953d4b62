"""ServiceTable -> Envoy resources, as the controller serves them: per service a VIP
listener, a gRPC api_listener with its route config, an EDS cluster and its assignment
(README: "What the controller serves")."""

from __future__ import annotations

from collections.abc import Mapping

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
from google.protobuf import any_pb2, message, struct_pb2, wrappers_pb2

from accel.model import (
    DEFAULT_FASTPATH,
    Guard,
    IPAddress,
    Service,
    ServiceTable,
    ValidationError,
)
from accel.xds.kinds import (
    CLUSTER,
    ENDPOINT,
    KIND,
    LISTENER,
    MESH_CLUSTER,
    META_KEY,
    PUSH_ORDER,
    ROUTE,
    Resources,
    resource_name,
)
from accel.xds.qos import bandwidth_meta, ratelimit_filter

_TCP, _UDP = address_pb2.SocketAddress.TCP, address_pb2.SocketAddress.UDP


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
            *([ratelimit_filter(svc.limits, svc.name)] if svc.limits.connections else []),
            listener_components_pb2.Filter(
                name="envoy.filters.network.tcp_proxy",
                typed_config=_pack(tcp_proxy_pb2.TcpProxy(stat_prefix=svc.name,
                                                          cluster=svc.name)))]))
    meta = {}
    if svc.edge:
        meta["edge"] = struct_pb2.Value(bool_value=True)
    if svc.fastpath != DEFAULT_FASTPATH:
        meta["fastpath"] = struct_pb2.Value(string_value=svc.fastpath)
    meta.update(bandwidth_meta(svc.limits))
    if meta:
        lst.metadata.filter_metadata[META_KEY].CopyFrom(struct_pb2.Struct(fields=meta))
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
    if not table.mesh_cidrs and table.guard == Guard() and table.fastpath == DEFAULT_FASTPATH:
        return None
    g = table.guard
    meta = struct_pb2.Struct()
    meta.update({"mesh_cidrs": [str(n) for n in table.mesh_cidrs],
                 "guard": {"deny": [str(n) for n in g.deny], "syn_rate": g.syn_rate,
                           "syn_burst": g.syn_burst}})
    if table.fastpath != DEFAULT_FASTPATH:
        meta.update({"fastpath": table.fastpath})
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
