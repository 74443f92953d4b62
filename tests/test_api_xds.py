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
