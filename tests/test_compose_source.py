"""The Docker table source against the real dockerd: labels -> ServiceTable, health, drain on
stop, events (through a connection that gets cut), and deterministic VIP allocation."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import subprocess
import threading
import time

import pytest

from accel.model import ValidationError
from accel.sources.docker import DockerSource
from accel.sources.vips import allocate
from tests.conftest_docker import (
    COMPOSE_DIR,
    compose_images,
    docker_api,
    remove_labelled,
    wait_for,
)

__all__ = ["compose_images", "docker_api"]  # fixtures used by the tests below

CIDR = "10.96.251.0/24"


# ---- VIP allocation (no docker) ---------------------------------------------------------------


def test_vips_are_a_function_of_the_names():
    names = [f"svc-{i}" for i in range(50)]
    a = allocate(names, CIDR)
    assert a == allocate(reversed(names), CIDR)
    net = ipaddress.ip_network(CIDR)
    assert len(set(a.values())) == 50
    assert all(v in net and v not in (net.network_address, net.broadcast_address)
               for v in a.values())
    # A name that collides with nobody moves nobody.
    more = allocate([*names, "another"], CIDR)
    moved = {n for n in names if more[n] != a[n]}
    assert not moved or more["another"] in {a[n] for n in moved}


def test_vip_collisions_resolve_deterministically_and_fill_a_small_cidr():
    names = ["a", "b", "c", "d", "e", "f"]
    a = allocate(names, "10.96.252.0/29")  # 6 usable addresses: every slot is taken
    assert sorted(map(str, a.values())) == [f"10.96.252.{i}" for i in range(1, 7)]
    assert a == allocate(list(reversed(names)), "10.96.252.0/29")
    with pytest.raises(ValidationError, match="free addresses"):
        allocate([*names, "g"], "10.96.252.0/29")


def test_pinned_vips_are_kept_and_avoided():
    pinned = {"db": ipaddress.ip_address("10.96.252.1")}
    a = allocate(["db", "a", "b", "c", "d", "e"], "10.96.252.0/29", pinned)
    assert a["db"] == pinned["db"]
    assert len(set(a.values())) == 6


def test_v6_cidr():
    a = allocate(["x", "y"], "fd00:96::/120")
    assert all(v.version == 6 and v in ipaddress.ip_network("fd00:96::/120") for v in a.values())


# ---- against dockerd --------------------------------------------------------------------------


@pytest.fixture
def labelled(docker_api, compose_images):
    """Run containers carrying a per-test label; all of them and the network go at the end."""
    tag = f"accel-src-{secrets.token_hex(3)}"
    label = f"meshaccel.test={tag}"
    net = docker_api.create_network(f"{tag}-net", labels={"meshaccel.test": tag})["Id"]
    made: list[str] = []

    def run(name: str, labels: dict[str, str], cmd: list[str], start: bool = True,
            health: list[str] | None = None) -> str:
        host_config = docker_api.create_host_config(init=True, network_mode=f"{tag}-net")
        c = docker_api.create_container(
            "meshaccel/app:local", cmd, name=f"{tag}-{name}", host_config=host_config,
            labels={"meshaccel.test": tag, **labels},
            healthcheck={"test": ["CMD", *health], "interval": 500_000_000,
                         "timeout": 1_000_000_000, "retries": 1} if health else None)
        made.append(c["Id"])
        if start:
            docker_api.start(c["Id"])
        return c["Id"]

    run.tag, run.label, run.net = tag, label, net
    try:
        yield run
    finally:
        remove_labelled(docker_api, label)


def ip_of(api, cid: str) -> ipaddress.IPv4Address:
    nets = api.inspect_container(cid)["NetworkSettings"]["Networks"]
    return ipaddress.ip_address(next(iter(nets.values()))["IPAddress"])


def serve(name: str, port: int, grace: float = 0.0) -> list[str]:
    return ["meshapp", "serve", "--name", name, "--port", str(port), "--grace", str(grace)]


SVC = {"meshaccel.service": "reviews", "meshaccel.port": "9080"}


@pytest.mark.docker
def test_labels_become_a_service_table(docker_api, labelled):
    r1 = labelled("r1", {**SVC, "meshaccel.weight": "3", "meshaccel.namespace": "shop",
                         "meshaccel.service_account": "reviews"}, serve("reviews", 9080))
    r2 = labelled("r2", SVC, serve("reviews", 9080))
    labelled("idle", {"meshaccel.service": "idle", "meshaccel.port": "81"}, ["true"],
             start=False)
    labelled("pinned", {"meshaccel.service": "db", "meshaccel.port": "5432",
                        "meshaccel.vip": "10.96.251.77"}, serve("db", 5432))
    labelled("bad", {"meshaccel.service": "bad", "meshaccel.port": "http"}, serve("b", 1))
    labelled("unlabelled", {}, serve("x", 1))

    src = DockerSource(CIDR, selector=[labelled.label])
    t = src.current().by_name()
    assert set(t) == {"reviews", "idle", "db"}
    eps = {e.address: e for e in t["reviews"].endpoints}
    assert set(eps) == {ip_of(docker_api, r1), ip_of(docker_api, r2)}
    assert eps[ip_of(docker_api, r1)].weight == 3 and eps[ip_of(docker_api, r2)].weight == 1
    assert all(e.healthy and e.port == 9080 for e in eps.values())
    # The workload's identity, as policies name it; the default elsewhere.
    assert (eps[ip_of(docker_api, r1)].namespace,
            eps[ip_of(docker_api, r1)].service_account) == ("shop", "reviews")
    assert (eps[ip_of(docker_api, r2)].namespace,
            eps[ip_of(docker_api, r2)].service_account) == ("default", "default")
    assert t["idle"].endpoints == ()  # created, never started: the VIP exists, no endpoint
    assert str(t["db"].vip) == "10.96.251.77"
    assert t["reviews"].vip == allocate(["reviews", "idle"], CIDR,
                                        {"db": t["db"].vip})["reviews"]
    assert any("meshaccel.port" in why and "http" in why for why in src.errors.values())
    subnet = ipaddress.ip_network(
        docker_api.inspect_network(labelled.net)["IPAM"]["Config"][0]["Subnet"])
    assert subnet in src.current().mesh_cidrs
    # Same containers, new source (a restarted controller): same VIPs.
    assert {s.name: s.vip for s in DockerSource(CIDR, selector=[labelled.label])
            .current().services} == {s.name: s.vip for s in src.current().services}


@pytest.mark.docker
def test_network_label_picks_the_endpoint_network(docker_api, labelled):
    other = docker_api.create_network(f"{labelled.tag}-zz", labels={"meshaccel.test":
                                                                     labelled.tag})["Id"]
    cid = labelled("r1", {**SVC, "meshaccel.network": f"{labelled.tag}-zz"},
                   serve("reviews", 9080), start=False)
    docker_api.connect_container_to_network(cid, other)
    docker_api.start(cid)
    addr = ipaddress.ip_address(docker_api.inspect_container(cid)["NetworkSettings"]
                                ["Networks"][f"{labelled.tag}-zz"]["IPAddress"])
    src = DockerSource(CIDR, selector=[labelled.label])
    assert [e.address for e in src.current().by_name()["reviews"].endpoints] == [addr]


class Recorder:
    def __init__(self) -> None:
        self.tables: list[tuple[float, object]] = []
        self.lock = threading.Lock()

    def __call__(self, table) -> None:
        with self.lock:
            self.tables.append((time.monotonic(), table))

    def endpoints(self, service: str) -> dict:
        with self.lock:
            if not self.tables:
                return {}
            svc = self.tables[-1][1].by_name().get(service)
        return {e.address: e.healthy for e in svc.endpoints} if svc else {}


@pytest.mark.docker
def test_events_follow_health_stop_start_and_removal(docker_api, labelled):
    r1 = labelled("r1", SVC, serve("reviews", 9080))
    r2 = labelled("r2", SVC, serve("reviews", 9080, grace=3))
    rt = labelled("rt", {"meshaccel.service": "ratings", "meshaccel.port": "9090"},
                  ["sh", "-c", "sleep 1.5; exec meshapp serve --port 9090"],
                  health=["meshapp", "check", "127.0.0.1:9090"])
    src = DockerSource(CIDR, selector=[labelled.label], resync_interval=60)
    rec = Recorder()
    src.watch(rec)
    try:
        ip1, ip2, ipt = (ip_of(docker_api, c) for c in (r1, r2, rt))
        assert src.current().by_name()["ratings"].endpoints[0].healthy is False  # starting
        wait_for(lambda: rec.endpoints("ratings") == {ipt: True}, 15, what="ratings healthy")

        # docker stop: drained at the kill event, while the app still serves its grace time.
        stopper = subprocess.Popen(["docker", "stop", "-t", "10", r2])
        t0 = time.monotonic()
        try:
            wait_for(lambda: rec.endpoints("reviews") == {ip1: True, ip2: False}, 2,
                     pause=0.02, what="r2 drained")
            drained = time.monotonic() - t0
            assert docker_api.inspect_container(r2)["State"]["Running"], \
                "drained only once the container had died"
            wait_for(lambda: rec.endpoints("reviews") == {ip1: True}, 10, what="r2 gone")
        finally:
            stopper.wait(30)
        assert drained < 1.0, f"drain took {drained:.2f}s"

        docker_api.start(r2)
        ip2 = ip_of(docker_api, r2)
        wait_for(lambda: rec.endpoints("reviews") == {ip1: True, ip2: True}, 5, what="r2 back")

        docker_api.pause(r1)
        wait_for(lambda: rec.endpoints("reviews") == {ip1: False, ip2: True}, 5, what="paused")
        docker_api.unpause(r1)
        wait_for(lambda: rec.endpoints("reviews") == {ip1: True, ip2: True}, 5, what="unpaused")

        for c in (r1, r2):
            docker_api.remove_container(c, force=True)
        wait_for(lambda: "reviews" not in rec.tables[-1][1].by_name(), 5, what="reviews gone")
    finally:
        src.close()
    assert not any(t.is_alive() for t in src._threads)


class CuttableProxy:
    """A unix-socket proxy in front of dockerd whose connections can all be cut at once:
    the event stream breaks the way it does when dockerd restarts."""

    def __init__(self, path: str, upstream: str = "/var/run/docker.sock"):
        self.path, self.upstream = path, upstream
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.lsock = socket.socket(socket.AF_UNIX)
        self.lsock.bind(path)
        self.lsock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX)
            u.connect(self.upstream)
            self.conns += [c, u]
            self.accepted += 1
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.conns = []

    def close(self) -> None:
        self.cut()
        self.lsock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


@pytest.mark.docker
def test_event_stream_reconnects_after_the_engine_connection_drops(docker_api, labelled,
                                                                   tmp_path):
    import docker

    r1 = labelled("r1", SVC, serve("reviews", 9080))
    r2 = labelled("r2", SVC, serve("reviews", 9080))
    proxy = CuttableProxy(str(tmp_path / "docker.sock"))
    client = docker.APIClient(base_url=f"unix://{proxy.path}", timeout=10)
    src = DockerSource(CIDR, client, selector=[labelled.label], resync_interval=300)
    rec = Recorder()
    src.watch(rec)
    try:
        ip1, ip2 = ip_of(docker_api, r1), ip_of(docker_api, r2)
        time.sleep(0.5)  # the event stream is up
        before = proxy.accepted
        proxy.cut()
        wait_for(lambda: proxy.accepted > before, 5, what="the source to reconnect")
        time.sleep(0.3)
        docker_api.stop(r2, timeout=5)
        wait_for(lambda: rec.endpoints("reviews") == {ip1: True}, 5,
                 what="the stop seen through the new stream")
        assert ip2 not in rec.endpoints("reviews")
    finally:
        src.close()
        client.close()
        proxy.close()


def test_unreachable_engine_is_a_clear_error(tmp_path):
    import docker

    client = docker.APIClient(base_url=f"unix://{tmp_path}/nothing.sock", version="1.41",
                              timeout=2)
    with pytest.raises(ConnectionError, match="Docker Engine"):
        DockerSource(CIDR, client)


def test_the_committed_example_vips_are_what_the_generator_makes(monkeypatch):
    from accel.compose_hosts import render_override

    monkeypatch.chdir(COMPOSE_DIR.parent)
    committed = (COMPOSE_DIR / "mesh.vips.yml").read_text()
    assert committed == render_override(["compose/mesh.yml"], "10.96.0.0/16"), \
        "regenerate: accel compose hosts -f compose/mesh.yml -o compose/mesh.vips.yml"
