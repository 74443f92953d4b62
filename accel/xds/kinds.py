"""The xDS resource types meshaccel reads and serves: type URLs, names, and a container
holding each type's resources by name (the client's packed: wire bytes, parsed on use)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
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


class Packed(Mapping[str, message.Message]):
    """One type's resources held as their wire bytes, a message parsed afresh on each
    access. A parsed (upb) message takes about 18 times its wire size: the client's state
    for 10,000 services was 146 MB as messages, 8 MB as bytes. Translation looks at a
    resource's bytes first (the memo) and parses only what changed."""

    __slots__ = ("cls", "raw")

    def __init__(self, cls: type[message.Message], raw: dict[str, bytes] | None = None):
        self.cls = cls
        self.raw = raw if raw is not None else {}

    @classmethod
    def of(cls, msg_cls: type[message.Message], items: Mapping[str, message.Message]) -> Packed:
        if isinstance(items, Packed):
            return items
        return cls(msg_cls, {n: m.SerializeToString() for n, m in items.items()})

    def __getitem__(self, name: str) -> message.Message:
        return self.cls.FromString(self.raw[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __contains__(self, name: object) -> bool:
        return name in self.raw

    def only(self, names: Iterable[str] | Mapping[str, object]) -> Packed:
        keep = names if isinstance(names, (set, frozenset, dict)) else set(names)
        return Packed(self.cls, {n: b for n, b in self.raw.items() if n in keep})

    def without(self, names: Iterable[str]) -> Packed:
        gone = set(names)
        return Packed(self.cls, {n: b for n, b in self.raw.items() if n not in gone})

    def updated(self, items: Mapping[str, message.Message]) -> Packed:
        raw = dict(self.raw)
        raw.update((n, m.SerializeToString()) for n, m in items.items())
        return Packed(self.cls, raw)


def raw_of(items: Mapping[str, message.Message], name: str) -> bytes | None:
    """A resource's wire bytes (no parse when held packed)."""
    if isinstance(items, Packed):
        return items.raw.get(name)
    m = items.get(name)
    return None if m is None else m.SerializeToString()


def raw_items(items: Mapping[str, message.Message]) -> list[tuple[str, bytes]]:
    """(name, wire bytes) by name order, parsing nothing when held packed."""
    if isinstance(items, Packed):
        return sorted(items.raw.items())
    return [(n, m.SerializeToString()) for n, m in sorted(items.items())]


@dataclass
class Resources:
    """The four resource kinds by name, as a client holds them or a server serves them."""

    listeners: Mapping[str, listener_pb2.Listener] = field(default_factory=dict)
    routes: Mapping[str, route_pb2.RouteConfiguration] = field(default_factory=dict)
    clusters: Mapping[str, cluster_pb2.Cluster] = field(default_factory=dict)
    endpoints: Mapping[str, endpoint_pb2.ClusterLoadAssignment] = field(default_factory=dict)

    @classmethod
    def packed(cls) -> Resources:
        return cls(*(Packed(MESSAGE[t]) for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)))

    def of(self, type_url: str) -> dict[str, message.Message]:
        return {LISTENER: self.listeners, ROUTE: self.routes, CLUSTER: self.clusters,
                ENDPOINT: self.endpoints}[type_url]  # type: ignore[return-value]

    def replace(self, type_url: str, items: Mapping[str, message.Message]) -> Resources:
        """A copy with one type's resources replaced (packed when this one's are)."""
        parts = {LISTENER: self.listeners, ROUTE: self.routes, CLUSTER: self.clusters,
                 ENDPOINT: self.endpoints}
        parts[type_url] = (Packed.of(MESSAGE[type_url], items)
                           if isinstance(parts[type_url], Packed) else dict(items))
        return Resources(parts[LISTENER], parts[ROUTE], parts[CLUSTER], parts[ENDPOINT])
