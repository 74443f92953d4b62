"""The agent's xDS client: the stream (stream.py) feeding a cache (cache.py) that flushes
one consistent ServiceTable to `on_update`, over state of the world or (delta=True)
incremental xDS.

LDS and CDS are wildcard subscriptions; EDS follows the clusters CDS yields and RDS the
route configs listeners name. A response is ACKed only after `on_update` accepted the
table it leads to; anything that fails (bad resources, a ValidationError or any other
exception from on_update) is NACKed with the reason and the last good state stays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grpc
from envoy.config.core.v3 import base_pb2

from accel.model import ServiceTable
from accel.xds.cache import EnvoyCache
from accel.xds.stream import MAX_RESPONSE_BYTES, AdsStream, Event

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


class XdsClient:
    """Run with start()/stop(); `events` is a list of callables (kind, info) called with
    "applied" after each ACK and "rejected" after each NACK."""

    def __init__(
        self,
        target: str,
        node_id: str,
        on_update: OnUpdate,
        *,
        cluster: str = "meshaccel",
        metadata: Mapping[str, object] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 15.0,
        delta: bool = False,
    ):
        self.cache = EnvoyCache(on_update)
        self.stream = AdsStream(target, node(node_id, cluster, metadata), self.cache,
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

    def state(self) -> dict:
        s, c = self.stream, self.cache
        with s.lock, c.lock:
            tr = c.translation
            return {
                "connected": s.connected,
                "target": self.target,
                "protocol": "delta" if self.delta else "sotw",
                "node_id": self.node.id,
                "reconnects": s.reconnects,
                "services": len(c.table.services) if c.table else None,
                "pending": c.pending(),
                "skipped": dict(tr.skipped) if tr else {},
                "ignored": {n: "; ".join(f) for n, f in tr.ignored.items()} if tr else {},
                **s.wire_state(),
            }
