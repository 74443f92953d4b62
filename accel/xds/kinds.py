"""The xDS resource types meshaccel reads and serves: type URLs, names, and a container
holding each type's resources by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.udp_proxy.v3 import udp_proxy_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message

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
RESOURCE_WRAPPER = _PREFIX + discovery_pb2.Resource.DESCRIPTOR.full_name

META_KEY = "meshaccel"  # listener.metadata.filter_metadata["meshaccel"]
# A STATIC cluster without endpoints whose metadata carries the table-wide settings
# (mesh_cidrs, guard): valid for Envoy, never requested by gRPC clients.
MESH_CLUSTER = "meshaccel.mesh"


def resource_name(msg: message.Message) -> str:
    return msg.cluster_name if isinstance(msg, endpoint_pb2.ClusterLoadAssignment) else msg.name


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
