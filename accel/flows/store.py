"""What the agent keeps of the connection records: a bounded history (for `accel flows`
and its --since), live subscribers (--follow, the WatchFlows stream) and per-service
totals for Prometheus, all fed by one call per batch of events.

Events are kept as the rows the ring gave (record.py Row) and counted from them: a
FlowRecord, with its strings, is built only for whoever reads one (a subscriber, the API,
the flow log). At thousands of connections a second that is most of the agent's work."""

from __future__ import annotations

import bisect
import queue
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from accel.flows.record import (
    COOKIE,
    KIND,
    REASON,
    RECEIVED,
    SENT,
    SERVER,
    SERVER_PORT,
    T_END,
    T_START,
    Decoder,
    FlowRecord,
    Row,
    endpoint,
)

HISTORY = 10000  # records kept for `accel flows` without --follow
WATCH_QUEUE = 10000  # records a slow subscriber may fall behind before it loses some
MAX_TRACKED = 262144  # open connections followed for the active gauge and byte deltas
ENDPOINT_SERIES = 1000  # per-endpoint series at most; further endpoints go to "other"
# Connection duration buckets, seconds: from a loopback request to a long stream.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 600.0)

ServiceKey = tuple[str, str]  # (service, namespace)
EndpointKey = tuple[str, str, bytes, int]  # service, namespace, address, port


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
    sent: int = 0
    received: int = 0


class FlowStore:
    def __init__(self, decoder: Decoder, history: int = HISTORY,
                 endpoint_series: int = ENDPOINT_SERIES):
        self.decoder = decoder
        self.lock = threading.Lock()
        self.history: deque[Row] = deque(maxlen=history)
        self.services: dict[ServiceKey, ServiceTotals] = {}
        self.endpoints: dict[EndpointKey, EndpointTotals] = {}
        self.endpoint_series = endpoint_series
        self._open: dict[int, _Open] = {}
        self._watchers: list[queue.Queue[FlowRecord]] = []
        self.received = 0
        self.watch_dropped = 0  # records a full subscriber queue did not take
        self.untracked = 0  # connections past MAX_TRACKED: counted, not followed

    def add(self, rows: Iterable[Row]) -> None:
        k = self.decoder.kinds
        kinds = (k["open"], k["close"], k["refused"])
        with self.lock:
            for row in rows:
                self.received += 1
                self.history.append(row)
                self._count(row, *kinds)
                if self._watchers:
                    record = self.decoder.record(row)
                    for q in self._watchers:
                        try:
                            q.put_nowait(record)
                        except queue.Full:
                            self.watch_dropped += 1

    def _totals(self, key: ServiceKey) -> ServiceTotals:
        t = self.services.get(key)
        if t is None:
            t = self.services[key] = ServiceTotals()
        return t

    def _endpoint(self, key: ServiceKey, row: Row) -> EndpointTotals:
        ek = (*key, row[SERVER], row[SERVER_PORT])
        e = self.endpoints.get(ek)
        if e is None:
            if len(self.endpoints) >= self.endpoint_series:
                ek = (*key, b"", 0)  # "other"
                e = self.endpoints.get(ek)
            if e is None:
                e = self.endpoints[ek] = EndpointTotals()
        return e

    def _count(self, row: Row, open_: int, close: int, refused: int) -> None:
        key = self.decoder.service(row)
        t = self._totals(key)
        kind = row[KIND]
        if kind == refused:
            reason = self.decoder.reason.get(row[REASON], str(row[REASON]))
            t.failures[reason] = t.failures.get(reason, 0) + 1
            return
        cookie = row[COOKIE]
        e = self._endpoint(key, row)
        o = self._open.get(cookie)
        if o is None:  # its first event (an open, or a later one whose open was dropped)
            t.connections += 1
            e.connections += 1
            if kind != close:
                if len(self._open) < MAX_TRACKED:
                    self._open[cookie] = o = _Open()
                    t.active += 1
                else:
                    self.untracked += 1
        # Bytes as deltas: a report adds what grew since the last one, the close the rest.
        sent, received = row[SENT], row[RECEIVED]
        if o is not None:
            d_sent, d_recv = max(0, sent - o.sent), max(0, received - o.received)
            o.sent, o.received = max(o.sent, sent), max(o.received, received)
        else:
            d_sent, d_recv = sent, received
        t.sent += d_sent
        t.received += d_recv
        e.sent += d_sent
        e.received += d_recv
        if kind == close:
            if self._open.pop(cookie, None) is not None:
                t.active -= 1
            duration = max(0, row[T_END] - row[T_START]) / 1e9
            # Per bucket (the last one past every bound); the scrape makes them cumulative.
            t.buckets[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
            t.durations += 1
            t.duration_sum += duration

    # ---- readers ---------------------------------------------------------------------------

    def recent(self, since: float = 0.0) -> list[FlowRecord]:
        return self.recent_and_watch(since, False)[0]

    def recent_and_watch(self, since: float = 0.0, follow: bool = True
                         ) -> tuple[list[FlowRecord], queue.Queue[FlowRecord] | None]:
        """The records kept that ended at `since` (unix seconds) or later and, with follow,
        a queue of every record after them (unwatch it when done)."""
        after = self.decoder.boot_ns(since) if since else 0
        with self.lock:
            kept = [row for row in self.history if row[T_END] >= after]
            q: queue.Queue[FlowRecord] | None = None
            if follow:
                q = queue.Queue(maxsize=WATCH_QUEUE)
                self._watchers.append(q)
        return [self.decoder.record(row) for row in kept], q

    def unwatch(self, q: queue.Queue[FlowRecord]) -> None:
        with self.lock:
            if q in self._watchers:
                self._watchers.remove(q)

    def snapshot(self) -> tuple[dict[ServiceKey, ServiceTotals],
                                dict[tuple[str, str, str], EndpointTotals]]:
        """Copies of the per-service and per-endpoint totals (endpoints as "ip:port", past
        the cap "other"), for a scrape."""
        with self.lock:
            svc = {k: ServiceTotals(v.connections, v.active, v.sent, v.received,
                                    dict(v.failures), list(v.buckets), v.durations,
                                    v.duration_sum) for k, v in self.services.items()}
            eps = {(s, ns, endpoint(a, p) if a else "other"):
                   EndpointTotals(v.connections, v.sent, v.received)
                   for (s, ns, a, p), v in self.endpoints.items()}
        return svc, eps
