"""The socket fast path on the real kernel: bytes are exact, the redirect is really taken,
and the sockhash holds nothing after the sockets close."""

from __future__ import annotations

import os
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from accel.model import Endpoint, Service, ServiceTable
from tests.traffic import EchoServer, connect, cpu_hog, digest, recv_all, roundtrip

pytestmark = pytest.mark.kernel


def mesh_of(*pods, port: int = 8080) -> ServiceTable:
    """The pods as a redirect-mode mesh: these tests dial the pod IPs (the table's default
    fast path) and prove the socket-to-socket hand-over itself."""
    return ServiceTable((
        Service("echo", "10.96.0.1", 80, endpoints=tuple(Endpoint(p.ip, port) for p in pods),
                fastpath="redirect"),
    ), fastpath="redirect")


def wait_empty(dp, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if dp.sockhash_entries() == 0 and dp.pairing_entries() == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"dead entries left: sockhash={dp.sockhash_entries()} "
                         f"pairs={dp.pairing_entries()}")


SIZES = [0, 1, 2, 100, 1460, 4095, 65536, 65537, 1 << 20, 3 * (1 << 20) + 17, 16 << 20]


@pytest.mark.parametrize("size", SIZES)
def test_bytes_exact_through_redirect(lab, datapath, size):
    client, server = lab.pods
    datapath.apply(mesh_of(server))
    payload = random.Random(size).randbytes(size)
    before = datapath.counters()
    with EchoServer(server, 8080):
        got = roundtrip(client, str(server.ip), 8080, payload, seed=size)
    assert len(got) == size and digest(got) == digest(payload)
    after = datapath.counters()
    assert after["sockhash_inserts"] - before["sockhash_inserts"] == 2
    if 0 < size <= 1 << 20:
        # Both directions went through the peer socket, not TCP.
        assert after["redirected_bytes"] - before["redirected_bytes"] == 2 * size
        assert after["msg_passthrough"] == before["msg_passthrough"]
    elif size:
        # Past the receiver's queue bound (it grows from REDIRECT_QUEUE_MIN as the receiver
        # reads) a connection pauses on TCP.
        moved = after["msg_backpressure"] - before["msg_backpressure"]
        redirected = after["redirected_bytes"] - before["redirected_bytes"]
        assert redirected == 2 * size or (moved and redirected > 0)
    wait_empty(datapath)


def test_server_closes_first_and_partial_reads(lab, datapath):
    client, server = lab.pods
    datapath.apply(mesh_of(server))
    rng = random.Random(7)
    with EchoServer(server, 8080, close_first_after=50_000, reply_prefix=b"HELLO"):
        for i in range(20):
            with connect(client, str(server.ip), 8080) as s:
                payload = rng.randbytes(50_000)
                s.sendall(payload)
                got = recv_all(s, rng)  # the server closes: EOF after the echo
                assert got == b"HELLO" + payload, f"connection {i}"
    c = datapath.counters()
    assert c["msg_redirects"] >= 40 and c["msg_redirect_misses"] == 0
    wait_empty(datapath)


def test_thousand_concurrent_connections(lab, datapath):
    client, server = lab.pods
    datapath.apply(mesh_of(server))
    n = 1000
    with EchoServer(server, 8080):
        socks = [connect(client, str(server.ip), 8080) for _ in range(n)]
        payloads = [os.urandom(1000 + i) for i in range(n)]
        for s, p in zip(socks, payloads, strict=True):
            s.sendall(p)
            s.shutdown(socket.SHUT_WR)
        rng = random.Random(1)
        for i, (s, p) in enumerate(zip(socks, payloads, strict=True)):
            assert recv_all(s, rng) == p, f"connection {i}"
            s.close()
    c = datapath.counters()
    assert c["sockhash_inserts"] == 2 * n
    assert c["msg_redirects"] >= 2 * n
    wait_empty(datapath)


@pytest.mark.parametrize("hog", [False, True], ids=["idle", "cpu-hog"])
def test_ten_thousand_short_connections_write_at_once(lab, datapath, hog):
    """The ordering hazard: a client writing the moment connect() returns, while the
    server socket may not be in the sockhash yet. Every byte must arrive in order."""
    client, server = lab.pods
    datapath.apply(mesh_of(server))
    n = 10_000

    def one(i: int) -> bool:
        payload = i.to_bytes(4, "big") * (1 + i % 300)
        with connect(client, str(server.ip), 8080) as s:
            s.sendall(payload[:3])
            s.sendall(payload[3:])
            s.shutdown(socket.SHUT_WR)
            got = recv_all(s, random.Random(i))
        return got == payload

    with EchoServer(server, 8080), ThreadPoolExecutor(16) as pool:
        if hog:
            with cpu_hog():
                results = list(pool.map(one, range(n)))
        else:
            results = list(pool.map(one, range(n)))
    bad = [i for i, ok in enumerate(results) if not ok]
    assert not bad, f"{len(bad)} connections corrupted, first {bad[:5]}"
    c = datapath.counters()
    assert c["sockhash_inserts"] == 2 * n
    # Most connections take the fast path; any that cannot are on TCP from the first byte.
    assert c["msg_redirects"] >= n
    wait_empty(datapath, timeout=15)


def test_ipv6_and_v4_mapped(lab, datapath):
    client, server = lab.pods
    datapath.apply(ServiceTable((
        Service("v6", "fd00:96::1", 80, endpoints=(Endpoint(server.ip6, 8080),)),
        Service("v4", "10.96.0.1", 80, endpoints=(Endpoint(server.ip, 8081),)),
    ), fastpath="redirect"))
    payload = os.urandom(200_000)
    with EchoServer(server, 8080, family=socket.AF_INET6):
        assert roundtrip(client, str(server.ip6), 8080, payload, family=socket.AF_INET6) == payload
    # An AF_INET6 client dialing ::ffff:a.b.c.d, an AF_INET server: keys must still meet.
    with EchoServer(server, 8081):
        got = roundtrip(client, f"::ffff:{server.ip}", 8081, payload, family=socket.AF_INET6)
        assert got == payload
    c = datapath.counters()
    assert c["sockhash_inserts"] == 4
    assert c["redirected_bytes"] == 4 * len(payload)
    wait_empty(datapath)


def test_non_mesh_connections_untouched(lab, datapath):
    client, server = lab.pods
    # The table names some other endpoint: neither pod is a mesh address.
    datapath.apply(ServiceTable((
        Service("other", "10.96.0.9", 80, endpoints=(Endpoint("10.250.0.1", 80),)),
    )))
    payload = os.urandom(300_000)
    with EchoServer(server, 8080):
        assert roundtrip(client, str(server.ip), 8080, payload) == payload
    c = datapath.counters()
    assert c["sockhash_inserts"] == 0 and c["msg_redirects"] == 0
    assert c["socks_non_mesh"] >= 2
    assert datapath.sockhash_entries() == 0
