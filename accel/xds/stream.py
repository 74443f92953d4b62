"""The xDS stream: one ADS connection at a time, state of the world or incremental
(Delta) on the wire, ACK/NACK by nonce, subscriptions per type, reconnects with backoff.

What a response means is the Cache's business (cache.py): `take` computes the new state
from a response (raising leaves everything as it was: the stream NACKs with the reason),
`commit` makes it the state in force, after which the stream ACKs and subscribes to the
names the new state needs. The stream keeps only what the wire needs: per type the last
version and nonce, the names subscribed to and (Delta) each resource's version.

State of the world: wildcard types are requested without names, named types with every
name; a resubscription is a request with the new name list. Delta: the first request of a
stream carries initial_resource_versions = what is held, so a reconnect costs only what
changed meanwhile; names appear and go by resource_names_(un)subscribe.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import message
from google.rpc import code_pb2, status_pb2

from accel.model import ValidationError
from accel.xds.processors import Processor

log = logging.getLogger(__name__)

Event = Callable[[str, dict], None]
Request = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
# The largest response accepted: room for ~400,000 services' listeners (gRPC's default of
# 4 MB would end every stream of a large mesh at its first response).
MAX_RESPONSE_BYTES = 256 << 20
STABLE_STREAM_S = 5.0


@dataclass(frozen=True)
class Update:
    """One response, decoded: `items` added or changed, `removed` gone; with `complete`
    (a state-of-the-world response of a wildcard type) items are all there is."""

    type_url: str
    items: dict[str, message.Message]
    removed: frozenset[str] = frozenset()
    complete: bool = False


class Taken(Protocol):
    """What Cache.take computed: committed as a whole, or dropped."""

    count: int  # resources of the type held after it
    children: Mapping[str, frozenset[str]]  # named type -> the names to subscribe to
    info: Mapping[str, object]  # for the "applied" event (services, pending, ...)


class Cache(Protocol):
    processors: Sequence[Processor]  # in subscription order

    def take(self, update: Update) -> Taken: ...
    def commit(self, taken: Taken) -> None: ...
    def held(self, type_url: str) -> Collection[str]: ...
    def keep_only(self, type_url: str, names: frozenset[str]) -> None: ...


@dataclass
class _TypeState:
    last_ack_version: str = ""
    last_nonce: str = ""
    last_nack_error: str | None = None
    last_update_time: float | None = None
    names: frozenset[str] = frozenset()  # named types: the subscription
    sorted_names: tuple[str, ...] = ()  # the same, as every request sends it
    subscribed: bool = False  # requested on the current stream
    stream_nonce: str = ""  # nonces mean nothing on another stream


class AdsStream:
    """Run with start()/stop(); `events` are callables (kind, info) called with "applied"
    after each ACK and "rejected" after each NACK."""

    def __init__(self, target: str, node: base_pb2.Node, cache: Cache, *,
                 credentials: grpc.ChannelCredentials | None = None, delta: bool = False,
                 backoff_initial: float = 0.5, backoff_max: float = 15.0):
        self.target = target
        self.node = node
        self.cache = cache
        self.credentials = credentials
        self.delta = delta
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.events: list[Event] = []
        self.processors = {p.type_url: p for p in cache.processors}
        self.types = {t: _TypeState() for t in self.processors}
        # Delta: name -> version of each resource held (a superset of what is held: stale
        # entries go when it is worth it, see _prune_versions).
        self._versions: dict[str, dict[str, str]] = {t: {} for t in self.processors}
        # perf_counter() when the response being handled arrived (latency measurements).
        self.last_received = 0.0
        self.connected = False
        self.reconnects = 0
        self._stream_gen = 0  # which stream `connected` speaks of
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: grpc.Future | None = None
        self.lock = threading.Lock()  # guards the per-type state for readers

    # -- lifecycle

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="xds-stream", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread:
            self._thread.join(timeout)
            self._thread = None

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
            self.reconnects += 1
            self._stop.wait(delay)

    def _stream_once(self) -> bool:
        """One stream, until it ends; True if it went well (a response, or up for a while)."""
        out: queue.Queue = queue.Queue()

        def requests() -> Iterator[Request]:
            while True:
                item = out.get()
                if item is None:
                    return
                yield item

        # Keepalive within what servers accept by default (5 min), to notice a dead peer.
        options = [("grpc.keepalive_time_ms", 300_000), ("grpc.keepalive_timeout_ms", 20_000),
                   ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
        channel = (grpc.secure_channel(self.target, self.credentials, options=options)
                   if self.credentials else grpc.insecure_channel(self.target, options=options))
        got = False
        started = time.monotonic()
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            for ts in self.types.values():
                ts.subscribed = False
                ts.stream_nonce = ""
            for req in self.first_requests():
                out.put(req)
            rpc = stub.DeltaAggregatedResources if self.delta else stub.StreamAggregatedResources
            self._call = call = rpc(requests())
            if self._stop.is_set():
                call.cancel()
            with self.lock:
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
                    with self.lock:
                        self.connected = True
                    log.info("xDS: connected to %s%s", self.target,
                             " (delta)" if self.delta else "")
                self.handle(resp, out)
        except grpc.RpcError as e:
            if not self._stop.is_set():
                code = e.code() if isinstance(e, grpc.Call) else None
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                log.warning("xDS stream to %s failed: %s %s", self.target, code, details)
                if self.delta and code == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("xDS: %s does not serve incremental xDS; without --xds-delta "
                                "the agent uses state of the world", self.target)
        finally:
            with self.lock:
                self.connected = False
                self._stream_gen += 1
            out.put(None)
            self._call = None
            channel.close()
        if got and not self._stop.is_set():
            log.warning("xDS stream to %s ended; keeping the last good state", self.target)
        # A stream that stayed up a while was a success even without a response (an
        # up-to-date Delta client gets none): the next reconnect need not back off further.
        return got or time.monotonic() - started >= STABLE_STREAM_S

    def _mark_connected(self, gen: int, call: grpc.RpcContext) -> None:
        with self.lock:
            if gen == self._stream_gen and call.is_active() and not self.connected:
                self.connected = True
                log.info("xDS: stream to %s open", self.target)

    # -- requests

    def first_requests(self) -> list[Request]:
        """A stream's opening: every type, parents first; named types only with names (a
        request naming nothing would be a wildcard to some servers). They carry what is
        held, so the server can skip it."""
        reqs: list[Request] = []
        for t, ts in self.types.items():
            wildcard = self.processors[t].wildcard
            if not wildcard and not ts.names:
                continue
            names = () if wildcard else ts.sorted_names
            req: Request
            if self.delta:
                # Wildcard said explicitly ("*", as ztunnel and Envoy do): a server reads an
                # empty first subscription as wildcard only by the legacy rule.
                names = ("*",) if wildcard else names
                req = self._delta_request(t, subscribe=names, initial=self._held_versions(t))
            else:
                req = self._request(t, nonce="")
            if not reqs:
                req.node.CopyFrom(self.node)
            ts.subscribed = True
            reqs.append(req)
        return reqs

    def _request(self, t: str, *, nonce: str, error: str | None = None
                 ) -> discovery_pb2.DiscoveryRequest:
        ts = self.types[t]
        req = discovery_pb2.DiscoveryRequest(
            type_url=t, version_info=ts.last_ack_version, response_nonce=nonce,
            resource_names=() if self.processors[t].wildcard else ts.sorted_names)
        if error is not None:
            req.error_detail.CopyFrom(_status(error))
        return req

    @staticmethod
    def _delta_request(t: str, *, nonce: str = "", error: str | None = None,
                       subscribe: Sequence[str] = (), unsubscribe: Sequence[str] = (),
                       initial: Mapping[str, str] | None = None
                       ) -> discovery_pb2.DeltaDiscoveryRequest:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=t, response_nonce=nonce, resource_names_subscribe=subscribe,
            resource_names_unsubscribe=unsubscribe, initial_resource_versions=initial or {})
        if error is not None:
            req.error_detail.CopyFrom(_status(error))
        return req

    # -- one response

    def handle(self, resp: discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse,
               out: queue.Queue) -> None:
        """Take one response and queue its ACK or NACK (and any new subscriptions)."""
        self.last_received = time.perf_counter()
        t = resp.type_url
        proc = self.processors.get(t)
        if proc is None:
            log.warning("xDS: ignoring a response of unrequested type %r", t)
            return
        versions: dict[str, str] = {}
        removed: frozenset[str] = frozenset()
        if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
            removed = frozenset(resp.removed_resources) | \
                frozenset(r.name for r in resp.removed_resource_names)
            version = resp.system_version_info

            def decode() -> Update:
                items, got = proc.decode_delta(resp.resources, self._versions[t])
                both = removed & items.keys()
                if both:
                    raise ValidationError(f"{proc.kind}[{min(both)}]", "both in resources "
                                          "and in removed_resources")
                versions.update(got)
                return Update(t, items, removed)

            def reply(error: str | None) -> Request:
                return self._delta_request(t, nonce=resp.nonce, error=error)
        else:
            version = resp.version_info

            def decode() -> Update:
                # State-of-the-world responses of wildcard types are complete: what is
                # absent is gone. Named types send what was asked for, maybe in parts.
                return Update(t, proc.decode(resp.resources), complete=proc.wildcard)

            def reply(error: str | None) -> Request:
                return self._request(t, nonce=resp.nonce, error=error)

        ts = self.types[t]
        try:
            taken = self.cache.take(decode())
        except Exception as e:  # noqa: BLE001 -- every failure is a NACK, never a crash
            msg = str(e) or type(e).__name__
            with self.lock:
                ts.last_nonce = ts.stream_nonce = resp.nonce
                ts.last_nack_error = msg
            log.warning("xDS: NACK %s version %s: %s", proc.kind, version, msg)
            out.put(reply(msg))
            self._emit("rejected", {"type_url": t, "version": version, "nonce": resp.nonce,
                                    "error": msg})
            return
        with self.lock:
            self.cache.commit(taken)
            if self.delta:
                held = self._versions[t]
                held.update(versions)
                for name in removed:
                    held.pop(name, None)
                self._prune_versions()
            ts.last_ack_version = version
            ts.last_nonce = ts.stream_nonce = resp.nonce
            ts.last_nack_error = None
            ts.last_update_time = time.time()
        out.put(reply(None))
        self._emit("applied", {"type_url": t, "version": version, "nonce": resp.nonce,
                               "resources": taken.count, **taken.info})
        for child, names in taken.children.items():
            self._resubscribe(child, names, out)

    def _resubscribe(self, t: str, names: frozenset[str], out: queue.Queue) -> None:
        ts = self.types[t]
        if names == ts.names and (ts.subscribed or not names):
            return
        add = names - ts.names if ts.subscribed else names
        gone = ts.names - names if ts.subscribed else frozenset()
        was_subscribed = ts.subscribed
        with self.lock:
            ts.names = names
            ts.sorted_names = tuple(sorted(names))
            # What is unsubscribed goes at once: state follows the subscription.
            self.cache.keep_only(t, names)
            self._prune_versions()
        if not self.delta:
            out.put(self._request(t, nonce=ts.stream_nonce))
            ts.subscribed = True
            return
        if not was_subscribed and not names:
            return  # a first request naming nothing would be a wildcard to some servers
        initial = None if was_subscribed else self._held_versions(t)
        out.put(self._delta_request(t, subscribe=sorted(add), unsubscribe=sorted(gone),
                                    initial=initial))
        ts.subscribed = True

    def _prune_versions(self) -> None:
        """Drop versions of what is no longer held (children dropped with their parent,
        resources filtered out). Every held resource has a version, so a count that differs
        means stale entries; equal counts cost nothing to check."""
        for t, versions in self._versions.items():
            held = self.cache.held(t)
            if len(versions) != len(held):
                self._versions[t] = {n: v for n, v in versions.items() if n in held}

    def _held_versions(self, t: str) -> dict[str, str]:
        held = self.cache.held(t)
        return {n: v for n, v in self._versions[t].items() if n in held}

    def _emit(self, kind: str, info: dict) -> None:
        for fn in list(self.events):
            try:
                fn(kind, info)
            except Exception:  # noqa: BLE001 -- an observer must not break the stream
                log.exception("xDS event hook failed")

    def wire_state(self) -> dict:
        """Per type: versions, nonce, last NACK, held count (call with the lock held)."""
        return {t: {"last_ack_version": ts.last_ack_version, "last_nonce": ts.last_nonce,
                    "last_nack_error": ts.last_nack_error,
                    "last_update_time": ts.last_update_time,
                    "resource_count": len(self.cache.held(t))}
                for t, ts in self.types.items()}


def _status(error: str) -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=error)
