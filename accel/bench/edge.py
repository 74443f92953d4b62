"""`accel bench edge`: ns/packet of the edge XDP program by BPF_PROG_TEST_RUN.

Cases, all in one run beside a floor: pass_floor (an XDP program that only
returns XDP_PASS: the cost of the test harness itself), hit (a tracked flow to
a VIP: DNAT, MAC rewrite, checksums, redirect), miss (TCP to an address that is
no VIP), drop (a SYN from a denied source). The guard is armed as in
production (a deny list and a SYN budget), so hit and miss pay for it.

The kernel runs a program `repeat` times on one buffer in place, so a hit would
turn into a miss after the first rewrite. The hit case therefore uses two VIPs
that are each other's backend: every run is a hit on one of them, each on a
tracked flow. A redirect also takes one from the TTL (forwarding), so the hit
case runs HIT_REPEAT times per call from TTL 255 (never reaching the kernel's
share at TTL 1), in 20 times as many rounds.
"""

from __future__ import annotations

import os
import platform
import secrets
import statistics
import subprocess
import tempfile
import time

from accel.bench.modes import POD_SYSCTLS
from accel.datapath.edge import EdgeDatapath, NeighbourResolver, NextHop
from accel.kernel.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT, prog_test_run
from accel.model import Endpoint, Guard, Service, ServiceTable

VIP_A, VIP_B = "10.254.0.1", "10.254.0.2"
CLIENT, DENIED, NOT_A_VIP = "198.51.100.7", "203.0.113.9", "10.254.0.77"
MAC = bytes.fromhex("020000000001")
HIT_REPEAT = 250
PASS_SRC = "int pass_floor(struct xdp_md *ctx) { return XDP_PASS; }"


def _packet(src: str, dst: str, flags: str) -> bytes:
    from scapy.all import IP, TCP, Ether, raw

    return raw(
        Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
        / IP(src=src, dst=dst, ttl=255)
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
            n, r = (min(repeat, HIT_REPEAT), rounds * 20) if name == "hit" else (repeat, rounds)
            out.append({"case": name, **_measure(fd, pkt, want, n, r)})
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


# ---- lab traffic: the edge against iptables DNAT for the same VIP -----------------------
#
# The same outside client (its own netns, full checksums as from a wire), pods and VIP,
# balanced by the XDP edge and by iptables DNAT in the node namespace. Workloads and tools
# are the mesh bench's (accel/bench/workloads.py: accel-crr, sockperf, iperf3); every
# process pinned to one CPU; modes rotated within each repeat; medians over repeats.
# Edge modes: `tc-edge` is what the agent runs on a veth uplink (auto): the balancer at tc
# ingress after GRO, into the pods as runtimes leave them (no GRO, no XDP on their end)
# with bpf_redirect_peer. The XDP modes force native XDP on that veth: `peer`, the same
# pods (XDP rewrites, tc ingress moves the packet in: what the agent does at XDP), `route`
# with that path switched off (XDP rewrites, the kernel forwards), `redirect` the pods with
# GRO switched on and the peer path off (XDP redirects into their veths). The edge
# programs' own run time is counted (BPF_ENABLE_STATS) per mode in a rotation of its own.

LAB_VIP = "10.96.78.1"
LAB_EDGE_NET = "10.202.0"
# mode -> (hook, pods' GRO, peer path)
LAB_EDGE_MODES = {
    "tc-edge": ("tc", False, True),
    "xdp-edge peer": ("native", False, True),
    "xdp-edge route": ("native", False, False),
    "xdp-edge redirect": ("native", True, False),
}
LAB_MODES = (*LAB_EDGE_MODES, "iptables-dnat")
CRR_PORT, RR_PORT, STREAM_PORT = 8080, 8081, 8082


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _lab_up(prefix: str, edge_gro: bool = False):
    """Lab pods on a bridge (accel.lab) plus an ext netns on a veth: the edge interface.
    Returns the lab, the client (a Pod for the ext netns) and the edge interface."""
    import ipaddress

    from accel.lab import Lab, Outside, Pod

    lab = Lab(2, prefix=prefix).up()
    outside = Outside(f"{prefix}-ext", f"{prefix}e", LAB_EDGE_NET, node=lab.node)
    client = Pod(outside.name, -1, ipaddress.IPv4Address(outside.ip),
                 ipaddress.IPv6Address("::"), "")
    try:
        outside.up()
        # GRO on the edge interface, the same for every mode: off (a veth's default) each
        # packet meets the path alone, as at XDP; on (a NIC's default) the path handles
        # 64 KB packets and the stream is bound by its two ends.
        _sh("ip", "netns", "exec", lab.node, "ethtool", "-K", outside.iface, "gro",
            "on" if edge_gro else "off")
        # The mesh bench's client settings: thousands of connections a second must not
        # run out of ports held in TIME_WAIT.
        _sh("ip", "netns", "exec", outside.name, "sysctl", "-qw", *POD_SYSCTLS)
    except BaseException:
        lab.down()  # the outside client's namespace (<prefix>-ext) with it
        raise
    return lab, client, outside.iface


def _servers(lab, cpu: int) -> list[subprocess.Popen]:
    from accel.bench import workloads as wl

    procs = [wl.start_server("crr", pod, "0.0.0.0", CRR_PORT, cpu) for pod in lab.pods]
    procs.append(wl.start_server("rr", lab.pods[0], "0.0.0.0", RR_PORT, cpu))
    procs.append(wl.start_server("stream", lab.pods[0], "0.0.0.0", STREAM_PORT, cpu))
    for pod in lab.pods:
        wl.wait_listening(pod, CRR_PORT, procs)
    wl.wait_listening(lab.pods[0], RR_PORT, procs)
    wl.wait_listening(lab.pods[0], STREAM_PORT, procs)
    return procs


def _lab_table(lab) -> ServiceTable:
    p0, p1 = lab.pods[0].ip, lab.pods[1].ip
    return ServiceTable.of([
        # Connection rate over both pods; the single-connection tools on pod 0.
        Service("lab-crr", LAB_VIP, 80, "TCP",
                (Endpoint(p0, CRR_PORT), Endpoint(p1, CRR_PORT)), edge=True),
        Service("lab-rr", LAB_VIP, 81, "TCP", (Endpoint(p0, RR_PORT),), edge=True),
        Service("lab-stream", LAB_VIP, 82, "TCP", (Endpoint(p0, STREAM_PORT),), edge=True),
    ])


def _iptables_dnat(node: str, lab, add: bool) -> None:
    p0, p1 = str(lab.pods[0].ip), str(lab.pods[1].ip)
    op = "-A" if add else "-D"
    rules = [
        ["-p", "tcp", "--dport", "80", "-m", "statistic", "--mode", "random",
         "--probability", "0.5", "-j", "DNAT", "--to-destination", f"{p0}:{CRR_PORT}"],
        ["-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", f"{p1}:{CRR_PORT}"],
        ["-p", "tcp", "--dport", "81", "-j", "DNAT", "--to-destination", f"{p0}:{RR_PORT}"],
        ["-p", "tcp", "--dport", "82", "-j", "DNAT", "--to-destination", f"{p0}:{STREAM_PORT}"],
    ]
    for r in rules:
        _sh("ip", "netns", "exec", node, "iptables", "-t", "nat", op, "PREROUTING",
            "-d", LAB_VIP, *r, check=add)


def _gro(lab, on: bool) -> None:
    for pod in lab.pods:
        pod.run(f"ethtool -K eth0 gro {'on' if on else 'off'}")


def _workloads(client, seconds: float, cpu: int) -> dict:
    from accel.bench import workloads as wl

    crr = wl.run_client("crr", client, LAB_VIP, 80, cpu, seconds)
    rr = wl.run_client("rr", client, LAB_VIP, 81, cpu, seconds)
    stream = wl.run_client("stream", client, LAB_VIP, 82, cpu, seconds)
    return {"crr_per_s": crr["conn_per_s"], "conn_p50_us": crr.get("conn_p50_us"),
            "rr_p50_us": rr.get("p50_us"), "stream_gbit_s": stream.get("gbps")}


def run_lab(seconds: float = 2.0, maglev_size: int = 65537, repeats: int = 5,
            cpu: int | None = None, edge_gro: bool = False) -> dict:
    """The edge (tc, and XDP's peer, route and redirect paths) against iptables DNAT:
    medians of `repeats` rotations, each mode's ratio to iptables DNAT beside it.
    Then one more rotation of the edge modes with BPF_ENABLE_STATS on, for the programs'
    run time per packet: not in the medians, since the accounting (two clock reads per
    program run) would be charged to the edge alone."""
    from accel.kernel import bpf
    from accel.lab import in_netns

    cpu = (os.cpu_count() or 1) - 1 if cpu is None else cpu
    prefix = "be" + secrets.token_hex(3)
    lab, client, iface = _lab_up(prefix, edge_gro)
    runs: dict[str, list[dict]] = {m: [] for m in LAB_MODES}
    prog_ns: dict[str, list[float]] = {}
    procs: list[subprocess.Popen] = []
    resolver = NeighbourResolver()
    dp = EdgeDatapath(iface, f"/sys/fs/bpf/{prefix}-edge", maglev_size, resolver=resolver)

    def edge_mode(mode: str, timed: bool) -> None:
        hook, gro, resolver.peer_path = LAB_EDGE_MODES[mode]
        _gro(lab, gro)
        in_netns(lab.node, lambda: dp.attach(hook))
        try:
            in_netns(lab.node, lambda: dp.apply(_lab_table(lab)))
            in_netns(lab.node, dp.refresh)
            if not timed:
                runs[mode].append(_workloads(client, seconds, cpu))
                return
            progs = [(p, dp.prog_fd(p)) for p in ("edge_xdp", "edge_tc", "edge_ingress",
                                                  "edge_tc_balance", "edge_reply")]
            before = {p: bpf.prog_run_stats(fd) for p, fd in progs}
            _workloads(client, seconds, cpu)
            for p, fd in progs:
                t, n = bpf.prog_run_stats(fd)
                t0, n0 = before[p]
                if n > n0:
                    prog_ns.setdefault(f"{mode} {p}", []).append((t - t0) / (n - n0))
        finally:
            in_netns(lab.node, dp.detach)

    try:
        procs = _servers(lab, cpu)
        in_netns(lab.node, dp.load)
        for rep in range(repeats):
            order = LAB_MODES[rep % len(LAB_MODES):] + LAB_MODES[:rep % len(LAB_MODES)]
            for mode in order:
                if mode != "iptables-dnat":
                    edge_mode(mode, timed=False)
                    continue
                _gro(lab, False)
                _iptables_dnat(lab.node, lab, add=True)
                try:
                    runs[mode].append(_workloads(client, seconds, cpu))
                finally:
                    _iptables_dnat(lab.node, lab, add=False)
        stats_fd = bpf.enable_stats()
        try:
            for mode in LAB_EDGE_MODES:
                edge_mode(mode, timed=True)
        finally:
            os.close(stats_fd)
    finally:
        in_netns(lab.node, dp.close)
        for p in procs:
            p.kill()
            p.wait()
        lab.down()
    out = []
    for mode, rs in runs.items():
        row = {"mode": mode}
        for k in ("crr_per_s", "conn_p50_us", "rr_p50_us", "stream_gbit_s"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            row[k] = round(statistics.median(vals), 2) if vals else None
        out.append(row)
    base = out[-1]  # iptables-dnat
    for row in out:
        for k, name in (("crr_per_s", "conn_x"), ("stream_gbit_s", "stream_x")):
            row[name] = round(row[k] / base[k], 2) if row[k] and base[k] else None
    return {"modes": out, "raw": runs, "cpu": cpu, "repeats": repeats, "seconds": seconds,
            "edge_iface_gro": edge_gro,
            "edge_prog_ns_per_run": {k: round(statistics.median(v), 1)
                                     for k, v in prog_ns.items()}}
