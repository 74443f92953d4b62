"""The agent's API on a real agent: the CLI and raw gRPC read the same state, ApplyConfig
steers real connections and bad input changes nothing, events, health, reflection,
metrics, and the unix socket's guarantees (root-only, stale replaced, live refused)."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from accel.api.gen import agent_pb2 as pb
from accel.api.gen import agent_pb2_grpc as pb_grpc
from accel.lab import Lab
from tests.api_harness import REPO, accel, write
from tests.traffic import EchoServer, connect

pytestmark = pytest.mark.kernel

MESH = REPO / "examples" / "mesh.yaml"
VIP = "10.96.0.1"


@pytest.fixture
def agent(env):
    return env.agent(MESH)


def stub(path: str) -> pb_grpc.AgentStub:
    return pb_grpc.AgentStub(grpc.insecure_channel(f"unix:{path}"))


def cli_json(*args: str) -> dict:
    out = accel(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def who(pod, port=80) -> str:
    with connect(pod, VIP, port) as s:
        s.sendall(b"?")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"|")[0].decode()


def echo_table(pod, version: str = "") -> pb.ApplyConfigRequest:
    return pb.ApplyConfigRequest(version=version, table=pb.ServiceTable(services=[
        pb.Service(name="echo", vip=VIP, port=80,
                   endpoints=[pb.Endpoint(address=str(pod.ip), port=8080, weight=3)])]))


# ---- reading --------------------------------------------------------------------------------


def test_cli_and_grpc_read_the_running_agent(env, agent):
    st = cli_json("status", "--api-socket", env.socket)
    assert st["source"] == f"file:{MESH}" and st["config_version"] == "file-1"
    assert st["services"] == 3 and st["applied"] == 1 and st["rejected"] == 0
    assert st["pin_dir"] == env.pin_dir and st["cgroup"] == str(env.cgroup)
    assert st["xds"] is None and st["edge"] is None
    assert st["maps"]["services"] == {"used": 3, "capacity": 16384}
    # This kernel has the BTF fields the redirect's queue bound needs (accel doctor too).
    assert st["redirect_unavailable"] is None

    svcs = cli_json("services", "--api-socket", env.socket)
    by_name = {s["name"]: s for s in svcs["services"]}
    assert set(by_name) == {"frontend", "reviews", "ratings"}
    assert by_name["reviews"]["vip"] == "10.96.0.11" and by_name["reviews"]["port"] == 9080
    assert [(e["address"], e["weight"], e["healthy"]) for e in by_name["reviews"]["endpoints"]] \
        == [("10.200.0.13", 1, True), ("10.200.0.14", 2, True)]
    assert by_name["ratings"]["vip"] == "fd00:96::12" and by_name["ratings"]["protocol"] == "TCP"

    stats = cli_json("stats", "--pin-dir", env.pin_dir, "--api-socket", env.socket)
    assert set(stats["services"]) == {"frontend", "reviews", "ratings"}
    assert "connect_balanced" in stats

    s = stub(env.socket)
    raw = s.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert (raw.source, raw.config_version, raw.pin_dir) == (st["source"], "file-1", env.pin_dir)
    assert not raw.xds.enabled and not raw.edge.enabled and raw.uptime_seconds > 0
    table = s.ListServices(pb.ListServicesRequest(), timeout=10).table
    assert sorted(x.name for x in table.services) == ["frontend", "ratings", "reviews"]
    counters = s.GetStats(pb.GetStatsRequest(), timeout=10)
    assert set(counters.services) == {"frontend", "reviews", "ratings"}
    assert set(counters.global_counters) >= {"connect_balanced", "msg_redirects"}

    human = accel("services", "--api-socket", env.socket)
    assert human.returncode == 0 and "[fd00:96::12]:9080/TCP" in human.stdout
    human = accel("status", "--api-socket", env.socket)
    assert human.returncode == 0 and "file-1" in human.stdout


def test_socket_is_root_only(env, agent):
    st = os.lstat(env.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    parent = os.stat(Path(env.socket).parent)
    assert stat.S_IMODE(parent.st_mode) == 0o700 and parent.st_uid == 0


def test_health_and_reflection(env, agent):
    ch = grpc.insecure_channel(f"unix:{env.socket}")
    health = health_pb2_grpc.HealthStub(ch)
    for name in ("", "accel.agent.v1.Agent"):
        r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="accel.agent.v1.Agent")]
    answers = list(refl.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"accel.agent.v1.Agent", "grpc.health.v1.Health"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto  # the schema itself


def test_no_agent_is_a_clear_error(env, tmp_path):
    for cmd in ("status", "services"):
        out = accel(cmd, "--api-socket", env.socket)
        assert out.returncode == 1 and "no agent API at" in out.stderr, out.stderr
    # A socket file nobody listens on: stale, said so, not a hang.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(env.socket)
    stale.close()
    out = accel("status", "--api-socket", env.socket, "--json")
    assert out.returncode == 1 and "no agent answers" in out.stderr, out.stderr


# ---- the unix socket ---------------------------------------------------------------------------


def test_stale_socket_is_replaced_and_a_live_one_refused(env, tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(env.socket)
    stale.close()
    first = env.agent(MESH)
    assert stub(env.socket).GetStatus(pb.GetStatusRequest(), timeout=10).config_version

    second = env.agent(MESH, wait_socket=False, pin_dir=f"{env.pin_dir}-2")
    assert second.wait() == 1
    assert "another agent is serving on" in second.read_log()
    # The second agent removed only its own things: the first still serves on its socket.
    assert stub(env.socket).GetStatus(pb.GetStatusRequest(), timeout=10).pin_dir == env.pin_dir
    assert not os.path.exists(f"{env.pin_dir}-2")
    first.stop()
    assert not os.path.exists(env.socket)  # removed on the way out


def test_a_file_in_the_way_is_not_deleted(env, tmp_path):
    Path(env.socket).write_text("precious")
    a = env.agent(MESH, wait_socket=False)
    assert a.wait() == 1 and "is not a socket" in a.read_log()
    assert Path(env.socket).read_text() == "precious"


# ---- changing -------------------------------------------------------------------------------


@pytest.fixture
def lab(env):
    lab = Lab(3, prefix=f"ha{env.uid}", cgroup=str(env.cgroup))
    try:
        yield lab.up()
    finally:
        lab.down()


def test_apply_config_steers_traffic_and_bad_input_changes_nothing(env, lab, tmp_path):
    client, a, b = lab.pods
    env.enter()
    cfg = write(tmp_path, "mesh.yaml", f"services:\n  - name: echo\n    vip: {VIP}\n"
                f"    port: 80\n    endpoints:\n      - {{address: {a.ip}, port: 8080}}\n")
    env.agent(cfg)
    servers = [EchoServer(p, 8080, reply_prefix=p.name.encode() + b"|") for p in (a, b)]
    s = stub(env.socket)
    events: list[pb.Event] = []
    watching = threading.Event()
    stream = s.WatchEvents(pb.WatchEventsRequest())

    def read_events() -> None:
        try:
            for ev in stream:
                events.append(ev)
                watching.set()
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    try:
        assert watching.wait(10) and events[0].kind == "watching"
        assert who(client) == a.name

        r = s.ApplyConfig(echo_table(b, version="ctl-7"), timeout=30)
        assert (r.applied, r.version, r.services, r.endpoints) == (True, "ctl-7", 1, 1)
        listed = s.ListServices(pb.ListServicesRequest(), timeout=10)
        assert listed.config_version == "ctl-7"
        [svc] = listed.table.services
        assert (svc.vip, svc.port, svc.endpoints[0].address, svc.endpoints[0].weight) \
            == (VIP, 80, str(b.ip), 3)
        assert all(who(client) == b.name for _ in range(5))  # the kernel follows the API

        bad = [
            ("table.services[echo].endpoints[0].port",
             pb.Endpoint(address=str(a.ip), port=70000)),
            ("table.services[echo].endpoints[0].address",
             pb.Endpoint(address="10.0.0.300", port=8080)),
            ("table.services[echo].endpoints[0].weight",
             pb.Endpoint(address=str(a.ip), port=8080, weight=0)),
        ]
        for field, ep in bad:
            req = pb.ApplyConfigRequest(version="bad", table=pb.ServiceTable(services=[
                pb.Service(name="echo", vip=VIP, port=80, endpoints=[ep])]))
            with pytest.raises(grpc.RpcError) as e:
                s.ApplyConfig(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith(field), e.value.details()
        for field, req in [
            ("table.services[echo].vip", pb.ApplyConfigRequest(table=pb.ServiceTable(
                services=[pb.Service(name="echo", vip="not-an-ip", port=80)]))),
            ("table.services[echo].protocol", pb.ApplyConfigRequest(table=pb.ServiceTable(
                services=[pb.Service(name="echo", vip=VIP, port=80, protocol="SCTP")]))),
            ("table.services[x]", pb.ApplyConfigRequest(table=pb.ServiceTable(services=[
                pb.Service(name="x", vip=VIP, port=80), pb.Service(name="x", vip=VIP, port=81)
            ]))),
            ("table.mesh_cidrs[0]", pb.ApplyConfigRequest(table=pb.ServiceTable(
                mesh_cidrs=["10.0.0.0/33"]))),
            ("table.guard.deny[0]", pb.ApplyConfigRequest(table=pb.ServiceTable(
                guard=pb.Guard(deny=["nope"])))),
            ("mesh_yaml.services[y].vip", pb.ApplyConfigRequest(
                mesh_yaml="services:\n  - {name: y, port: 80}\n")),
            ("config", pb.ApplyConfigRequest(version="empty")),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                s.ApplyConfig(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith(field), e.value.details()

        # validate_only: checked, not applied.
        r = s.ApplyConfig(pb.ApplyConfigRequest(validate_only=True, table=pb.ServiceTable()),
                          timeout=10)
        assert not r.applied

        # Nothing changed: the same table, the same version, the same kernel behaviour.
        after = s.ListServices(pb.ListServicesRequest(), timeout=10)
        assert after == listed
        assert all(who(client) == b.name for _ in range(5))
        st = cli_json("status", "--api-socket", env.socket)
        assert st["config_version"] == "ctl-7" and st["applied"] == 2

        kinds = [(ev.kind, ev.version) for ev in events]
        assert ("applied", "ctl-7") in kinds and ("rejected", "bad") in kinds, kinds

        m = scrape(env.metrics_port)
        assert m[("meshaccel_service_connects_total", (("service", "echo"),))] >= 10
        assert m[("meshaccel_connect_balanced_total", ())] >= 11
        assert m[("meshaccel_config_applied_total", ())] == 2
        assert m[("meshaccel_config_rejected_total", ())] == 0
        assert m[("meshaccel_config_info", (("source", f"file:{cfg}"), ("version", "ctl-7")))] \
            == 1
        counters = s.GetStats(pb.GetStatsRequest(), timeout=10)
        assert counters.services["echo"].connects == \
            m[("meshaccel_service_connects_total", (("service", "echo"),))]
    finally:
        stream.cancel()
        reader.join(5)
        for srv in servers:
            srv.close()


def test_apply_config_from_the_cli_client(env, agent):
    from accel.api import client

    r = client.apply_config({"services": [{"name": "solo", "vip": "10.96.9.9", "port": 443,
                                           "endpoints": [{"address": "10.200.0.50",
                                                          "port": 8443}]}]},
                            version="cli-1", socket_path=env.socket)
    assert r == {"version": "cli-1", "services": 1, "endpoints": 1, "applied": True}
    listed = client.list_services(env.socket)
    assert [s["name"] for s in listed["services"]] == ["solo"]
    with pytest.raises(client.ApiCallError) as e:
        client.apply_config("services: [{name: z, vip: 10.0.0.1, port: 0}]",
                            socket_path=env.socket)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "mesh_yaml.services[z].port" in e.value.details
    assert client.get_status(env.socket)["config_version"] == "cli-1"
    assert client.get_stats(env.socket)["services"].keys() == {"solo"}


def test_set_guard(env, agent):
    s = stub(env.socket)
    for field, guard in [("guard.deny[1]", pb.Guard(deny=["192.0.2.0/24", "300.1.1.0/24"])),
                         ("guard.syn_rate", pb.Guard(syn_rate=20_000_000)),
                         ("guard", None)]:
        with pytest.raises(grpc.RpcError) as e:
            s.SetGuard(pb.SetGuardRequest(guard=guard), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field), e.value.details()
    assert s.ListServices(pb.ListServicesRequest(), timeout=10).table.guard == pb.Guard()

    r = s.SetGuard(pb.SetGuardRequest(guard=pb.Guard(deny=["192.0.2.7/24", "2001:db8::/32"],
                                                     syn_rate=100)), timeout=10)
    assert not r.enforced  # no XDP edge on this agent
    assert list(r.guard.deny) == ["192.0.2.0/24", "2001:db8::/32"]
    assert (r.guard.syn_rate, r.guard.syn_burst) == (100, 100)  # burst defaults to the rate
    table = s.ListServices(pb.ListServicesRequest(), timeout=10).table
    assert table.guard == r.guard and len(table.services) == 3  # services untouched


def test_metrics_endpoint(env, agent):
    m = scrape(env.metrics_port)
    from accel.datapath.counters import counter_names

    for name in counter_names():
        assert (f"meshaccel_{name}_total", ()) in m, name
    for svc in ("frontend", "reviews", "ratings"):
        assert (("meshaccel_service_connects_total", (("service", svc),)) in m)
        assert (("meshaccel_service_no_backend_total", (("service", svc),)) in m)
    assert m[("meshaccel_config_services", ())] == 3
    assert m[("meshaccel_config_endpoints", ())] == 4
    assert ("meshaccel_xds_connected", ()) not in m  # not fed by xDS
    assert m[("meshaccel_map_capacity", (("map", "services"),))] == 16384
    assert m[("meshaccel_map_entries", (("map", "services"),))] == 3
    assert not [k for k in m if k[0] == "meshaccel_scrape_errors"]


def test_a_full_size_table_goes_through(env, agent):
    """10,000 services, 100,000 endpoints (the default capacities), more than gRPC's default
    4 MiB message limit, both ways."""
    from accel.api.server import MAX_MESSAGE

    svcs = [pb.Service(name=f"svc-{i:05d}.bookinfo.svc.cluster.local", vip=f"fd00:96::{i:x}",
                       port=80, endpoints=[
                           pb.Endpoint(address=f"fd00:2000:{i:04x}:{j:04x}:1111:2222:3333:4444",
                                       port=9080, weight=1 + j % 3) for j in range(10)])
            for i in range(10_000)]
    req = pb.ApplyConfigRequest(version="full", table=pb.ServiceTable(services=svcs))
    assert req.ByteSize() > 4 << 20
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE)]
    s = pb_grpc.AgentStub(grpc.insecure_channel(f"unix:{env.socket}", options=opts))
    r = s.ApplyConfig(req, timeout=300)
    assert (r.services, r.endpoints) == (10_000, 100_000)
    from accel.api import client

    listed = client.list_services(env.socket)
    assert listed["config_version"] == "full" and len(listed["services"]) == 10_000
    assert sum(len(x["endpoints"]) for x in listed["services"]) == 100_000


def test_watch_events_client_and_graceful_stop(env, agent):
    """The client's event iterator sees changes, and ends (no hang) when the agent stops."""
    import time

    from accel.api import client

    events = client.watch_events(env.socket)
    assert next(events)["kind"] == "watching"
    client.apply_config({"services": []}, version="empty-1", socket_path=env.socket)
    ev = next(events)
    assert (ev["kind"], ev["version"]) == ("applied", "empty-1")

    rest: list = []
    done = threading.Event()

    def drain() -> None:
        try:
            rest.extend(events)
        except client.AgentUnavailable:
            pass
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    started = time.monotonic()
    agent.stop()
    assert agent.proc.returncode == 0, agent.output
    assert done.wait(5) and time.monotonic() - started < 8
    assert "agent stopped" in agent.output and not os.path.exists(env.socket)


def test_a_table_beyond_capacity_is_resource_exhausted_and_changes_nothing(env):
    env.agent(MESH, "--capacity", "services=3")
    s = stub(env.socket)
    before = s.ListServices(pb.ListServicesRequest(), timeout=10)
    four = pb.ServiceTable(services=[
        pb.Service(name=f"s{i}", vip=f"10.96.5.{i + 1}", port=80,
                   endpoints=[pb.Endpoint(address=f"10.200.5.{i + 1}", port=80)])
        for i in range(4)])
    for validate_only in (True, False):
        with pytest.raises(grpc.RpcError) as e:
            s.ApplyConfig(pb.ApplyConfigRequest(table=four, validate_only=validate_only),
                          timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity of 3" in e.value.details(), e.value.details()
    assert s.ListServices(pb.ListServicesRequest(), timeout=10) == before
    st = s.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert st.rejected == 1 and "capacity" in st.last_error and st.config_version == "file-1"
