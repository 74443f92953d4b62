"""Issue 14's interface end to end: `accel agent --xds H:P --xds-api workload --node-name
NODE --node-id ID --pod-iface GLOB --pod-netns NS` against a Delta server serving Istio
ambient's workload API (Workloads in two namespaces, a Service, an AuthorizationPolicy),
with lab pods as the workloads: allowed clients are balanced over both pods through the VIP
and stay on the fast path, a denied client is refused at once through the VIP and to the
pod IP, widening the policy lets it in, narrowing it cuts a held connection."""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import time

import pytest

from accel.sources.memory import MemorySource
from accel.xds.gen.istio import security_pb2 as sec
from accel.xds.gen.istio import workload_pb2 as wl
from accel.xds.server import ControllerServer
from accel.xds.workload.kinds import ADDRESS, AUTHORIZATION
from tests.api_harness import accel, free_port
from tests.traffic import EchoServer, connect

NODE = "node-a"
VIP = "10.96.77.7"
HOST = "db.back.svc.cluster.local"


def workload(pod, ns: str, sa: str, member: bool) -> wl.Address:
    w = wl.Workload(uid=f"Kubernetes//Pod/{ns}/{pod.name}", name=pod.name, namespace=ns,
                    service_account=sa, node=NODE, status=wl.HEALTHY,
                    addresses=[pod.ip.packed, pod.ip6.packed])
    if member:
        w.services[f"back/{HOST}"].ports.add(service_port=5432, target_port=8080)
    return wl.Address(workload=w)


def service() -> wl.Address:
    return wl.Address(service=wl.Service(
        name="db", namespace="back", hostname=HOST,
        addresses=[wl.NetworkAddress(address=ipaddress.ip_address(VIP).packed)],
        ports=[wl.Port(service_port=5432, target_port=8080)]))


def allow_from(*namespaces: str) -> sec.Authorization:
    return sec.Authorization(
        name="allow-clients", namespace="back", scope=sec.NAMESPACE, action=sec.ALLOW,
        groups=[sec.Group(rules=[sec.Rules(matches=[sec.Match(
            namespaces=[sec.StringMatch(exact=n) for n in namespaces])])])])


def resources(pods, policy: sec.Authorization) -> dict:
    c1, c2, s1, s2 = pods
    addrs = [workload(c1, "front", "web", False), workload(c2, "other", "default", False),
             workload(s1, "back", "db", True), workload(s2, "back", "db", True), service()]
    return {ADDRESS: {(a.workload.uid if a.HasField("workload") else f"back/{HOST}"): a
                      for a in addrs},
            AUTHORIZATION: {f"{policy.namespace}/{policy.name}": policy}}


def refused_within(pod, host: str, port: int, seconds: float) -> float:
    """Seconds until a connect() from `pod` is refused (EPERM/ECONNREFUSED), retrying."""
    start = time.monotonic()
    while True:
        t = time.monotonic()
        try:
            connect(pod, host, port, timeout=2).close()
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ECONNREFUSED, errno.ECONNRESET):
                assert time.monotonic() - t < 0.5, "refused, but only after a wait"
                return time.monotonic() - start
            raise
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{host}:{port} still reachable after {seconds}s")
        time.sleep(0.05)


def served_by(pod, host: str, port: int) -> str:
    with connect(pod, host, port, timeout=3) as s:
        assert s.getpeername() == (host, port)
        s.sendall(b"who")
        return s.recv(64).decode().split("|")[0]


@pytest.mark.kernel
@pytest.mark.parametrize("fastpath", ["route", "redirect"])
def test_workload_api_agent_balances_allowed_and_refuses_denied(lab_factory, env, fastpath):
    # env after lab_factory: its agent stops before the lab's namespaces go.
    lab = lab_factory(4)
    c1, c2, s1, s2 = lab.pods
    port = free_port()
    srv = ControllerServer(MemorySource(), f"127.0.0.1:{port}", api="workload").start()
    try:
        srv.publish_resources(resources(lab.pods, allow_from("front")))
        env.enter()  # the pods' sockets are the test process's: in the agent's cgroup
        agent = env.agent(None, "--xds", f"127.0.0.1:{port}", "--xds-api", "workload",
                          "--node-name", NODE, "--node-id",
                          f"ztunnel~{s1.ip}~ztunnel-x.istio-system~istio-system.svc."
                          "cluster.local", "--pod-iface", f"{lab.prefix}p*",
                          "--pod-netns", lab.node, "--fastpath", fastpath)
        out = accel("status", "--wait", "30", "--api-socket", env.socket)
        assert out.returncode == 0, (out.stdout, out.stderr, agent.read_log())
        st = json.loads(accel("status", "--json", "--api-socket", env.socket).stdout)
        assert st["services"] == 1 and st["xds"]["connected"]

        with EchoServer(s1, 8080, reply_prefix=f"{s1.name}|".encode()), \
                EchoServer(s2, 8080, reply_prefix=f"{s2.name}|".encode()):
            # Allowed (namespace front): balanced over both pods, 40 connects, each pod
            # missed with probability 2^-40.
            seen = {served_by(c1, VIP, 5432) for _ in range(40)}
            assert seen == {s1.name, s2.name}
            # ... and on the fast path: balanced at connect(), carried past the bridge.
            stats = json.loads(accel("stats", "--json", "--pin-dir", env.pin_dir,
                                     "--api-socket", env.socket).stdout)
            assert stats["connect_balanced"] >= 40
            if fastpath == "route":
                assert stats["pod_redirects"] >= 40 * 4
            else:  # each message handed socket to socket: 40 requests, 40 replies
                assert stats["msg_redirects"] >= 80
            # Denied (namespace other): refused at once, through the VIP and to the pod.
            assert refused_within(c2, VIP, 5432, 1) < 1
            assert refused_within(c2, str(s1.ip), 8080, 1) < 1
            held = connect(c1, VIP, 5432)
            held.sendall(b"x")
            assert held.recv(64)

            # Widened: other's client gets in within 3 s.
            srv.publish_resources(resources(lab.pods, allow_from("front", "other")))
            deadline = time.monotonic() + 3
            while True:
                try:
                    assert served_by(c2, VIP, 5432) in (s1.name, s2.name)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "widened policy not in force in 3 s"
                    time.sleep(0.05)

            # Narrowed to other only: front's held connection is cut. Typically within
            # 0.25 s (`accel bench policy`: p99 248 ms); the bound is 5 s because the
            # whole path (server, gRPC, apply, the socket iterator) shares this 2-core VM
            # with the rest of the suite (one CI run saw 2.015 s).
            t = time.monotonic()
            srv.publish_resources(resources(lab.pods, allow_from("other")))
            held.settimeout(5)
            with pytest.raises(OSError) as cut:
                while True:
                    held.sendall(b"y")
                    if not held.recv(64):
                        raise ConnectionResetError(errno.ECONNRESET, "closed")
                    time.sleep(0.05)
            assert time.monotonic() - t < 5 and not isinstance(cut.value, TimeoutError)
            held.close()
            assert refused_within(c1, VIP, 5432, 2) < 2
            assert served_by(c2, VIP, 5432) in (s1.name, s2.name)

        st = json.loads(accel("status", "--json", "--api-socket", env.socket).stdout)
        counters = st["policy"]["policies"]["back/allow-clients"]
        assert counters["allowed"] >= 42, st["policy"]
        # Denied and cut by no policy's match: the ALLOW policy no longer admits front, so
        # the destination's default (deny) decides, and counts.
        default = st["policy"]["default"]
        assert default["denied"] >= 3 and default["closed_by_update"] >= 1, st["policy"]
        # Each refusal is a connection record too, under the VIP dialed (or the pod IP).
        flows = [json.loads(line) for line in accel(
            "flows", "--json", "--since", "5m", "--api-socket", env.socket).stdout.splitlines()]
        refused = [f for f in flows if f.get("reason") == "policy"]
        assert {f["vip"] for f in refused} >= {f"{VIP}:5432", f"{s1.ip}:8080"}, flows[-5:]
        listed = json.loads(accel("policies", "--json", "--api-socket", env.socket).stdout)
        assert listed["policies"]["back/allow-clients"] == counters
        text = accel("policies", "--api-socket", env.socket).stdout
        assert "back/allow-clients" in text and "closed by update" in text
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics") as r:
            metrics = r.read().decode()
        line = ('meshaccel_policy_decisions_total{decision="allowed",'
                'policy="back/allow-clients"} ')
        assert line in metrics
        assert float(metrics.split(line)[1].split()[0]) == counters["allowed"]
        agent.stop()
        assert agent.proc.returncode == 0
    finally:
        srv.stop(0)


def test_workload_stream_nacks_a_malformed_address_and_keeps_the_last_good_state():
    """The agent's client on the workload API (stream -> processors -> cache), no kernel:
    a Service whose address is 5 bytes is NACKed naming it and the field, the table and
    verdicts in force stay, and the next good version is taken."""
    from types import SimpleNamespace

    from accel.xds.client import XdsClient

    pods = [SimpleNamespace(name=f"p{i}", ip=ipaddress.ip_address(f"10.200.9.{10 + i}"),
                            ip6=ipaddress.ip_address(f"fd00:9::{10 + i}")) for i in range(4)]
    applied: list = []
    events: list = []
    port = free_port()
    srv = ControllerServer(MemorySource(), f"127.0.0.1:{port}", api="workload").start()
    client = XdsClient(f"127.0.0.1:{port}", "", lambda t, v: applied.append((t, v)),
                       api="workload", node_name=NODE, metadata={"INSTANCE_IPS": "10.0.0.9"})
    client.events.append(lambda kind, info: events.append((kind, info)))
    try:
        srv.publish_resources(resources(pods, allow_from("front")))
        client.start()
        deadline = time.monotonic() + 10
        while not applied or len(applied[-1][0].services) != 1:
            assert time.monotonic() < deadline, events
            time.sleep(0.02)
        good_table, good_verdicts = applied[-1]
        assert {str(e.address) for e in good_table.services[0].endpoints} == \
            {"10.200.9.12", "10.200.9.13"}
        assert good_verdicts.policed  # the two back pods are policed here

        bad = resources(pods, allow_from("front"))
        bad[ADDRESS][f"back/{HOST}"].service.addresses[0].address = b"\x01\x02\x03\x04\x05"
        n = len(applied)
        srv.publish_resources(bad)
        while not any(k == "rejected" for k, _ in events):
            assert time.monotonic() < deadline + 5, events
            time.sleep(0.02)
        [(_, nack)] = [(k, i) for k, i in events if k == "rejected"]
        assert f"Address[back/{HOST}].service.addresses[0]" in nack["error"], nack
        assert len(applied) == n and client.table is good_table
        assert client.state()["api"] == "workload"
        assert client.node.id == ("ztunnel~10.0.0.9~meshaccel-" + socket.gethostname()
                                  + ".istio-system~istio-system.svc.cluster.local")

        # Names of the server's own choosing (not the content's): keyed by them, removals
        # follow them, and the policy is still found by the name workloads give it.
        renamed = resources(pods, allow_from("front", "other"))
        renamed = {t: {f"{t[-7:]}-{i}": m for i, m in enumerate(items.values())}
                   for t, items in renamed.items()}
        srv.publish_resources(renamed)
        while len(applied) == n:
            assert time.monotonic() < deadline + 10, events
            time.sleep(0.02)
        assert client.table is applied[-1][0]
        table, verdicts = applied[-1]
        assert len(table.services) == 1 and verdicts.policed
        assert verdicts.policies == ("back/allow-clients",)
        assert client.state()["workloads"] == 4  # the old names' entries went
    finally:
        client.stop()
        srv.stop(0)
