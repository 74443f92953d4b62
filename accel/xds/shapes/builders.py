"""Envoy v3 resource builders: the pieces every control plane's shape is made of."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as epc
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2


def pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def sock(addr: str, port: int, udp: bool = False) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(
        address=addr, port_value=port,
        protocol=address_pb2.SocketAddress.UDP if udp else address_pb2.SocketAddress.TCP))


def tcp_listener(name: str, vip: str, port: int, cluster: str, **meta) -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name=name, address=sock(vip, port), filter_chains=[
        listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.tcp_proxy",
            typed_config=pack(tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=cluster)))])])
    if meta:
        s = struct_pb2.Struct()
        s.update(meta)
        lst.metadata.filter_metadata["meshaccel"].CopyFrom(s)
    return lst


def eds_cluster(name: str, service_name: str = "") -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    if service_name:
        c.eds_cluster_config.service_name = service_name
    return c


def lbe(addr: str, port: int, weight: int | None = None,
        health: int = health_check_pb2.UNKNOWN) -> epc.LbEndpoint:
    e = epc.LbEndpoint(endpoint=epc.Endpoint(address=sock(addr, port)), health_status=health)
    if weight is not None:
        e.load_balancing_weight.value = weight
    return e


def locality(*eps: epc.LbEndpoint, weight: int | None = None, priority: int = 0,
             zone: str = "") -> epc.LocalityLbEndpoints:
    loc = epc.LocalityLbEndpoints(lb_endpoints=eps, priority=priority)
    loc.locality.zone = zone
    if weight is not None:
        loc.load_balancing_weight.CopyFrom(wrappers_pb2.UInt32Value(value=weight))
    return loc


def cla(name: str, *locs: epc.LocalityLbEndpoints) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=locs)
