"""The agent's xDS client: the stream (stream.py) feeding a cache (cache.py) that flushes
one consistent ServiceTable to `on_update`, over state of the world or (delta=True)
incremental xDS.

LDS and CDS are wildcard subscriptions; EDS follows the clusters CDS yields and RDS the
route configs listeners name. A response is ACKed only after `on_update` accepted the
table it leads to; anything that fails (bad resources, a ValidationError or any other
exception from on_update) is NACKed with the reason and the last good state stays.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping

import grpc
from envoy.config.core.v3 import base_pb2

from accel.model import DEFAULT_FASTPATH, ServiceTable
from accel.xds.cache import EnvoyCache
from accel.xds.stream import MAX_RESPONSE_BYTES, AdsStream, Event
from accel.xds.workload.kinds import ztunnel_node
from accel.xds.workload_cache import OnWorkloadUpdate, WorkloadCache

OnUpdate = Callable[[ServiceTable], None]

__all__ = ["MAX_RESPONSE_BYTES", "Event", "OnUpdate", "XdsClient", "node"]


def node(node_id: str, cluster: str = "meshaccel",
         metadata: Mapping[str, object] | None = None) -> base_pb2.Node:
    """How the agent introduces itself: a controller keys its answer on id, cluster and
    metadata (istiod: NAMESPACE, INSTANCE_IPS, ...)."""
    n = base_pb2.Node(id=node_id, cluster=cluster, user_agent_name="meshaccel")
    if metadata:
        n.metadata.update(dict(metadata))
    return n


def host_addresses() -> list[str]:
    """This host's unicast addresses, IPv4 first (INSTANCE_IPS for istiod)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = {ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()}
    keep = [a for a in found if not (a.is_loopback or a.is_link_local or a.is_multicast)]
    return [str(a) for a in sorted(keep, key=lambda a: (a.version, a))]


class XdsClient:
    """Run with start()/stop(); `events` is a list of callables (kind, info) called with
    "applied" after each ACK and "rejected" after each NACK.

    api="envoy": on_update(table) with what Listeners/Routes/Clusters/Endpoints mean.
    api="workload": Istio ambient's workload API, as istiod serves ztunnel (Delta only):
    on_update(table, verdicts), `node_name` being this host's node (its workloads are the
    policed destinations); the node presents itself as ztunnel does (kinds.ztunnel_node)."""

    def __init__(
        self,
        target: str,
        node_id: str,
        on_update: OnUpdate | OnWorkloadUpdate,
        *,
        cluster: str = "meshaccel",
        metadata: Mapping[str, object] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 15.0,
        delta: bool = False,
        api: str = "envoy",
        node_name: str = "",
        fastpath: str = DEFAULT_FASTPATH,
    ):
        self.cache: EnvoyCache | WorkloadCache
        if api == "workload":
            self.cache = WorkloadCache(on_update, node_name,  # type: ignore[arg-type]
                                       fastpath=fastpath)
            given = str((metadata or {}).get("INSTANCE_IPS") or "")
            ips = given.split(",") if given else host_addresses()
            who = ztunnel_node(node_name, ips[0] if ips else "0.0.0.0",
                               pod=f"meshaccel-{socket.gethostname()}", cluster_id=cluster,
                               node_id=node_id or None)
            who.metadata.update({"INSTANCE_IPS": ",".join(ips)})
            if metadata:
                who.metadata.update(dict(metadata))
            delta = True  # istiod serves the workload API over Delta only
        elif api == "envoy":
            self.cache = EnvoyCache(on_update)  # type: ignore[arg-type]
            who = node(node_id, cluster, metadata)
        else:
            raise ValueError(f"api: {api!r} is not envoy or workload")
        self.api = api
        self.stream = AdsStream(target, who, self.cache,
                                credentials=credentials, delta=delta,
                                backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.target = target
        self.delta = delta
        self.node = self.stream.node
        self.events: list[Event] = self.stream.events

    def start(self) -> XdsClient:
        self.stream.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.stream.stop(timeout)

    @property
    def last_received(self) -> float:
        """perf_counter() when the response being handled arrived."""
        return self.stream.last_received

    @property
    def table(self) -> ServiceTable | None:
        """The last table on_update accepted (stays in force while disconnected)."""
        return self.cache.table

    def report(self) -> tuple[dict[str, tuple[str, int, str, str]], dict[str, tuple[str, ...]]]:
        """(left: where -> (vip, port, protocol, why), ignored: service -> features) of the
        translation in force: what `accel services` shows beside the table."""
        with self.cache.lock:
            tr = self.cache.translation
        if tr is None:
            return {}, {}
        left = {w: (str(v), p, proto, tr.skipped[w]) for w, (v, p, proto) in tr.left.items()}
        return left, dict(tr.ignored)

    def policy_ignored(self) -> dict[str, str]:
        """What the policy compiler left out of the workload API's policies, and why."""
        c = self.cache
        return dict(c.policy.ignored) if isinstance(c, WorkloadCache) and c.policy else {}

    def state(self) -> dict:
        s, c = self.stream, self.cache
        with s.lock, c.lock:
            tr = c.translation
            extra = {}
            if isinstance(c, WorkloadCache):
                extra = {"workloads": len(c.state.workloads), "policies": len(c.state.policies),
                         "policy_ignored": self.policy_ignored()}
            return {
                "connected": s.connected,
                "target": self.target,
                "api": self.api,
                **extra,
                "protocol": "delta" if self.delta else "sotw",
                "node_id": self.node.id,
                "reconnects": s.reconnects,
                "services": len(c.table.services) if c.table else None,
                "pending": c.pending(),
                "skipped": dict(tr.skipped) if tr else {},
                "ignored": {n: "; ".join(f) for n, f in tr.ignored.items()} if tr else {},
                **s.wire_state(),
            }
