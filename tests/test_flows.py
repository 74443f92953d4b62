"""Connection records on the real kernel: a real `accel agent`, lab pods, connections of
random sizes through a VIP with half-closes in both orders, read back through
`accel flows --follow --json` (the WatchFlows stream), the flow log and Prometheus; refused
connects; a tiny ring that overflows and counts it; events switched off at run time."""

from __future__ import annotations

import json
import queue
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from accel.flows.part import FlowsPart
from accel.flows.reader import FlowReader, kernel_stats, set_enabled
from accel.model import Endpoint, Service, ServiceTable
from tests.api_harness import ACCEL, REPO, accel
from tests.flowtraffic import SizedServer, sized_call

pytestmark = pytest.mark.kernel

VIP, EMPTY_VIP = "10.96.9.1", "10.96.9.2"
CONNECTIONS = 20


def mesh_yaml(path: Path, server_ip: str, fastpath: str) -> Path:
    path.write_text(f"""services:
  - name: sized
    vip: {VIP}
    port: 80
    fastpath: {fastpath}
    endpoints: [{{address: {server_ip}, port: 8080}}]
  - name: empty
    vip: {EMPTY_VIP}
    port: 80
""")
    return path


def _lines(stream) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _next(q: queue.Queue[str], deadline: float, what: str) -> str:
    try:
        return q.get(timeout=max(0.1, deadline - time.time()))
    except queue.Empty:
        raise AssertionError(f"no {what} within the time allowed") from None


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    from tests.test_api_agent import scrape

    return scrape(port)


def _metric(m: dict, name: str, **labels: str) -> float:
    want = tuple(sorted({"namespace": "", **labels}.items()))
    return m.get((name, want), 0.0)


@pytest.mark.parametrize("fastpath,path", [("route", "tcp"), ("redirect", "redirected")])
def test_flows_follow_exact_bytes_through_vip(env, fastpath, path):
    """Twenty connections of random sizes (seeded), each half-closed (client first or server
    first), appear in `accel flows --follow --json` with the service, the VIP, the endpoint,
    the client's address:port, the exact bytes each way and the path; a refused connect is
    recorded with its reason; the flow log and the metrics agree."""
    from accel.lab import Lab

    env.enter()
    lab = Lab(2, prefix=f"fl{env.uid}", cgroup=str(env.cgroup)).up()
    follower = None
    try:
        client, server = lab.pods
        flow_log = env.tmp / "flows.jsonl"
        env.agent(mesh_yaml(env.tmp / "mesh.yaml", str(server.ip), fastpath),
                  "--flow-log", str(flow_log))
        follower = subprocess.Popen(
            [*ACCEL, "flows", "--follow", "--json", "--api-socket", env.socket],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        err, out = _lines(follower.stderr), _lines(follower.stdout)
        assert "following" in _next(err, time.time() + 30, "'following' from accel flows")
        before = _scrape(env.metrics_port)

        srv = SizedServer(server, 8080)
        rng = random.Random(1717)
        calls = {}
        try:
            for i in range(CONNECTIONS):
                c = sized_call(client, VIP, 80, rng.randrange(0, 400_000),
                               rng.randrange(0, 400_000), server_first=bool(i % 2), seed=i)
                calls[c.src] = c
            with pytest.raises(PermissionError):
                sized_call(client, EMPTY_VIP, 80, 1, 1, False, 0)
        finally:
            srv.close()

        got, refused = {}, []
        deadline = time.time() + 30
        while len(got) < CONNECTIONS or not refused:
            r = json.loads(_next(out, deadline, f"records ({len(got)} of {CONNECTIONS})"))
            if r["event"] == "refused":
                refused.append(r)
            elif r["service"] == "sized":
                assert r["event"] == "close"
                got[r["src"]] = r
        assert set(got) == set(calls)
        for src, c in calls.items():
            r = got[src]
            assert (r["service"], r["vip"], r["dst"]) == ("sized", f"{VIP}:80",
                                                          f"{server.ip}:8080"), r
            assert (r["bytes_sent"], r["bytes_received"]) == (c.sent, c.received), r
            assert r["path"] == path, r
            assert (r["verdict"], r["reason"]) == ("forwarded", "")
            assert r["time_start"] <= r["time_end"] and r["srtt_us"] > 0
            assert r["client_netns"] != 0
            if path == "redirected":
                assert r["server_netns"] not in (0, r["client_netns"])
        [ref] = refused
        assert (ref["service"], ref["vip"], ref["verdict"], ref["reason"]) == (
            "empty", f"{EMPTY_VIP}:80", "dropped", "no_backend")

        # The metrics rise by at least what was sent (other connections could add more).
        after = _scrape(env.metrics_port)

        def delta(name: str, **labels: str) -> float:
            return _metric(after, name, **labels) - _metric(before, name, **labels)

        assert delta("meshaccel_service_connections_total", service="sized") >= CONNECTIONS
        assert delta("meshaccel_service_bytes_total", service="sized", direction="sent") >= \
            sum(c.sent for c in calls.values())
        assert delta("meshaccel_service_bytes_total", service="sized",
                     direction="received") >= sum(c.received for c in calls.values())
        assert delta("meshaccel_service_connect_failures_total", service="empty",
                     reason="no_backend") >= 1
        assert delta("meshaccel_service_connection_duration_seconds_count",
                     service="sized") >= CONNECTIONS
        assert _metric(after, "meshaccel_service_connections_active", service="sized") == 0
        assert _metric(after, "meshaccel_flow_dropped_total") == 0

        # The flow log holds the same records; the history answers without --follow.
        logged = [json.loads(x) for x in flow_log.read_text().splitlines()]
        closes = {r["src"]: r for r in logged if r["event"] == "close"}
        assert {s: (r["bytes_sent"], r["bytes_received"]) for s, r in closes.items()} == \
            {s: (c.sent, c.received) for s, c in calls.items()}
        hist = accel("flows", "--json", "--since", "5m", "--service", "sized",
                     "--api-socket", env.socket)
        assert hist.returncode == 0, hist.stderr
        assert {json.loads(x)["src"] for x in hist.stdout.splitlines()} == set(calls)
    finally:
        if follower is not None:
            follower.terminate()
            follower.wait(10)
        lab.down()


def _echo_calls(client, n: int) -> None:
    for i in range(n):
        sized_call(client, VIP, 80, 10 + i, 10, False, i)


def test_ring_overflow_counted_and_events_switch_off(lab, pin_dir, test_cgroup):
    """A one-page ring takes 28 events: 40 connections (an open and a close each) overflow
    it. Every event is either in the ring or counted as dropped, and the datapath never
    waited (every call completed). Events switched off at run time add nothing."""
    from accel.datapath.datapath import Capacities, Datapath

    client, server = lab.pods
    dp = Datapath(pin_dir=pin_dir, cgroup_path=str(test_cgroup),
                  capacities=Capacities(flow_ring=4096)).start()
    srv = SizedServer(server, 8080)
    try:
        dp.apply(ServiceTable((Service("sized", VIP, 80,
                                       endpoints=(Endpoint(server.ip, 8080),)),)))
        set_enabled(pin_dir, True)
        reader = FlowReader(pin_dir, lambda vip, port: "sized")
        assert reader.ring.size == 4096
        _echo_calls(client, 40)
        s = kernel_stats(pin_dir)
        assert s["events"] + s["dropped"] == 80 and s["dropped"] >= 80 - 4096 // 144, s
        records = reader.poll()
        assert len(records) == s["events"]
        # Room again once read: the next connection is recorded whole.
        _echo_calls(client, 1)
        assert [reader.decode.record(r).event for r in reader.poll()] == ["open", "close"]
        assert kernel_stats(pin_dir)["dropped"] == s["dropped"]
        set_enabled(pin_dir, False)
        _echo_calls(client, 5)
        assert reader.poll() == [] and kernel_stats(pin_dir)["events"] == s["events"] + 2
        reader.close()
    finally:
        srv.close()
        dp.close()


@pytest.mark.parametrize("fastpath", ["route", "redirect"])
def test_long_connection_reports_every_10s(lab, datapath, fastpath):
    """A connection that carries bytes for over 10 s reports before it closes; its close
    still has the exact totals."""
    client, server = lab.pods
    table = ServiceTable((Service("sized", VIP, 80, endpoints=(Endpoint(server.ip, 8080),),
                                  fastpath=fastpath),))
    datapath.apply(table)
    flows = FlowsPart(datapath.pin_dir)
    flows.apply(table)
    flows.start()
    srv = SizedServer(server, 8080)
    try:
        s = client.socket()
        s.settimeout(30)
        with s:
            s.connect((VIP, 80))
            s.sendall(b"\0\0\0\x03\0")  # reply 3 bytes after our EOF
            t_end = time.time() + 11
            sent = 5
            while time.time() < t_end:
                s.sendall(b"x" * 1000)
                sent += 1000
                time.sleep(0.25)
            s.shutdown(socket.SHUT_WR)
            got = 0
            while chunk := s.recv(4096):
                got += len(chunk)
            assert got == 3
        deadline = time.time() + 5
        while time.time() < deadline:
            recs = [r for r in flows.store.recent() if r.service == "sized"]
            if any(r.event == "close" for r in recs):
                break
            time.sleep(0.1)
        reports = [r for r in recs if r.event == "report"]
        [close] = [r for r in recs if r.event == "close"]
        assert reports and 0 < reports[0].bytes_sent < sent
        assert reports[0].time_end - reports[0].time_start >= 10
        assert (close.bytes_sent, close.bytes_received) == (sent, 3)
    finally:
        srv.close()
        flows.stop()


@pytest.mark.parametrize("fastpath,path", [("route", "tcp"), ("redirect", "redirected")])
def test_ipv6_vip_exact_bytes(lab, datapath, fastpath, path):
    """An IPv6 VIP: the record's addresses are IPv6 ("[ip]:port") and the bytes exact."""
    client, server = lab.pods
    vip6 = "fd00:96::17"
    table = ServiceTable((Service("six", vip6, 80, endpoints=(Endpoint(server.ip6, 8080),),
                                  fastpath=fastpath),))
    datapath.apply(table)
    flows = FlowsPart(datapath.pin_dir)
    flows.apply(table)
    flows.start()
    srv = SizedServer(server, 8080, family=socket.AF_INET6)
    try:
        calls = {c.src: c for c in (
            sized_call(client, vip6, 80, 1000 * i + 7, 70_000 - i, bool(i % 2), i,
                       family=socket.AF_INET6) for i in range(4))}
        deadline = time.time() + 5
        while time.time() < deadline:
            got = {r.src: r for r in flows.store.recent() if r.event == "close"}
            if len(got) == len(calls):
                break
            time.sleep(0.1)
        assert set(got) == set(calls)
        for src, c in calls.items():
            r = got[src]
            assert (r.vip, r.dst, r.path) == (f"[{vip6}]:80", f"[{server.ip6}]:8080", path)
            assert (r.bytes_sent, r.bytes_received) == (c.sent, c.received)
    finally:
        srv.close()
        flows.stop()
