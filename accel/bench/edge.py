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

import json
import os
import platform
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from accel.datapath.edge import EdgeDatapath, NextHop
from accel.kernel.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT, prog_test_run
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


# ---- lab traffic: the edge against iptables DNAT for the same VIP -----------------------

LAB_VIP = "10.96.78.1"
LAB_EDGE_NET = "10.202.0"


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _lab_up(prefix: str):
    """Lab pods on a bridge (accel.lab) plus an ext netns on a veth: the edge interface."""
    from pyroute2 import IPRoute, netns

    from accel.lab import Lab

    lab = Lab(2, prefix=prefix).up()
    ext, iface = f"{prefix}-ext", f"{prefix}e"
    try:
        netns.create(ext)
        with IPRoute(netns=lab.node) as ipr:
            ipr.link("add", ifname=iface, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ext})
            idx = ipr.link_lookup(ifname=iface)[0]
            ipr.addr("add", index=idx, address=f"{LAB_EDGE_NET}.1", prefixlen=24)
            ipr.link("set", index=idx, state="up")
        with IPRoute(netns=ext) as pr:
            pr.link("set", index=pr.link_lookup(ifname="lo")[0], state="up")
            eth = pr.link_lookup(ifname="eth0")[0]
            pr.addr("add", index=eth, address=f"{LAB_EDGE_NET}.2", prefixlen=24)
            pr.link("set", index=eth, state="up")
            pr.route("add", dst="default", gateway=f"{LAB_EDGE_NET}.1")
        _sh("ip", "netns", "exec", lab.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Frames from a wire carry full checksums; a veth sender would leave them partial.
        _sh("ip", "netns", "exec", ext, "ethtool", "-K", "eth0", "tx", "off")
        for pod in lab.pods:
            pod.run("ethtool -K eth0 gro on")  # NAPI on the pod end: takes XDP redirects
    except BaseException:
        _lab_down(lab, ext)
        raise
    return lab, ext, iface


def _lab_down(lab, ext: str) -> None:
    from pyroute2 import netns

    try:
        netns.remove(ext)
    except OSError:
        pass
    lab.down()


def _crr(ext: str, seconds: float) -> float:
    """Connections per second: connect, one request line, one reply line, close."""
    from accel.lab import in_netns

    def loop() -> float:
        n, end = 0, time.monotonic() + seconds
        t0 = time.monotonic()
        while time.monotonic() < end:
            with socket.create_connection((LAB_VIP, 80), timeout=2) as s:
                s.sendall(b"x\n")
                if not s.recv(64):
                    raise RuntimeError("connection closed without a reply")
            n += 1
        return n / (time.monotonic() - t0)

    return in_netns(ext, loop)


def _echo_servers(lab) -> list[subprocess.Popen]:
    code = (
        "import socket,threading\n"
        "s=socket.create_server(('0.0.0.0',8080),backlog=512)\n"
        "def h(c):\n"
        "    with c:\n"
        "        d=c.recv(64)\n"
        "        c.sendall(d)\n"
        "while True:\n"
        "    c,_=s.accept(); threading.Thread(target=h,args=(c,),daemon=True).start()\n"
    )
    return [pod.popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL) for pod in lab.pods]


def _lab_mode(lab, ext: str, seconds: float) -> dict:
    out: dict = {}
    out["crr_per_s"] = round(_crr(ext, seconds), 1)
    pod0 = lab.pods[0]
    srv = pod0.popen(["sockperf", "server", "--tcp", "-p", "8081"], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        r = _sh("ip", "netns", "exec", ext, "sockperf", "ping-pong", "--tcp", "-i", LAB_VIP,
                "-p", "81", "-t", str(max(1, int(seconds))), check=False)
        m = re.search(r"avg-latency=([\d.]+)", r.stdout)
        out["rr_latency_us"] = float(m.group(1)) if m else None
    finally:
        srv.kill()
        srv.wait()
    srv = pod0.popen(["iperf3", "-s", "-p", "8082", "-1"], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        r = _sh("ip", "netns", "exec", ext, "iperf3", "-c", LAB_VIP, "-p", "82", "-J", "-t",
                str(max(1, int(seconds))), check=False)
        try:
            bps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
            out["stream_gbit_s"] = round(bps / 1e9, 3)
        except (ValueError, KeyError):
            out["stream_gbit_s"] = None
    finally:
        srv.kill()
        srv.wait()
    return out


def _lab_table(lab) -> ServiceTable:
    p0, p1 = lab.pods[0].ip, lab.pods[1].ip
    return ServiceTable.of([
        # Connection rate over both pods; the single-connection tools on pod 0.
        Service("lab-crr", LAB_VIP, 80, "TCP", (Endpoint(p0, 8080), Endpoint(p1, 8080)),
                edge=True),
        Service("lab-rr", LAB_VIP, 81, "TCP", (Endpoint(p0, 8081),), edge=True),
        Service("lab-stream", LAB_VIP, 82, "TCP", (Endpoint(p0, 8082),), edge=True),
    ])


def _iptables_dnat(node: str, lab, add: bool) -> None:
    p0, p1 = str(lab.pods[0].ip), str(lab.pods[1].ip)
    op = "-A" if add else "-D"
    rules = [
        ["-p", "tcp", "--dport", "80", "-m", "statistic", "--mode", "random",
         "--probability", "0.5", "-j", "DNAT", "--to-destination", f"{p0}:8080"],
        ["-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", f"{p1}:8080"],
        ["-p", "tcp", "--dport", "81", "-j", "DNAT", "--to-destination", f"{p0}:8081"],
        ["-p", "tcp", "--dport", "82", "-j", "DNAT", "--to-destination", f"{p0}:8082"],
    ]
    for r in rules:
        _sh("ip", "netns", "exec", node, "iptables", "-t", "nat", op, "PREROUTING",
            "-d", LAB_VIP, *r, check=add)


def run_lab(seconds: float = 2.0, maglev_size: int = 65537) -> list[dict]:
    """The same client, pods and VIP, balanced by the XDP edge and by iptables DNAT."""
    from accel.lab import in_netns

    prefix = "be" + secrets.token_hex(3)
    lab, ext, iface = _lab_up(prefix)
    servers = _echo_servers(lab)
    results = []
    try:
        time.sleep(0.5)
        dp = EdgeDatapath(iface, f"/sys/fs/bpf/{prefix}-edge", maglev_size)
        try:
            mode = in_netns(lab.node, dp.attach)
            in_netns(lab.node, lambda: dp.apply(_lab_table(lab)))
            results.append({"mode": f"xdp-edge ({mode})", **_lab_mode(lab, ext, seconds)})
        finally:
            in_netns(lab.node, dp.close)
        _iptables_dnat(lab.node, lab, add=True)
        try:
            results.append({"mode": "iptables-dnat", **_lab_mode(lab, ext, seconds)})
        finally:
            _iptables_dnat(lab.node, lab, add=False)
    finally:
        for p in servers:
            p.kill()
            p.wait()
        _lab_down(lab, ext)
    return results
