"""QoS seen from outside a real agent: `accel services` (limits column), status (the
mechanism), stats, gRPC (ListServices limits, ApplyConfig limits, a bad one refused naming
the field) and Prometheus (refused connections per service)."""

from __future__ import annotations

import errno
import json

import grpc
import pytest

from accel.api.gen import agent_pb2 as pb
from accel.lab import Lab
from tests.api_harness import accel, write
from tests.test_api_agent import scrape, stub
from tests.traffic import EchoServer, connect

pytestmark = pytest.mark.kernel

VIP = "10.96.0.30"


def cli_json(*args: str) -> dict:
    out = accel(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_limits_visible_and_applied_through_the_api(env):
    lab = Lab(2, prefix=f"aq{env.uid}", cgroup=str(env.cgroup)).up()
    try:
        client, server = lab.pods
        mesh = write(env.tmp, "mesh.yaml", f"""services:
  - name: bulk
    vip: {VIP}
    port: 80
    limits: {{bandwidth: 50Mbit, connections: 1/m, burst: 2}}
    endpoints: [{{address: {server.ip}, port: 8080}}]
""")
        env.agent(mesh)
        env.enter()
        refused = 0
        with EchoServer(server, 8080):
            for _ in range(5):
                try:
                    connect(client, VIP, 80).close()
                except OSError as e:
                    assert e.errno == errno.EPERM
                    refused += 1
        assert refused == 3

        svcs = cli_json("services", "--api-socket", env.socket)["services"]
        assert svcs[0]["limits"] == {"bandwidth": "50Mbit", "connections": "1/m", "burst": 2}
        human = accel("services", "--api-socket", env.socket)
        assert "limits" in human.stdout and "50Mbit, 1/m burst 2" in human.stdout
        st = cli_json("status", "--api-socket", env.socket)
        assert st["qos"]["bandwidth"] == "tcp-pacing" and st["qos"]["refused_errno"] == "EPERM"
        assert "qos" in accel("status", "--api-socket", env.socket).stdout
        stats = cli_json("stats", "--pin-dir", env.pin_dir, "--api-socket", env.socket)
        assert stats["services"]["bulk"]["refused_by_limit"] == 3
        assert stats["services"]["bulk"]["connects"] == 2
        assert stats["services"]["bulk"]["paced"] == 2
        # Each refusal is a connection record too, with its reason (accel flows).
        out = accel("flows", "--json", "--service", "bulk", "--api-socket", env.socket)
        assert out.returncode == 0, out.stderr
        records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        assert [r["reason"] for r in records if r["event"] == "refused"] == ["limit"] * 3
        metrics = scrape(env.metrics_port)
        assert metrics[("meshaccel_service_refused_by_limit_total", (("service", "bulk"),))] == 3
        for gauge in ("paced_live", "paced_light"):  # gauges, beside the counters
            assert (f"meshaccel_service_{gauge}", (("service", "bulk"),)) in metrics, gauge
        assert stats["services"]["bulk"]["paced_light"] >= 0

        s = stub(env.socket)
        lim = s.ListServices(pb.ListServicesRequest(), timeout=10).table.services[0].limits
        assert (lim.bandwidth, lim.connections, lim.burst) == (50_000_000, 1 / 60, 2)
        # Over the API: the limit raised (connections flow again), then a bad one refused.
        table = pb.ServiceTable(services=[pb.Service(
            name="bulk", vip=VIP, port=80, limits=pb.Limits(connections=100, burst=10),
            endpoints=[pb.Endpoint(address=str(server.ip), port=8080)])])
        s.ApplyConfig(pb.ApplyConfigRequest(table=table, version="v2"), timeout=10)
        with EchoServer(server, 8080):
            for _ in range(5):
                connect(client, VIP, 80).close()
        table.services[0].limits.burst = 0
        table.services[0].limits.connections = 0
        table.services[0].limits.burst = 5
        with pytest.raises(grpc.RpcError) as e:
            s.ApplyConfig(pb.ApplyConfigRequest(table=table, version="v3"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "services[bulk].limits.burst" in e.value.details()
        assert cli_json("status", "--api-socket", env.socket)["config_version"] == "v2"
    finally:
        lab.down()
