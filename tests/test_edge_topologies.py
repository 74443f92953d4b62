"""The XDP edge in front of pods as container runtimes leave them: plain veths, no GRO and
no XDP program on the pod end (Docker, Kubernetes CNIs), behind a bridge or a routed veth.

An XDP redirect into such a veth is dropped by the kernel, uncounted. The edge must see
that (the kernel's xdp-features of the target) and take another way in: the packet's
address rewritten in XDP, then moved into the pod from tc ingress (bpf_redirect_peer),
with nothing about the pod changed. The client is outside the
host as a real one is: its own namespace, full checksums on its frames (tx offload off,
as from a wire), and no cgroup program of the agent on its sockets (the agent's cgroup
programs sit on a cgroup of their own), so its packets really cross the edge.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import time

import pytest

pytest.importorskip("bcc")
from pyroute2 import IPRoute

from accel.datapath import cgroup as cg
from accel.kernel import netdev
from accel.lab import Lab, Outside, in_netns
from accel.model import Endpoint, Guard, Limits, Service, ServiceTable, parse_network
from accel.runtime import Runtime, Settings
from tests.test_edge_lab import Client, Servers, try_connect

pytestmark = pytest.mark.kernel

VIP, VIP6 = "10.96.79.1", "fd00:96::79"
EDGE_NET, EDGE_NET6 = "10.203.0", "fd00:203:"
CLIENT, CLIENT6 = f"{EDGE_NET}.2", f"{EDGE_NET6}:2"
N_CONNECTIONS = 200
# Maglev splits two equal backends ~50/50; fewer than 60 of 200 on one of them has
# probability < 1e-8 (binomial, z = -5.7): a failure means the split is broken.
MIN_PER_BACKEND = 60


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def pod_takes_no_xdp_frames(pod) -> None:
    """The pod end as the runtime left it: no GRO, no XDP program (read, never changed)."""
    def read():
        with IPRoute() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0]
        return netdev.gro_on("eth0"), link.get_attr("IFLA_XDP")
    gro, xdp = in_netns(pod.name, read)
    assert gro is False, f"{pod.name}: GRO is on"
    assert xdp is None or not xdp.get_attr("IFLA_XDP_PROG_ID"), f"{pod.name}: XDP attached"


class Edge:
    """An ext netns (the outside client) wired to the lab's node by a veth whose node end
    is the edge interface; an agent (Runtime) in the node namespace runs the edge on it,
    its cgroup programs on a cgroup of their own."""

    def __init__(self, lab: Lab, uid: str, hook: str = "native"):
        self.lab = lab
        self.hook = hook
        self.ext = f"{lab.prefix}-ext"
        self.iface = f"{lab.prefix}e"
        self.cgroup = cg.cgroup2_mount() / f"accel-edge-{uid}"
        self.pin = f"/sys/fs/bpf/accel-edge-{uid}"
        self.runtime: Runtime | None = None
        self.servers: Servers | None = None
        self.outside: Outside | None = None

    def up(self) -> Edge:
        lab = self.lab
        self.outside = Outside(self.ext, self.iface, EDGE_NET, EDGE_NET6, node=lab.node).up()
        lab.route_ipv6()
        self.servers = Servers(lab)
        self.cgroup.mkdir()
        settings = Settings(pin_dir=self.pin, cgroup=str(self.cgroup), edge_iface=self.iface,
                            edge_hook=self.hook)
        self.runtime = in_netns(lab.node, lambda: Runtime(settings).start(ServiceTable()))
        return self

    def apply(self, table: ServiceTable) -> None:
        assert self.runtime is not None
        in_netns(self.lab.node, lambda: self.runtime.apply(table))

    def refresh(self) -> int:
        rt = self.runtime
        assert rt is not None and rt.edge is not None
        with rt.lock:
            return in_netns(self.lab.node, rt.edge.refresh)

    def set_guard(self, guard: Guard) -> None:
        assert self.runtime is not None
        in_netns(self.lab.node, lambda: self.runtime.set_guard(guard))

    def backends(self) -> dict[str, str]:
        """address -> via, from the agent's status (what `accel status` prints)."""
        assert self.runtime is not None
        st = self.runtime.status()["edge"]
        return {f"{b['address']}": b["via"] for v in st["vips"] for b in v["backends"]}

    def counters(self) -> dict[str, int]:
        assert self.runtime is not None and self.runtime.edge is not None
        return self.runtime.edge.counters()["global"]

    def down(self) -> None:
        if self.runtime is not None:
            in_netns(self.lab.node, self.runtime.stop)
        if self.servers is not None:
            self.servers.close()
        if self.outside is not None:
            self.outside.down()
        if self.cgroup.exists():
            self.cgroup.rmdir()
        shutil.rmtree(self.pin, ignore_errors=True)


@pytest.fixture(params=["bridge-native", "routed-native", "bridge-tc", "routed-tc"])
def edge(request, uid):
    """The edge at native XDP, or at tc ingress (what `auto` picks for a veth uplink)."""
    topology, hook = request.param.split("-")
    lab = Lab(2, prefix=f"hf{uid}", routed=topology == "routed")
    lab.up()
    e = Edge(lab, uid, hook)
    try:
        yield e.up()
    finally:
        e.down()
        lab.down()


def table(lab: Lab) -> ServiceTable:
    return ServiceTable.of([
        Service("web", VIP, 80, "TCP", tuple(Endpoint(p.ip, 8080) for p in lab.pods), edge=True),
        Service("web6", VIP6, 80, "TCP", tuple(Endpoint(p.ip6, 8080) for p in lab.pods),
                edge=True),
    ])


def spread(ext: str, vip: str, n: int) -> collections.Counter:
    """n connections from the outside client, one request each: which pod answered."""
    got: collections.Counter = collections.Counter()
    for _ in range(n):
        c = Client(ext, vip)  # a reply from anywhere but the VIP would reset it
        try:
            got[c.ask()] += 1
        finally:
            c.close()
    return got


def test_edge_reaches_backends_behind_untouched_veths(edge):
    lab = edge.lab
    for pod in lab.pods:
        pod_takes_no_xdp_frames(pod)
    edge.apply(table(lab))

    vias = edge.backends()
    for pod in lab.pods:
        for addr in (str(pod.ip), str(pod.ip6)):
            via = f"tc redirect_peer ifindex {pod_host_ifindex(lab, pod)}"
            assert vias[addr].startswith(via), vias
            assert ("a pod's veth" if edge.hook == "native" else "tc hook") in vias[addr], vias
    before = edge.counters()
    names = {p.name for p in lab.pods}
    for vip in (VIP, VIP6):
        got = spread(edge.ext, vip, N_CONNECTIONS)
        assert set(got) == names and min(got.values()) >= MIN_PER_BACKEND, (vip, got)
    after = edge.counters()
    assert after["fwd_peer"] - before["fwd_peer"] >= 2 * N_CONNECTIONS * 2  # >= SYN+ACK
    assert after["reply_revnat"] - before["reply_revnat"] >= 2 * N_CONNECTIONS * 2
    for name in ("fwd_route", "fwd_fallback", "peer_kernel"):  # none left to the kernel
        assert after[name] == before[name], name
    for pod in lab.pods:
        pod_takes_no_xdp_frames(pod)  # still as the runtime left it

    # The pod's owner turns GRO on (XDP could now redirect into it): the path stays, so a
    # pod turning it off again can never make a redirect drop frames. Nothing changes.
    p0 = lab.pods[0]
    p0.run("ethtool -K eth0 gro on")
    assert edge.refresh() == 0
    vias = edge.backends()
    assert all(v.startswith("tc redirect_peer") for v in vias.values()), vias
    got = spread(edge.ext, VIP, N_CONNECTIONS)
    assert set(got) == names and min(got.values()) >= MIN_PER_BACKEND, got

    # A denied source gets no connection.
    edge.set_guard(Guard(deny=(parse_network(f"{CLIENT}/32", "deny"),)))
    drops = edge.counters()["drop_deny"]
    assert try_connect(edge.ext, VIP) is None
    assert edge.counters()["drop_deny"] > drops


def pod_host_ifindex(lab: Lab, pod) -> int:
    with IPRoute(netns=lab.node) as ipr:
        return ipr.link_lookup(ifname=pod.host_ifname)[0]


def narrow_path(lab: Lab, pod, mtu: int = 1280) -> None:
    """The link to `pod` carries at most `mtu` bytes while the pod advertises the MSS of a
    1500-byte path (advmss on its routes, as behind a tunnel): the client's full-size
    segments with DF set meet a hop that must answer frag-needed / packet too big."""
    sh("ip", "netns", "exec", lab.node, "ip", "link", "set", pod.host_ifname, "mtu", str(mtu))
    pod.run(f"ip link set eth0 mtu {mtu}")
    gw4, gw6 = (lab.GATEWAY4, lab.GATEWAY6) if lab.routed else (lab.gateway, "fd00:200::1")
    pod.run(f"ip route change default via {gw4} dev eth0 advmss 1460")
    pod.run(f"ip -6 route change default via {gw6} dev eth0 advmss 1440")


def table_of(lab: Lab, pods) -> ServiceTable:
    return ServiceTable.of([
        Service("web", VIP, 80, "TCP", tuple(Endpoint(p.ip, 8080) for p in pods), edge=True),
        Service("web6", VIP6, 80, "TCP", tuple(Endpoint(p.ip6, 8080) for p in pods), edge=True),
    ])


# Both hooks and both topologies, in two runs (the suite's time): each path of each hook is
# covered, and the kernel's frag-needed leaves a bridge and a routed veth alike.
@pytest.mark.parametrize("edge", ["bridge-native", "routed-tc"], indirect=True)
def test_path_mtu_discovery_works_through_the_edge(edge):
    """A smaller MTU between edge and backend: the client's DF segments are too big; the
    frag-needed / packet-too-big errors quote the backend, edge_tc gives them the VIP back,
    and transfers complete, IPv4 and IPv6. Pod 0 takes XDP frames (GRO on) and is reached
    by a redirect out of its veth (the peer path switched off), where XDP or tc hands a
    too-big frame to the kernel; pod 1 by the tc redirect_peer path, where tc hands a
    too-big packet or GRO segment to the kernel; each is the VIP's only backend in turn,
    the client's learnt path MTU flushed in between.

    At tc the edge interface aggregates (GRO on, as a NIC): the balancer rewrites
    CHECKSUM_PARTIAL packets, whose L4 field is the pseudo-header's sum and must not take
    the port's change (80 -> 8080). Pod 0's host end computes checksums in software (tx
    offload off, GSO in software), so a wrong sum reaches the pod as a bad checksum and
    the transfer stalls: nothing else on a host checks a partial checksum."""
    lab = edge.lab
    for pod in lab.pods:
        narrow_path(lab, pod)
    lab.pods[0].run("ethtool -K eth0 gro on")
    if edge.hook == "tc":
        sh("ip", "netns", "exec", lab.node, "ethtool", "-K", edge.iface, "gro", "on")
        sh("ip", "netns", "exec", lab.node, "ethtool", "-K", lab.pods[0].host_ifname,
           "tx", "off")
    big = "y" * 300_000
    paths = ("redirect", "tc redirect_peer")
    resolver = edge.runtime.edge.resolver
    for pod, path in zip(lab.pods, paths, strict=True):
        sh("ip", "netns", "exec", edge.ext, "ip", "route", "flush", "cache")
        sh("ip", "netns", "exec", edge.ext, "ip", "-6", "route", "flush", "cache")
        resolver.peer_path = path != "redirect"  # XDP's own redirect, for pod 0 at XDP
        edge.apply(table_of(lab, [pod]))
        vias = edge.backends()
        assert vias[str(pod.ip)].startswith(path) and vias[str(pod.ip6)].startswith(path), vias
        before = edge.counters()
        for vip in (VIP, VIP6):
            for _ in range(3):
                c = Client(edge.ext, vip, timeout=10)
                try:
                    assert c.ask(big) == pod.name  # the echo of 300 kB, every byte compared
                finally:
                    c.close()
        after = edge.counters()
        assert after["icmp_revnat"] >= before["icmp_revnat"] + 2, (path, after)  # v4 and v6
        assert after["fwd_too_big"] >= before["fwd_too_big"] + 2, (path, after)


@pytest.mark.parametrize("edge", ["bridge-tc"], indirect=True)
def test_replies_leave_by_the_route_to_the_client(edge):
    """A multi-homed host whose route to the client is not the edge interface: replies the
    edge forwards itself (edge_reply) leave through the interface that route names, as
    the kernel would forward them, not back out of the edge interface."""
    lab = edge.lab
    edge.apply(table(lab))
    alt = f"{lab.prefix}a"
    sh("ip", "-n", lab.node, "link", "add", alt, "type", "veth", "peer", "name", "alt",
       "netns", edge.ext)
    sh("ip", "-n", lab.node, "addr", "add", "10.204.0.1/24", "dev", alt)
    sh("ip", "-n", lab.node, "link", "set", alt, "up")
    sh("ip", "-n", edge.ext, "addr", "add", "10.204.0.2/24", "dev", "alt")
    sh("ip", "-n", edge.ext, "link", "set", "alt", "up")
    for conf in ("all", "alt"):  # the client takes replies on either of its links
        sh("ip", "netns", "exec", edge.ext, "sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0")
    sh("ip", "-n", lab.node, "route", "add", f"{CLIENT}/32", "via", "10.204.0.2", "dev", alt)

    def alt_rx() -> int:
        return int(sh("ip", "netns", "exec", edge.ext, "cat",
                      "/sys/class/net/alt/statistics/rx_packets"))

    before, direct = alt_rx(), edge.counters()["reply_direct"]
    got = spread(edge.ext, VIP, 40)
    assert sum(got.values()) == 40, got
    assert alt_rx() - before >= 40 * 2, "replies did not take the route to the client"
    assert edge.counters()["reply_direct"] - direct >= 40 * 2


@pytest.mark.parametrize("edge", ["bridge-native"], indirect=True)
def test_generic_xdp_redirects_into_untouched_veths(edge):
    """In generic mode a redirect is an skb sent out of the target: every veth takes it, so
    the edge redirects even to pods without GRO (and says why)."""
    lab = edge.lab
    rt = edge.runtime
    assert rt is not None and rt.edge is not None
    with rt.lock:
        in_netns(lab.node, rt.edge.detach)
        assert in_netns(lab.node, lambda: rt.edge.attach("generic")) == "generic"
    edge.apply(table(lab))
    edge.refresh()
    vias = edge.backends()
    assert all(v.startswith("redirect") and "generic XDP" in v for v in vias.values()), vias
    for pod in lab.pods:
        pod_takes_no_xdp_frames(pod)
    before = edge.counters()
    for vip in (VIP, VIP6):
        got = spread(edge.ext, vip, N_CONNECTIONS)
        assert set(got) == {p.name for p in lab.pods}, got
        assert min(got.values()) >= MIN_PER_BACKEND, got
    after = edge.counters()
    # Every packet was redirected: none routed, none handed to the kernel.
    for name in ("fwd_fallback", "fwd_route", "fwd_too_big", "fwd_ttl_expiring"):
        assert after[name] == before[name], name


@pytest.mark.parametrize("edge", ["bridge-native", "bridge-tc"], indirect=True)
def test_connection_limit_resets_syns_from_outside(edge):
    """A service limited to 5 connections/s (burst 5): of 20 back-to-back connects from
    outside the host, exactly the burst is admitted (the bucket is one compare-and-swapped
    word; a token comes back every 200 ms, more than the burst usually takes), the others
    get a reset from the VIP at once (ECONNREFUSED, never a timeout), counted; a second later one
    more is admitted. Both hooks: at XDP the SYN is marked and tc answers it."""
    lab = edge.lab
    limited = Service("web", VIP, 80, "TCP", tuple(Endpoint(p.ip, 8080) for p in lab.pods),
                      edge=True, limits=Limits(connections=5, burst=5))
    limited6 = Service("web6", VIP6, 80, "TCP", tuple(Endpoint(p.ip6, 8080) for p in lab.pods),
                       edge=True, limits=Limits(connections=5, burst=5))
    edge.apply(ServiceTable.of([limited, limited6]))
    names = {p.name for p in lab.pods}
    for vip in (VIP, VIP6):
        before = edge.counters()["refuse_limit"]
        passed, refused, slowest = 0, 0, 0.0
        t0 = time.monotonic()
        for _ in range(20):
            t = time.monotonic()
            try:
                c = Client(edge.ext, vip, timeout=5)
            except ConnectionRefusedError:
                refused += 1
                slowest = max(slowest, time.monotonic() - t)
                continue
            try:
                assert c.ask() in names
            finally:
                c.close()
            passed += 1
        took = time.monotonic() - t0
        # The burst, plus the tokens the elapsed time gave back (none when under 200 ms).
        assert 5 <= passed <= 5 + int(took * 5), (vip, passed, refused, took)
        assert refused == 20 - passed and slowest < 0.05, (refused, slowest)
        assert edge.counters()["refuse_limit"] - before == refused
        row = next(v for v in edge.runtime.edge.counters()["vips"] if v["vip"] == vip)
        assert row["refused_limit"] >= refused
        time.sleep(0.25)  # one token back
        Client(edge.ext, vip).close()
    st = edge.runtime.status()["edge"]["vips"]
    assert {v["service"]: v["connection_limit"] for v in st} == {
        "web": {"connections": 5.0, "burst": 5}, "web6": {"connections": 5.0, "burst": 5}}
