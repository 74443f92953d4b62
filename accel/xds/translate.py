"""Envoy v3 xDS resources <-> ServiceTable: the one import for client, server and tools.

The agent reads a defined subset of xDS (see README.md, "xDS mapping"); the controller
writes resources that both the agent and gRPC's proxyless xDS client understand.
Errors name the resource and the field, e.g.
``Listener[reviews.vip].address.socket_address.port_value: port 0 is out of range 1-65535``.

The work is done in modules with one job each:

- kinds.py: type URLs, resource names, the Resources container
- decode.py: a response's Anys / delta Resources -> messages
- fronts.py: Listener, RouteConfiguration, Cluster -> VIP and target cluster
- endpoints.py: ClusterLoadAssignment -> weighted endpoints
- to_table.py: all of it -> ServiceTable (incrementally, with a Memo)
- to_resources.py: ServiceTable -> resources, as the controller serves them
"""

from __future__ import annotations

from accel.xds.decode import ip as _ip
from accel.xds.decode import parse as _parse
from accel.xds.decode import socket_address as _socket_address
from accel.xds.decode import typed as _typed
from accel.xds.endpoints import USED_HEALTH, endpoints_of
from accel.xds.fronts import Front as _Front
from accel.xds.fronts import cluster_eds_name as _cluster_eds_name
from accel.xds.fronts import cluster_eds_names, listener_rds_names
from accel.xds.fronts import front as _front
from accel.xds.fronts import route_cluster as _route_cluster
from accel.xds.kinds import (
    CLUSTER,
    ENDPOINT,
    HCM,
    KIND,
    LISTENER,
    MESH_CLUSTER,
    MESSAGE,
    META_KEY,
    PUSH_ORDER,
    RESOURCE_WRAPPER,
    ROUTE,
    ROUTER,
    TCP_PROXY,
    UDP_PROXY,
    WILDCARD_TYPES,
    Resources,
    resource_name,
)
from accel.xds.processors import unpack, unpack_delta
from accel.xds.to_resources import (
    api_listener,
    cluster,
    load_assignment,
    merge,
    merge_mesh,
    mesh_cluster,
    pack_all,
    route_config,
    service_resources,
    to_resources,
    vip_listener,
)
from accel.xds.to_table import (
    Memo,
    Translation,
    listener_fronts,
    mesh_settings,
    to_table,
    update_endpoints,
)

_RESOURCE_WRAPPER = RESOURCE_WRAPPER

__all__ = [
    "CLUSTER", "ENDPOINT", "HCM", "KIND", "LISTENER", "MESH_CLUSTER", "MESSAGE", "META_KEY",
    "PUSH_ORDER", "RESOURCE_WRAPPER", "ROUTE", "ROUTER", "TCP_PROXY", "UDP_PROXY",
    "USED_HEALTH", "WILDCARD_TYPES", "Memo", "Resources", "Translation", "api_listener",
    "cluster", "cluster_eds_names", "endpoints_of", "listener_fronts", "listener_rds_names",
    "load_assignment",
    "merge", "merge_mesh", "mesh_cluster", "mesh_settings", "pack_all", "resource_name",
    "route_config", "service_resources", "to_resources", "to_table", "unpack", "unpack_delta",
    "update_endpoints", "vip_listener",
    # Internals some tests reach for.
    "_Front", "_RESOURCE_WRAPPER", "_cluster_eds_name", "_front", "_ip", "_parse",
    "_route_cluster", "_socket_address", "_typed",
]
