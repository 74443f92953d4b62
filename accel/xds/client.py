"""The agent's ADS client: xDS into ServiceTables, state of the world or (delta=True)
incremental.

LDS and CDS are wildcard subscriptions; EDS follows the clusters CDS yields and RDS the
route configs listeners name. A response is ACKed only after `on_update` accepted the
table it leads to; anything that fails (bad resources, a ValidationError or any other
exception from on_update) is NACKed with the reason and the last good state stays.
The Delta protocol's wire side lives in client_delta.py; what a response does to the
resources held and the table is the same for both.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import code_pb2, status_pb2

from accel.model import ServiceTable
from accel.xds import translate
from accel.xds.client_delta import DeltaADS
from accel.xds.kinds import Packed, raw_items, raw_of
from accel.xds.translate import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources

log = logging.getLogger(__name__)

OnUpdate = Callable[[ServiceTable], None]
Event = Callable[[str, dict], None]
# The largest DiscoveryResponse accepted: room for ~400,000 services' listeners.
MAX_RESPONSE_BYTES = 256 << 20
# Subscribe parents first so children are asked for as soon as their names are known.
SUBSCRIBE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
STABLE_STREAM_S = 5.0


@dataclass
class _TypeState:
    last_ack_version: str = ""
    last_nonce: str = ""
    last_nack_error: str | None = None
    last_update_time: float | None = None
    names: frozenset[str] = frozenset()  # EDS/RDS subscription
    sorted_names: tuple[str, ...] = ()  # the same, as every request sends it
    subscribed: bool = False  # requested on the current stream
    stream_nonce: str = ""  # nonces mean nothing on another stream


@dataclass(frozen=True)
class _Result:
    resources: Resources
    table: ServiceTable | None  # None: not synced yet (no LDS or no CDS so far)
    pending: dict[str, str]
    eds_names: frozenset[str]
    rds_names: frozenset[str]
    count: int
    translation: translate.Translation | None = None  # with `table`


class XdsClient(DeltaADS):
    """Run with start()/stop(); `events` is a list of callables (kind, info) called with
    "applied" after each ACK and "rejected" after each NACK. delta=True speaks incremental
    xDS (DeltaAggregatedResources) instead of state of the world."""

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
        self.target = target
        self.delta = delta
        self.node = base_pb2.Node(id=node_id, cluster=cluster, user_agent_name="meshaccel")
        if metadata:  # what a controller keys its answer on (istiod: NAMESPACE, ...)
            self.node.metadata.update(dict(metadata))
        self.on_update = on_update
        self.credentials = credentials
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.events: list[Event] = []
        self._types = {t: _TypeState() for t in SUBSCRIBE_ORDER}
        self._res = Resources.packed()  # wire bytes: messages cost ~18x (kinds.Packed)
        self._seen: set[str] = set()
        self._table: ServiceTable | None = None
        self._tr: translate.Translation | None = None  # the translation _table came from
        self._pending: dict[str, str] = {}
        self._memo = translate.Memo()
        self._names_cache: dict[str, tuple[dict, frozenset[str]]] = {}
        # Delta: name -> version of each resource held (a superset of the names held:
        # stale entries go when it is worth it, see client_delta).
        self._versions: dict[str, dict[str, str]] = {t: {} for t in SUBSCRIBE_ORDER}
        # perf_counter() when the response being handled arrived (for latency measurements).
        self.last_received = 0.0
        self._connected = False
        self._stream_gen = 0  # which stream _connected speaks of
        self._reconnects = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: grpc.Future | None = None
        self._lock = threading.Lock()

    # -- public

    def start(self) -> XdsClient:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="xds-client", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread:
            self._thread.join(timeout)
            self._thread = None

    @property
    def table(self) -> ServiceTable | None:
        """The last table on_update accepted (stays in force while disconnected)."""
        return self._table

    def report(self) -> tuple[dict[str, tuple[str, int, str, str]], dict[str, tuple[str, ...]]]:
        """(left: where -> (vip, port, protocol, why), ignored: service -> features) of the
        translation in force: what `accel services` shows beside the table."""
        with self._lock:
            tr = self._tr
        if tr is None:
            return {}, {}
        left = {w: (str(v), p, proto, tr.skipped[w]) for w, (v, p, proto) in tr.left.items()}
        return left, dict(tr.ignored)

    def state(self) -> dict:
        with self._lock:
            out: dict = {
                "connected": self._connected,
                "target": self.target,
                "protocol": "delta" if self.delta else "sotw",
                "node_id": self.node.id,
                "reconnects": self._reconnects,
                "services": len(self._table.services) if self._table else None,
                "pending": dict(self._pending),
                "skipped": dict(self._tr.skipped) if self._tr else {},
                "ignored": {n: "; ".join(f) for n, f in self._tr.ignored.items()}
                if self._tr else {},
            }
            for t, ts in self._types.items():
                out[t] = {
                    "last_ack_version": ts.last_ack_version,
                    "last_nonce": ts.last_nonce,
                    "last_nack_error": ts.last_nack_error,
                    "last_update_time": ts.last_update_time,
                    "resource_count": len(self._res.of(t)),
                }
            return out

    # -- the stream

    def _run(self) -> None:
        backoff = self.backoff_initial
        while not self._stop.is_set():
            went_well = self._stream_once()
            if self._stop.is_set():
                break
            if went_well:
                backoff = self.backoff_initial
            # Full jitter on the upper half keeps a fleet of agents from reconnecting in step.
            delay = random.uniform(backoff / 2, backoff)
            backoff = min(backoff * 2, self.backoff_max)
            log.info("xDS: reconnecting to %s in %.2fs", self.target, delay)
            self._reconnects += 1
            self._stop.wait(delay)

    def _stream_once(self) -> bool:
        """One stream, until it ends; True if it went well (a response, or up for a while)."""
        out: queue.Queue = queue.Queue()

        def requests() -> Iterator[discovery_pb2.DiscoveryRequest]:
            while True:
                item = out.get()
                if item is None:
                    return
                yield item

        # Keepalive within what servers accept by default (5 min), to notice a dead peer.
        # State of the world is big: LDS for 10,000 services is 5.5 MB, past gRPC's 4 MB
        # default, which would end every stream at its first response.
        options = [("grpc.keepalive_time_ms", 300_000), ("grpc.keepalive_timeout_ms", 20_000),
                   ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
        channel = (grpc.secure_channel(self.target, self.credentials, options=options)
                   if self.credentials else grpc.insecure_channel(self.target, options=options))
        got = False
        started = time.monotonic()
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            for ts in self._types.values():
                ts.subscribed = False
                ts.stream_nonce = ""
            if self.delta:
                for req in self._delta_first_requests():
                    out.put(req)
                self._call = call = stub.DeltaAggregatedResources(requests())
                handle = self._handle_delta
            else:
                first = True
                # Resubscribe with what we hold: the server can skip what we already have.
                for t in SUBSCRIBE_ORDER:
                    ts = self._types[t]
                    if t in (ENDPOINT, ROUTE) and not ts.names:
                        continue
                    out.put(self._request(t, nonce="", node=first))
                    ts.subscribed = True
                    first = False
                self._call = call = stub.StreamAggregatedResources(requests())
                handle = self._handle
            if self._stop.is_set():
                call.cancel()
            with self._lock:
                self._stream_gen += 1
                gen = self._stream_gen
            # A Delta server has nothing to say to a client that is up to date, so a first
            # response cannot be what tells the stream is up: a ready channel with the call
            # still open is.
            def on_state(state: grpc.ChannelConnectivity) -> None:
                if state == grpc.ChannelConnectivity.READY:
                    self._mark_connected(gen, call)

            channel.subscribe(on_state)
            for resp in call:
                if not got:
                    got = True
                    with self._lock:
                        self._connected = True
                    log.info("xDS: connected to %s%s", self.target,
                             " (delta)" if self.delta else "")
                handle(resp, out)
        except grpc.RpcError as e:
            if not self._stop.is_set():
                code = e.code() if isinstance(e, grpc.Call) else None
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                log.warning("xDS stream to %s failed: %s %s", self.target, code, details)
                if self.delta and code == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("xDS: %s does not serve incremental xDS; without --xds-delta "
                                "the agent uses state of the world", self.target)
        finally:
            with self._lock:
                self._connected = False
                self._stream_gen += 1
            out.put(None)
            self._call = None
            channel.close()
        if got and not self._stop.is_set():
            log.warning("xDS stream to %s ended; keeping the last good table", self.target)
        # A stream that stayed up a while was a success even without a response (an
        # up-to-date Delta client gets none): the next reconnect need not back off further.
        return got or time.monotonic() - started >= STABLE_STREAM_S

    def _mark_connected(self, gen: int, call) -> None:
        with self._lock:
            if gen == self._stream_gen and call.is_active() and not self._connected:
                self._connected = True
                log.info("xDS: stream to %s open", self.target)

    def _request(self, t: str, *, nonce: str, node: bool = False,
                 error: str | None = None) -> discovery_pb2.DiscoveryRequest:
        ts = self._types[t]
        req = discovery_pb2.DiscoveryRequest(
            type_url=t, version_info=ts.last_ack_version, response_nonce=nonce,
            resource_names=ts.sorted_names if t in (ENDPOINT, ROUTE) else [])
        if node:
            req.node.CopyFrom(self.node)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT,
                                                        message=error))
        return req

    # -- one response

    def _handle(self, resp: discovery_pb2.DiscoveryResponse, out: queue.Queue) -> None:
        self.last_received = time.perf_counter()
        t = resp.type_url
        if t not in self._types:
            log.warning("xDS: ignoring a response of unrequested type %r", t)
            return
        self._take(
            t, resp.nonce, resp.version_info, out,
            # SotW LDS/CDS responses are complete: what is absent is gone.
            lambda: self._apply(t, translate.unpack(t, resp.resources),
                                complete=t in translate.WILDCARD_TYPES),
            lambda error: self._request(t, nonce=resp.nonce, error=error))

    def _take(self, t: str, nonce: str, version: str, out: queue.Queue,
              apply: Callable[[], _Result], reply: Callable[[str | None], object],
              commit: Callable[[_Result], None] | None = None) -> None:
        """Apply a response and ACK it, or NACK it with the reason: `apply` computes the new
        state (raising leaves everything as it was), `reply(error)` makes the ACK/NACK, and
        `commit` stores what else the protocol keeps (under the lock, with the state)."""
        ts = self._types[t]
        try:
            r = apply()
        except Exception as e:  # noqa: BLE001 -- every failure is a NACK, never a crash
            msg = str(e) or type(e).__name__
            with self._lock:
                ts.last_nonce = ts.stream_nonce = nonce
                ts.last_nack_error = msg
            log.warning("xDS: NACK %s version %s: %s", translate.KIND[t], version, msg)
            out.put(reply(msg))
            self._emit("rejected", {"type_url": t, "version": version, "nonce": nonce,
                                    "error": msg})
            return
        with self._lock:
            self._res = r.resources
            self._seen.add(t)
            if r.table is not None:
                self._table = r.table
                self._tr = r.translation
                self._pending = r.pending
            if commit is not None:
                commit(r)
            ts.last_ack_version = version
            ts.last_nonce = ts.stream_nonce = nonce
            ts.last_nack_error = None
            ts.last_update_time = time.time()
        out.put(reply(None))
        self._emit("applied", {"type_url": t, "version": version, "nonce": nonce,
                               "resources": r.count,
                               "services": len(r.table.services) if r.table else None,
                               "pending": sorted(r.pending)})
        self._resubscribe(ENDPOINT, r.eds_names, out)
        self._resubscribe(ROUTE, r.rds_names, out)

    def _apply(self, t: str, items: dict, *, removed: frozenset[str] = frozenset(),
               complete: bool = False) -> _Result:
        """Validate a response's resources (`items` added or changed, `removed` gone; or with
        `complete`, items are all there is) against the rest of the state and hand the table
        to on_update; raise (-> NACK) without changing anything if either fails."""
        if t == ENDPOINT and not removed and not complete:
            fast = self._apply_endpoints(items)
            if fast is not None:
                return fast
        if complete:
            merged = items
        else:
            # A response need not repeat every resource: absence is no removal. EDS/RDS take
            # only the names subscribed to.
            wanted = self._types[t].names if t in (ENDPOINT, ROUTE) else None
            held = self._res.of(t)
            assert isinstance(held, Packed)
            merged = (held.without(removed) if removed else held).updated(
                {n: m for n, m in items.items() if wanted is None or n in wanted})
        cand = self._res.replace(t, merged)
        # Children go with their parents (EDS follows CDS, RDS follows LDS).
        eds_names = self._names(CLUSTER, cand.clusters, translate.cluster_eds_names)
        rds_names = self._names(LISTENER, cand.listeners, translate.listener_rds_names)
        assert isinstance(cand.routes, Packed) and isinstance(cand.endpoints, Packed)
        cand = Resources(cand.listeners, cand.routes.only(rds_names), cand.clusters,
                         cand.endpoints.only(eds_names))
        seen = self._seen | {t}
        tr = translate.to_table(cand, strict=False, cds_seen=CLUSTER in seen,
                                check_clusters=_changed_listeners(t, self._res, cand, items),
                                previous=self._table, memo=self._memo)
        table = None
        if self._table is not None or _synced(seen, eds_names, rds_names):
            if self._table is None or table_changed(self._table, tr.table):
                self.on_update(tr.table)
            else:
                # Keep the table on_update last took: the next one derives from it, which
                # is what lets the agent apply just the difference.
                tr = dataclasses.replace(tr, table=self._table)
            table = tr.table
        return _Result(cand, table, dict(tr.pending), eds_names, rds_names, len(merged), tr)

    def _apply_endpoints(self, items: dict) -> _Result | None:
        """An EDS response, when only ClusterLoadAssignments change: rebuild just the services
        made from the changed ones (translate.update_endpoints) and hand on_update a table
        derived from the last. None: this needs the full translation."""
        prev = self._tr
        if prev is None or prev.table is not self._table:
            return None
        eds_names = self._names(CLUSTER, self._res.clusters, translate.cluster_eds_names)
        wanted = self._types[ENDPOINT].names
        old = self._res.endpoints
        fresh = {n: m for n, m in items.items() if n in wanted and n in eds_names}
        tr = translate.update_endpoints(
            prev, {n: m for n, m in fresh.items() if raw_of(old, n) != m.SerializeToString()})
        if tr is None:
            return None
        if tr.table is not prev.table:
            if table_changed(prev.table, tr.table):
                self.on_update(tr.table)
            else:
                tr = prev
        assert isinstance(old, Packed)
        merged = old.updated(fresh)
        return _Result(self._res.replace(ENDPOINT, merged), tr.table, dict(tr.pending),
                       eds_names, self._names(LISTENER, self._res.listeners,
                                              translate.listener_rds_names),
                       len(merged), tr)

    def _names(self, t: str, resources: dict, fn: Callable[[dict], set[str]]) -> frozenset[str]:
        """EDS names of the clusters / RDS names of the listeners: each walks every resource,
        so it is redone only for a new cluster / listener set (Resources.replace keeps the
        dicts of the types a response did not touch)."""
        hit = self._names_cache.get(t)
        if hit is None or hit[0] is not resources:
            hit = self._names_cache[t] = (resources, frozenset(fn(resources)))
        return hit[1]

    def _resubscribe(self, t: str, names: frozenset[str], out: queue.Queue) -> None:
        if self.delta:
            self._delta_resubscribe(t, names, out)
            return
        ts = self._types[t]
        if names == ts.names and (ts.subscribed or not names):
            return
        with self._lock:
            ts.names = names
            ts.sorted_names = tuple(sorted(names))
            # The removed names go too: state follows the subscription.
            held = self._res.of(t)
            assert isinstance(held, Packed)
            self._res = self._res.replace(t, held.only(names))
        out.put(self._request(t, nonce=ts.stream_nonce))
        ts.subscribed = True

    def _emit(self, kind: str, info: dict) -> None:
        for fn in list(self.events):
            try:
                fn(kind, info)
            except Exception:  # noqa: BLE001 -- an observer must not break the stream
                log.exception("xDS event hook failed")


def _synced(seen: set[str], eds: frozenset[str], rds: frozenset[str]) -> bool:
    """The first table waits for one answer of every type in use: an agent must not flush
    its datapath for a table that only means "not all there yet". Later tables hold back
    just the services still waiting (translate.to_table's `previous`)."""
    return (LISTENER in seen and CLUSTER in seen and (not eds or ENDPOINT in seen)
            and (not rds or ROUTE in seen))


def _changed_listeners(t: str, old: Resources, new: Resources, items: dict) -> set[str]:
    """Listeners whose cluster reference is new in this response: only those are NACKed for
    naming an unknown cluster."""
    if t == LISTENER:
        return {n for n, raw in raw_items(new.listeners) if raw_of(old.listeners, n) != raw}
    if t == ROUTE:
        routes = set(items)
        out = set()
        for n, lst in new.listeners.items():
            if translate.listener_rds_names({n: lst}) & routes:
                out.add(n)
        return out
    return set()


def table_changed(a: ServiceTable, b: ServiceTable) -> bool:
    return not a.equivalent(b)
