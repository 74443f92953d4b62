"""`accel bench edge`: ns/packet of the edge XDP program by BPF_PROG_TEST_RUN.

Cases, all in one run beside a floor: pass_floor (an XDP program that only
returns XDP_PASS: the cost of the test harness itself), hit (a tracked flow to
a VIP: DNAT, MAC rewrite, checksums, redirect), miss (TCP to an address that is
no VIP), drop (a SYN from a denied source). The guard is armed as in
production (a deny list and a SYN budget), so hit and miss pay for it.

The kernel runs a program `repeat` times on one buffer in place, so a hit would
turn into a miss after the first rewrite. The hit case therefore uses two VIPs
that are each other's backend: every run is a hit on one of them, each on a
tracked flow.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time

from accel.datapath.edge import EdgeDatapath, NextHop
from accel.datapath.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT, prog_test_run
from accel.model import Endpoint, Guard, Service, ServiceTable

VIP_A, VIP_B = "10.254.0.1", "10.254.0.2"
CLIENT, DENIED, NOT_A_VIP = "198.51.100.7", "203.0.113.9", "10.254.0.77"
MAC = bytes.fromhex("020000000001")
PASS_SRC = "int pass_floor(struct xdp_md *ctx) { return XDP_PASS; }"


def _packet(src: str, dst: str, flags: str) -> bytes:
    from scapy.all import IP, TCP, Ether, raw

    return raw(
        Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
        / IP(src=src, dst=dst)
        / TCP(sport=40000, dport=80, flags=flags, seq=1, ack=1 if "A" in flags else 0)
    )


def _loopback(addrs):
    # Redirect to lo: BPF_PROG_TEST_RUN reports the verdict without sending.
    return {a: NextHop(1, MAC, MAC) for a in addrs}


def _env(repeat: int, rounds: int) -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "repeat": repeat,
        "rounds": rounds,
        "method": "BPF_PROG_TEST_RUN, median of rounds",
        "jit": open("/proc/sys/net/core/bpf_jit_enable").read().strip()
        if os.path.exists("/proc/sys/net/core/bpf_jit_enable")
        else "?",
    }


def _measure(fd: int, packet: bytes, want: int, repeat: int, rounds: int) -> dict:
    prog_test_run(fd, packet, repeat=16)  # warm: flow entries, caches
    samples = []
    for _ in range(rounds):
        r = prog_test_run(fd, packet, repeat=repeat)
        if r.retval != want:
            raise RuntimeError(f"benchmark case returned {r.action}, expected verdict {want}")
        samples.append(r.ns_per_run)
    return {
        "ns_per_packet": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
    }


def run(repeat: int = 1_000_000, rounds: int = 7, maglev_size: int = 65537) -> dict:
    from bcc import BPF

    floor = BPF(text=PASS_SRC)
    floor_fn = floor.load_func(b"pass_floor", BPF.XDP)
    pin = tempfile.mkdtemp(prefix="accel-bench-edge-", dir="/sys/fs/bpf")
    os.rmdir(pin)  # the datapath makes (and so removes) its own pin dir
    dp = EdgeDatapath(None, pin, maglev_size, resolver=_loopback)
    try:
        t0 = time.perf_counter()
        dp.load()
        load_s = time.perf_counter() - t0
        table = ServiceTable.of(
            [
                Service("bench-a", VIP_A, 80, "TCP", (Endpoint(VIP_B, 80),), edge=True),
                Service("bench-b", VIP_B, 80, "TCP", (Endpoint(VIP_A, 80),), edge=True),
            ],
            guard=Guard(deny=(), syn_rate=1000, syn_burst=2000),
        )
        from accel.model import parse_network

        t0 = time.perf_counter()
        dp.apply(table)
        apply_s = time.perf_counter() - t0
        dp.set_guard(Guard(deny=(parse_network("203.0.113.0/24", "deny"),), syn_rate=1000,
                           syn_burst=2000))
        cases = [
            ("pass_floor", floor_fn.fd, _packet(CLIENT, NOT_A_VIP, "A"), XDP_PASS),
            ("hit", dp.xdp_fd, _packet(CLIENT, VIP_A, "A"), XDP_REDIRECT),
            ("miss", dp.xdp_fd, _packet(CLIENT, NOT_A_VIP, "A"), XDP_PASS),
            ("drop", dp.xdp_fd, _packet(DENIED, VIP_A, "S"), XDP_DROP),
        ]
        out = []
        for name, fd, pkt, want in cases:
            out.append({"case": name, **_measure(fd, pkt, want, repeat, rounds)})
        floor_ns = out[0]["ns_per_packet"]
        for c in out:
            c["over_floor"] = c["ns_per_packet"] - floor_ns
        env = _env(repeat, rounds)
        env.update(maglev_size=maglev_size, load_seconds=round(load_s, 3),
                   apply_seconds=round(apply_s, 3))
        return {"env": env, "cases": out}
    finally:
        dp.close()
        floor.cleanup()
