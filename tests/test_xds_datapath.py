"""xDS all the way into the kernel: the controller's pushes steer real connections, a NACKed
response leaves the last good datapath serving, a dead controller changes nothing, and
--config and --xds produce the same maps."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from accel import config
from accel.datapath.datapath import Datapath
from accel.runtime import Runtime
from accel.sources.file import FileSource
from accel.xds.client import XdsClient
from accel.xds.server import ControllerServer
from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, pack, tcp_listener
from accel.xds.translate import CLUSTER, ENDPOINT, LISTENER
from tests import traffic
from tests.api_harness import free_port
from tests.test_xds_client import Harness
from tests.traffic import connect, named_servers

pytestmark = pytest.mark.kernel

PORTS = range(18200, 18250)  # this module's share; free_port picks one nobody holds
VIP = "10.96.0.20"


def mesh_yaml(*pods, port: int = 8080) -> str:
    eps = "".join(f"      - {{address: {p.ip}, port: {port}}}\n" for p in pods)
    return (f"services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    fastpath: redirect\n"
            f"    endpoints:\n{eps}")


def who(client) -> str:
    return traffic.who(client, VIP, 80, timeout=5)


def wait_until(pred, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s")


@pytest.fixture
def backends(lab_factory):
    lab = lab_factory(3)
    client, a, b = lab.pods
    servers = named_servers([a, b])
    yield client, a, b
    for s in servers:
        s.close()


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_controller_push_steers_new_connections_within_a_second(backends, datapath, tmp_path):
    client, a, b = backends
    mesh = tmp_path / "mesh.yaml"
    write(mesh, mesh_yaml(a))
    port = free_port(PORTS)
    controller = ControllerServer(FileSource(mesh, poll_interval=0.05),
                                  listen=f"127.0.0.1:{port}").start()
    agent = Runtime(datapath=datapath)
    xds = XdsClient(f"127.0.0.1:{port}", "test-node", agent.apply,
                    backoff_initial=0.1, backoff_max=0.5).start()
    try:
        wait_until(lambda: who(client) == a.name, 10)
        held = connect(client, VIP, 80)
        held.sendall(b"before")
        write(mesh, mesh_yaml(b))
        took = wait_until(lambda: who(client) == b.name, 3)
        assert took < 1.0, f"took {took:.2f}s"
        assert {who(client) for _ in range(20)} == {b.name}
        held.sendall(b"after")
        held.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := held.recv(4096):
            got += chunk
        assert got == a.name.encode() + b"|beforeafter"  # the old connection carried on
        held.close()
        state = xds.state()
        assert state["connected"]
        assert datapath.counters()["msg_redirects"] > 0
    finally:
        xds.stop()
        controller.stop()


def test_nack_keeps_the_last_good_datapath_serving(backends, datapath):
    client, a, _ = backends
    agent = Runtime(datapath=datapath)
    h = Harness(on_update=agent.apply)
    try:
        good = [pack(tcp_listener("web.vip", VIP, 80, "web"))]
        h.ads.send(CLUSTER, "1", [pack(eds_cluster("web"))])
        h.ads.send(ENDPOINT, "1", [pack(cla("web", locality(lbe(str(a.ip), 8080))))])
        n = h.ads.send(LISTENER, "1", good)
        h.ads.reply_to(n)
        wait_until(lambda: who(client) == a.name, 5)
        for bad, needle in (
            (tcp_listener("web.vip", VIP, 0, "web"), "port"),
            (tcp_listener("web.vip", "10.96.0.300", 80, "web"), "address"),
            (tcp_listener("web.vip", VIP, 80, "nope"), "nope"),
        ):
            n = h.ads.send(LISTENER, "2", [pack(bad)])
            reply = h.ads.reply_to(n)
            assert reply.error_detail.message and needle in reply.error_detail.message
            assert reply.version_info == "1"  # NACK: still at the last good version
            assert who(client) == a.name  # and the datapath still serves it
        dup = [pack(tcp_listener("web.vip", VIP, 80, "web")),
               pack(tcp_listener("web.vip", VIP, 81, "web"))]
        reply = h.ads.reply_to(h.ads.send(LISTENER, "3", dup))
        assert "duplicate" in reply.error_detail.message.lower()
        assert who(client) == a.name
    finally:
        h.close()


def test_controller_down_datapath_keeps_working_then_resyncs(backends, datapath, tmp_path):
    client, a, b = backends
    mesh = tmp_path / "mesh.yaml"
    write(mesh, mesh_yaml(a))
    port = free_port(PORTS)
    controller = ControllerServer(FileSource(mesh), listen=f"127.0.0.1:{port}").start()
    agent = Runtime(datapath=datapath)
    xds = XdsClient(f"127.0.0.1:{port}", "test-node", agent.apply,
                    backoff_initial=0.1, backoff_max=0.5).start()
    try:
        wait_until(lambda: who(client) == a.name, 10)
        controller.stop()
        wait_until(lambda: not xds.state()["connected"], 5)
        assert {who(client) for _ in range(10)} == {a.name}  # last good state serves
        write(mesh, mesh_yaml(b))
        # A new controller process: its version sequence starts over.
        controller = ControllerServer(FileSource(mesh), listen=f"127.0.0.1:{port}").start()
        wait_until(lambda: who(client) == b.name, 10)
        assert xds.state()["connected"]
    finally:
        xds.stop()
        controller.stop()


def test_config_and_xds_give_the_same_maps(lab, test_cgroup, tmp_path, uid):
    client, server = lab.pods
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        f"services:\n"
        f"  - {{name: a, vip: 10.96.0.1, port: 80, endpoints: [{{address: {server.ip}, "
        f"port: 8080, weight: 3}}, {{address: {client.ip}, port: 8080}}]}}\n"
        f"  - {{name: b, vip: 'fd00:96::2', port: 443, endpoints: [{{address: '{server.ip6}', "
        f"port: 8443}}]}}\n"
        f"  - {{name: c, vip: 10.96.0.3, port: 53, protocol: UDP, endpoints: "
        f"[{{address: {server.ip}, port: 5353, weight: 2}}]}}\n"
        f"mesh_cidrs: [10.201.0.0/16]\n"
    )
    port = free_port(PORTS)
    with Datapath(pin_dir=f"/sys/fs/bpf/accel-test-{uid}-file", cgroup_path=str(test_cgroup)) \
            as by_file, Datapath(pin_dir=f"/sys/fs/bpf/accel-test-{uid}-xds",
                                 cgroup_path=str(test_cgroup)) as by_xds:
        by_file.apply(config.load(mesh))
        controller = ControllerServer(FileSource(mesh), listen=f"127.0.0.1:{port}").start()
        xds = XdsClient(f"127.0.0.1:{port}", "n", by_xds.apply).start()
        try:
            wait_until(lambda: len(by_xds.dump()["services"]) == 3, 10)
        finally:
            xds.stop()
            controller.stop()
        assert by_file.dump() == by_xds.dump()
