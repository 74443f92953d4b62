"""An agent fed by xDS reports the stream through its API and metrics: connected, the
version ACKed per type URL, and a NACK with its reason while the last good table stays."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from accel.sources.file import FileSource
from accel.xds.server import ControllerServer
from accel.xds.translate import CLUSTER, ENDPOINT
from tests.api_harness import Env, accel, free_port, write

pytestmark = pytest.mark.kernel

def service(name: str, octet: int) -> str:
    return (f"  - name: {name}\n    vip: 10.96.7.{octet}\n    port: 80\n    endpoints:\n"
            f"      - {{address: 10.200.7.{octet}, port: 8080}}\n")


def status(env: Env) -> dict:
    out = accel("status", "--json", "--api-socket", env.socket)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(pred, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_xds_state_ack_and_nack(env, tmp_path):
    cfg = write(tmp_path, "mesh.yaml", "services:\n" + service("a", 1) + service("b", 2))
    srv = ControllerServer(FileSource(cfg, poll_interval=0.05),
                           f"127.0.0.1:{free_port()}").start()
    try:
        env.agent(None, "--xds", f"127.0.0.1:{srv.port}", "--node-id", f"ha-{env.uid}",
                  "--capacity", "services=2")
        st = wait_for(lambda: (s := status(env))["services"] == 2 and all(
            s["xds"]["types"].get(t, {}).get("last_ack_version") == "1"
            for t in (CLUSTER, ENDPOINT)) and s)
        assert st["source"] == f"xds:127.0.0.1:{srv.port}"
        xds = st["xds"]
        assert xds["connected"] and xds["node_id"] == f"ha-{env.uid}"
        assert not any(t["last_nack_error"] for t in xds["types"].values())
        m = scrape(env.metrics_port)
        assert m[("meshaccel_xds_connected", ())] == 1
        assert m[("meshaccel_xds_nack", (("type_url", CLUSTER),))] == 0
        assert m[("meshaccel_xds_ack_info", (("type_url", CLUSTER), ("version", "1")))] == 1
        assert m[("meshaccel_xds_resources", (("type_url", CLUSTER),))] >= 2

        # Three services do not fit --capacity services=2: NACKed, the two stay in force.
        write(tmp_path, "mesh.yaml", "services:\n" + service("a", 1) + service("b", 2)
              + service("c", 3))
        st = wait_for(lambda: (s := status(env))["rejected"] >= 1 and any(
            t["last_nack_error"] for t in s["xds"]["types"].values()) and s)
        nacked = {u: t["last_nack_error"] for u, t in st["xds"]["types"].items()
                  if t["last_nack_error"]}
        assert all("capacity" in e for e in nacked.values()), nacked
        assert st["services"] == 2 and "capacity" in st["last_error"]
        m = scrape(env.metrics_port)
        assert sum(m[("meshaccel_xds_nack", (("type_url", u),))] for u in nacked) == len(nacked)
        assert m[("meshaccel_config_rejected_total", ())] >= 1
        human = accel("status", "--api-socket", env.socket)
        assert human.returncode == 0 and "capacity" in human.stdout
    finally:
        srv.stop()


def test_ready_only_once_the_first_table_is_applied(env, tmp_path):
    """One readiness signal: status "ready", gRPC health and `accel status --wait` agree,
    and say not ready while the agent's xDS controller has sent nothing yet."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    agent = env.agent(None, "--xds", f"127.0.0.1:{port}", "--node-id", f"hr-{env.uid}",
                      wait_socket=False)
    st = wait_for(lambda: (r := accel("status", "--json", "--api-socket", env.socket))
                  .returncode == 0 and json.loads(r.stdout))
    assert st["ready"] is False and "waiting for the first table" in st["not_ready"]
    assert st["services"] == 0 and st["seconds_to_ready"] is None
    r = accel("status", "--wait", "0.5", "--api-socket", env.socket)
    assert r.returncode == 1 and "not ready after 0.5s" in r.stderr, r.stderr
    with grpc.insecure_channel(f"unix:{env.socket}") as ch:
        check = health_pb2_grpc.HealthStub(ch).Check
        assert check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        cfg = write(tmp_path, "mesh.yaml", "services:\n" + service("a", 1) + service("b", 2))
        srv = ControllerServer(FileSource(cfg, poll_interval=0.05), f"127.0.0.1:{port}").start()
        try:
            r = accel("status", "--wait", "60", "--json", "--api-socket", env.socket)
            assert r.returncode == 0, r.stderr + agent.read_log()
            st = json.loads(r.stdout)
            # Ready means the table is in the maps, not merely received.
            assert st["ready"] and st["services"] == 2 and st["maps"]["services"]["used"] == 2
            assert st["not_ready"] == "" and st["seconds_to_ready"] > 0
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        finally:
            srv.stop()
