"""Per-service QoS on the real kernel (accel/bpf/lib/qos.h, accel/datapath/qos.py): the
connection-rate bucket at connect() and bandwidth by TCP pacing, between lab pods."""

from __future__ import annotations

import errno
import ipaddress
import json
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest

from accel.model import Endpoint, Limits, Service, ServiceTable
from tests.traffic import EchoServer, connect

pytestmark = pytest.mark.kernel

VIP = "10.96.0.20"


def limited(server_ip: str, port: int = 80, name: str = "bulk", **limits) -> Service:
    return Service(name, VIP, port, endpoints=(Endpoint(server_ip, 8080),),
                   limits=Limits(**limits))


def burst(client, n: int) -> tuple[int, int, float]:
    """n back-to-back connects through the VIP: (passed, refused, slowest refusal in s)."""
    passed = refused = 0
    slowest = 0.0
    for _ in range(n):
        t = time.monotonic()
        try:
            s = connect(client, VIP, 80, timeout=5)
        except OSError as e:
            assert e.errno == errno.EPERM, e  # refused at once, never a timeout
            refused += 1
            slowest = max(slowest, time.monotonic() - t)
            continue
        s.close()
        passed += 1
    return passed, refused, slowest


def test_connection_bucket_burst_then_refill(lab, datapath):
    client, server = lab.pods
    datapath.apply(ServiceTable((limited(server.ip, connections=5, burst=5),)))
    with EchoServer(server, 8080):
        t0 = time.monotonic()
        passed, refused, slowest = burst(client, 20)
        took = time.monotonic() - t0
        # A token comes back every 200 ms: a burst done sooner than that passes exactly the
        # bucket (the state is one compare-and-swapped word: no CPU race can add one).
        assert took < 0.2, took
        assert (passed, refused) == (5, 15)
        assert slowest < 0.05
        time.sleep(1.0)
        t1 = time.monotonic()
        passed2, refused2, _ = burst(client, 20)
        # 1 s refills 5 tokens, plus one per 200 ms the second burst itself lasts.
        extra = int((time.monotonic() - t1) / 0.2)
        assert 5 <= passed2 <= 5 + extra + 1, (passed2, extra)
    c = datapath.qos_counters()["bulk"]
    assert c["admitted"] == passed + passed2
    assert c["refused"] == refused + refused2
    assert datapath.service_counters()["bulk"]["connects"] == passed + passed2


def test_unlimited_service_untouched_and_limit_removed(lab, datapath):
    client, server = lab.pods
    free = Service("free", VIP, 81, endpoints=(Endpoint(server.ip, 8080),))
    datapath.apply(ServiceTable((limited(server.ip, connections=1, burst=1), free)))
    with EchoServer(server, 8080):
        assert burst(client, 3)[:2] == (1, 2)
        for _ in range(10):  # the other service on the same endpoint: no limit
            connect(client, VIP, 81).close()
        datapath.apply(ServiceTable((limited(server.ip), free)))  # limit removed
        assert burst(client, 10)[:2] == (10, 0)
    assert "free" not in datapath.qos_counters()


def test_connection_limit_from_parallel_clients_is_exact(lab, datapath):
    """Two threads on two CPUs racing for one bucket: admitted never exceeds the burst."""
    client, server = lab.pods
    datapath.apply(ServiceTable((limited(server.ip, connections=1 / 3600, burst=30),)))
    results: list[tuple[int, int, float]] = []
    with EchoServer(server, 8080):
        threads = [threading.Thread(target=lambda: results.append(burst(client, 40)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum(r[0] for r in results) == 30
    c = datapath.qos_counters()["bulk"]
    assert (c["admitted"], c["refused"]) == (30, 50)





MBIT = 1_000_000


@contextmanager
def iperf_servers(pod, *ports: int, cpus: tuple[int | None, ...] = ()):
    procs = [pod.popen(pinned(cpu, ["iperf3", "-s", "-p", str(p)]), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
             for p, cpu in zip(ports, cpus or (None,) * len(ports), strict=True)]
    try:
        time.sleep(0.3)
        yield
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def iperf(pod, port: int, seconds: int, interval: float = 0,
          cpu: int | None = None) -> subprocess.Popen:
    """iperf3 client through the VIP (its own process, in the test's cgroup), JSON out."""
    argv = ["iperf3", "-c", VIP, "-p", str(port), "-t", str(seconds), "-J"]
    if interval:
        argv += ["-i", str(interval)]
    return pod.popen(pinned(cpu, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    doc = json.loads(out)
    assert proc.returncode == 0 and "error" not in doc, (doc.get("error"), err)
    return doc


def received_bps(doc: dict) -> float:
    return doc["end"]["sum_received"]["bits_per_second"]


def interval_bps(doc: dict, start: float, end: float) -> float:
    """Sender bit/s over the report intervals inside [start, end) seconds."""
    ivs = [iv["sum"] for iv in doc["intervals"]
           if iv["sum"]["start"] >= start - 1e-3 and iv["sum"]["end"] <= end + 1e-3]
    return sum(iv["bytes"] for iv in ivs) * 8 / sum(iv["seconds"] for iv in ivs)


def test_bandwidth_paced_other_service_not_slowed_limit_changed_live(lab, datapath):
    client, server = lab.pods
    # The limited service asks for the socket redirect: it must not get it (the redirect
    # skips TCP and so its pacing); the unlimited one keeps its fast path.
    bulk = Service("bulk", VIP, 80, endpoints=(Endpoint(server.ip, 8080),),
                   fastpath="redirect", limits=Limits(bandwidth=50 * MBIT))
    free = Service("free", VIP, 81, endpoints=(Endpoint(server.ip, 8081),), fastpath="redirect")
    datapath.apply(ServiceTable((bulk, free)))
    # The unlimited stream's two ends on CPU 1, the limited one's on CPU 0: what is compared
    # is the path (a shared queue would slow it), not where the scheduler put four processes
    # on this 2-vCPU VM (5-15 Gbit/s unpinned).
    with iperf_servers(server, 8080, 8081, cpus=(0, 1)):
        alone = received_bps(result(iperf(client, 81, 3, cpu=1)))
        limited = iperf(client, 80, 9, interval=0.5, cpu=0)
        time.sleep(1.0)
        together = received_bps(result(iperf(client, 81, 3, cpu=1)))
        # Raised under traffic at ~4.5 s: the connection follows within a second, unbroken.
        time.sleep(0.5)
        datapath.apply(ServiceTable((replace(bulk, limits=Limits(bandwidth=100 * MBIT)), free)))
        doc = result(limited)
        # Other sessions share the machine: compare with the slower of two solo runs.
        alone = min(alone, received_bps(result(iperf(client, 81, 3, cpu=1))))
    before, after = interval_bps(doc, 0.5, 4.0), interval_bps(doc, 5.5, 9.0)
    print(f"free alone {alone / MBIT:.0f} Mbit/s, beside bulk {together / MBIT:.0f}; "
          f"bulk at 50 Mbit: {before / MBIT:.1f}, raised to 100 Mbit: {after / MBIT:.1f}")
    assert 42.5 * MBIT <= before <= 57.5 * MBIT, before
    assert 85 * MBIT <= after <= 115 * MBIT, after
    assert together >= 0.7 * alone, (alone, together)
    q = datapath.qos_counters()["bulk"]
    # iperf3 dials twice per test (control + data): both paced, the idle one holds no share.
    assert q["paced"] == 2 and q["repaced"] >= 1
    c = datapath.counters()
    assert c["sockhash_inserts"] == 2 * 6  # only free's connections (3 tests x 2), both ends


def pingpong_p99(client, port: int, seconds: int = 3) -> float:
    from accel.bench.workloads import run_client

    return run_client("rr", client, VIP, port, cpu=1, seconds=seconds)["p99_us"]


def test_200mbit_service_beside_pingpong_to_the_same_pod(lab, datapath):
    """The issue's bar: a 200 Mbit/s service carries 180-220 Mbit/s through its VIP while a
    ping-pong to another service on the same server pod keeps its p99 within 2x of idle
    (pacing queues nothing in front of the other service's packets)."""
    client, server = lab.pods
    datapath.apply(ServiceTable((
        Service("bulk", VIP, 80, endpoints=(Endpoint(server.ip, 8080),),
                limits=Limits(bandwidth=200 * MBIT)),
        Service("rr", VIP, 82, endpoints=(Endpoint(server.ip, 8082),)))))
    rr_server = server.popen(["taskset", "-c", "1", "sockperf", "server", "--tcp", "-i",
                              str(server.ip), "-p", "8082"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # p99 of a few seconds is moved by one hiccup of this 2-core VM (one CI run saw 2.2x):
    # each side is the lower of two 2-second runs.
    try:
        with iperf_servers(server, 8080):
            idle = min(pingpong_p99(client, 82, 2) for _ in range(2))
            stream = iperf(client, 80, 7)
            time.sleep(1.5)
            loaded = min(pingpong_p99(client, 82, 2) for _ in range(2))
            rate = received_bps(result(stream))
    finally:
        rr_server.terminate()
        rr_server.wait()
    print(f"bulk {rate / MBIT:.1f} Mbit/s; ping-pong p99 idle {idle:.1f} us, "
          f"under the stream {loaded:.1f} us")
    assert 180 * MBIT <= rate <= 220 * MBIT, rate
    assert loaded <= 2 * idle, (idle, loaded)


def test_connections_of_a_service_share_its_rate_fairly(lab, datapath):
    client, server = lab.pods
    datapath.apply(ServiceTable((limited(server.ip, bandwidth=100 * MBIT),)))
    with iperf_servers(server, 8080):
        proc = client.popen(["iperf3", "-c", VIP, "-p", "80", "-t", "4", "-P", "2", "-J"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        doc = result(proc)
    streams = [s["receiver"]["bits_per_second"] for s in doc["end"]["streams"]]
    total = received_bps(doc)
    print(f"two connections of a 100 Mbit service: {[round(s / MBIT, 1) for s in streams]}")
    assert 85 * MBIT <= total <= 115 * MBIT, total
    assert min(streams) >= 0.8 * max(streams), streams


# A receiver that counts each connection's bytes (tagged by its sender's first 8 bytes)
# between WARM and WARM + SPAN seconds after it starts, then prints bit/s per tag.
SINK = """
import json, socket, sys, threading, time
warm, span = float(sys.argv[1]), float(sys.argv[2])
counts = {}
def serve(c):
    tag = b""
    while len(tag) < 8:
        tag += c.recv(8 - len(tag))
    tag = tag.decode().strip("_")
    counts[tag] = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            return
        counts[tag] += len(b)
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", 8080)); ls.listen(8)
threading.Thread(target=lambda: [threading.Thread(target=serve, args=(ls.accept()[0],),
                 daemon=True).start() for _ in iter(int, 1)], daemon=True).start()
time.sleep(warm); a = dict(counts); time.sleep(span); b = dict(counts)
print(json.dumps({t: (b[t] - a.get(t, 0)) * 8 / span for t in b}), flush=True)
"""

# A sender: `bulk` writes as fast as TCP takes it; `light` 12.5 kB every 10 ms (10 Mbit/s).
SENDER = """
import socket, sys, time
kind = sys.argv[2]
s = socket.create_connection((sys.argv[1], 80))
s.sendall(kind.encode().ljust(8, b"_"))
chunk = bytes(1 << 16) if kind == "bulk" else bytes(12500)
t = time.monotonic()
while True:
    s.sendall(chunk)
    if kind == "light":
        t += 0.01
        time.sleep(max(0.0, t - time.monotonic()))
"""


def test_what_a_light_connection_leaves_goes_to_the_others(lab, datapath):
    """Work-conserving: a 100 Mbit/s service with a 10 Mbit/s sender and a bulk one. The
    bulk connection gets what the light one leaves (an even split would hold it at 50),
    the light one keeps its 10, and the two together stay within the limit."""
    client, server = lab.pods
    datapath.apply(ServiceTable((limited(server.ip, bandwidth=100 * MBIT),)))
    sink = server.popen(["python3", "-c", SINK, "2.5", "3"], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    senders = []
    try:
        time.sleep(0.3)
        senders = [client.popen(["python3", "-c", SENDER, VIP, kind],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for kind in ("light", "bulk")]
        out, err = sink.communicate(timeout=20)
    finally:
        for p in (*senders, sink):
            p.kill()
            p.wait()
    rates = json.loads(out or "{}")
    print(f"light and bulk of a 100 Mbit service: "
          f"{ {k: round(v / MBIT, 1) for k, v in rates.items()} }")
    assert set(rates) == {"light", "bulk"}, (out, err)
    assert 8 * MBIT <= rates["light"] <= 12 * MBIT, rates
    assert rates["bulk"] >= 75 * MBIT, rates  # an even split: <= 50
    assert rates["bulk"] + rates["light"] <= 110 * MBIT, rates
    light = datapath.qos_counters()["bulk"]["light"]
    assert light == 1, light  # the light sender, counted as such


def test_200_back_to_back_connects_at_100_per_s_burst_20(lab, datapath):
    """The issue's bar: about burst + rate x elapsed of 200 connects pass (+-30%), every
    refused one fails in under 50 ms."""
    client, server = lab.pods
    datapath.apply(ServiceTable((limited(server.ip, connections=100, burst=20),)))
    with EchoServer(server, 8080):
        t0 = time.monotonic()
        passed, refused, slowest = burst(client, 200)
        elapsed = time.monotonic() - t0
    expected = 20 + 100 * elapsed
    print(f"200 connects in {elapsed * 1000:.0f} ms: {passed} passed (expected {expected:.0f}), "
          f"slowest refusal {slowest * 1000:.2f} ms")
    assert 0.7 * expected <= passed <= 1.3 * expected, (passed, expected)
    assert passed + refused == 200 and slowest < 0.05
    assert datapath.qos_counters()["bulk"]["refused"] == refused


@pytest.mark.parametrize("mbit", [50, 200, 1000])
def test_rate_accuracy(lab, datapath, mbit):
    """One iperf3 stream through a limited VIP carries the limit within +-10%."""
    client, server = lab.pods
    datapath.apply(ServiceTable((limited(server.ip, bandwidth=mbit * MBIT),)))
    with iperf_servers(server, 8080):
        doc = result(iperf(client, 80, 4, interval=0.5))
    rate = interval_bps(doc, 1.0, 4.0)  # past slow start
    print(f"limit {mbit} Mbit/s: {rate / MBIT:.1f} Mbit/s")
    assert 0.9 * mbit * MBIT <= rate <= 1.1 * mbit * MBIT, rate


def test_limit_removed_under_traffic(lab, datapath):
    """Removing the limit unpaces the live connection within a second, unbroken."""
    client, server = lab.pods
    svc = limited(server.ip, bandwidth=50 * MBIT)
    datapath.apply(ServiceTable((svc,)))
    with iperf_servers(server, 8080):
        stream = iperf(client, 80, 6, interval=0.5)
        time.sleep(2.5)
        datapath.apply(ServiceTable((replace(svc, limits=Limits()),)))
        doc = result(stream)
    before, after = interval_bps(doc, 0.5, 2.0), interval_bps(doc, 3.5, 6.0)
    print(f"50 Mbit/s: {before / MBIT:.1f}; limit removed: {after / MBIT:.0f} Mbit/s")
    assert 42.5 * MBIT <= before <= 57.5 * MBIT, before
    assert after >= 10 * before, after


def test_pacing_holds_on_the_pod_routed_path(lab_factory, datapath):
    """Pod routing (bpf_redirect_peer past the bridge) carries a paced connection's packets:
    the pacing is done by the sender's TCP before any device, so the limit still holds."""
    from accel.datapath.podroute import PodRouter

    lab = lab_factory(2)
    client, server = lab.pods
    datapath.apply(ServiceTable((limited(server.ip, bandwidth=50 * MBIT),),
                                mesh_cidrs=(ipaddress.ip_network(lab.subnet),)))
    router = PodRouter(datapath.pin_dir, (client.host_ifname, server.host_ifname),
                       netns=lab.node)
    try:
        router.refresh()
        before = datapath.counters()["pod_redirects"]
        with iperf_servers(server, 8080):
            doc = result(iperf(client, 80, 4, interval=0.5))
        routed = datapath.counters()["pod_redirects"] - before
    finally:
        router.close()
    rate = interval_bps(doc, 1.0, 4.0)
    print(f"pod-routed, 50 Mbit/s limit: {rate / MBIT:.1f} Mbit/s, {routed} packets routed")
    assert 45 * MBIT <= rate <= 55 * MBIT, rate
    # The stream went pod to pod, not over the bridge: 4 s at 50 Mbit/s is 25 MB, at least
    # 380 segments of 64 KiB (GSO) one way.
    assert routed >= 380, routed


def test_limit_added_under_traffic_reaches_a_redirected_connection(lab, datapath):
    """A service without a limit: its connection takes the socket redirect (no TCP, no
    pacing). A bandwidth limit set under traffic moves it to TCP (the peer reads what was
    handed over first) and paces it within a second, unbroken, every byte delivered."""
    from accel.flows import reader

    reader.set_enabled(datapath.pin_dir, True)  # the agent's default: RTT samples per client
    client, server = lab.pods
    svc = Service("bulk", VIP, 80, endpoints=(Endpoint(server.ip, 8080),), fastpath="redirect")
    datapath.apply(ServiceTable((svc,)))
    with iperf_servers(server, 8080):
        stream = iperf(client, 80, 6, interval=0.5)
        time.sleep(2.5)
        moved = datapath.counters()["msg_qos_late"]
        redirected = datapath.counters()["msg_redirects"]
        assert redirected > 1000, redirected  # on the socket redirect until now
        datapath.apply(ServiceTable((replace(svc, limits=Limits(bandwidth=50 * MBIT)),)))
        doc = result(stream)
    before, after = interval_bps(doc, 0.5, 2.0), interval_bps(doc, 4.0, 6.0)
    print(f"unlimited: {before / MBIT:.0f} Mbit/s; 50 Mbit/s set: {after / MBIT:.1f}")
    assert before >= 10 * 50 * MBIT, before
    assert 42.5 * MBIT <= after <= 57.5 * MBIT, after
    # iperf3 verifies nothing of the content, but what it sent the server received.
    assert doc["end"]["sum_received"]["bytes"] >= doc["end"]["sum_sent"]["bytes"] * 0.99
    assert datapath.counters()["msg_qos_late"] > moved
    assert datapath.qos_counters()["bulk"]["paced"] >= 1
