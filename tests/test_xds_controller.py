"""The controller's ADS server with the real XdsClient, a raw ADS stream and the CLI."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accel.model import ServiceTable, ValidationError
from accel.sources.file import FileSource
from accel.xds.client import XdsClient
from accel.xds.server import ControllerServer
from accel.xds.translate import CLUSTER, ENDPOINT, LISTENER, ROUTE

REPO = Path(__file__).resolve().parent.parent

MESH = """
services:
  - name: reviews
    vip: 10.96.0.10
    port: 9080
    endpoints:
      - {address: 10.200.0.11, port: 9080, weight: 2}
      - {address: 10.200.0.12, port: 9080}
"""
RATINGS = """
  - name: ratings
    vip: 10.96.0.11
    port: 9080
    edge: true
    endpoints: [{address: 10.200.0.13, port: 9080}]
"""


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Recorder:
    def __init__(self, fail_on: str | None = None):
        self.tables: list[tuple[float, ServiceTable]] = []
        self.cond = threading.Condition()
        self.fail_on = fail_on

    def __call__(self, table: ServiceTable) -> None:
        if self.fail_on and any(s.name == self.fail_on for s in table.services):
            raise ValidationError(f"services[{self.fail_on}]", "rejected by the test agent")
        with self.cond:
            self.tables.append((time.monotonic(), table))
            self.cond.notify_all()

    def wait(self, pred, timeout: float = 5.0) -> tuple[float, ServiceTable]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (self.tables and pred(self.tables[-1][1])):
                left = deadline - time.monotonic()
                assert left > 0, f"tables: {self.tables}"
                self.cond.wait(left)
            return self.tables[-1]


def names(t: ServiceTable) -> list[str]:
    return sorted(s.name for s in t.services)


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    p = tmp_path / "mesh.yaml"
    write(p, MESH)
    return p


def test_file_change_reaches_the_client_within_a_second(mesh: Path) -> None:
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05), "127.0.0.1:18150").start()
    rec = Recorder()
    client = XdsClient(f"127.0.0.1:{srv.port}", "hx-a", rec).start()
    try:
        _, t = rec.wait(lambda t: names(t) == ["reviews"])
        assert {str(e): e.weight for e in t.services[0].endpoints} == {
            "10.200.0.11:9080": 2, "10.200.0.12:9080": 1}
        started = time.monotonic()
        write(mesh, MESH + RATINGS)
        when, t = rec.wait(lambda t: names(t) == ["ratings", "reviews"], timeout=2)
        assert when - started < 1.0
        assert t.by_name()["ratings"].edge
        # The server saw every type ACKed at its current version.
        wait_for(lambda: all(
            sub["acked_version"] == srv.version
            for sub in srv.ads.clients()[0]["types"].values()))
        c = srv.ads.clients()[0]
        assert c["node_id"] == "hx-a" and srv.version == "2"
        assert c["types"][ENDPOINT]["names"] == ["ratings", "reviews"]
    finally:
        client.stop()
        srv.stop()


def test_nack_is_recorded_by_the_server_and_last_good_stays(mesh: Path) -> None:
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05), "127.0.0.1:18151").start()
    rec = Recorder(fail_on="ratings")
    client = XdsClient(f"127.0.0.1:{srv.port}", "hx-b", rec).start()
    try:
        rec.wait(lambda t: names(t) == ["reviews"])
        write(mesh, MESH + RATINGS)
        wait_for(lambda: srv.ads.nacks >= 1)
        types = srv.ads.clients()[0]["types"]
        errors = [s["nack_error"] for s in types.values() if s["nack_error"]]
        assert errors == ["services[ratings]: rejected by the test agent"]
        assert names(client.table) == ["reviews"]
        st = client.state()
        assert any(st[t]["last_nack_error"] for t in (CLUSTER, ENDPOINT, LISTENER))
        # Fixed upstream: the next version goes through.
        write(mesh, MESH.replace("10.200.0.12", "10.200.0.14"))
        _, t = rec.wait(lambda t: "10.200.0.14:9080" in map(str, t.services[0].endpoints))
        assert names(t) == ["reviews"]
    finally:
        client.stop()
        srv.stop()


def test_controller_restart_client_reconnects_and_resyncs(mesh: Path) -> None:
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05), "127.0.0.1:18152").start()
    rec = Recorder()
    client = XdsClient("127.0.0.1:18152", "hx-c", rec, backoff_initial=0.1,
                       backoff_max=0.4).start()
    try:
        rec.wait(lambda t: names(t) == ["reviews"])
        for _ in range(3):  # push the version sequence past where the next server starts
            write(mesh, MESH.replace("weight: 2", f"weight: {3 + _}"))
            rec.wait(lambda t, w=3 + _: t.services[0].endpoints[0].weight == w)
        srv.stop()
        wait_for(lambda: not client.state()["connected"])
        assert names(client.table) == ["reviews"]  # in force while disconnected
        write(mesh, MESH + RATINGS)
        srv = ControllerServer(FileSource(mesh, poll_interval=0.05), "127.0.0.1:18152").start()
        rec.wait(lambda t: names(t) == ["ratings", "reviews"], timeout=5)
        assert client.state()["connected"] and client.state()[LISTENER]["last_ack_version"] == "1"
    finally:
        client.stop()
        srv.stop()


class RawStream:
    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.requests: queue.Queue = queue.Queue()
        self.responses = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            self.channel).StreamAggregatedResources(iter(self.requests.get, None))

    def ask(self, t: str, names=(), nonce: str = "", version: str = "") -> None:
        self.requests.put(discovery_pb2.DiscoveryRequest(
            type_url=t, resource_names=list(names), response_nonce=nonce, version_info=version,
            node={"id": "hx-raw"}))

    def next(self) -> discovery_pb2.DiscoveryResponse:
        return next(self.responses)

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()
        self.channel.close()


def test_server_protocol_by_name_order_and_nonces(mesh: Path) -> None:
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05), "127.0.0.1:18153").start()
    raw = RawStream(srv.port)
    try:
        got = {}
        for t, n in ((CLUSTER, ()), (LISTENER, ()), (ENDPOINT, ["reviews", "nope"]),
                     (ROUTE, ["reviews.route"])):
            raw.ask(t, n)
            r = raw.next()
            assert r.type_url == t and r.version_info == "1"
            got[t] = r
            raw.ask(t, n, nonce=r.nonce, version=r.version_info)  # ACK
        assert len(got[LISTENER].resources) == 2  # wildcard: reviews.vip and reviews
        assert len(got[ENDPOINT].resources) == 1  # only the names asked for that exist
        assert len({r.nonce for r in got.values()}) == 4
        # A change: endpoints of reviews and a new service. Pushed CDS, EDS, LDS, RDS order,
        # only the types whose subscribed resources changed (RDS did not).
        write(mesh, MESH.replace("10.200.0.12", "10.200.0.19") + RATINGS)
        order = []
        nonces = {}
        for _ in range(3):
            r = raw.next()
            order.append(r.type_url)
            nonces[r.type_url] = r.nonce
            assert r.version_info == "2"
            raw.ask(r.type_url, [] if r.type_url in (CLUSTER, LISTENER) else
                    (["reviews", "nope"] if r.type_url == ENDPOINT else ["reviews.route"]),
                    nonce=r.nonce, version="2")
        assert order == [CLUSTER, ENDPOINT, LISTENER]
        # A request carrying a superseded nonce is ignored (xDS protocol) ...
        raw.ask(ENDPOINT, ["ratings"], nonce=got[ENDPOINT].nonce)
        # ... and subscribing to the new cluster's endpoints gets just what was asked for.
        raw.ask(ENDPOINT, ["reviews", "ratings"], nonce=nonces[ENDPOINT])
        r = raw.next()
        assert r.type_url == ENDPOINT and len(r.resources) == 2
        wait_for(lambda: srv.ads.acks >= 7)
    finally:
        raw.close()
        srv.stop()


def run_cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "accel.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_controller_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MESH.replace("port: 9080\n    endpoints", "port: 0\n    endpoints"))
    p = run_cli("controller", "--config", str(bad), "--listen", "127.0.0.1:18154")
    out, err = p.communicate(timeout=20)
    assert p.returncode == 2, err
    assert "services[reviews].port" in err and "out of range" in err


def test_cli_controller_serves_health_and_stops_on_sigterm(mesh: Path) -> None:
    p = run_cli("controller", "--config", str(mesh), "--listen", "127.0.0.1:18155")
    try:
        line = p.stdout.readline()
        assert "serving xDS on 127.0.0.1:18155" in line, p.stderr.read() if p.poll() else line
        with grpc.insecure_channel("127.0.0.1:18155") as ch:
            h = health_pb2_grpc.HealthStub(ch)
            assert h.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
