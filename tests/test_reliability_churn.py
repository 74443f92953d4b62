"""Churn under load: the endpoint set changes 100 times a second while traffic runs."""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from accel.model import Endpoint, Service, ServiceTable
from accel.runtime import Runtime
from tests.test_reliability_restart import Pump
from tests.traffic import connect, named_servers

pytestmark = [pytest.mark.kernel, pytest.mark.reliability]
VIP = "10.96.3.1"


def test_endpoint_churn_100_per_second(lab_factory, datapath):
    lab = lab_factory(5)
    client, stable, *flapping = lab.pods
    agent = Runtime(datapath=datapath)

    def table(members) -> ServiceTable:
        return ServiceTable((Service("churn", VIP, 80, endpoints=tuple(
            Endpoint(p.ip, 8080) for p in [stable, *members])),))

    agent.apply(table(flapping))
    servers = named_servers(lab.pods[1:])
    # Long-lived connections to every endpoint, made before the churn starts.
    drains = [Pump(connect(client, VIP, 80, timeout=30), i, prefixed=True) for i in range(6)]
    stop = threading.Event()
    changes = [0]

    def churn() -> None:
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            i += 1
            members = [p for j, p in enumerate(flapping) if (i >> j) & 1]
            agent.apply(table(members))
            changes[0] += 1
            next_at += 0.01
            time.sleep(max(0.0, next_at - time.monotonic()))

    def request(i: int) -> tuple[str, bool]:
        payload = os.urandom(1 + i % 20_000)
        with connect(client, VIP, 80, timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        name, _, body = data.partition(b"|")
        return name.decode(), body == payload

    t = threading.Thread(target=churn)
    t.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(request, range(2000)))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        t.join()
        for p in drains:
            p.stop()
        for p in drains:
            p.sock.close()
        for s in servers:
            s.close()
    rate = changes[0] / elapsed
    assert rate >= 80, f"only {rate:.0f} changes/s"
    assert all(ok for _, ok in results), "a request's bytes differ"
    landed = collections.Counter(name for name, _ in results)
    assert landed[stable.name] > 0 and sum(landed.values()) == 2000
    errors = [p.error for p in drains if p.error]
    assert not errors, errors  # connections to removed endpoints drained, intact
    assert any(p.server != stable.name for p in drains)
    assert datapath.counters()["connect_no_backend"] == 0
