"""XdsClient against a scripted ADS server: ACK/NACK on the wire, held services, removal,
resubscription after a reconnect."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import pytest
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from accel.model import ServiceTable, ValidationError
from accel.xds.client import XdsClient
from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, pack, sock, tcp_listener
from accel.xds.translate import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.api_harness import free_port

PORTS = range(18100, 18150)  # this module's share; free_port picks one nobody holds


def record_and_replay(owner, request_iterator, context):
    """A scripted stream: every request is appended to owner.requests (owner.cond notified);
    every response the test puts on owner.out is sent, until the client goes."""

    def read() -> None:
        try:
            for req in request_iterator:
                with owner.cond:
                    owner.requests.append(req)
                    owner.cond.notify_all()
        except Exception:  # noqa: BLE001
            pass

    threading.Thread(target=read, daemon=True).start()
    while context.is_active():
        try:
            yield owner.out.get(timeout=0.05)
        except queue.Empty:
            continue


class ScriptedAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Sends what the test tells it to and records every request."""

    def __init__(self) -> None:
        self.requests: list[discovery_pb2.DiscoveryRequest] = []
        self.cond = threading.Condition()
        self.out: queue.Queue = queue.Queue()
        self.nonces = itertools.count(1)
        self.streams = 0

    def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802
        with self.cond:
            self.streams += 1
        yield from record_and_replay(self, request_iterator, context)

    def send(self, t: str, version: str, resources: list[any_pb2.Any]) -> str:
        nonce = f"n{next(self.nonces)}"
        self.out.put(discovery_pb2.DiscoveryResponse(type_url=t, version_info=version,
                                                     nonce=nonce, resources=resources))
        return nonce

    def wait(self, pred: Callable[[discovery_pb2.DiscoveryRequest], bool],
             timeout: float = 5.0) -> discovery_pb2.DiscoveryRequest:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for r in self.requests:
                    if pred(r):
                        return r
                left = deadline - time.monotonic()
                seen = [(r.type_url[-20:], r.response_nonce, r.version_info)
                        for r in self.requests]
                assert left > 0, f"no such request; got {seen}"
                self.cond.wait(left)

    def reply_to(self, nonce: str, timeout: float = 5.0) -> discovery_pb2.DiscoveryRequest:
        return self.wait(lambda r: r.response_nonce == nonce, timeout)


class Harness:
    def __init__(self, on_update: Callable[[ServiceTable], None] | None = None, **client):
        self.port = free_port(PORTS)
        self.tables: list[ServiceTable] = []
        self.events: list[tuple[str, dict]] = []
        self.cond = threading.Condition()
        self.hook = on_update
        self.start_server()
        self.client = XdsClient(f"127.0.0.1:{self.port}", "hx-node", self._on_update,
                                backoff_initial=0.1, backoff_max=0.5, **client)
        self.client.events.append(lambda k, i: self.events.append((k, i)))
        self.client.start()

    def start_server(self) -> None:
        self.ads = ScriptedAds()
        self.server = grpc.server(futures.ThreadPoolExecutor(8),
                                  options=[("grpc.so_reuseport", 0)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, self.server)
        assert self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def _on_update(self, table: ServiceTable) -> None:
        if self.hook:
            self.hook(table)
        with self.cond:
            self.tables.append(table)
            self.cond.notify_all()

    def push(self, res, t: str, wait_names: int | None = None) -> None:
        """Send all of `res`'s resources of type t (for EDS and RDS once the client has
        subscribed to wait_names of them) and check they are ACKed."""
        if wait_names is not None:
            self.ads.wait(lambda r: r.type_url == t and len(r.resource_names) == wait_names)
        items = [pack(m) for _, m in sorted(res.of(t).items())]
        reply = self.ads.reply_to(self.ads.send(t, "1", items))
        assert not reply.error_detail.message, (t, reply.error_detail.message)

    def push_all(self, res) -> None:
        """All of res, in the order controllers push (CDS, EDS, LDS, RDS), each type once
        the client asks for it."""
        self.ads.wait(lambda r: r.type_url == CLUSTER)
        self.push(res, CLUSTER)
        if res.endpoints:
            self.push(res, ENDPOINT, wait_names=len(res.endpoints))
        self.push(res, LISTENER)
        if res.routes:
            self.push(res, ROUTE, wait_names=len(res.routes))

    def wait_table(self, pred: Callable[[ServiceTable], bool], timeout: float = 5) -> ServiceTable:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (self.tables and pred(self.tables[-1])):
                left = deadline - time.monotonic()
                assert left > 0, f"tables so far: {self.tables}"
                self.cond.wait(left)
            return self.tables[-1]

    def close(self) -> None:
        self.client.stop()
        self.server.stop(0)


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def names(t: ServiceTable) -> list[str]:
    return sorted(s.name for s in t.services)


def base(h: Harness) -> None:
    """A good v1: service `a` at 10.96.0.1:80."""
    h.ads.wait(lambda r: r.type_url == CLUSTER)
    n = h.ads.send(CLUSTER, "1", [pack(eds_cluster("a"))])
    h.ads.reply_to(n)
    h.ads.wait(lambda r: r.type_url == ENDPOINT and list(r.resource_names) == ["a"])
    h.ads.send(ENDPOINT, "1", [pack(cla("a", locality(lbe("10.0.0.1", 8080))))])
    n = h.ads.send(LISTENER, "1", [pack(tcp_listener("a", "10.96.0.1", 80, "a"))])
    h.ads.reply_to(n)
    h.wait_table(lambda t: names(t) == ["a"])


def test_first_request_and_acks(h: Harness) -> None:
    first = h.ads.wait(lambda r: True)
    assert first.node.id == "hx-node" and first.node.cluster == "meshaccel"
    lds = h.ads.wait(lambda r: r.type_url == LISTENER)
    assert list(lds.resource_names) == [] and not lds.HasField("node")
    base(h)
    ack = h.ads.wait(lambda r: r.type_url == LISTENER and r.response_nonce)
    assert ack.version_info == "1" and not ack.HasField("error_detail")
    st = h.client.state()
    assert st["connected"] and st[LISTENER]["last_ack_version"] == "1"
    assert st[ENDPOINT]["resource_count"] == 1 and st[LISTENER]["last_nack_error"] is None
    assert [k for k, _ in h.events].count("applied") >= 3


BAD_LDS = {
    "bad address": (
        [tcp_listener("b", "10.96.0.300", 80, "a")],
        "Listener[b].address.socket_address.address: '10.96.0.300' is not an IPv4 or IPv6 "
        "address (hostnames need DNS, which meshaccel does not do)"),
    "port 0": (
        [tcp_listener("b", "10.96.0.2", 0, "a")],
        "Listener[b].address.socket_address.port_value: port 0 is out of range 1-65535"),
    "unknown cluster": (
        [tcp_listener("a", "10.96.0.1", 80, "a"), tcp_listener("b", "10.96.0.2", 80, "zz")],
        "Listener[b]: references unknown cluster 'zz'"),
    "duplicate listener": (
        [tcp_listener("a", "10.96.0.1", 80, "a"), tcp_listener("a", "10.96.0.2", 80, "a")],
        "Listener[a]: duplicate Listener name in one response"),
    "duplicate VIP": (
        [tcp_listener("a", "10.96.0.1", 80, "a"), tcp_listener("b", "10.96.0.1", 80, "a")],
        "Listener[b].address: duplicate VIP 10.96.0.1:80/TCP, already used by Listener[a]"),
    "malformed Any": (
        [any_pb2.Any(type_url=LISTENER, value=b"\x0a\x05ab")],
        "Listener resources[0]: malformed Any (Listener): Error parsing message"),
}


@pytest.mark.parametrize("case", list(BAD_LDS))
def test_nack_names_resource_and_field_and_keeps_last_good(h: Harness, case: str) -> None:
    base(h)
    good = h.client.table
    resources, expected = BAD_LDS[case]
    n = h.ads.send(LISTENER, "2", [r if isinstance(r, any_pb2.Any) else pack(r)
                                   for r in resources])
    nack = h.ads.reply_to(n)
    assert nack.HasField("error_detail")
    assert nack.error_detail.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert nack.error_detail.message.startswith(expected)
    assert nack.version_info == "1"  # the version still in force
    assert h.client.table is good and h.tables[-1] is good
    st = h.client.state()[LISTENER]
    assert st["last_ack_version"] == "1" and st["last_nack_error"].startswith(expected)
    assert h.events[-1][0] == "rejected"
    # The next good version is applied and ACKed.
    n = h.ads.send(LISTENER, "3", [pack(tcp_listener("a", "10.96.0.1", 80, "a")),
                                   pack(tcp_listener("c", "10.96.0.3", 80, "a"))])
    ack = h.ads.reply_to(n)
    assert ack.version_info == "3" and not ack.HasField("error_detail")
    assert names(h.wait_table(lambda t: len(t.services) == 2)) == ["a", "c"]


def test_on_update_failure_is_a_nack() -> None:
    calls = []

    def apply(table: ServiceTable) -> None:
        calls.append(table)
        if any(s.name == "boom" for s in table.services):
            raise ValidationError("services[boom]", "map full")

    h = Harness(apply)
    try:
        base(h)
        n = h.ads.send(LISTENER, "2", [pack(tcp_listener("a", "10.96.0.1", 80, "a")),
                                       pack(tcp_listener("boom", "10.96.0.2", 80, "a",
                                                         service="boom"))])
        nack = h.ads.reply_to(n)
        assert nack.error_detail.message == "services[boom]: map full"
        assert names(h.client.table) == ["a"]
        # A later EDS update is judged against the last good listeners, not the rejected ones.
        n = h.ads.send(ENDPOINT, "2", [pack(cla("a", locality(lbe("10.0.0.2", 8080))))])
        assert h.ads.reply_to(n).version_info == "2"
        t = h.wait_table(lambda t: str(t.services[0].endpoints[0]) == "10.0.0.2:8080")
        assert names(t) == ["a"]
    finally:
        h.close()


def test_listener_waits_for_its_endpoints_then_removal_follows_parents(h: Harness) -> None:
    base(h)
    n = h.ads.send(CLUSTER, "2", [pack(eds_cluster("a")), pack(eds_cluster("b"))])
    h.ads.reply_to(n)
    h.ads.wait(lambda r: r.type_url == ENDPOINT and list(r.resource_names) == ["a", "b"])
    n = h.ads.send(LISTENER, "2", [pack(tcp_listener("a", "10.96.0.1", 80, "a")),
                                   pack(tcp_listener("b", "10.96.0.2", 80, "b"))])
    h.ads.reply_to(n)
    # b has no ClusterLoadAssignment yet: the table goes on without it. (The client stores
    # the table and what is pending before it ACKs, and reply_to waited for that ACK.)
    assert names(h.client.table) == ["a"]
    assert h.client.state()["pending"] == {"b": "ClusterLoadAssignment 'b'"}
    h.ads.send(ENDPOINT, "2", [pack(cla("b", locality(lbe("10.0.0.9", 80))))])
    h.wait_table(lambda t: names(t) == ["a", "b"])
    assert h.client.state()["pending"] == {}
    # CDS drops b before LDS does (make-before-break): b is held, its EDS unsubscribed.
    n = h.ads.send(CLUSTER, "3", [pack(eds_cluster("a"))])
    assert not h.ads.reply_to(n).HasField("error_detail")
    h.ads.wait(lambda r: r.type_url == ENDPOINT and list(r.resource_names) == ["a"])
    assert names(h.client.table) == ["a", "b"]
    n = h.ads.send(LISTENER, "3", [pack(tcp_listener("a", "10.96.0.1", 80, "a"))])
    h.ads.reply_to(n)
    h.wait_table(lambda t: names(t) == ["a"])
    assert h.client.state()[ENDPOINT]["resource_count"] == 1
    # An EDS response without b (a SotW EDS update need not repeat all) removes nothing.
    n = h.ads.send(ENDPOINT, "4", [])
    assert h.ads.reply_to(n).version_info == "4"
    assert names(h.client.table) == ["a"] and len(h.client.table.services[0].endpoints) == 1


def test_reconnect_resubscribes_with_last_acked_versions(h: Harness) -> None:
    base(h)
    good = h.client.table
    h.server.stop(0)
    deadline = time.monotonic() + 5
    while h.client.state()["connected"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not h.client.state()["connected"] and h.client.table is good
    h.start_server()
    first = h.ads.wait(lambda r: True)
    assert first.node.id == "hx-node"
    for t in (CLUSTER, ENDPOINT, LISTENER):
        r = h.ads.wait(lambda r, t=t: r.type_url == t)
        assert r.version_info == "1" and r.response_nonce == ""
    eds = h.ads.wait(lambda r: r.type_url == ENDPOINT)
    assert list(eds.resource_names) == ["a"]
    # The new server starts a new version sequence; the client follows it.
    h.ads.send(CLUSTER, "1", [pack(eds_cluster("a"))])
    h.ads.send(ENDPOINT, "1", [pack(cla("a", locality(lbe("10.0.0.7", 8080))))])
    h.ads.send(LISTENER, "1", [pack(tcp_listener("a", "10.96.0.1", 80, "a"))])
    t = h.wait_table(lambda t: str(t.services[0].endpoints[0]) == "10.0.0.7:8080")
    assert h.client.state()["connected"] and names(t) == ["a"]


def test_rds_follows_listeners_and_bad_route_is_nacked(h: Harness) -> None:
    def routes(cluster: str) -> route_pb2.RouteConfiguration:
        return route_pb2.RouteConfiguration(name="r", virtual_hosts=[
            route_components_pb2.VirtualHost(name="v", domains=["*"], routes=[
                route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix=""),
                                           route=route_components_pb2.RouteAction(
                                               cluster=cluster))])])

    base(h)
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="h", rds=hcm_pb2.Rds(route_config_name="r"))
    web = listener_pb2.Listener(name="web", address=sock("10.96.0.5", 80), filter_chains=[
        listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="hcm", typed_config=pack(hcm))])])
    n = h.ads.send(LISTENER, "2", [pack(tcp_listener("a", "10.96.0.1", 80, "a")), pack(web)])
    h.ads.reply_to(n)
    h.ads.wait(lambda r: r.type_url == ROUTE and list(r.resource_names) == ["r"])
    assert h.client.state()["pending"] == {"web": "RouteConfiguration 'r'"}
    n = h.ads.send(ROUTE, "1", [pack(routes("nope"))])
    assert h.ads.reply_to(n).error_detail.message == \
        "Listener[web] via RouteConfiguration[r]: references unknown cluster 'nope'"
    n = h.ads.send(ROUTE, "2", [pack(routes("a"))])
    assert h.ads.reply_to(n).version_info == "2"
    t = h.wait_table(lambda t: len(t.services) == 2)
    assert str(t.by_name()["web"].vip) == "10.96.0.5"
    # The listener goes: its route config goes with it.
    n = h.ads.send(LISTENER, "3", [pack(tcp_listener("a", "10.96.0.1", 80, "a"))])
    h.ads.reply_to(n)
    h.ads.wait(lambda r: r.type_url == ROUTE and list(r.resource_names) == [])
    assert names(h.wait_table(lambda t: len(t.services) == 1)) == ["a"]
    assert h.client.state()[ROUTE]["resource_count"] == 0


def test_node_identity_as_the_controller_expects() -> None:
    """Node id, cluster and metadata (istiod keys its answer on NAMESPACE, CLUSTER_ID, ...)
    go in the first request of the stream."""
    h = Harness(cluster="Kubernetes", metadata={"NAMESPACE": "default", "CLUSTER_ID":
                                                "Kubernetes", "LABELS": {"app": "ratings"}})
    try:
        first = h.ads.wait(lambda r: r.HasField("node"))
        assert first.node.id == "hx-node" and first.node.cluster == "Kubernetes"
        meta = first.node.metadata
        assert meta["NAMESPACE"] == "default" and meta["CLUSTER_ID"] == "Kubernetes"
        assert meta["LABELS"]["app"] == "ratings"
    finally:
        h.close()
