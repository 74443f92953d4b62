"""What the agent keeps of the connection records: a bounded history (for `accel flows`
and its --since), live subscribers (--follow, the WatchFlows stream) and per-service
totals for Prometheus, all fed by one call per batch of records."""

from __future__ import annotations

import bisect
import queue
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from accel.flows.record import FlowRecord

HISTORY = 10000  # records kept for `accel flows` without --follow
WATCH_QUEUE = 10000  # records a slow subscriber may fall behind before it loses some
MAX_TRACKED = 262144  # open connections followed for the active gauge and byte deltas
ENDPOINT_SERIES = 1000  # per-endpoint series at most; further endpoints go to "other"
# Connection duration buckets, seconds: from a loopback request to a long stream.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 600.0)

ServiceKey = tuple[str, str]  # (service, namespace)


@dataclass
class ServiceTotals:
    connections: int = 0
    active: int = 0
    sent: int = 0
    received: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # by reason
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    durations: int = 0
    duration_sum: float = 0.0


@dataclass
class EndpointTotals:
    connections: int = 0
    sent: int = 0
    received: int = 0


@dataclass
class _Open:
    key: ServiceKey
    endpoint: str
    sent: int = 0
    received: int = 0


class FlowStore:
    def __init__(self, history: int = HISTORY, endpoint_series: int = ENDPOINT_SERIES):
        self.lock = threading.Lock()
        self.history: deque[FlowRecord] = deque(maxlen=history)
        self.services: dict[ServiceKey, ServiceTotals] = {}
        self.endpoints: dict[tuple[str, str, str], EndpointTotals] = {}
        self.endpoint_series = endpoint_series
        self._open: dict[int, _Open] = {}
        self._watchers: list[queue.Queue[FlowRecord]] = []
        self.received = 0
        self.watch_dropped = 0  # records a full subscriber queue did not take
        self.untracked = 0  # connections past MAX_TRACKED: counted, not followed

    def add(self, records: Iterable[FlowRecord]) -> None:
        with self.lock:
            for r in records:
                self.received += 1
                self.history.append(r)
                self._count(r)
                for q in self._watchers:
                    try:
                        q.put_nowait(r)
                    except queue.Full:
                        self.watch_dropped += 1

    def _totals(self, r: FlowRecord) -> ServiceTotals:
        key = (r.service, r.namespace)
        t = self.services.get(key)
        if t is None:
            t = self.services[key] = ServiceTotals()
        return t

    def _endpoint(self, r: FlowRecord) -> EndpointTotals:
        key = (r.service, r.namespace, r.dst)
        e = self.endpoints.get(key)
        if e is None:
            if len(self.endpoints) >= self.endpoint_series:
                key = (r.service, r.namespace, "other")
                e = self.endpoints.get(key)
            if e is None:
                e = self.endpoints[key] = EndpointTotals()
        return e

    def _count(self, r: FlowRecord) -> None:
        t = self._totals(r)
        if r.event == "refused":
            t.failures[r.reason] = t.failures.get(r.reason, 0) + 1
            return
        o = self._open.get(r.id)
        if o is None:  # its first event (an open, or a later one whose open was dropped)
            t.connections += 1
            self._endpoint(r).connections += 1
            if r.event != "close":
                if len(self._open) < MAX_TRACKED:
                    self._open[r.id] = o = _Open((r.service, r.namespace), r.dst)
                    t.active += 1
                else:
                    self.untracked += 1
        # Bytes as deltas: a report adds what grew since the last one, the close the rest.
        d_sent = max(0, r.bytes_sent - (o.sent if o else 0))
        d_recv = max(0, r.bytes_received - (o.received if o else 0))
        if o is not None:
            o.sent = max(o.sent, r.bytes_sent)
            o.received = max(o.received, r.bytes_received)
        t.sent += d_sent
        t.received += d_recv
        e = self._endpoint(r)
        e.sent += d_sent
        e.received += d_recv
        if r.event == "close":
            if self._open.pop(r.id, None) is not None:
                t.active -= 1
            # Per bucket (the last one past every bound); the scrape makes them cumulative.
            t.buckets[bisect.bisect_left(DURATION_BUCKETS, r.duration)] += 1
            t.durations += 1
            t.duration_sum += r.duration

    # ---- readers ---------------------------------------------------------------------------

    def recent(self, since: float = 0.0) -> list[FlowRecord]:
        return self.recent_and_watch(since, False)[0]

    def recent_and_watch(self, since: float = 0.0, follow: bool = True
                         ) -> tuple[list[FlowRecord], queue.Queue[FlowRecord] | None]:
        """The records kept that ended at `since` or later and, with follow, a queue of
        every record after them (unwatch it when done)."""
        with self.lock:
            kept = [r for r in self.history if r.time_end >= since]
            q: queue.Queue[FlowRecord] | None = None
            if follow:
                q = queue.Queue(maxsize=WATCH_QUEUE)
                self._watchers.append(q)
        return kept, q

    def unwatch(self, q: queue.Queue[FlowRecord]) -> None:
        with self.lock:
            if q in self._watchers:
                self._watchers.remove(q)

    def snapshot(self) -> tuple[dict[ServiceKey, ServiceTotals],
                                dict[tuple[str, str, str], EndpointTotals]]:
        """Copies of the per-service and per-endpoint totals, for a scrape."""
        with self.lock:
            svc = {k: ServiceTotals(v.connections, v.active, v.sent, v.received,
                                    dict(v.failures), list(v.buckets), v.durations,
                                    v.duration_sum) for k, v in self.services.items()}
            eps = {k: EndpointTotals(v.connections, v.sent, v.received)
                   for k, v in self.endpoints.items()}
        return svc, eps
