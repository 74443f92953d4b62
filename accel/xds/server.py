"""The controller's ADS server: LDS/RDS/CDS/EDS over one gRPC stream, state of the world
(StreamAggregatedResources) or incremental (DeltaAggregatedResources).

It serves what translate.py makes of a TableSource's table, to meshaccel agents and to
gRPC proxyless clients alike. Each table change is a new version, pushed to every stream
in make-before-break order (CDS, EDS, LDS, RDS), and only for resources that changed:
SotW LDS/CDS responses hold every resource, SotW EDS/RDS pushes only the changed ones, and
Delta responses only the changed ones of every type plus the names removed (removals go
children first: RDS, LDS, EDS, CDS).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from accel.model import Service, ServiceTable
from accel.sources import TableSource
from accel.xds import translate
from accel.xds.server_delta import Changes, DeltaSubscription
from accel.xds.workload import kinds as workload_kinds

log = logging.getLogger(__name__)

ADS_SERVICE = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name
CONTROL_PLANE = "meshaccel-controller"


@dataclass(frozen=True)
class Api:
    """The resource types a server speaks: their kind names, push order (removals go the
    other way) and which a client may subscribe to by wildcard."""

    name: str
    kinds: dict[str, str]
    push_order: tuple[str, ...]
    wildcard: frozenset[str]


ENVOY_API = Api("envoy", translate.KIND, translate.PUSH_ORDER,
                frozenset(translate.WILDCARD_TYPES))
# Istio ambient's, as istiod serves ztunnel (both types wildcard).
WORKLOAD_API = Api("workload", workload_kinds.KIND, workload_kinds.PUSH_ORDER,
                   frozenset(workload_kinds.TYPES))
APIS = {a.name: a for a in (ENVOY_API, WORKLOAD_API)}


@dataclass(frozen=True)
class Snapshot:
    version: str
    table: ServiceTable
    resources: dict[str, dict[str, any_pb2.Any]]  # type_url -> name -> packed resource
    # type_url -> name -> digest of the bytes: what SotW compares and Delta's per-resource
    # version (the same across controller restarts, so reconnecting clients keep theirs).
    digests: dict[str, dict[str, str]]
    # Service -> its packed resources: the next snapshot re-packs only changed services.
    cache: dict[Service, dict] = field(default_factory=dict, repr=False, compare=False)
    api: Api = ENVOY_API

    @classmethod
    def workload(cls, version: str, table: ServiceTable, node_name: str = "") -> Snapshot:
        """The table as istiod would serve it to ztunnel (accel/xds/workload/from_table.py):
        every workload on node `node_name`."""
        from accel.xds.workload.from_table import workload_resources

        served = workload_resources(table, lambda _: node_name)
        for what, why in served.skipped.items():
            log.warning("workload API: not served: %s: %s", what, why)
        items = {workload_kinds.ADDRESS: served.addresses,
                 workload_kinds.AUTHORIZATION: served.authorizations}
        resources = {t: {n: workload_kinds.pack(m) for n, m in items[t].items()}
                     for t in workload_kinds.TYPES}
        digests = {t: {n: hashlib.blake2b(a.value, digest_size=16).hexdigest()
                       for n, a in resources[t].items()} for t in workload_kinds.TYPES}
        return cls(version, table, resources, digests, api=WORKLOAD_API)

    @classmethod
    def of(cls, version: str, table: ServiceTable, previous: Snapshot | None = None) -> Snapshot:
        old = previous.cache if previous else {}
        cache: dict[Service, dict] = {}

        def packed(svc: Service) -> dict:
            hit = cache.get(svc) or old.get(svc)
            if hit is None:
                hit = {t: [(translate.resource_name(m), _packed(m)) for m in msgs]
                       for t, msgs in translate.service_resources(svc).items()}
            cache[svc] = hit
            return hit

        parts = translate.merge(table, packed)
        translate.merge_mesh(table, parts, _packed)
        resources = {t: {n: a for n, (a, _) in items.items()} for t, items in parts.items()}
        digests = {t: {n: d for n, (_, d) in items.items()} for t, items in parts.items()}
        return cls(version, table, resources, digests, cache)

    @classmethod
    def of_resources(cls, version: str,
                     items: Mapping[str, Mapping[str, message.Message]],
                     api: Api = ENVOY_API) -> Snapshot:
        """Resources as they are (type_url -> name -> message), in another control plane's
        shape (`accel bench xds --shape istio`, tests of the workload API): served like a
        table's, with no table behind them."""
        resources: dict[str, dict[str, any_pb2.Any]] = {}
        digests: dict[str, dict[str, str]] = {}
        for t in api.push_order:
            for name, msg in items.get(t, {}).items():
                a = workload_kinds.pack(msg) if api is WORKLOAD_API else _packed(msg)[0]
                resources.setdefault(t, {})[name] = a
                digests.setdefault(t, {})[name] = \
                    hashlib.blake2b(a.value, digest_size=16).hexdigest()
        return cls(version, ServiceTable(()), resources, digests, api=api)


def _packed(msg) -> tuple[any_pb2.Any, str]:
    a = any_pb2.Any()
    a.Pack(msg)
    return a, hashlib.blake2b(a.value, digest_size=16).hexdigest()


@dataclass
class _Sub:
    """One resource type on one stream."""

    names: set[str] | None = None  # None: wildcard
    nonce: str = ""  # last nonce sent
    sent_version: str = ""
    sent: dict[str, str] | None = None  # name -> digest of what the client last got
    acked_version: str = ""
    nack_error: str | None = None
    nacked_version: str = ""


@dataclass
class _Stream:
    id: int
    peer: str
    node_id: str = ""
    events: queue.Queue = field(default_factory=queue.Queue)
    subs: dict[str, _Sub] = field(default_factory=dict)
    delta: dict[str, DeltaSubscription] | None = None  # Delta xDS streams only
    opened: float = field(default_factory=time.time)


_END = object()
_PUSH = object()


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, snapshot: Snapshot):
        self._snapshot = snapshot
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._epoch = os.urandom(4).hex()  # nonces stay unique across restarts
        self.acks = 0
        self.nacks = 0

    # -- state shared with the server

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.events.put(_PUSH)

    def close_all(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.events.put(_END)

    def clients(self) -> list[dict]:
        with self._lock:
            streams = list(self._streams.values())
        return [{
            "peer": s.peer, "node_id": s.node_id, "opened": s.opened,
            "protocol": "sotw" if s.delta is None else "delta",
            "types": {t: {"names": None if sub.names is None else sorted(sub.names),
                          "sent_version": sub.sent_version, "acked_version": sub.acked_version,
                          "nack_error": sub.nack_error}
                      for t, sub in list(s.subs.items())} if s.delta is None else
            {t: sub.describe() for t, sub in list(s.delta.items())},
        } for s in streams]

    def _open(self, request_iterator, context, delta: bool) -> _Stream:
        """Register a stream and start reading its requests into its event queue."""
        stream = _Stream(next(self._ids), context.peer(), delta={} if delta else None)
        with self._lock:
            self._streams[stream.id] = stream
        context.add_callback(lambda: stream.events.put(_END))

        def read() -> None:
            try:
                for req in request_iterator:
                    stream.events.put(req)
            except Exception as e:  # the client went away: the stream is over
                log.debug("stream %d read ended: %s", stream.id, e)
            stream.events.put(_END)

        threading.Thread(target=read, name=f"ads-read-{stream.id}", daemon=True).start()
        log.info("ADS stream %d (%s) opened from %s", stream.id,
                 "delta" if delta else "state of the world", stream.peer)
        return stream

    def _close(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.pop(stream.id, None)
        log.info("ADS stream %d from %s (node %r) closed", stream.id, stream.peer,
                 stream.node_id)

    def _nonce(self) -> str:
        return f"{self._epoch}-{next(self._nonces)}"

    # -- state of the world

    def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802
        return self._serve(request_iterator, context, False, self._sotw_push,
                           self._on_request)

    def _serve(self, request_iterator, context, delta: bool, push, answer):
        """One ADS stream, either flavour: requests and pushes arrive on one queue and are
        answered in order until the client goes."""
        stream = self._open(request_iterator, context, delta=delta)
        try:
            while True:
                ev = stream.events.get()
                if ev is _END:
                    return
                if ev is _PUSH:
                    yield from push(stream, self._snapshot)
                    continue
                resp = answer(stream, ev)
                if resp is not None:
                    yield resp
        finally:
            self._close(stream)

    def _sotw_push(self, stream: _Stream, snap: Snapshot):
        for t in snap.api.push_order:
            if t in stream.subs:
                resp = self._respond(stream, t, snap, only_if_changed=True)
                if resp is not None:
                    yield resp

    def _kind(self, type_url: str) -> str:
        return self._snapshot.api.kinds.get(type_url, type_url)

    def _requested_type(self, stream: _Stream, req) -> str | None:
        """Either flavour's request: note who asks; the type it asks for, if we serve it."""
        if req.HasField("node") and req.node.id:
            stream.node_id = req.node.id
        if req.type_url not in self._snapshot.api.kinds:
            log.warning("node %r asked for unknown type %r", stream.node_id, req.type_url)
            return None
        return req.type_url

    def _on_request(self, stream: _Stream,
                    req: discovery_pb2.DiscoveryRequest) -> discovery_pb2.DiscoveryResponse | None:
        t = self._requested_type(stream, req)
        if t is None:
            return None
        sub = stream.subs.get(t)
        if sub is not None and sub.nonce and req.response_nonce:
            if req.response_nonce != sub.nonce:
                return None  # answers an older response: superseded, ignore (xDS protocol)
            if req.HasField("error_detail"):
                self.nacks += 1
                sub.nack_error = req.error_detail.message
                sub.nacked_version = sub.sent_version
                log.warning("node %r (%s) NACKed %s version %s: %s", stream.node_id,
                            stream.peer, self._kind(t), sub.sent_version,
                            req.error_detail.message)
            else:
                self.acks += 1
                sub.acked_version = req.version_info
                sub.nack_error = None
                log.debug("node %r ACKed %s version %s", stream.node_id, self._kind(t),
                          req.version_info)
        names: set[str] | None = set(req.resource_names)
        if t in self._snapshot.api.wildcard and (not names or "*" in names):
            names = None
        first = sub is None
        if sub is None:
            sub = stream.subs[t] = _Sub()
        changed = first or names != sub.names
        sub.names = names
        if not changed:
            return None
        if not first and names is not None and not names - set(sub.sent or {}):
            # Fewer names: SotW EDS/RDS need no answer to an unsubscribe.
            if t not in self._snapshot.api.wildcard:
                sub.sent = {n: d for n, d in (sub.sent or {}).items() if n in names}
                return None
        return self._respond(stream, t, self._snapshot, only_if_changed=False)

    def _respond(self, stream: _Stream, t: str, snap: Snapshot,
                 only_if_changed: bool) -> discovery_pb2.DiscoveryResponse | None:
        sub = stream.subs[t]
        items = snap.resources[t]
        digests = snap.digests[t]
        names = sorted(items) if sub.names is None else sorted(n for n in sub.names if n in items)
        view = {n: digests[n] for n in names}
        if only_if_changed and view == sub.sent:
            return None
        if only_if_changed and sub.names is not None and sub.sent is not None:
            # EDS/RDS (named subscriptions): a push carries only the resources that changed,
            # as the xDS protocol allows for these types (absence is not removal). One
            # changed endpoint among 10,000 clusters is then one resource, not 10,000.
            names = [n for n in names if sub.sent.get(n) != view[n]]
            if not names:  # only removals, which EDS/RDS do not express: nothing to send
                sub.sent = view
                return None
        sub.sent = view
        sub.sent_version = snap.version
        sub.nonce = self._nonce()
        return discovery_pb2.DiscoveryResponse(
            version_info=snap.version, type_url=t, nonce=sub.nonce,
            resources=[items[n] for n in names],
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE))

    # -- incremental (Delta)

    def DeltaAggregatedResources(self, request_iterator, context):  # noqa: N802
        return self._serve(request_iterator, context, True, self._delta_push,
                           lambda stream, req: self._on_delta_request(stream, req,
                                                                      self._snapshot))

    def _on_delta_request(self, stream: _Stream, req: discovery_pb2.DeltaDiscoveryRequest,
                          snap: Snapshot) -> discovery_pb2.DeltaDiscoveryResponse | None:
        assert stream.delta is not None
        t = self._requested_type(stream, req)
        if t is None:
            return None
        sub = stream.delta.get(t)
        if sub is None:
            sub = stream.delta[t] = DeltaSubscription(t)
        verdict = sub.on_reply(req)
        if verdict == "nack":
            self.nacks += 1
            log.warning("node %r (%s) NACKed %s version %s: %s", stream.node_id, stream.peer,
                        self._kind(t), sub.sent_version, req.error_detail.message)
        elif verdict == "ack":
            self.acks += 1
            log.debug("node %r ACKed %s version %s", stream.node_id, self._kind(t),
                      sub.sent_version)
        # Subscription changes count even on a request carrying a stale nonce.
        due = sub.on_request(req)
        if due is None:
            return None
        changes = sub.changes(snap.digests[t], due.only)
        if not changes and not due.even_if_empty:
            return None
        return self._delta_response(stream, t, snap, changes)

    def _delta_push(self, stream: _Stream, snap: Snapshot):
        """A new snapshot: additions and changes parents first (CDS, EDS, LDS, RDS), then
        removals children first (RDS, LDS, EDS, CDS), so nothing points at what is gone."""
        assert stream.delta is not None
        todo = {t: sub.changes(snap.digests[t]) for t, sub in stream.delta.items() if sub.started}
        for t in snap.api.push_order:
            if todo.get(t) and todo[t].upsert:
                yield self._delta_response(stream, t, snap, Changes(todo[t].upsert, ()))
        for t in reversed(snap.api.push_order):
            if todo.get(t) and todo[t].remove:
                yield self._delta_response(stream, t, snap, Changes((), todo[t].remove))

    def _delta_response(self, stream: _Stream, t: str, snap: Snapshot,
                        changes: Changes) -> discovery_pb2.DeltaDiscoveryResponse:
        assert stream.delta is not None
        sub = stream.delta[t]
        items, versions = snap.resources[t], snap.digests[t]
        sub.sent(changes, versions)
        sub.sent_version = snap.version
        sub.nonce = self._nonce()
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snap.version, type_url=t, nonce=sub.nonce,
            resources=[discovery_pb2.Resource(name=n, version=versions[n], resource=items[n])
                       for n in changes.upsert],
            removed_resources=changes.remove,
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE))


class ControllerServer:
    """ADS + gRPC health + reflection, fed by a TableSource (which it owns once started)."""

    def __init__(self, source: TableSource, listen: str = "127.0.0.1:18000",
                 max_streams: int = 256, api: str = "envoy", node_name: str = ""):
        self.source = source
        self.listen = listen
        self.max_streams = max_streams
        self.api = APIS[api]
        self.node_name = node_name  # the workload API's Workload.node of every endpoint
        self.port = 0
        self._server: grpc.Server | None = None
        self._version = 0
        self._lock = threading.Lock()
        self._health = health.HealthServicer()
        self.ads: AdsServicer | None = None

    @property
    def version(self) -> str:
        return str(self._version)

    def start(self) -> ControllerServer:
        table = self.source.current()
        self._version = 1
        self.ads = AdsServicer(self._snapshot(self.version, table, None))
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_streams + 8,
                                       thread_name_prefix="controller"),
            options=[
                ("grpc.so_reuseport", 0),  # a port already taken must fail, not be shared
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (ADS_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        try:
            port = server.add_insecure_port(self.listen)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {self.listen}: {e}") from None
        if not port:
            raise OSError(f"cannot listen on {self.listen}")
        self.port = port
        server.start()
        self._server = server
        for svc in ("", ADS_SERVICE):
            self._health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        self.source.watch(self.update)
        log.info("controller serving xDS version %s (%d services) on %s", self.version,
                 len(table.services), self.listen)
        return self

    def update(self, table: ServiceTable) -> None:
        """Publish a new table to every stream (the source calls this on each change)."""
        with self._lock:
            assert self.ads is not None
            # Raises before anything changes.
            snap = self._snapshot(str(self._version + 1), table, self.ads.snapshot)
            self._version += 1
            self.ads.publish(snap)
        log.info("xDS version %s: %d services", snap.version, len(table.services))

    def publish_resources(self, items: Mapping[str, Mapping[str, message.Message]]) -> None:
        """Publish resources as they are (type_url -> name -> message, in this server's
        API) as the next version."""
        with self._lock:
            assert self.ads is not None
            self._version += 1
            self.ads.publish(Snapshot.of_resources(self.version, items, self.api))

    def _snapshot(self, version: str, table: ServiceTable,
                  previous: Snapshot | None) -> Snapshot:
        if self.api is WORKLOAD_API:
            return Snapshot.workload(version, table, self.node_name)
        if table.policies:
            log.warning("%d policies not served: Envoy's resources carry no authorization "
                        "for L4 identities; serve them with --xds-api workload",
                        len(table.policies))
        return Snapshot.of(version, table, previous)

    def stop(self, grace: float = 2.0) -> None:
        if self._server is None:
            return
        self._health.enter_graceful_shutdown()
        self.source.close()
        if self.ads:
            self.ads.close_all()  # end streams cleanly so clients reconnect at once
        self._server.stop(grace).wait()
        self._server = None

    def __enter__(self) -> ControllerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
