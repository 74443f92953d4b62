"""Capacity: maps configured small fill up; what does not fit stays on the kernel path,
counted and reported; nothing else breaks."""

from __future__ import annotations

import os
import random
import socket

import pytest

from accel.datapath.datapath import Capacities, Datapath
from accel.model import Endpoint, Service, ServiceTable
from accel.runtime import CapacityError, Runtime
from tests.traffic import EchoServer, connect, recv_all

pytestmark = [pytest.mark.kernel, pytest.mark.reliability]


@pytest.fixture
def small(pin_dir, test_cgroup):
    dp = Datapath(pin_dir=pin_dir, cgroup_path=str(test_cgroup),
                  capacities=Capacities(sockets=64, services=4, slots=16)).start()
    try:
        yield Runtime(datapath=dp)
    finally:
        dp.close()


def svc(i: int, *pods) -> Service:
    return Service(f"s{i}", f"10.96.1.{i}", 80, endpoints=tuple(Endpoint(p.ip, 8080) for p in pods),
                   fastpath="redirect")


def test_full_sockhash_falls_back_to_tcp(lab, small):
    client, server = lab.pods
    small.apply(ServiceTable((svc(1, server),)))
    with EchoServer(server, 8080):
        socks = [connect(client, "10.96.1.1", 80) for _ in range(100)]  # 200 sockets > 64
        payloads = [os.urandom(5000) for _ in socks]
        for s, p in zip(socks, payloads, strict=True):
            s.sendall(p)
            s.shutdown(socket.SHUT_WR)
        for i, (s, p) in enumerate(zip(socks, payloads, strict=True)):
            assert recv_all(s, random.Random(i)) == p
            s.close()
    c = small.datapath.counters()
    assert c["sockhash_inserts"] == 64  # exactly what fits
    # Every other socket stays on TCP, counted: a client that did not fit publishes no
    # redirect choice, so its server end is not even tried (left routed).
    assert c["sockhash_insert_failures"] + c["socks_routed"] == 200 - 64
    assert c["sockhash_insert_failures"] > 0
    assert c["msg_redirects"] > 0  # those that fit are still accelerated
    usage = small.status()["maps"]["sockets"]
    assert usage["capacity"] == 64


def test_too_many_services_rejected_whole_and_old_state_serves(lab, small):
    client, server = lab.pods
    small.apply(ServiceTable(tuple(svc(i, server) for i in range(1, 5))))
    with pytest.raises(CapacityError, match="5 services exceed the capacity of 4"):
        small.apply(ServiceTable(tuple(svc(i, server) for i in range(1, 6))))
    with pytest.raises(CapacityError, match="slots exceed"):
        many = ServiceTable((Service("big", "10.96.2.1", 80, endpoints=tuple(
            Endpoint(f"10.200.1.{i}", 8080) for i in range(1, 20))),))
        small.apply(many)
    assert small.rejected_count == 2 and "capacity" in small.last_error
    assert sorted(small.datapath.dump()["services"]) == sorted(
        f"10.96.1.{i}:80/TCP" for i in range(1, 5))
    with EchoServer(server, 8080):
        for i in range(1, 5):
            with connect(client, f"10.96.1.{i}", 80) as s:
                s.sendall(b"ok")
                assert s.recv(2) == b"ok"
