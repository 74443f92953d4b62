"""An agent running the XDP edge: the API reports the edge (where, how, its counters per
VIP), and SetGuard reaches the kernel: a SYN from a CIDR denied through the API is
dropped by XDP and counted."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.all import IP, TCP, Ether, get_if_hwaddr, sendp

from accel.api import client
from accel.api.gen import agent_pb2 as pb
from accel.api.gen import agent_pb2_grpc as pb_grpc
from tests.api_harness import Env, accel, write

pytestmark = pytest.mark.kernel

VIP = "192.168.251.100"


@pytest.fixture
def veth(env):
    """ha<uid>e0 (the edge) <-> ha<uid>e1 (where test packets come from), root netns."""
    e0, e1 = f"ha{env.uid}e0", f"ha{env.uid}e1"
    subprocess.run(["ip", "link", "add", e0, "type", "veth", "peer", "name", e1], check=True)
    try:
        for cmd in (["ip", "link", "set", e0, "up"], ["ip", "link", "set", e1, "up"],
                    ["ip", "addr", "add", "192.168.251.1/24", "dev", e0]):
            subprocess.run(cmd, check=True)
        yield e0, e1
    finally:
        for a in env.agents:  # the agent detaches from the link before the link goes
            a.stop()
        subprocess.run(["ip", "link", "del", e0], check=False)


def syns(e0: str, e1: str, src: str, n: int) -> None:
    pkt = (Ether(dst=get_if_hwaddr(e0), src=get_if_hwaddr(e1))
           / IP(src=src, dst=VIP) / TCP(sport=40000, dport=80, flags="S"))
    sendp([pkt] * n, iface=e1, verbose=False)


def edge_counter(env: Env, name: str) -> int:
    return client.get_stats(env.socket)["edge"]["global"][name]


def vip_stat(env: Env, name: str) -> int:
    return client.get_stats(env.socket)["edge"]["vips"][0][name]


def wait_for(check, what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_edge_status_stats_and_guard(env, veth):
    e0, e1 = veth
    cfg = write(env.tmp, "mesh.yaml",
                f"services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    edge: true\n"
                "    endpoints:\n      - {address: 192.168.251.2, port: 8080}\n")
    env.agent(cfg, "--edge-iface", e0)
    st = client.get_status(env.socket)
    assert st["edge"]["iface"] == e0 and st["edge"]["mode"] == "tc"  # auto on a veth
    stats = client.get_stats(env.socket)
    assert [(v["service"], v["vip"], v["port"]) for v in stats["edge"]["vips"]] == \
        [("web", VIP, 80)]
    assert "drop_deny" in stats["edge"]["global"]

    syns(e0, e1, "198.51.100.9", 5)
    wait_for(lambda: vip_stat(env, "packets") >= 5, "the edge to see the 5 SYNs")
    assert edge_counter(env, "drop_deny") == 0  # nothing denied yet

    s = pb_grpc.AgentStub(grpc.insecure_channel(f"unix:{env.socket}"))
    r = s.SetGuard(pb.SetGuardRequest(guard=pb.Guard(deny=["198.51.100.0/24"])), timeout=10)
    assert r.enforced
    syns(e0, e1, "198.51.100.9", 5)
    syns(e0, e1, "203.0.113.9", 5)  # not denied
    wait_for(lambda: edge_counter(env, "drop_deny") >= 5 and vip_stat(env, "packets") >= 10,
             "the edge to see the next 10 SYNs")
    assert edge_counter(env, "drop_deny") == 5
    st = client.get_status(env.socket)
    assert st["edge"]["guard"]["deny"] == ["198.51.100.0/24"]
    vip = client.get_stats(env.socket)["edge"]["vips"][0]
    assert vip["drop_deny"] == 5
    text = urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics",
                                  timeout=10).read().decode()
    m = {(x.name, tuple(sorted(x.labels.items()))): x.value
         for fam in text_string_to_metric_families(text) for x in fam.samples}
    assert m[("meshaccel_edge_drop_deny_total", ())] == 5
    labels = (("port", "80"), ("protocol", "TCP"), ("service", "web"), ("vip", VIP))
    assert m[("meshaccel_edge_vip_drop_deny_total", labels)] == 5
    human = accel("status", "--api-socket", env.socket)
    assert human.returncode == 0 and f"iface={e0}" in human.stdout
    # Each backend with its path and why: no neighbour answers 192.168.251.2.
    line = next(ln for ln in human.stdout.splitlines() if "192.168.251.2:8080" in ln)
    assert "kernel route: no neighbour entry for 192.168.251.2" in line, human.stdout
