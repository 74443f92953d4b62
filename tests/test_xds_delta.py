"""Incremental (Delta) xDS: the real XdsClient against the real controller, a raw Delta
stream against the controller, the client against a scripted Delta server (NACKs, removals,
unsubscribes, initial_resource_versions), and the kernel maps a Delta-fed datapath ends
with, compared to a state-of-the-world-fed one."""

from __future__ import annotations

import itertools
import queue
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from accel.model import ServiceTable
from accel.sources.file import FileSource
from accel.xds import translate
from accel.xds.client import XdsClient
from accel.xds.server import ControllerServer
from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, tcp_listener
from accel.xds.translate import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.api_harness import free_port
from tests.test_xds_client import record_and_replay
from tests.test_xds_controller import MESH, RATINGS, Recorder, names, wait_for, write

PORTS = range(18760, 18820)  # this module's share; free_port picks one nobody holds


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    p = tmp_path / "mesh.yaml"
    write(p, MESH)
    return p


def delta_client(port: int, node: str, on_update, **kw) -> XdsClient:
    return XdsClient(f"127.0.0.1:{port}", node, on_update, delta=True,
                     backoff_initial=0.1, backoff_max=0.4, **kw).start()


def stream_of(srv: ControllerServer, node: str) -> dict:
    got = [c for c in srv.ads.clients() if c["node_id"] == node]
    assert len(got) == 1, srv.ads.clients()
    return got[0]


def all_acked(srv: ControllerServer, node: str) -> bool:
    c = [c for c in srv.ads.clients() if c["node_id"] == node]
    return bool(c) and all(s["acked_version"] == srv.version and s["nack_error"] is None
                           for s in c[0]["types"].values())


# --------------------------------------------------------------------------- client <-> controller


def test_file_change_reaches_the_client_within_a_second(mesh: Path) -> None:
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05),
                           f"127.0.0.1:{free_port(PORTS)}").start()
    rec = Recorder()
    client = delta_client(srv.port, "hdx-a", rec)
    try:
        _, t = rec.wait(lambda t: names(t) == ["reviews"])
        assert {str(e): e.weight for e in t.services[0].endpoints} == {
            "10.200.0.11:9080": 2, "10.200.0.12:9080": 1}
        wait_for(lambda: all_acked(srv, "hdx-a"))
        before = stream_of(srv, "hdx-a")["types"]
        started = time.monotonic()
        write(mesh, MESH + RATINGS)
        when, t = rec.wait(lambda t: names(t) == ["ratings", "reviews"], timeout=2)
        assert when - started < 1.0
        assert t.by_name()["ratings"].edge
        wait_for(lambda: all_acked(srv, "hdx-a"))
        c = stream_of(srv, "hdx-a")
        assert c["protocol"] == "delta" and srv.version == "2"
        types = c["types"]
        assert types[LISTENER]["names"] is None and types[CLUSTER]["names"] is None  # wildcard
        assert types[ENDPOINT]["names"] == ["ratings", "reviews"]
        # Only the new service's resources went out: 2 listeners, 1 cluster, 1 assignment.
        sent = {t: types[t]["resources_sent"] - before[t]["resources_sent"]
                for t in (LISTENER, CLUSTER)}
        assert sent == {LISTENER: 2, CLUSTER: 1}
        assert types[ENDPOINT]["resources_sent"] - before[ENDPOINT]["resources_sent"] == 1
        st = client.state()
        assert st["protocol"] == "delta" and st["connected"]
        assert st[LISTENER]["last_ack_version"] == "2" and st[LISTENER]["resource_count"] == 4
    finally:
        client.stop()
        srv.stop()


def test_removal_reaches_the_client_and_unsubscribes_its_endpoints(mesh: Path) -> None:
    write(mesh, MESH + RATINGS)
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05),
                           f"127.0.0.1:{free_port(PORTS)}").start()
    rec = Recorder()
    client = delta_client(srv.port, "hdx-b", rec)
    try:
        rec.wait(lambda t: names(t) == ["ratings", "reviews"])
        wait_for(lambda: all_acked(srv, "hdx-b"))
        write(mesh, MESH)
        _, t = rec.wait(lambda t: names(t) == ["reviews"], timeout=2)
        # The cluster went, so its endpoints are unsubscribed by name, and the server holds
        # for the stream only what the client has.
        wait_for(lambda: stream_of(srv, "hdx-b")["types"][ENDPOINT]["names"] == ["reviews"])
        types = stream_of(srv, "hdx-b")["types"]
        assert types[LISTENER]["removals_sent"] == 2 and types[CLUSTER]["removals_sent"] == 1
        assert {t: types[t]["resources"] for t in (LISTENER, CLUSTER, ENDPOINT)} == {
            LISTENER: 2, CLUSTER: 1, ENDPOINT: 1}
        st = client.state()
        assert {t: st[t]["resource_count"] for t in (LISTENER, CLUSTER, ENDPOINT)} == {
            LISTENER: 2, CLUSTER: 1, ENDPOINT: 1}
        # Coming back, it is subscribed to again and its endpoints sent once.
        sent = types[ENDPOINT]["resources_sent"]
        write(mesh, MESH + RATINGS.replace("10.200.0.13", "10.200.0.19"))
        rec.wait(lambda t: names(t) == ["ratings", "reviews"], timeout=2)
        wait_for(lambda: all_acked(srv, "hdx-b"))
        assert stream_of(srv, "hdx-b")["types"][ENDPOINT]["resources_sent"] == sent + 1
        assert str(client.table.by_name()["ratings"].endpoints[0]) == "10.200.0.19:9080"
    finally:
        client.stop()
        srv.stop()


def test_reconnect_sends_initial_versions_and_gets_only_what_changed(mesh: Path) -> None:
    port = free_port(PORTS)
    write(mesh, MESH + RATINGS)
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05), f"127.0.0.1:{port}").start()
    rec = Recorder()
    client = delta_client(port, "hdx-c", rec)
    try:
        rec.wait(lambda t: names(t) == ["ratings", "reviews"])
        wait_for(lambda: all_acked(srv, "hdx-c"))
        # The same server drops the stream: the client comes back holding everything.
        srv.ads.close_all()
        wait_for(lambda: len(srv.ads.clients()) == 1 and client.state()["reconnects"] >= 1
                 and client.state()["connected"])
        # Once the server has taken what the new stream says it holds (its first request
        # per type), anything it had to send follows at once; an absence is checked over a
        # window after that event (0.3 s: sends take a few ms here).
        held = {CLUSTER: 2, ENDPOINT: 2, LISTENER: 4}
        wait_for(lambda: {t: s["resources"] for t, s in
                          stream_of(srv, "hdx-c")["types"].items()} == held)
        time.sleep(0.3)
        types = stream_of(srv, "hdx-c")["types"]
        assert {t: (s["resources_sent"], s["removals_sent"]) for t, s in types.items()} == {
            CLUSTER: (0, 0), ENDPOINT: (0, 0), LISTENER: (0, 0)}
        # A new controller process, and one endpoint changed meanwhile: just that goes out.
        srv.stop()
        wait_for(lambda: not client.state()["connected"])
        write(mesh, MESH.replace("10.200.0.12", "10.200.0.14") + RATINGS)
        srv = ControllerServer(FileSource(mesh, poll_interval=0.05), f"127.0.0.1:{port}").start()
        _, t = rec.wait(lambda t: "10.200.0.14:9080" in map(str, t.by_name()["reviews"].endpoints),
                        timeout=5)
        assert names(t) == ["ratings", "reviews"]
        wait_for(lambda: stream_of(srv, "hdx-c")["types"][ENDPOINT]["acked_version"] == "1")
        wait_for(lambda: client.state()["connected"])
        types = stream_of(srv, "hdx-c")["types"]
        assert {t: (s["resources_sent"], s["removals_sent"]) for t, s in types.items()} == {
            CLUSTER: (0, 0), ENDPOINT: (1, 0), LISTENER: (0, 0)}
        assert types[ENDPOINT]["acked_version"] == "1"
    finally:
        client.stop()
        srv.stop()


def test_nack_is_recorded_by_the_server_and_last_good_stays(mesh: Path) -> None:
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05),
                           f"127.0.0.1:{free_port(PORTS)}").start()
    rec = Recorder(fail_on="ratings")
    client = delta_client(srv.port, "hdx-d", rec)
    try:
        rec.wait(lambda t: names(t) == ["reviews"])
        write(mesh, MESH + RATINGS)
        wait_for(lambda: srv.ads.nacks >= 1)
        errors = [s["nack_error"] for s in stream_of(srv, "hdx-d")["types"].values()
                  if s["nack_error"]]
        assert errors == ["services[ratings]: rejected by the test agent"]
        assert names(client.table) == ["reviews"]
        # Fixed upstream: the next version goes through.
        write(mesh, MESH.replace("10.200.0.12", "10.200.0.14"))
        _, t = rec.wait(lambda t: "10.200.0.14:9080" in map(str, t.services[0].endpoints))
        assert names(t) == ["reviews"]
    finally:
        client.stop()
        srv.stop()


# --------------------------------------------------------------------------- a raw Delta stream


class RawDelta:
    def __init__(self, port: int, node: str = "hdx-raw"):
        self.node = node
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.requests: queue.Queue = queue.Queue()
        self.responses = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            self.channel).DeltaAggregatedResources(iter(self.requests.get, None))

    def ask(self, t: str, sub=(), unsub=(), nonce: str = "", initial=None,
            error: str | None = None) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=t, resource_names_subscribe=list(sub), resource_names_unsubscribe=list(unsub),
            response_nonce=nonce, initial_resource_versions=initial or {}, node={"id": self.node})
        if error:
            req.error_detail.message = error
        self.requests.put(req)

    def next(self, timeout: float = 5.0) -> discovery_pb2.DeltaDiscoveryResponse:
        box: list = []
        t = threading.Thread(target=lambda: box.append(next(self.responses)), daemon=True)
        t.start()
        t.join(timeout)
        assert box, "no response"
        return box[0]

    def quiet(self, seconds: float = 0.5) -> bool:
        """True if no response comes within `seconds` (then the stream is only good for
        closing: a reader is left waiting on it)."""
        box: list = []
        def read() -> None:
            try:
                box.append(next(self.responses))
            except grpc.RpcError:
                pass  # cancelled by close()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(seconds)
        assert not box, f"unexpected response: {box[0]}"
        return True

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()
        self.channel.close()


def got(r: discovery_pb2.DeltaDiscoveryResponse) -> dict[str, str]:
    return {res.name: res.version for res in r.resources}


def test_raw_delta_stream_protocol(mesh: Path) -> None:
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05),
                           f"127.0.0.1:{free_port(PORTS)}").start()
    raw = RawDelta(srv.port)
    try:
        raw.ask(CLUSTER)  # legacy wildcard: a first request naming nothing
        r = raw.next()
        assert r.type_url == CLUSTER and got(r).keys() == {"reviews"}
        assert r.system_version_info == "1"
        cds_version = got(r)["reviews"]
        raw.ask(CLUSTER, nonce=r.nonce)  # ACK
        raw.ask(LISTENER, sub=["*"])  # explicit wildcard
        r = raw.next()
        assert got(r).keys() == {"reviews", "reviews.vip"} and not r.removed_resources
        raw.ask(LISTENER, nonce=r.nonce)
        # By name: what exists comes, what does not is reported removed.
        raw.ask(ENDPOINT, sub=["reviews", "nope"])
        r = raw.next()
        assert got(r).keys() == {"reviews"} and list(r.removed_resources) == ["nope"]
        cla_msg = translate.unpack_delta(ENDPOINT, r.resources, {})[0]["reviews"]
        assert len(cla_msg.endpoints[0].lb_endpoints) == 2
        raw.ask(ENDPOINT, nonce=r.nonce, error="rejected by the raw test")  # NACK
        wait_for(lambda: stream_of(srv, "hdx-raw")["types"].get(ENDPOINT, {}).get("nack_error")
                 == "rejected by the raw test")
        types = stream_of(srv, "hdx-raw")["types"]
        assert types[CLUSTER]["acked_version"] == "1" and types[LISTENER]["acked_version"] == "1"
        # Re-subscribing to a name held must resend it (the client may have dropped it).
        raw.ask(ENDPOINT, sub=["reviews"])
        r = raw.next()
        assert got(r).keys() == {"reviews"} and not r.removed_resources
        raw.ask(ENDPOINT, nonce=r.nonce)

        # A change: one endpoint moves and a service comes. Adds and changes go CDS, EDS,
        # LDS; each carries only what changed (EDS: the subscribed name only, not "ratings").
        write(mesh, MESH.replace("10.200.0.12", "10.200.0.19") + RATINGS)
        seen = []
        for _ in range(3):
            r = raw.next()
            seen.append((r.type_url, sorted(got(r)), list(r.removed_resources)))
            assert r.system_version_info == "2"
            raw.ask(r.type_url, nonce=r.nonce)
        assert seen == [(CLUSTER, ["ratings"], []), (ENDPOINT, ["reviews"], []),
                        (LISTENER, ["ratings", "ratings.vip"], [])]
        # The removal of a service: listeners first, then the cluster.
        write(mesh, MESH.replace("10.200.0.12", "10.200.0.19"))
        seen = []
        for _ in range(2):
            r = raw.next()
            seen.append((r.type_url, sorted(got(r)), sorted(r.removed_resources)))
            raw.ask(r.type_url, nonce=r.nonce)
        assert seen == [(LISTENER, [], ["ratings", "ratings.vip"]), (CLUSTER, [], ["ratings"])]
        # Unsubscribed: neither answered nor pushed when its endpoints change.
        raw.ask(ENDPOINT, unsub=["reviews"])
        write(mesh, MESH.replace("10.200.0.12", "10.200.0.19").replace("weight: 2", "weight: 5"))
        wait_for(lambda: srv.version == "4")
        assert raw.quiet()
        types = stream_of(srv, "hdx-raw")["types"]
        assert types[ENDPOINT]["names"] == ["nope"] and types[ENDPOINT]["resources"] == 0
        assert types[CLUSTER]["resources"] == 1 and types[LISTENER]["resources"] == 2
        assert srv.ads.nacks == 1 and srv.ads.acks >= 8
        assert cds_version == srv.ads.snapshot.digests[CLUSTER]["reviews"]
    finally:
        raw.close()
        srv.stop()


def test_raw_delta_reconnect_with_initial_versions(mesh: Path) -> None:
    """initial_resource_versions: what matches is not resent, what changed is, what is gone
    is removed, and a named LDS subscription (gRPC's way) gets only that listener."""
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05),
                           f"127.0.0.1:{free_port(PORTS)}").start()
    raw = RawDelta(srv.port)
    try:
        raw.ask(LISTENER)
        listeners = got(raw.next())
        raw.close()
        raw = RawDelta(srv.port)
        held = dict(listeners, **{"reviews.vip": "stale", "gone.vip": "x"})
        raw.ask(LISTENER, initial=held)
        r = raw.next()
        assert got(r) == {"reviews.vip": listeners["reviews.vip"]}
        assert list(r.removed_resources) == ["gone.vip"]
        raw.ask(CLUSTER, initial={"reviews": "whatever"}, sub=["*"])
        r = raw.next()
        assert got(r).keys() == {"reviews"}
        raw.close()
        # Everything up to date: no answer at all.
        raw = RawDelta(srv.port)
        raw.ask(LISTENER, initial=listeners)
        assert raw.quiet()
        raw.close()
        raw = RawDelta(srv.port, node="hdx-grpc")
        raw.ask(LISTENER, sub=["reviews"])
        r = raw.next()
        assert got(r).keys() == {"reviews"} and not r.removed_resources
    finally:
        raw.close()
        srv.stop()


# --------------------------------------------------------------------------- a scripted server


class ScriptedDelta(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Sends what the test tells it to over Delta streams and records every request."""

    def __init__(self) -> None:
        self.requests: list[discovery_pb2.DeltaDiscoveryRequest] = []
        self.cond = threading.Condition()
        self.out: queue.Queue = queue.Queue()
        self.nonces = itertools.count(1)

    def DeltaAggregatedResources(self, request_iterator, context):  # noqa: N802
        yield from record_and_replay(self, request_iterator, context)

    def send(self, t: str, resources: dict[str, tuple[str, object]] | None = None,
             removed=(), raw: list | None = None) -> str:
        """resources: name -> (version, message)."""
        nonce = f"d{next(self.nonces)}"
        res = raw if raw is not None else [
            discovery_pb2.Resource(name=n, version=v, resource=_pack(m))
            for n, (v, m) in (resources or {}).items()]
        self.out.put(discovery_pb2.DeltaDiscoveryResponse(
            type_url=t, nonce=nonce, system_version_info=f"s{nonce}", resources=res,
            removed_resources=list(removed)))
        return nonce

    def wait(self, pred: Callable[[discovery_pb2.DeltaDiscoveryRequest], bool],
             timeout: float = 5.0, after: int = 0) -> discovery_pb2.DeltaDiscoveryRequest:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for r in self.requests[after:]:
                    if pred(r):
                        return r
                left = deadline - time.monotonic()
                assert left > 0, f"no such request; got {self.requests[after:]}"
                self.cond.wait(left)

    def reply_to(self, nonce: str) -> discovery_pb2.DeltaDiscoveryRequest:
        return self.wait(lambda r: r.response_nonce == nonce)


def _pack(msg):
    from google.protobuf import any_pb2

    a = any_pb2.Any()
    a.Pack(msg)
    return a


class Chained(Recorder):
    """A Recorder that first hands the table on (to an agent, which may refuse it)."""

    def __init__(self, hook: Callable[[ServiceTable], None]):
        super().__init__()
        self.hook = hook

    def __call__(self, table: ServiceTable) -> None:
        self.hook(table)
        super().__call__(table)


class DeltaHarness:
    def __init__(self, fail_on: str | None = None,
                 hook: Callable[[ServiceTable], None] | None = None):
        self.port = free_port(PORTS)
        self.rec = Chained(hook) if hook else Recorder(fail_on=fail_on)
        self.start_server()
        self.client = delta_client(self.port, "hdx-script", self.rec)

    def start_server(self) -> None:
        self.ads = ScriptedDelta()
        self.server = grpc.server(futures.ThreadPoolExecutor(8),
                                  options=[("grpc.so_reuseport", 0)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, self.server)
        assert self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def close(self) -> None:
        self.client.stop()
        self.server.stop(0)


@pytest.fixture
def dh():
    h = DeltaHarness()
    yield h
    h.close()


def base(h: DeltaHarness) -> None:
    """A good state: service `a` at 10.96.0.1:80 (resource versions c1, e1, l1)."""
    first = h.ads.wait(lambda r: r.type_url == CLUSTER)
    # Wildcard said explicitly, as ztunnel and Envoy do.
    assert first.node.id == "hdx-script" and list(first.resource_names_subscribe) == ["*"]
    assert not first.initial_resource_versions
    h.ads.reply_to(h.ads.send(CLUSTER, {"a": ("c1", eds_cluster("a"))}))
    sub = h.ads.wait(lambda r: r.type_url == ENDPOINT)
    assert list(sub.resource_names_subscribe) == ["a"] and not sub.response_nonce
    h.ads.send(ENDPOINT, {"a": ("e1", cla("a", locality(lbe("10.0.0.1", 8080))))})
    h.ads.reply_to(h.ads.send(LISTENER, {"a": ("l1", tcp_listener("a", "10.96.0.1", 80, "a"))}))
    h.rec.wait(lambda t: names(t) == ["a"])


def test_client_nacks_a_bad_resource_and_keeps_the_last_good_state(dh: DeltaHarness) -> None:
    base(dh)
    n_tables = len(dh.rec.tables)
    good = dh.client.table
    bad_cases = [
        ({"a": ("l2", tcp_listener("a", "10.96.0.1", 0, "a"))}, (), "port"),
        ({"b": ("l2", tcp_listener("b", "10.96.0.1", 80, "a"))}, (), "duplicate VIP"),
        ({"a": ("l2", tcp_listener("a", "10.96.0.1", 80, "nope"))}, (), "nope"),
        ({"a": ("l2", tcp_listener("a", "10.96.0.1", 81, "a"))}, ("a",), "removed_resources"),
    ]
    for resources, removed, needle in bad_cases:
        reply = dh.ads.reply_to(dh.ads.send(LISTENER, resources, removed))
        assert reply.error_detail.message and needle in reply.error_detail.message, reply
        assert reply.error_detail.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert dh.client.table is good
    # A Resource named differently from what it holds, and one without a payload.
    wrong = discovery_pb2.Resource(name="x", version="l3",
                                   resource=_pack(tcp_listener("a", "10.96.0.1", 80, "a")))
    reply = dh.ads.reply_to(dh.ads.send(LISTENER, raw=[wrong]))
    assert "sent under the name 'x'" in reply.error_detail.message
    empty = discovery_pb2.Resource(name="a", version="l9")
    reply = dh.ads.reply_to(dh.ads.send(LISTENER, raw=[empty]))
    assert "has no resource" in reply.error_detail.message
    # A heartbeat (no payload, the version held) changes nothing and is ACKed.
    beat = discovery_pb2.Resource(name="a", version="l1")
    reply = dh.ads.reply_to(dh.ads.send(LISTENER, raw=[beat]))
    assert not reply.HasField("error_detail")
    assert len(dh.rec.tables) == n_tables and dh.client.table is good
    st = dh.client.state()
    assert st[LISTENER]["last_nack_error"] is None and st[LISTENER]["resource_count"] == 1

    # on_update refusing a table is a NACK too.
    dh.rec.fail_on = "b"
    reply = dh.ads.reply_to(dh.ads.send(
        LISTENER, {"b": ("l4", tcp_listener("b", "10.96.0.2", 80, "a"))}))
    assert "rejected by the test agent" in reply.error_detail.message
    assert dh.client.table is good
    # The reconnect tells the server the last good versions, not the rejected ones.
    dh.server.stop(0)
    dh.start_server()
    first = {}
    for t in (CLUSTER, ENDPOINT, LISTENER):
        first[t] = dh.ads.wait(lambda r, t=t: r.type_url == t)
    assert dict(first[CLUSTER].initial_resource_versions) == {"a": "c1"}
    assert dict(first[ENDPOINT].initial_resource_versions) == {"a": "e1"}
    assert list(first[ENDPOINT].resource_names_subscribe) == ["a"]
    assert dict(first[LISTENER].initial_resource_versions) == {"a": "l1"}
    assert list(first[LISTENER].resource_names_subscribe) == ["*"]  # wildcard, as before
    # Nothing to send (all up to date): the client still counts as connected.
    wait_for(lambda: dh.client.state()["connected"])
    assert dh.client.table is good


def test_client_applies_changes_and_removals_and_unsubscribes(dh: DeltaHarness) -> None:
    base(dh)
    # A second service; only it is sent.
    dh.ads.reply_to(dh.ads.send(CLUSTER, {"b": ("c1", eds_cluster("b"))}))
    sub = dh.ads.wait(lambda r: r.type_url == ENDPOINT and list(r.resource_names_subscribe)
                      == ["b"])
    assert not sub.resource_names_unsubscribe
    dh.ads.send(ENDPOINT, {"b": ("e1", cla("b", locality(lbe("10.0.0.2", 8080))))})
    dh.ads.reply_to(dh.ads.send(LISTENER, {"b": ("l1", tcp_listener("b", "10.96.0.2", 80, "b"))}))
    t = dh.rec.wait(lambda t: names(t) == ["a", "b"])[1]
    a = t.get("a")
    # One endpoint of b changes: a stays the very same Service object.
    dh.ads.reply_to(dh.ads.send(ENDPOINT, {"b": ("e2", cla("b", locality(lbe("10.0.0.3", 80))))}))
    t = dh.rec.wait(lambda t: str(t.get("b").endpoints[0]) == "10.0.0.3:80")[1]
    assert t.get("a") is a
    # b goes: listener first, then its cluster, and its endpoints are unsubscribed.
    dh.ads.reply_to(dh.ads.send(LISTENER, removed=["b"]))
    dh.rec.wait(lambda t: names(t) == ["a"])
    mark = len(dh.ads.requests)
    dh.ads.reply_to(dh.ads.send(CLUSTER, removed=["b"]))
    unsub = dh.ads.wait(lambda r: r.type_url == ENDPOINT and bool(r.resource_names_unsubscribe),
                        after=mark)
    assert list(unsub.resource_names_unsubscribe) == ["b"] and not unsub.resource_names_subscribe
    assert not unsub.response_nonce  # a spontaneous request, not an ACK
    st = dh.client.state()
    assert {t: st[t]["resource_count"] for t in (LISTENER, CLUSTER, ENDPOINT)} == {
        LISTENER: 1, CLUSTER: 1, ENDPOINT: 1}
    # Removing what was never sent is harmless; the endpoints of a removed while the cluster
    # stays: the service waits (held at its last definition), then comes back.
    assert not dh.ads.reply_to(dh.ads.send(LISTENER, removed=["never"])).HasField("error_detail")
    dh.ads.reply_to(dh.ads.send(ENDPOINT, removed=["a"]))
    wait_for(lambda: dh.client.state()["pending"] == {"a": "ClusterLoadAssignment 'a'"})
    assert names(dh.client.table) == ["a"]
    dh.ads.reply_to(dh.ads.send(ENDPOINT, {"a": ("e3", cla("a", locality(lbe("10.0.0.9", 80))))}))
    dh.rec.wait(lambda t: str(t.get("a").endpoints[0]) == "10.0.0.9:80")
    assert dh.client.state()["pending"] == {}


# --------------------------------------------------------------------------- into the kernel


def test_delta_and_sotw_give_the_same_maps(lab, test_cgroup, tmp_path, uid):
    from accel.datapath.datapath import Datapath

    client, server = lab.pods
    mesh = tmp_path / "mesh.yaml"

    def table_yaml(weight: int, extra: bool) -> str:
        return (
            f"services:\n"
            f"  - {{name: a, vip: 10.96.0.1, port: 80, endpoints: [{{address: {server.ip}, "
            f"port: 8080, weight: {weight}}}, {{address: {client.ip}, port: 8080}}]}}\n"
            f"  - {{name: b, vip: 'fd00:96::2', port: 443, endpoints: [{{address: "
            f"'{server.ip6}', port: 8443}}]}}\n"
            f"  - {{name: c, vip: 10.96.0.3, port: 53, protocol: UDP, endpoints: "
            f"[{{address: {server.ip}, port: 5353, weight: 2}}]}}\n"
            + (f"  - {{name: d, vip: 10.96.0.4, port: 80, edge: true, endpoints: "
               f"[{{address: {server.ip}, port: 8081}}]}}\n" if extra else "")
            + "mesh_cidrs: [10.201.0.0/16]\n")

    write(mesh, table_yaml(3, False))
    port = free_port(PORTS)
    pins = [f"/sys/fs/bpf/hdx-{uid}-sotw", f"/sys/fs/bpf/hdx-{uid}-delta"]
    controller = ControllerServer(FileSource(mesh, poll_interval=0.05),
                                  listen=f"127.0.0.1:{port}").start()
    try:
        with Datapath(pin_dir=pins[0], cgroup_path=str(test_cgroup)) as by_sotw, \
                Datapath(pin_dir=pins[1], cgroup_path=str(test_cgroup)) as by_delta:
            sotw = XdsClient(f"127.0.0.1:{port}", "hdx-sotw", by_sotw.apply).start()
            delta = XdsClient(f"127.0.0.1:{port}", "hdx-delta", by_delta.apply,
                              delta=True).start()
            try:
                def same(n: int) -> bool:
                    a, b = by_sotw.dump(), by_delta.dump()
                    return len(a["services"]) == n and a == b

                wait_for(lambda: same(3), 10)
                # Changes travel differently (whole LDS/CDS vs. just what changed), and
                # must end in the same maps: a weight, a new edge service, then a removal.
                write(mesh, table_yaml(5, True))
                wait_for(lambda: same(4) and "10.96.0.4:80/TCP" in by_delta.dump()["services"],
                         10)
                write(mesh, table_yaml(5, False))
                wait_for(lambda: same(3), 10)
                assert by_delta.dump() == by_sotw.dump()
                assert delta.state()["protocol"] == "delta" and not delta.state()["pending"]
            finally:
                sotw.stop()
                delta.stop()
    finally:
        controller.stop()
        for p in pins:
            shutil.rmtree(p, ignore_errors=True)



# --------------------------------------------------------------------------- fuzzed bad input


@pytest.mark.reliability
def test_wire_nack_keeps_the_maps(side_agent, capsys) -> None:
    """test_fuzz_xds's corruptions, each sent as a Delta response (the touched type's
    resources as changed, the ones it lost as removed): every one is NACKed naming the
    resource, the client keeps its table and the kernel maps stay byte for byte the same;
    then a good change is ACKed and reaches the kernel."""
    from hypothesis import given
    from hypothesis import strategies as st

    from tests import test_fuzz_xds as fz

    layer = "xds delta wire (NACKs)"
    agent = side_agent
    dp = agent.datapath
    h = DeltaHarness(hook=agent.apply)
    good = fz.resources(fz.WIRE_TABLE, fz.WIRE_SHAPES)

    def versioned(t: str, v: str, res=None) -> dict:
        return {n: (v, m) for n, m in (res or good).of(t).items()}

    try:
        h.ads.wait(lambda r: r.type_url == CLUSTER)
        assert not h.ads.reply_to(h.ads.send(CLUSTER, versioned(CLUSTER, "g1"))).error_detail.code
        h.ads.wait(lambda r: r.type_url == ENDPOINT and len(r.resource_names_subscribe) == 3)
        assert not h.ads.reply_to(h.ads.send(ENDPOINT, versioned(ENDPOINT, "g1"))).error_detail.code
        assert not h.ads.reply_to(h.ads.send(LISTENER, versioned(LISTENER, "g1"))).error_detail.code
        h.ads.wait(lambda r: r.type_url == ROUTE and list(r.resource_names_subscribe) ==
                   ["api.route"])
        assert not h.ads.reply_to(h.ads.send(ROUTE, versioned(ROUTE, "g1"))).error_detail.code
        _, table = h.rec.wait(lambda t: len(t.services) == 4)
        assert table.canonical() == fz.WIRE_TABLE.canonical()
        before = dp.dump()
        good_table = h.client.table

        def held() -> dict[str, int]:
            st_ = h.client.state()
            return {t: st_[t]["resource_count"] for t in (LISTENER, CLUSTER, ENDPOINT, ROUTE)}

        held_before = held()
        sent = Counter()

        def nack(which: str, data) -> None:
            case = fz.Case(fz.copy_resources(good), data.draw)
            fz.MUTATIONS[which][0](case)
            if case.accept or not case.expect:
                return
            [t] = case.touched
            n = sum(sent.values())
            sent[t] += 1
            gone = sorted(set(good.of(t)) - set(case.res.of(t)))
            raw = [discovery_pb2.Resource(version=f"bad-{n}", resource=a)
                   for a in case.all_wire()[t]]
            req = h.ads.reply_to(h.ads.send(t, raw=raw, removed=gone))
            fz.COUNTS[layer, "rejected" if req.HasField("error_detail") else "accepted"] += 1
            assert req.HasField("error_detail"), f"{which}: ACKed, expected /{case.expect}/"
            msg = req.error_detail.message
            assert req.error_detail.code == 3  # INVALID_ARGUMENT
            assert re.search(case.expect, msg) or fz.NAMED.match(msg), f"{which}: {msg}"
            assert h.client.table is good_table
            assert dp.dump() == before

        def nacker(which: str):
            return fz.fuzz(4)(given(data=st.data())(lambda data: nack(which, data)))

        for which in sorted(n for n, (_, on_wire) in fz.MUTATIONS.items() if on_wire):
            nacker(which)()
        assert sum(sent.values()) > 50 and len(sent) == 4, sent
        assert held() == held_before
        # A good change: just the one assignment, ACKed, in the kernel.
        more = fz.copy_resources(good)
        more.endpoints["web"].endpoints[0].lb_endpoints.add().CopyFrom(lbe("10.200.7.9", 8080))
        ack = h.ads.reply_to(h.ads.send(ENDPOINT, {"web": ("g2", more.endpoints["web"])}))
        assert not ack.HasField("error_detail")
        after = dp.dump()
        assert ("10.200.7.9", 8080) in after["services"]["10.96.7.1:80/TCP"]
        assert after["services"]["10.96.7.5:5432/TCP"] == before["services"]["10.96.7.5:5432/TCP"]
        assert agent.rejected_count == 0  # NACKed before the datapath was ever asked
    finally:
        h.close()
    fz.summary(capsys, layer)


@pytest.mark.kernel  # the agent process, its datapath in this kernel
def test_bench_xds_delta_fills_the_maps_and_times_changes(tmp_path: Path) -> None:
    """`accel bench xds --delta` (the agent process with --xds-delta, the in-process client
    with delta=True) ends with complete, verified maps."""
    from tests.test_perf_smoke import bench

    r = bench(tmp_path, "xds", "--delta", "--services", "30", "--endpoints", "4",
              "--changes", "8")
    assert r["env"]["xds"] == "delta"
    assert r["push"]["maps_complete"] and r["push"]["maps"]["services"] == 30
    assert r["change"]["changes"] == 8 and r["change"]["maps_verified"]
