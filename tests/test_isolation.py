"""Pairing is exact: sockets with identical 4-tuples in different namespaces are never
handed each other's bytes."""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import threading
import time

import pytest

from accel.model import Endpoint, Service, ServiceTable
from tests.traffic import EchoServer, connect, recv_all

pytestmark = pytest.mark.kernel


def loopback_mesh(*pods) -> ServiceTable:
    return ServiceTable(
        (Service("echo", "10.96.0.1", 80, endpoints=tuple(Endpoint(p.ip, 8080) for p in pods),
                 fastpath="redirect"),),
        mesh_cidrs=(ipaddress.ip_network("127.0.0.0/8"),), fastpath="redirect",
    )


def test_same_loopback_tuple_in_two_pods(lab, datapath):
    """Each pod talks over its own 127.0.0.1 with the same ports at the same time."""
    a, b = lab.pods
    datapath.apply(loopback_mesh(a, b))
    servers = [EchoServer(p, 7000, host="127.0.0.1", reply_prefix=p.name.encode() + b":")
               for p in (a, b)]
    try:
        for round_ in range(30):
            socks = [connect(p, "127.0.0.1", 7000, bind=("127.0.0.1", 40000 + round_))
                     for p in (a, b)]
            payloads = [os.urandom(10_000) for _ in socks]
            for s, data in zip(socks, payloads, strict=True):
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            for p, s, data in zip((a, b), socks, payloads, strict=True):
                got = recv_all(s, random.Random(round_))
                assert got == p.name.encode() + b":" + data, f"round {round_}: crossed pods"
                s.close()
    finally:
        for srv in servers:
            srv.close()
    c = datapath.counters()
    # Redirect really was used (each pair found its own peer), and never a stranger.
    assert c["sockhash_inserts"] == 4 * 30
    assert c["msg_redirects"] >= 4 * 30
    assert c["msg_redirect_misses"] == 0


def test_same_addresses_on_separate_links_half_open(lab_factory, datapath):
    """Two pairs of pods with identical addresses and ports on separate bridges; pair A's
    handshake is held half-open (its server drops the final ACK) while pair B talks."""
    lab_a = lab_factory(2)
    lab_b = lab_factory(2)  # same subnet, same addresses, another node namespace
    a_cli, a_srv = lab_a.pods
    b_cli, b_srv = lab_b.pods
    assert (a_cli.ip, a_srv.ip) == (b_cli.ip, b_srv.ip)
    datapath.apply(ServiceTable((
        Service("echo", "10.96.0.1", 80, endpoints=(Endpoint(a_srv.ip, 8080),)),
    ), fastpath="redirect"))
    # Hold pair A half-open: the server pod drops pure ACKs, so the server never
    # reaches ESTABLISHED while the client already has.
    a_srv.run("iptables -A INPUT -p tcp --dport 8080 --tcp-flags SYN,ACK ACK -j DROP")
    srv_a = EchoServer(a_srv, 8080, keep=True)
    srv_b = EchoServer(b_srv, 8080, keep=True)
    try:
        sa = connect(a_cli, str(a_srv.ip), 8080, bind=(str(a_cli.ip), 45000), timeout=20)
        data_a = b"A" * 5000
        sa.sendall(data_a)  # the client is established and writes into the held connection

        results: dict[str, bytes] = {}
        for i in range(20):
            sb = connect(b_cli, str(b_srv.ip), 8080, bind=(str(b_cli.ip), 45000))
            data_b = os.urandom(20_000)
            sb.sendall(data_b)
            sb.shutdown(socket.SHUT_WR)
            got = recv_all(sb, random.Random(i))
            assert got == data_b, f"pair B connection {i} corrupted"
            sb.close()
            time.sleep(0.01)
        assert srv_a.accepted == 0  # still half-open

        # Release pair A: TCP retransmits complete it; its bytes arrive intact and alone.
        a_srv.run("iptables -D INPUT -p tcp --dport 8080 --tcp-flags SYN,ACK ACK -j DROP")
        sa.shutdown(socket.SHUT_WR)
        reader = threading.Thread(
            target=lambda: results.setdefault("a", recv_all(sa, random.Random(0))))
        reader.start()
        reader.join(timeout=30)
        assert results.get("a") == data_a
        sa.close()
    finally:
        srv_a.close()
        srv_b.close()
    assert srv_a.received == [data_a]
    assert all(b"A" * 100 not in r for r in srv_b.received)
    c = datapath.counters()
    assert c["msg_redirects"] >= 40  # pair B took the fast path
