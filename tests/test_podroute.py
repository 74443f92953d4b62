"""Pod routing on the real kernel: packets between registered mesh pods skip the bridge
(counted per packet), bytes stay exact, everything else stays on the bridge, a spoofed
source is never routed, pods coming and going are followed, and nothing is left behind."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import time

import pytest

from accel.datapath import podroute
from accel.datapath.podroute import PodRouter
from accel.model import ServiceTable
from tests.traffic import EchoServer, digest, roundtrip

pytestmark = pytest.mark.kernel


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


def test_udp_left_to_the_kernel(lab_factory, datapath, router_factory):
    """UDP has no handshake that shows whether the host NATs it: it keeps the bridge, every
    byte intact."""
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
    assert delta(datapath, before)["pod_redirects"] == 0


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
    assert d["pod_redirects"] == 0 and d["sockhash_inserts"] == 0 and d["pod_untracked"] == 0


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _tcp4_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 65535, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", _csum(s + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) \
        + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, socket.IPPROTO_TCP,
                     0, s, d)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return ip + tcp


def test_spoofed_source_is_not_routed(lab_factory, datapath, router_factory):
    """A pod sending with another registered pod's address is not handed to the peer pod by
    us: the SYN takes the bridge as it would without meshaccel (counted), and the answer,
    of a connection we never saw open, is left to the kernel too."""
    lab = lab_factory(3)
    a, b, c = lab.pods
    datapath.apply(mesh(lab))
    router_factory(lab, a, b, c)
    listener = b.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw = c.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
    with listener, raw:
        listener.bind((str(b.ip), 9998))
        listener.listen(8)
        before = datapath.counters()
        raw.sendto(_tcp4_syn(str(a.ip), str(b.ip), 4444, 9998), (str(b.ip), 0))
        deadline = time.time() + 5
        while time.time() < deadline and not delta(datapath, before)["pod_untracked"]:
            time.sleep(0.05)
        d = delta(datapath, before)
    assert d["pod_foreign_source"] == 1 and d["pod_redirects"] == 0
    assert d["pod_untracked"] >= 1  # b's SYN-ACK to the real a: through the kernel


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
    # agent's (its own pin dir, so its own program) on the same namespace stay.
    dead = PodRouter(datapath.pin_dir, (a.host_ifname,), netns=lab.node)
    dead.refresh()
    other_pins = f"{datapath.pin_dir}-other"
    alive = PodRouter(other_pins, (b.host_ifname,), netns=lab.node)
    alive.refresh()
    assert alive.prog_id != dead.prog_id
    try:
        assert podroute.detach_from(lab.node, dead.prog_id) == [
            f"tc ingress filter on {a.host_ifname}"]
        assert "accel_pod_tc" not in tc_state(lab, a)
        assert "accel_pod_tc" in tc_state(lab, b)
    finally:
        dead.ports.clear()  # its filter was removed above
        dead.close()
        alive.close()
        shutil.rmtree(other_pins, ignore_errors=True)
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
    human = accel("status", "--api-socket", env.socket).stdout
    assert f"2 ports, 4 addresses in netns {lab.node}" in human
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
    dead.table.close()
    dead.prog.close()
    subprocess.run(["ip", "netns", "del", c.name], check=True)
    nxt = router_factory(lab, a, b)
    assert len(list(nxt.table.keys())) == 4 and nxt.status()["addresses"] == 4
    with EchoServer(b, 8080):
        assert roundtrip(a, str(b.ip), 8080, b"z" * 100) == b"z" * 100


IP_MINTTL = 21  # linux/in.h and in6.h; Python's socket module lacks them
IPV6_MINHOPCOUNT = 73


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_routed_pods_stay_a_routed_hop(lab_factory, datapath, router_factory, family):
    """Pods on /32 routes without a bridge (Calico's shape): routed by us, bytes exact, the
    TTL/hop limit one less as the host's forwarding would leave it (seen by a listener's
    minimum TTL), an expiring TTL left to the kernel."""
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

    # A listener that ignores SYNs below a minimum TTL tells what they arrived with.
    lst = b.socket(family, socket.SOCK_STREAM)
    with lst:
        lst.bind((target, 9997))
        if v4:
            lst.setsockopt(socket.IPPROTO_IP, IP_MINTTL, 8)
        else:
            lst.setsockopt(socket.IPPROTO_IPV6, IPV6_MINHOPCOUNT, 8)
        lst.listen(16)

        def dial(pod, ttl: int) -> tuple[bool, int]:
            before = datapath.counters()
            s = pod.socket(family, socket.SOCK_STREAM)
            s.settimeout(1.0)
            if v4:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            else:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
            try:
                s.connect((target, 9997))
                ok = True
            except OSError:
                ok = False
            finally:
                s.close()
            return ok, delta(datapath, before)["pod_redirects"]

        # Sent with 9, arrives with 8: accepted; sent with 8, arrives with 7: ignored. The
        # same through us as through the kernel's forwarding.
        routed9, routed8 = dial(a, 9), dial(a, 8)
        assert routed9[0] and routed9[1] > 0 and not routed8[0] and routed8[1] > 0
        assert dial(outsider, 9) == (True, 0) and dial(outsider, 8) == (False, 0)
        # TTL 1 would expire on the host: the kernel drops it (and answers), not us.
        assert dial(a, 1) == (False, 0)


def test_connections_the_host_nats_are_left_to_its_conntrack(lab_factory, datapath,
                                                             router_factory):
    """A pod dials an address of the host that the host DNATs to another local pod (a
    published port, a kube-proxy ClusterIP in the host): the replies go pod to pod by
    address but must meet the host's conntrack to be translated back. We never saw that
    connection's SYN go pod to pod, so we leave all of it to the kernel."""
    lab = lab_factory(2)
    a, b = lab.pods
    datapath.apply(mesh(lab))
    router_factory(lab, a, b)
    rule = ["-t", "nat", "-A", "PREROUTING", "-d", str(lab.gateway), "-p", "tcp", "--dport",
            "9000", "-j", "DNAT", "--to-destination", f"{b.ip}:8080"]
    subprocess.run(["ip", "netns", "exec", lab.node, "iptables", *rule], check=True)
    before = datapath.counters()
    payload = random.Random(9).randbytes(100_000)
    with EchoServer(b, 8080):
        got = roundtrip(a, str(lab.gateway), 9000, payload)
        nat = delta(datapath, before)
        before = datapath.counters()
        direct = roundtrip(a, str(b.ip), 8080, payload[:500])
        routed = delta(datapath, before)
    assert digest(got) == digest(payload) and direct == payload[:500]
    assert nat["pod_redirects"] == 0 and nat["pod_untracked"] >= 2  # b's answers
    assert routed["pod_redirects"] >= 6


def test_isolated_bridge_ports_stay_isolated(lab_factory, datapath, router_factory):
    """Two isolated bridge ports cannot reach each other through the bridge; routing them
    past it would undo that, so such ports are not taken (and say why)."""
    lab = lab_factory(2)
    a, b = lab.pods
    datapath.apply(mesh(lab))
    for p in (a, b):
        subprocess.run(["ip", "netns", "exec", lab.node, "bridge", "link", "set", "dev",
                        p.host_ifname, "isolated", "on"], check=True)
    r = router_factory(lab, a, b)
    st = r.status()
    assert st["ports"] == [] and st["addresses"] == 0
    assert all("isolated" in why for why in st["failures"].values()) and len(st["failures"]) == 2
    s = a.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1)
    with EchoServer(b, 8080), s, pytest.raises(OSError):
        s.connect((str(b.ip), 8080))


def test_a_stale_flow_does_not_capture_a_nated_connection(lab_factory, datapath,
                                                          router_factory):
    """Flow entries outlive their connections. A direct connection from port P, then one
    from the same port P to a host address the host DNATs to the same server: the second
    one's answers match the old entry's four-tuple, but its SYN-ACK does not acknowledge
    the recorded SYN, so the entry goes and the host translates the answers as it must."""
    lab = lab_factory(2)
    a, b = lab.pods
    datapath.apply(mesh(lab))
    router_factory(lab, a, b)
    subprocess.run(["ip", "netns", "exec", lab.node, "iptables", "-t", "nat", "-A",
                    "PREROUTING", "-d", str(lab.gateway), "-p", "tcp", "--dport", "9000", "-j",
                    "DNAT", "--to-destination", f"{b.ip}:8080"], check=True)
    port = 40000 + random.Random().randrange(20000)

    def dial(host: str, dport: int) -> bytes:
        s = a.socket(socket.AF_INET, socket.SOCK_STREAM)
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # RST on close: no TIME_WAIT on our side, so the port is free again at once.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.settimeout(5)
            s.bind((str(a.ip), port))
            s.connect((host, dport))
            s.sendall(b"hello")
            return s.recv(5)

    with EchoServer(b, 8080):
        before = datapath.counters()
        assert dial(str(b.ip), 8080) == b"hello"
        assert delta(datapath, before)["pod_redirects"] >= 3
        time.sleep(0.2)
        before = datapath.counters()
        assert dial(str(lab.gateway), 9000) == b"hello"
        d = delta(datapath, before)
    assert d["pod_redirects"] == 0 and d["pod_untracked"] >= 1


def test_pod_maps_of_another_layout_are_recreated(lab_factory, pin_dir):
    """Pod routing's maps kept by a build with another layout (--keep, then an upgrade):
    recreated instead of the agent failing at the verifier; pods route as before."""
    import ctypes

    from bcc import BPF

    os.makedirs(pin_dir)
    old = BPF(text=f'BPF_TABLE_PINNED("hash", u32, u32, accel_pod_eps, 64, '
                   f'"{pin_dir}/accel_pod_eps");')
    old["accel_pod_eps"]
    old.cleanup()
    lab = lab_factory(2)
    r = PodRouter(pin_dir, (f"{lab.prefix}p*",), netns=lab.node)
    try:
        assert ctypes.sizeof(r.table.Key) == 16  # struct addr16 again
        r.refresh()
        assert len(r.status()["ports"]) == 2
    finally:
        r.close()
