"""Pod routing on the real kernel: packets between registered mesh pods skip the bridge
(counted per packet), bytes stay exact, everything else stays on the bridge, a spoofed
source is never routed, pods coming and going are followed, and nothing is left behind."""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import struct
import subprocess
import time

import pytest

from accel.datapath import podroute
from accel.datapath.podroute import PodRouter
from accel.model import ServiceTable
from tests.traffic import EchoServer, digest, roundtrip


def mesh(lab) -> ServiceTable:
    return ServiceTable((), mesh_cidrs=(ipaddress.ip_network(lab.subnet),
                                        ipaddress.ip_network(lab.subnet6)))


@pytest.fixture
def router_factory(datapath):
    made: list[PodRouter] = []

    def make(lab, *pods) -> PodRouter:
        r = PodRouter(datapath.pin_dir, tuple(p.host_ifname for p in pods), netns=lab.node)
        made.append(r)
        r.refresh()
        return r

    yield make
    for r in made:
        r.close()


def tc_state(lab, pod) -> str:
    return subprocess.run(["ip", "netns", "exec", lab.node, "tc", "filter", "show", "dev",
                           pod.host_ifname, "ingress"], capture_output=True, text=True).stdout


def qdiscs(lab) -> str:
    return subprocess.run(["ip", "netns", "exec", lab.node, "tc", "qdisc", "show"],
                          capture_output=True, text=True).stdout


def delta(datapath, before: dict[str, int]) -> dict[str, int]:
    now = datapath.counters()
    return {k: now[k] - before.get(k, 0) for k in now}


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_mesh_pods_skip_the_bridge_bytes_exact(lab_factory, datapath, router_factory, family):
    lab = lab_factory(3)
    a, b, outsider = lab.pods
    datapath.apply(mesh(lab))
    r = router_factory(lab, a, b)
    st = r.status()
    assert [p["iface"] for p in st["ports"]] == [a.host_ifname, b.host_ifname]
    assert st["ports"][0]["addresses"] == sorted([str(a.ip), str(a.ip6)])
    assert "accel_pod_tc" in tc_state(lab, a)

    target = str(b.ip) if family == socket.AF_INET else str(b.ip6)
    payload = random.Random(3).randbytes(300_000)
    before = datapath.counters()
    with EchoServer(b, 8080, family=family):
        got = roundtrip(a, target, 8080, payload, family=family)
        routed = delta(datapath, before)
        # The unregistered pod reaches the same server over the bridge, untouched.
        before = datapath.counters()
        got2 = roundtrip(outsider, target, 8080, payload[:1000], family=family)
        bridged = delta(datapath, before)
    assert digest(got) == digest(payload) and got2 == payload[:1000]
    # At least the handshake, the FINs and their ACKs, both ways.
    assert routed["pod_redirects"] >= 6
    assert routed["pod_foreign_source"] == 0
    assert bridged["pod_redirects"] == 0


def test_udp_routed_packet_by_packet(lab_factory, datapath, router_factory):
    """Data the sockmap does not carry (UDP) is routed packet by packet, every byte intact."""
    lab = lab_factory(2)
    a, b = lab.pods
    datapath.apply(mesh(lab))
    router_factory(lab, a, b)
    before = datapath.counters()
    rx = b.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((str(b.ip), 9999))
        rx.settimeout(5)
        msgs = [random.Random(i).randbytes(1 + i * 97) for i in range(50)]
        for m in msgs:
            tx.sendto(m, (str(b.ip), 9999))
            assert rx.recv(65536) == m
    assert delta(datapath, before)["pod_redirects"] >= len(msgs)


def test_non_mesh_pods_untouched(lab_factory, datapath, router_factory):
    lab = lab_factory(2)
    a, b = lab.pods
    # Registered ports, but neither address is in the mesh.
    datapath.apply(ServiceTable((), mesh_cidrs=(ipaddress.ip_network("10.254.0.0/24"),)))
    router_factory(lab, a, b)
    before = datapath.counters()
    with EchoServer(b, 8080):
        assert roundtrip(a, str(b.ip), 8080, b"x" * 5000) == b"x" * 5000
    d = delta(datapath, before)
    assert d["pod_redirects"] == 0 and d["sockhash_inserts"] == 0


def _udp4(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP,
                      0, socket.inet_aton(src), socket.inet_aton(dst))
    csum = 0
    for i in range(0, 20, 2):
        csum += (hdr[i] << 8) | hdr[i + 1]
    while csum >> 16:
        csum = (csum & 0xFFFF) + (csum >> 16)
    hdr = hdr[:10] + struct.pack("!H", ~csum & 0xFFFF) + hdr[12:]
    return hdr + udp


def test_spoofed_source_is_not_routed(lab_factory, datapath, router_factory):
    """A pod sending with another registered pod's address is not handed to the peer pod by
    us: the packet takes the bridge as it would without meshaccel, counted."""
    lab = lab_factory(3)
    a, b, c = lab.pods
    datapath.apply(mesh(lab))
    router_factory(lab, a, b, c)
    rx = b.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw = c.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
    with rx, raw:
        rx.bind(("0.0.0.0", 9998))
        rx.settimeout(5)
        before = datapath.counters()
        raw.sendto(_udp4(str(a.ip), str(b.ip), 4444, 9998, b"spoofed"), (str(b.ip), 0))
        assert rx.recvfrom(100) == (b"spoofed", (str(a.ip), 4444))
        d = delta(datapath, before)
    assert d["pod_foreign_source"] == 1 and d["pod_redirects"] == 0


def test_follows_pods_coming_and_going(lab_factory, datapath, router_factory):
    lab = lab_factory(3)
    a, b, c = lab.pods
    datapath.apply(mesh(lab))
    r = router_factory(lab, a, b, c)
    assert r.status()["addresses"] == 6
    subprocess.run(["ip", "netns", "del", c.name], check=True)  # its veth pair goes with it
    deadline = time.time() + 5
    while time.time() < deadline and len(r.status()["ports"]) != 2:
        time.sleep(0.1)
        r.refresh()
    st = r.status()
    assert [p["iface"] for p in st["ports"]] == [a.host_ifname, b.host_ifname]
    keys = list(r.table.keys())
    assert len(keys) == 4 and st["addresses"] == 4 and not st["failures"]
    with EchoServer(b, 8080):
        assert roundtrip(a, str(b.ip), 8080, b"still" * 100) == b"still" * 100


def test_close_and_crash_leave_nothing(lab_factory, datapath):
    lab = lab_factory(2)
    a, b = lab.pods
    datapath.apply(mesh(lab))
    r = PodRouter(datapath.pin_dir, (f"{lab.prefix}p*",), netns=lab.node)
    r.refresh()
    assert len(r.status()["ports"]) == 2 and "clsact" in qdiscs(lab)
    r.close()
    assert "clsact" not in qdiscs(lab) and "accel_pod_tc" not in tc_state(lab, a)

    # An agent that died: its filters are found by program id and removed; another
    # router's filters on the same namespace stay.
    dead = PodRouter(datapath.pin_dir, (a.host_ifname,), netns=lab.node)
    dead.refresh()
    alive = PodRouter(datapath.pin_dir, (b.host_ifname,), netns=lab.node)
    alive.refresh()
    try:
        assert podroute.detach_from(lab.node, dead.prog_id) == [
            f"tc ingress filter on {a.host_ifname}"]
        assert "accel_pod_tc" not in tc_state(lab, a)
        assert "accel_pod_tc" in tc_state(lab, b)
    finally:
        dead.attached.clear()  # already removed above
        dead.close()
        alive.close()
    assert "clsact" not in qdiscs(lab)


def test_agent_pod_routing_end_to_end(env, lab_factory, tmp_path):
    """`accel agent --pod-netns --pod-iface`: status names the ports, the counters move,
    SIGTERM removes the filters; a namespace that does not exist is refused up front."""
    from tests.api_harness import accel

    lab = lab_factory(2)
    a, b = lab.pods
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(json.dumps({"services": [], "mesh_cidrs": [lab.subnet]}))
    bad = accel("agent", "--config", str(cfg), "--pin-dir", env.pin_dir, "--cgroup",
                str(env.cgroup), "--api-socket", "", "--pod-netns", f"{lab.prefix}-nope",
                "--pod-iface", "x")
    assert bad.returncode == 2 and "--pod-netns" in bad.stderr
    agent = env.agent(cfg, "--pod-netns", lab.node, "--pod-iface", f"{lab.prefix}p*")
    out = accel("status", "--json", "--api-socket", env.socket)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    ports = st["pod_routing"]["ports"]
    assert [p["iface"] for p in ports] == [a.host_ifname, b.host_ifname]
    with EchoServer(b, 8080):
        assert roundtrip(a, str(b.ip), 8080, b"y" * 1000) == b"y" * 1000
    out = accel("stats", "--json", "--pin-dir", env.pin_dir, "--api-socket", env.socket)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pod_redirects"] >= 6
    agent.stop()
    assert agent.proc.returncode == 0
    assert "clsact" not in qdiscs(lab)


def test_next_router_prunes_a_dead_ones_entries(lab_factory, datapath, router_factory):
    """A router that died (or --keep) leaves its entries pinned; the next one adopts them and
    drops those of pods that went away meanwhile, so no address points at a dead port."""
    lab = lab_factory(3)
    a, b, c = lab.pods
    datapath.apply(mesh(lab))
    dead = PodRouter(datapath.pin_dir, (f"{lab.prefix}p*",), netns=lab.node)
    dead.refresh()
    assert len(list(dead.table.keys())) == 6
    dead._node.close()  # gone without close(): filters and entries stay
    dead.module.cleanup()
    subprocess.run(["ip", "netns", "del", c.name], check=True)
    nxt = router_factory(lab, a, b)
    assert len(list(nxt.table.keys())) == 4 and nxt.status()["addresses"] == 4
    with EchoServer(b, 8080):
        assert roundtrip(a, str(b.ip), 8080, b"z" * 100) == b"z" * 100


IP_RECVTTL = 12  # linux/in.h; Python's socket module lacks it


def _recv_hops(sock: socket.socket, family: int) -> tuple[bytes, int]:
    data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4))
    for level, kind, value in anc:
        if (level, kind) in ((socket.IPPROTO_IP, socket.IP_TTL),
                             (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT)):
            return data, int.from_bytes(value[:4], "little") if len(value) >= 4 else value[0]
    raise AssertionError(f"no TTL/hop limit in {anc}")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_routed_pods_stay_a_routed_hop(lab_factory, datapath, router_factory, family):
    """Pods on /32 routes without a bridge (Calico's shape): routed by us, bytes exact, the
    TTL/hop limit one less as the host's forwarding would leave it, an expiring TTL left
    to the kernel."""
    lab = lab_factory(3, routed=True)
    a, b, outsider = lab.pods
    datapath.apply(mesh(lab))
    r = router_factory(lab, a, b)
    assert [p["bridge"] for p in r.status()["ports"]] == [None, None]
    v4 = family == socket.AF_INET
    target = str(b.ip) if v4 else str(b.ip6)
    payload = random.Random(5).randbytes(200_000)
    before = datapath.counters()
    with EchoServer(b, 8080, family=family):
        assert digest(roundtrip(a, target, 8080, payload, family=family)) == digest(payload)
    assert delta(datapath, before)["pod_redirects"] >= 6

    rx = b.socket(family, socket.SOCK_DGRAM)
    with rx:
        rx.bind((target, 9997))
        rx.settimeout(5)
        if v4:
            rx.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        else:
            rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        hops = {}
        for name, pod in (("routed", a), ("kernel", outsider)):
            tx = pod.socket(family, socket.SOCK_DGRAM)
            with tx:
                if v4:
                    tx.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 9)
                else:
                    tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 9)
                before = datapath.counters()
                tx.sendto(name.encode(), (target, 9997))
                data, hops[name] = _recv_hops(rx, family)
                assert data == name.encode()
                assert delta(datapath, before)["pod_redirects"] == (name == "routed")
        assert hops == {"routed": 8, "kernel": 8}

        # TTL 1 would expire on the host: the kernel drops it (and answers), not us.
        tx = a.socket(family, socket.SOCK_DGRAM)
        with tx:
            if v4:
                tx.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
            else:
                tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 1)
            before = datapath.counters()
            tx.sendto(b"expires", (target, 9997))
            rx.settimeout(0.5)
            with pytest.raises(TimeoutError):
                rx.recv(100)
            assert delta(datapath, before)["pod_redirects"] == 0
