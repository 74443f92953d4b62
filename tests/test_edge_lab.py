"""The edge balancer end to end: external client netns -> edge interface -> VIP -> pods.

Topology (all namespaces named he<hex>-*): the lead's Lab gives a node netns with
pods on a bridge; an ext netns is wired to the node by a veth whose node end is
the edge interface (XDP + tc). The client knows only the VIP. The client's veth
computes full checksums (tx offload off), as frames arriving from a wire do.
GRO is switched on in each pod, so the edge redirects into their veths (the redirect
path); pods left as runtimes make them are routed instead: tests/test_edge_topologies.py.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
import time

import pytest

pytest.importorskip("bcc")

from accel.datapath.edge import EdgeDatapath
from accel.lab import Lab, Outside, in_netns
from accel.model import Endpoint, Guard, Service, ServiceTable, parse_network

pytestmark = pytest.mark.kernel

VIP, VIP6 = "10.96.77.1", "fd00:96::77"
EDGE_NET, EDGE_NET6 = "10.201.0", "fd00:201:"
CLIENT, CLIENT6 = f"{EDGE_NET}.2", f"{EDGE_NET6}:2"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Servers:
    """A TCP server in each pod on port 8080 that answers `<pod>:<line>` per line."""

    def __init__(self, lab: Lab):
        self.stop = threading.Event()
        self.socks = []
        for pod in lab.pods:
            srv = in_netns(pod.name, lambda: socket.create_server(
                ("::", 8080), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128))
            srv.settimeout(0.2)
            self.socks.append(srv)
            threading.Thread(target=self._accept, args=(srv, pod.name), daemon=True).start()

    def _accept(self, srv: socket.socket, name: str) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn, name), daemon=True).start()

    def _serve(self, conn: socket.socket, name: str) -> None:
        conn.settimeout(10)
        with conn:
            f = conn.makefile("rb")
            try:
                for line in f:
                    conn.sendall(f"{name}:{line.decode().strip()}\n".encode())
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        for s in self.socks:
            s.close()


class Client:
    """A connection from the ext netns to the VIP."""

    def __init__(self, ext: str, vip: str, timeout: float = 2.0):
        fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
        self.sock = in_netns(ext, lambda: socket.socket(fam, socket.SOCK_STREAM))
        self.sock.settimeout(timeout)
        self.sock.connect((vip, 80))
        self.file = self.sock.makefile("rb")

    def ask(self, text: str = "hi") -> str:
        self.sock.sendall(text.encode() + b"\n")
        line = self.file.readline().decode().strip()
        if not line:
            raise ConnectionError("closed")
        pod, _, echo = line.partition(":")
        assert echo == text
        return pod

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def edge_lab():
    prefix = "he" + secrets.token_hex(3)
    lab = Lab(3, prefix=prefix)
    ext = f"{prefix}-ext"
    iface = f"{prefix}e"
    lab.up()
    servers = None
    outside = Outside(ext, iface, EDGE_NET, EDGE_NET6, node=lab.node)
    try:
        outside.up()
        lab.route_ipv6()
        for pod in lab.pods:
            pod.run("ethtool -K eth0 gro on")
        servers = Servers(lab)
        yield lab, ext, iface
    finally:
        if servers:
            servers.close()
        outside.down()
        lab.down()


def table(lab: Lab, pods: list[int], v6: bool = False) -> ServiceTable:
    svcs = [Service("web", VIP, 80, "TCP",
                    tuple(Endpoint(lab.pods[i].ip, 8080) for i in pods), edge=True)]
    if v6:
        svcs.append(Service("web6", VIP6, 80, "TCP",
                            tuple(Endpoint(lab.pods[i].ip6, 8080) for i in pods), edge=True))
    return ServiceTable.of(svcs)


def try_connect(ext: str, vip: str = VIP) -> Client | None:
    try:
        return Client(ext, vip, timeout=1.0)
    except OSError:
        return None


def row(dp: EdgeDatapath, name: str) -> dict:
    return next(r for r in dp.counters()["vips"] if r["service"] == name)


def test_edge_balances_keeps_flows_and_guards(edge_lab):
    lab, ext, iface = edge_lab
    names = [p.name for p in lab.pods]
    dp = EdgeDatapath(iface, f"/sys/fs/bpf/{lab.prefix}-edge")
    clients: list[Client] = []
    try:
        mode = in_netns(lab.node, lambda: dp.attach("native"))  # auto would pick tc on a veth
        assert mode == "native"
        # Before the VIP exists, nothing answers it: the node does not know it.
        assert try_connect(ext) is None
        in_netns(lab.node, lambda: dp.apply(table(lab, [0, 1], v6=True)))
        in_netns(lab.node, lambda: dp.set_guard(Guard()))
        assert {b.hop is not None for v in dp._vips.values() for b in v.backends.values()} == {
            True}, dp.status()

        clients = [Client(ext, VIP) for _ in range(24)]
        first = [c.ask() for c in clients]
        assert set(first) == {names[0], names[1]}  # balanced, and the replies came from the VIP
        v6 = Client(ext, VIP6)
        assert v6.ask() in names[:2]
        v6.close()
        r = row(dp, "web")
        assert r["new_flows"] >= 24 and r["packets"] > 24 and r["reply_packets"] > 24
        assert dp.counters()["global"]["reply_revnat"] > 0

        # A third pod joins: every established connection stays where it was.
        in_netns(lab.node, lambda: dp.apply(table(lab, [0, 1, 2])))
        assert [c.ask("again") for c in clients] == first
        fresh = [Client(ext, VIP) for _ in range(30)]
        assert names[2] in {c.ask() for c in fresh}
        for c in fresh:
            c.close()

        # Pod 0 leaves: connections on the others carry on; new ones avoid pod 0.
        in_netns(lab.node, lambda: dp.apply(table(lab, [1, 2])))
        for c, pod in zip(clients, first, strict=True):
            if pod != names[0]:
                assert c.ask("still") == pod
        fresh = [Client(ext, VIP) for _ in range(20)]
        assert {c.ask() for c in fresh} <= {names[1], names[2]}
        for c in fresh:
            c.close()

        # The client's address is denied: new connections and established ones go dark.
        survivor = next(c for c, pod in zip(clients, first, strict=True) if pod != names[0])
        before = row(dp, "web")["drop_deny"]
        in_netns(lab.node, lambda: dp.set_guard(Guard(deny=(parse_network(f"{CLIENT}/32", "d"),))))
        assert try_connect(ext) is None
        survivor.sock.settimeout(1.0)
        with pytest.raises(OSError):
            survivor.ask("denied")
        assert row(dp, "web")["drop_deny"] > before
        in_netns(lab.node, lambda: dp.set_guard(Guard()))
        ok = try_connect(ext)
        assert ok is not None and ok.ask() in names[1:]
        ok.close()
    finally:
        for c in clients:
            c.close()
        in_netns(lab.node, dp.close)
    # Nothing of ours is left on the interface.
    out = subprocess.run(["ip", "netns", "exec", lab.node, "ip", "-d", "link", "show", iface],
                         capture_output=True, text=True).stdout
    assert "xdp" not in out
    tc = subprocess.run(["ip", "netns", "exec", lab.node, "tc", "qdisc", "show", "dev", iface],
                        capture_output=True, text=True).stdout
    assert "clsact" not in tc
    time.sleep(0)


def test_attach_refuses_a_foreign_xdp_program_and_replaces_its_own(edge_lab):
    from bcc import BPF

    from accel.datapath.edge import EdgeError

    lab, ext, iface = edge_lab
    other = BPF(text="int someone_else(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = other.load_func(b"someone_else", BPF.XDP)
    in_netns(lab.node, lambda: BPF.attach_xdp(iface, fn, 0))
    dp = EdgeDatapath(iface, f"/sys/fs/bpf/{lab.prefix}-edge", 16411, max_vips=4)
    try:
        with pytest.raises(EdgeError, match="someone_else"):
            in_netns(lab.node, lambda: dp.attach("native"))
        out = subprocess.run(["ip", "netns", "exec", lab.node, "ip", "-d", "link", "show", iface],
                             capture_output=True, text=True).stdout
        assert "someone_else" in out  # untouched
        in_netns(lab.node, lambda: BPF.remove_xdp(iface, 0))
        # An earlier agent's program (ours) is replaced: a restart must not need cleanup.
        first = in_netns(lab.node, lambda: dp.attach("native"))
        again = EdgeDatapath(iface, f"/sys/fs/bpf/{lab.prefix}-edge", 16411, max_vips=4)
        try:
            assert in_netns(lab.node, lambda: again.attach("native")) == first
        finally:
            in_netns(lab.node, again.close)
    finally:
        in_netns(lab.node, dp.close)
        other.cleanup()
