from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Endpoint(_message.Message):
    __slots__ = ("address", "port", "weight", "healthy")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    weight: int
    healthy: bool
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., weight: _Optional[int] = ..., healthy: _Optional[bool] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("name", "vip", "port", "protocol", "endpoints", "edge", "fastpath", "limits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    FASTPATH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    vip: str
    port: int
    protocol: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    edge: bool
    fastpath: str
    limits: Limits
    def __init__(self, name: _Optional[str] = ..., vip: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., edge: _Optional[bool] = ..., fastpath: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("bandwidth", "connections", "burst")
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    bandwidth: int
    connections: float
    burst: int
    def __init__(self, bandwidth: _Optional[int] = ..., connections: _Optional[float] = ..., burst: _Optional[int] = ...) -> None: ...

class Guard(_message.Message):
    __slots__ = ("deny", "syn_rate", "syn_burst")
    DENY_FIELD_NUMBER: _ClassVar[int]
    SYN_RATE_FIELD_NUMBER: _ClassVar[int]
    SYN_BURST_FIELD_NUMBER: _ClassVar[int]
    deny: _containers.RepeatedScalarFieldContainer[str]
    syn_rate: int
    syn_burst: int
    def __init__(self, deny: _Optional[_Iterable[str]] = ..., syn_rate: _Optional[int] = ..., syn_burst: _Optional[int] = ...) -> None: ...

class ServiceTable(_message.Message):
    __slots__ = ("services", "mesh_cidrs", "guard", "fastpath")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    MESH_CIDRS_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    FASTPATH_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[Service]
    mesh_cidrs: _containers.RepeatedScalarFieldContainer[str]
    guard: Guard
    fastpath: str
    def __init__(self, services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ..., mesh_cidrs: _Optional[_Iterable[str]] = ..., guard: _Optional[_Union[Guard, _Mapping]] = ..., fastpath: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class XdsTypeStatus(_message.Message):
    __slots__ = ("last_ack_version", "last_nonce", "last_nack_error", "last_update_time", "resource_count")
    LAST_ACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_NONCE_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    last_ack_version: str
    last_nonce: str
    last_nack_error: str
    last_update_time: float
    resource_count: int
    def __init__(self, last_ack_version: _Optional[str] = ..., last_nonce: _Optional[str] = ..., last_nack_error: _Optional[str] = ..., last_update_time: _Optional[float] = ..., resource_count: _Optional[int] = ...) -> None: ...

class XdsStatus(_message.Message):
    __slots__ = ("enabled", "connected", "target", "node_id", "reconnects", "types", "pending", "skipped", "ignored", "api", "workloads", "policies")
    class TypesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: XdsTypeStatus
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[XdsTypeStatus, _Mapping]] = ...) -> None: ...
    class PendingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SkippedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class IgnoredEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    connected: bool
    target: str
    node_id: str
    reconnects: int
    types: _containers.MessageMap[str, XdsTypeStatus]
    pending: _containers.ScalarMap[str, str]
    skipped: _containers.ScalarMap[str, str]
    ignored: _containers.ScalarMap[str, str]
    api: str
    workloads: int
    policies: int
    def __init__(self, enabled: _Optional[bool] = ..., connected: _Optional[bool] = ..., target: _Optional[str] = ..., node_id: _Optional[str] = ..., reconnects: _Optional[int] = ..., types: _Optional[_Mapping[str, XdsTypeStatus]] = ..., pending: _Optional[_Mapping[str, str]] = ..., skipped: _Optional[_Mapping[str, str]] = ..., ignored: _Optional[_Mapping[str, str]] = ..., api: _Optional[str] = ..., workloads: _Optional[int] = ..., policies: _Optional[int] = ...) -> None: ...

class EdgeStatus(_message.Message):
    __slots__ = ("enabled", "iface", "mode", "maglev_size", "guard", "vips")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    IFACE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAGLEV_SIZE_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    iface: str
    mode: str
    maglev_size: int
    guard: Guard
    vips: _containers.RepeatedCompositeFieldContainer[EdgeVipStatus]
    def __init__(self, enabled: _Optional[bool] = ..., iface: _Optional[str] = ..., mode: _Optional[str] = ..., maglev_size: _Optional[int] = ..., guard: _Optional[_Union[Guard, _Mapping]] = ..., vips: _Optional[_Iterable[_Union[EdgeVipStatus, _Mapping]]] = ...) -> None: ...

class EdgeVipStatus(_message.Message):
    __slots__ = ("service", "vip", "port", "protocol", "dirty_slots", "backends", "connection_limit", "connection_burst")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    DIRTY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_BURST_FIELD_NUMBER: _ClassVar[int]
    service: str
    vip: str
    port: int
    protocol: str
    dirty_slots: int
    backends: _containers.RepeatedCompositeFieldContainer[EdgeBackendStatus]
    connection_limit: float
    connection_burst: int
    def __init__(self, service: _Optional[str] = ..., vip: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., dirty_slots: _Optional[int] = ..., backends: _Optional[_Iterable[_Union[EdgeBackendStatus, _Mapping]]] = ..., connection_limit: _Optional[float] = ..., connection_burst: _Optional[int] = ...) -> None: ...

class EdgeBackendStatus(_message.Message):
    __slots__ = ("address", "port", "via")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    via: str
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., via: _Optional[str] = ...) -> None: ...

class PodRoutingStatus(_message.Message):
    __slots__ = ("enabled", "netns", "patterns", "ports", "addresses", "conflicts", "failures", "error")
    class FailuresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    netns: str
    patterns: _containers.RepeatedScalarFieldContainer[str]
    ports: _containers.RepeatedCompositeFieldContainer[PodPortStatus]
    addresses: int
    conflicts: _containers.RepeatedScalarFieldContainer[str]
    failures: _containers.ScalarMap[str, str]
    error: str
    def __init__(self, enabled: _Optional[bool] = ..., netns: _Optional[str] = ..., patterns: _Optional[_Iterable[str]] = ..., ports: _Optional[_Iterable[_Union[PodPortStatus, _Mapping]]] = ..., addresses: _Optional[int] = ..., conflicts: _Optional[_Iterable[str]] = ..., failures: _Optional[_Mapping[str, str]] = ..., error: _Optional[str] = ...) -> None: ...

class PodPortStatus(_message.Message):
    __slots__ = ("iface", "addresses", "bridge")
    IFACE_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_FIELD_NUMBER: _ClassVar[int]
    iface: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    bridge: int
    def __init__(self, iface: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., bridge: _Optional[int] = ...) -> None: ...

class MapUsage(_message.Message):
    __slots__ = ("used", "capacity")
    USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    used: int
    capacity: int
    def __init__(self, used: _Optional[int] = ..., capacity: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("version", "source", "config_version", "uptime_seconds", "services", "applied", "rejected", "last_error", "pin_dir", "cgroup", "xds", "edge", "maps", "pod_routing", "redirect_unavailable", "ready", "not_ready", "compiled", "seconds_to_ready", "services_left", "policy", "qos")
    class MapsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MapUsage
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MapUsage, _Mapping]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    PIN_DIR_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    XDS_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    POD_ROUTING_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_TO_READY_FIELD_NUMBER: _ClassVar[int]
    SERVICES_LEFT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    version: str
    source: str
    config_version: str
    uptime_seconds: float
    services: int
    applied: int
    rejected: int
    last_error: str
    pin_dir: str
    cgroup: str
    xds: XdsStatus
    edge: EdgeStatus
    maps: _containers.MessageMap[str, MapUsage]
    pod_routing: PodRoutingStatus
    redirect_unavailable: str
    ready: bool
    not_ready: str
    compiled: bool
    seconds_to_ready: float
    services_left: int
    policy: PolicyStatus
    qos: QosStatus
    def __init__(self, version: _Optional[str] = ..., source: _Optional[str] = ..., config_version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., services: _Optional[int] = ..., applied: _Optional[int] = ..., rejected: _Optional[int] = ..., last_error: _Optional[str] = ..., pin_dir: _Optional[str] = ..., cgroup: _Optional[str] = ..., xds: _Optional[_Union[XdsStatus, _Mapping]] = ..., edge: _Optional[_Union[EdgeStatus, _Mapping]] = ..., maps: _Optional[_Mapping[str, MapUsage]] = ..., pod_routing: _Optional[_Union[PodRoutingStatus, _Mapping]] = ..., redirect_unavailable: _Optional[str] = ..., ready: _Optional[bool] = ..., not_ready: _Optional[str] = ..., compiled: _Optional[bool] = ..., seconds_to_ready: _Optional[float] = ..., services_left: _Optional[int] = ..., policy: _Optional[_Union[PolicyStatus, _Mapping]] = ..., qos: _Optional[_Union[QosStatus, _Mapping]] = ...) -> None: ...

class QosStatus(_message.Message):
    __slots__ = ("bandwidth", "connections", "refused_errno", "note")
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_ERRNO_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    bandwidth: str
    connections: str
    refused_errno: str
    note: str
    def __init__(self, bandwidth: _Optional[str] = ..., connections: _Optional[str] = ..., refused_errno: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class PolicyCounters(_message.Message):
    __slots__ = ("allowed", "denied", "dry_run_denied", "closed_by_update")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_DENIED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_UPDATE_FIELD_NUMBER: _ClassVar[int]
    allowed: int
    denied: int
    dry_run_denied: int
    closed_by_update: int
    def __init__(self, allowed: _Optional[int] = ..., denied: _Optional[int] = ..., dry_run_denied: _Optional[int] = ..., closed_by_update: _Optional[int] = ...) -> None: ...

class PolicyStatus(_message.Message):
    __slots__ = ("enabled", "policies", "defaults", "maps", "guarded", "namespaces", "ignored")
    class PoliciesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: PolicyCounters
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[PolicyCounters, _Mapping]] = ...) -> None: ...
    class MapsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MapUsage
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MapUsage, _Mapping]] = ...) -> None: ...
    class IgnoredEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    GUARDED_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    policies: _containers.MessageMap[str, PolicyCounters]
    defaults: PolicyCounters
    maps: _containers.MessageMap[str, MapUsage]
    guarded: _containers.RepeatedScalarFieldContainer[str]
    namespaces: int
    ignored: _containers.ScalarMap[str, str]
    def __init__(self, enabled: _Optional[bool] = ..., policies: _Optional[_Mapping[str, PolicyCounters]] = ..., defaults: _Optional[_Union[PolicyCounters, _Mapping]] = ..., maps: _Optional[_Mapping[str, MapUsage]] = ..., guarded: _Optional[_Iterable[str]] = ..., namespaces: _Optional[int] = ..., ignored: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("config_version", "table", "left", "ignored")
    class IgnoredEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Reasons
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Reasons, _Mapping]] = ...) -> None: ...
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    config_version: str
    table: ServiceTable
    left: _containers.RepeatedCompositeFieldContainer[LeftService]
    ignored: _containers.MessageMap[str, Reasons]
    def __init__(self, config_version: _Optional[str] = ..., table: _Optional[_Union[ServiceTable, _Mapping]] = ..., left: _Optional[_Iterable[_Union[LeftService, _Mapping]]] = ..., ignored: _Optional[_Mapping[str, Reasons]] = ...) -> None: ...

class LeftService(_message.Message):
    __slots__ = ("where", "vip", "port", "protocol", "reason")
    WHERE_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    where: str
    vip: str
    port: int
    protocol: str
    reason: str
    def __init__(self, where: _Optional[str] = ..., vip: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Reasons(_message.Message):
    __slots__ = ("reasons",)
    REASONS_FIELD_NUMBER: _ClassVar[int]
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceCounters(_message.Message):
    __slots__ = ("connects", "no_backend", "refused_by_limit", "paced", "repaced", "paced_live", "paced_light")
    CONNECTS_FIELD_NUMBER: _ClassVar[int]
    NO_BACKEND_FIELD_NUMBER: _ClassVar[int]
    REFUSED_BY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    PACED_FIELD_NUMBER: _ClassVar[int]
    REPACED_FIELD_NUMBER: _ClassVar[int]
    PACED_LIVE_FIELD_NUMBER: _ClassVar[int]
    PACED_LIGHT_FIELD_NUMBER: _ClassVar[int]
    connects: int
    no_backend: int
    refused_by_limit: int
    paced: int
    repaced: int
    paced_live: int
    paced_light: int
    def __init__(self, connects: _Optional[int] = ..., no_backend: _Optional[int] = ..., refused_by_limit: _Optional[int] = ..., paced: _Optional[int] = ..., repaced: _Optional[int] = ..., paced_live: _Optional[int] = ..., paced_light: _Optional[int] = ...) -> None: ...

class EdgeVipCounters(_message.Message):
    __slots__ = ("service", "vip", "port", "protocol", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    service: str
    vip: str
    port: int
    protocol: str
    counters: _containers.ScalarMap[str, int]
    def __init__(self, service: _Optional[str] = ..., vip: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class EdgeStats(_message.Message):
    __slots__ = ("counters", "vips")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    counters: _containers.ScalarMap[str, int]
    vips: _containers.RepeatedCompositeFieldContainer[EdgeVipCounters]
    def __init__(self, counters: _Optional[_Mapping[str, int]] = ..., vips: _Optional[_Iterable[_Union[EdgeVipCounters, _Mapping]]] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("global_counters", "services", "edge", "flow_counters")
    class GlobalCountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ServicesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ServiceCounters
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ServiceCounters, _Mapping]] = ...) -> None: ...
    class FlowCountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GLOBAL_COUNTERS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    FLOW_COUNTERS_FIELD_NUMBER: _ClassVar[int]
    global_counters: _containers.ScalarMap[str, int]
    services: _containers.MessageMap[str, ServiceCounters]
    edge: EdgeStats
    flow_counters: _containers.ScalarMap[str, int]
    def __init__(self, global_counters: _Optional[_Mapping[str, int]] = ..., services: _Optional[_Mapping[str, ServiceCounters]] = ..., edge: _Optional[_Union[EdgeStats, _Mapping]] = ..., flow_counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("kinds",)
    KINDS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "message", "version", "time")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    version: str
    time: float
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ..., version: _Optional[str] = ..., time: _Optional[float] = ...) -> None: ...

class WatchFlowsRequest(_message.Message):
    __slots__ = ("follow", "service", "since", "events")
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    follow: bool
    service: str
    since: float
    events: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, follow: _Optional[bool] = ..., service: _Optional[str] = ..., since: _Optional[float] = ..., events: _Optional[_Iterable[str]] = ...) -> None: ...

class Flow(_message.Message):
    __slots__ = ("event", "id", "time_start", "time_end", "service", "namespace", "vip", "src", "dst", "bytes_sent", "bytes_received", "bytes_redirected", "path", "verdict", "reason", "srtt_us", "retransmits", "client_netns", "server_netns")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_START_FIELD_NUMBER: _ClassVar[int]
    TIME_END_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_REDIRECTED_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SRTT_US_FIELD_NUMBER: _ClassVar[int]
    RETRANSMITS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NETNS_FIELD_NUMBER: _ClassVar[int]
    SERVER_NETNS_FIELD_NUMBER: _ClassVar[int]
    event: str
    id: int
    time_start: float
    time_end: float
    service: str
    namespace: str
    vip: str
    src: str
    dst: str
    bytes_sent: int
    bytes_received: int
    bytes_redirected: int
    path: str
    verdict: str
    reason: str
    srtt_us: int
    retransmits: int
    client_netns: int
    server_netns: int
    def __init__(self, event: _Optional[str] = ..., id: _Optional[int] = ..., time_start: _Optional[float] = ..., time_end: _Optional[float] = ..., service: _Optional[str] = ..., namespace: _Optional[str] = ..., vip: _Optional[str] = ..., src: _Optional[str] = ..., dst: _Optional[str] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_redirected: _Optional[int] = ..., path: _Optional[str] = ..., verdict: _Optional[str] = ..., reason: _Optional[str] = ..., srtt_us: _Optional[int] = ..., retransmits: _Optional[int] = ..., client_netns: _Optional[int] = ..., server_netns: _Optional[int] = ...) -> None: ...

class ApplyConfigRequest(_message.Message):
    __slots__ = ("table", "mesh_yaml", "version", "validate_only")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    MESH_YAML_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    table: ServiceTable
    mesh_yaml: str
    version: str
    validate_only: bool
    def __init__(self, table: _Optional[_Union[ServiceTable, _Mapping]] = ..., mesh_yaml: _Optional[str] = ..., version: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class ApplyConfigResponse(_message.Message):
    __slots__ = ("version", "services", "endpoints", "applied")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    version: str
    services: int
    endpoints: int
    applied: bool
    def __init__(self, version: _Optional[str] = ..., services: _Optional[int] = ..., endpoints: _Optional[int] = ..., applied: _Optional[bool] = ...) -> None: ...

class SetGuardRequest(_message.Message):
    __slots__ = ("guard",)
    GUARD_FIELD_NUMBER: _ClassVar[int]
    guard: Guard
    def __init__(self, guard: _Optional[_Union[Guard, _Mapping]] = ...) -> None: ...

class SetGuardResponse(_message.Message):
    __slots__ = ("enforced", "guard")
    ENFORCED_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    enforced: bool
    guard: Guard
    def __init__(self, enforced: _Optional[bool] = ..., guard: _Optional[_Union[Guard, _Mapping]] = ...) -> None: ...
