"""The workload API's resource types: type URLs, names, and packing under Istio's type
URLs (the messages live in meshaccel's own proto package, see proto/accel/istio/)."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from google.protobuf import any_pb2, message

from accel.xds.gen.istio import security_pb2, workload_pb2

_PREFIX = "type.googleapis.com/"
ADDRESS = _PREFIX + "istio.workload.Address"
AUTHORIZATION = _PREFIX + "istio.security.Authorization"
TYPES = (ADDRESS, AUTHORIZATION)
# Both wildcard (ztunnel subscribes to both with "*"). Policies before the workloads that
# name them (authorization_policies), removals the other way round: a workload never names
# a policy the receiver lacks, which would leave that workload without it for a moment.
PUSH_ORDER = (AUTHORIZATION, ADDRESS)
KIND = {ADDRESS: "Address", AUTHORIZATION: "Authorization"}
MESSAGE: dict[str, type[message.Message]] = {ADDRESS: workload_pb2.Address,
                                             AUTHORIZATION: security_pb2.Authorization}


def resource_name(msg: message.Message) -> str:
    """The name istiod gives a resource: a workload's uid, a service's
    "namespace/hostname", a policy's "namespace/name" ("" when it has none)."""
    if isinstance(msg, workload_pb2.Address):
        kind = msg.WhichOneof("type")
        if kind == "workload":
            return msg.workload.uid
        if kind == "service":
            return f"{msg.service.namespace}/{msg.service.hostname}"
        return ""
    if isinstance(msg, security_pb2.Authorization):
        return f"{msg.namespace}/{msg.name}"
    raise TypeError(f"not a workload API message: {type(msg).__name__}")


def pack(msg: message.Message) -> any_pb2.Any:
    """An Any under Istio's type URL (Any.Pack would name meshaccel's package)."""
    type_url = ADDRESS if isinstance(msg, workload_pb2.Address) else AUTHORIZATION
    return any_pb2.Any(type_url=type_url, value=msg.SerializeToString())


def ztunnel_node(node_name: str, ip: str, pod: str = "meshaccel", namespace: str = "istio-system",
                 cluster_id: str = "Kubernetes", node_id: str | None = None) -> base_pb2.Node:
    """The Node a workload API client presents, as ztunnel does: id
    `ztunnel~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local` (istiod serves only a node of
    type ztunnel the workload API) and metadata NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME,
    CLUSTER_ID."""
    node = base_pb2.Node(
        id=node_id or f"ztunnel~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local",
        cluster=cluster_id)
    node.metadata.update({"NAME": pod, "NAMESPACE": namespace, "INSTANCE_IPS": ip,
                          "NODE_NAME": node_name, "CLUSTER_ID": cluster_id})
    return node
