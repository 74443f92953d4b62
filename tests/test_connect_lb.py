"""Connect-time load balancing on the real kernel: VIP:port -> endpoint by weight, the VIP
visible to the application, the fast path still pairing the balanced connection."""

from __future__ import annotations

import collections
import errno
import os
import socket
import time

import pytest

from accel.model import Endpoint, Service, ServiceTable
from tests import traffic
from tests.traffic import EchoServer, connect, named_servers, roundtrip

pytestmark = pytest.mark.kernel

VIP = "10.96.0.10"


def table(*eps, vip=VIP, port=80, proto="TCP", name="web") -> ServiceTable:
    # Redirect: these tests also prove balanced connections are paired socket to socket.
    return ServiceTable((Service(name, vip, port, proto, endpoints=tuple(eps),
                                 fastpath="redirect"),))


def who(client, host=VIP, port=80, family=socket.AF_INET) -> str:
    return traffic.who(client, host, port, family)


def test_weighted_balance_getpeername_and_fast_path(lab_factory, datapath):
    lab = lab_factory(4)
    client, *backends = lab.pods
    weights = [1, 2, 5]
    datapath.apply(table(*(Endpoint(p.ip, 8080, w) for p, w in zip(backends, weights,
                                                                   strict=True))))
    servers = named_servers(backends)
    try:
        n = 1600
        hits = collections.Counter(who(client) for _ in range(n))
        with connect(client, VIP, 80) as s:
            assert s.getpeername() == (VIP, 80)  # the app sees the VIP it dialed
    finally:
        for s in servers:
            s.close()
    # Chi-square goodness of fit against the weights: df=2, where P(chi2 > x) = exp(-x/2),
    # so x = 2 ln(1e4) = 18.42 fails a correct datapath with probability 1e-4 (expected
    # counts 200-1000: the chi-square approximation holds).
    expected = {p.name: n * w / sum(weights) for p, w in zip(backends, weights, strict=True)}
    chi2 = sum((hits[k] - e) ** 2 / e for k, e in expected.items())
    assert set(hits) == set(expected) and chi2 < 18.42, (hits, expected)
    c = datapath.counters()
    assert c["connect_balanced"] == n + 1
    assert c["peername_vip"] >= 1
    assert c["sockhash_inserts"] == 2 * (n + 1)  # balanced connections are still paired
    assert c["msg_redirects"] >= 2 * n
    assert datapath.service_counters()["web"]["connects"] == n + 1


def test_ipv6_vip_and_v4_vip_from_ipv6_socket(lab, datapath):
    client, server = lab.pods
    datapath.apply(ServiceTable((
        Service("v6", "fd00:96::10", 80, endpoints=(Endpoint(server.ip6, 8080),),
                fastpath="redirect"),
        Service("v4", VIP, 80, endpoints=(Endpoint(server.ip, 8081),), fastpath="redirect"),
    )))
    payload = os.urandom(50_000)
    with EchoServer(server, 8080, family=socket.AF_INET6), EchoServer(server, 8081):
        assert roundtrip(client, "fd00:96::10", 80, payload, family=socket.AF_INET6) == payload
        with connect(client, "fd00:96::10", 80, socket.AF_INET6) as s:
            assert s.getpeername()[:2] == ("fd00:96::10", 80)
        assert roundtrip(client, f"::ffff:{VIP}", 80, payload, family=socket.AF_INET6) == payload
    c = datapath.counters()
    assert c["connect_balanced"] == 3 and c["redirected_bytes"] >= 4 * len(payload)


def test_udp_sendmsg_and_recvmsg_show_the_vip(lab, datapath):
    client, server = lab.pods
    datapath.apply(table(Endpoint(server.ip, 5353), port=53, proto="UDP", name="dns"))
    srv = server.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((str(server.ip), 5353))
    srv.settimeout(5)
    cli = client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli.settimeout(5)
    try:
        for i in range(5):
            cli.sendto(b"q%d" % i, (VIP, 53))
            data, addr = srv.recvfrom(100)
            assert data == b"q%d" % i
            srv.sendto(b"a" + data, addr)
            reply, src = cli.recvfrom(100)
            assert reply == b"aq%d" % i and src == (VIP, 53)  # recvmsg shows the VIP
    finally:
        srv.close()
        cli.close()
    assert datapath.counters()["udp_balanced"] == 5


def test_no_usable_endpoint_refuses_at_once(lab, datapath):
    client, server = lab.pods
    datapath.apply(table(Endpoint(server.ip, 8080, healthy=False)))
    t = time.monotonic()
    with pytest.raises(OSError) as e:
        connect(client, VIP, 80, timeout=5)
    assert e.value.errno == errno.EPERM and time.monotonic() - t < 1
    assert datapath.counters()["connect_no_backend"] == 1


def test_change_steers_new_connections_existing_continue(lab_factory, datapath):
    lab = lab_factory(3)
    client, old, new = lab.pods
    datapath.apply(table(Endpoint(old.ip, 8080)))
    servers = named_servers([old, new])
    try:
        held = connect(client, VIP, 80)
        held.sendall(b"x" * 1000)
        datapath.apply(table(Endpoint(new.ip, 8080)))
        assert {who(client) for _ in range(50)} == {new.name}
        # The connection made before the change still talks to the old endpoint.
        held.sendall(b"y" * 1000)
        held.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := held.recv(65536):
            got += chunk
        assert got == old.name.encode() + b"|" + b"x" * 1000 + b"y" * 1000
        held.close()
    finally:
        for s in servers:
            s.close()


def test_make_before_break_under_churn(lab_factory, datapath):
    """The endpoint set flips continuously while clients connect: every connect lands on
    an endpoint of either the old or the new set, never fails."""
    import threading

    lab = lab_factory(4)
    client, *backends = lab.pods
    sets = [[backends[0], backends[1]], [backends[1], backends[2]], [backends[2]]]
    datapath.apply(table(*(Endpoint(p.ip, 8080) for p in sets[0])))
    servers = named_servers(backends)
    stop = threading.Event()
    flips = [0]

    def churn() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            datapath.apply(table(*(Endpoint(p.ip, 8080) for p in sets[i % len(sets)])))
            flips[0] += 1
            time.sleep(0.005)

    t = threading.Thread(target=churn)
    t.start()
    try:
        results = collections.Counter(who(client) for _ in range(500))
    finally:
        stop.set()
        t.join()
        for s in servers:
            s.close()
    # Every connect reached a backend (who() raises otherwise) while the set kept changing.
    assert set(results) <= {p.name for p in backends} and flips[0] > 20
    assert datapath.counters()["connect_no_backend"] == 0


def test_long_lived_sockets_keep_their_vip_through_churn(lab, pin_dir, test_cgroup):
    """The VIP a connected socket dialed lives with the socket: thousands of connections
    later (far more than the reverse-NAT LRU holds) getpeername() and a connected UDP
    socket's recvmsg() still show the VIP, not the endpoint."""
    from accel.datapath.datapath import Capacities, Datapath

    client, server = lab.pods
    dp = Datapath(pin_dir=pin_dir, cgroup_path=str(test_cgroup),
                  capacities=Capacities(revnat=64)).start()
    try:
        dp.apply(ServiceTable((
            Service("web", VIP, 80, endpoints=(Endpoint(server.ip, 8080),)),
            Service("dns", VIP, 53, "UDP", endpoints=(Endpoint(server.ip, 5353),)),
        )))
        srv = server.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv.bind((str(server.ip), 5353))
        srv.settimeout(5)
        udp = client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(5)
        udp.connect((VIP, 53))
        with srv, udp, EchoServer(server, 8080), connect(client, VIP, 80) as old:
            for _ in range(300):  # churn: each one a reverse-NAT entry, 64 of them at most
                with connect(client, VIP, 80) as s:
                    assert s.getpeername() == (VIP, 80)
            assert old.getpeername() == (VIP, 80)
            old.sendall(b"ping")
            assert old.recv(4) == b"ping"
            udp.send(b"q")
            data, addr = srv.recvfrom(10)
            srv.sendto(b"a", addr)
            assert udp.recvfrom(10) == (b"a", (VIP, 53))
    finally:
        dp.close()
