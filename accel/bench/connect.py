"""`accel bench connect`: new-connection latency to a VIP as the number of services grows
(a benchmark, not a test).

One connection at a time (connect + 1-byte echo + close, timed in C: accel/bench/connlat.c)
from a lab pod to a VIP with N services configured, for each N:
  accel     connect-time balancing: the datapath's cgroup programs rewrite connect() to an
            endpoint by a hash lookup (and pair the sockets for the sk_msg fast path)
  iptables  kube-proxy's way, in the client pod's netns: OUTPUT -> KUBE-SERVICES with one
            rule per service -> KUBE-SVC-* (-m statistic over the endpoints) -> KUBE-SEP-*
            (DNAT); the measured VIP sits in the middle of the list
and beside them, once per round:
  direct         the endpoint itself, no accel programs, no NAT: the floor
  direct+accel   the endpoint itself from the accel cgroup: what pairing costs, without LB
Client and server are pinned to the same CPU (taskset) in every case. With N's rules and
table both in place, the four cases run in short alternating chunks (in rotating order),
so that load from elsewhere on a shared machine spreads over all of them alike.

Names: lab hp<hex> (netns hp<hex>-*), cgroups accel-hp-<hex>[-plain], pin dir
/sys/fs/bpf/hp-<hex>-c; all removed at the end, also after a failure.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accel.model import Endpoint, Service, ServiceTable

SOURCE = Path(__file__).with_name("connlat.c")
VIP0 = int(ipaddress.IPv4Address("10.96.0.0"))
FAKE_EP0 = int(ipaddress.IPv4Address("10.201.0.0"))  # endpoints of the other services
VIP_PORT = 80
SERVER_PORT = 18500  # the server pod's ports (its own netns): 18500.. for accel, 18550.. plain
PLAIN_OFFSET = 50


def build(workdir: str) -> str:
    exe = os.path.join(workdir, "connlat")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc): deploy/setup.sh installs it")
    subprocess.run([cc, "-O2", "-Wall", "-o", exe, str(SOURCE)], check=True,
                   capture_output=True, text=True)
    return exe


def vip(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(VIP0 + i)


def services(n: int, endpoints: int, measured: list[tuple[str, int]]) -> list[tuple[
        ipaddress.IPv4Address, list[tuple[str, int]]]]:
    """(VIP, endpoints) of n services; the one in the middle is the measured one."""
    out = []
    for i in range(n):
        if i == n // 2:
            out.append((vip(i), measured))
        else:
            out.append((vip(i), [(str(ipaddress.IPv4Address(FAKE_EP0 + i * endpoints + j)),
                                  8080) for j in range(endpoints)]))
    return out


def accel_table(svcs) -> ServiceTable:
    return ServiceTable(tuple(
        Service(f"svc-{i}", v, VIP_PORT, endpoints=tuple(Endpoint(a, p) for a, p in eps))
        for i, (v, eps) in enumerate(svcs)))


def iptables_rules(svcs) -> str:
    """The nat table kube-proxy's iptables mode would write for these services."""
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]",
             ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]"]
    rules = ['-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES']
    for i, (v, eps) in enumerate(svcs):
        svc = f"KUBE-SVC-{i:06d}"
        lines.append(f":{svc} - [0:0]")
        rules.append(f'-A KUBE-SERVICES -d {v}/32 -p tcp -m comment --comment "bench/svc-{i} '
                     f'cluster IP" -m tcp --dport {VIP_PORT} -j {svc}')
        for j, (addr, port) in enumerate(eps):
            sep = f"KUBE-SEP-{i:06d}-{j}"
            lines.append(f":{sep} - [0:0]")
            left = len(eps) - j
            stat = f"-m statistic --mode random --probability {1 / left:.10f} " \
                if left > 1 else ""
            rules.append(f"-A {svc} {stat}-j {sep}")
            rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {addr}:{port}")
    return "\n".join(lines + rules + ["COMMIT", ""])


def _percentiles(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)

    def us(p: float) -> float:
        return round(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] / 1e3, 1)

    return {"p50_us": us(50), "p90_us": us(90), "p99_us": us(99),
            "mean_us": round(statistics.fmean(s) / 1e3, 1), "min_us": us(0)}


class Bench:
    def __init__(self, sizes: list[int], endpoints: int, count: int, warmup: int,
                 rounds: int, chunks: int, cpu: int, say: Callable[[str], None]):
        self.sizes, self.endpoints, self.count, self.warmup = sizes, endpoints, count, warmup
        self.rounds, self.chunks, self.cpu, self.say = rounds, chunks, cpu, say
        self.tag = secrets.token_hex(3)
        # (case, services, round) -> connection times in ns
        self.samples: dict[tuple[str, int, int], list[int]] = {}
        self.errors: dict[tuple[str, int], int] = {}
        self.balanced = 0
        self.setup_s: dict[str, float] = {}
        self.procs: list[subprocess.Popen] = []

    # -- processes in a pod, a cgroup, on a CPU

    def _preexec(self, group: Path) -> Callable[[], None]:
        def join() -> None:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        return join

    def _cmd(self, pod, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", pod.name, "taskset", "-c", str(self.cpu), *argv]

    def start_server(self, pod, group: Path, ports: list[int]) -> None:
        p = subprocess.Popen(self._cmd(pod, self.exe, "server", *map(str, ports)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=self._preexec(group))
        self.procs.append(p)
        if p.stdout is None or p.stdout.readline().strip() != "ready":
            err = p.stderr.read() if p.stderr else ""
            raise RuntimeError(f"connlat server did not start: {err}")

    def measure(self, case: str, n: int, r: int, count: int, pod, group: Path, addr: str,
                port: int) -> None:
        out = subprocess.run(self._cmd(pod, self.exe, "client", addr, str(port),
                                       str(count), str(self.warmup)),
                             capture_output=True, text=True, preexec_fn=self._preexec(group),
                             timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"connlat client ({case}, {n}): {out.stderr.strip()}")
        lines = out.stdout.split()
        self.errors[(case, n)] = self.errors.get((case, n), 0) + int(lines[1])
        self.samples.setdefault((case, n, r), []).extend(int(x) for x in lines[2:])

    # -- the run

    def run(self) -> dict[str, Any]:
        from accel.datapath import cgroup as cg
        from accel.datapath.datapath import Capacities, Datapath
        from accel.lab import Lab

        root = cg.cgroup2_mount()
        accel_cg = root / f"accel-hp-{self.tag}"
        plain_cg = root / f"accel-hp-{self.tag}-plain"
        workdir = tempfile.mkdtemp(prefix=f"hp-{self.tag}-")
        lab = Lab(3, prefix=f"hp{self.tag}")
        dp = None
        try:
            self.exe = build(workdir)
            accel_cg.mkdir()
            plain_cg.mkdir()
            lab.up()
            client, ipt_client, server = lab.pods
            for pod in (client, ipt_client):
                # Many short connections: the whole port range and TIME_WAIT reuse.
                pod.run("sysctl -q -w net.ipv4.ip_local_port_range='1024 65535' "
                        "net.ipv4.tcp_tw_reuse=1")
            ports = [SERVER_PORT + j for j in range(self.endpoints)]
            plain_ports = [p + PLAIN_OFFSET for p in ports]
            self.start_server(server, accel_cg, ports)
            self.start_server(server, plain_cg, plain_ports)
            measured = [(str(server.ip), p) for p in ports]
            plain_measured = [(str(server.ip), p) for p in plain_ports]
            biggest = max(self.sizes)
            dp = Datapath(pin_dir=f"/sys/fs/bpf/hp-{self.tag}-c", cgroup_path=str(accel_cg),
                          capacities=Capacities(services=max(16384, biggest + 16),
                                                mesh_nets=max(131072,
                                                              2 * biggest * self.endpoints),
                                                slots=max(262144, 2 * biggest * self.endpoints)))
            dp.start()
            # The server is a mesh endpoint from the start, so direct+accel pairs in every round.
            dp.apply(accel_table(services(1, self.endpoints, measured)))
            self.say(f"cpu {self.cpu}; {self.rounds} rounds of {self.count} connections per "
                     f"case in {self.chunks} chunks (each after {self.warmup} untimed)")
            per_chunk = [self.count // self.chunks + (i < self.count % self.chunks)
                         for i in range(self.chunks)]
            for r in range(self.rounds):
                for n in self.sizes:
                    svcs = services(n, self.endpoints, plain_measured)
                    target = str(svcs[n // 2][0])
                    t0 = time.monotonic()
                    ipt_client.run(["iptables-restore"], input=iptables_rules(svcs))
                    self.setup_s[f"iptables-restore {n}"] = round(time.monotonic() - t0, 2)
                    t0 = time.monotonic()
                    dp.apply(accel_table(services(n, self.endpoints, measured)))
                    self.setup_s[f"accel apply {n}"] = round(time.monotonic() - t0, 2)
                    cases = [
                        ("direct", 0, client, plain_cg, str(server.ip), plain_ports[0]),
                        ("direct+accel", 0, client, accel_cg, str(server.ip), ports[0]),
                        ("iptables", n, ipt_client, plain_cg, target, VIP_PORT),
                        ("accel", n, client, accel_cg, target, VIP_PORT),
                    ]
                    before = dp.counters().get("connect_balanced", 0)
                    for i, count in enumerate(per_chunk):
                        for case in cases[i % 4:] + cases[:i % 4]:
                            if count:
                                self.measure(case[0], case[1], r, count, *case[2:])
                    self.balanced += dp.counters().get("connect_balanced", 0) - before
                    self.say(f"round {r + 1}/{self.rounds}, {n} services: " + ", ".join(
                        f"{c[0]} {_percentiles(self.samples[(c[0], c[1], r)])['p50_us']}"
                        for c in cases) + " us (p50)")
            return self.result()
        finally:
            for p in self.procs:
                p.kill()
                p.wait()
            if dp is not None:
                dp.close()
            lab.down()
            for group in (accel_cg, plain_cg):
                if group.exists():
                    group.rmdir()
            shutil.rmtree(workdir, ignore_errors=True)

    def result(self) -> dict[str, Any]:
        ipt = subprocess.run(["iptables", "--version"], capture_output=True, text=True)
        cases = []
        for case, n in sorted({(c, n) for c, n, _ in self.samples}):
            rounds = [self.samples[(case, n, r)] for r in range(self.rounds)
                      if (case, n, r) in self.samples]
            ns = [x for runs in rounds for x in runs]
            cases.append({"case": case, "services": n, "connections": len(ns),
                          "errors": self.errors[(case, n)], **_percentiles(ns),
                          "round_p50_us": [_percentiles(x)["p50_us"] for x in rounds]})
        order = {"direct": 0, "direct+accel": 1, "accel": 2, "iptables": 3}
        cases.sort(key=lambda c: (order[c["case"]], c["services"]))
        accel_runs = sum(len(v) for (c, _, _), v in self.samples.items() if c == "accel")
        invocations = self.rounds * len(self.sizes) * self.chunks  # accel client runs
        return {
            "env": {"kernel": platform.release(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "iptables": ipt.stdout.strip(),
                    "placement": f"client and server pinned to CPU {self.cpu} (taskset)",
                    "endpoints_per_service": self.endpoints, "rounds": self.rounds,
                    "connections_per_case_and_round": self.count, "chunks": self.chunks,
                    "warmup_per_chunk": self.warmup},
            "setup_s": self.setup_s,
            # Every timed accel connection (and its warmup) went through the LB program.
            "accel_balanced": self.balanced,
            "accel_connections": accel_runs + self.warmup * invocations,
            "cases": cases,
        }


def run(sizes: list[int], endpoints: int = 3, count: int = 2000, warmup: int = 20,
        rounds: int = 3, chunks: int = 10, cpu: int | None = None,
        say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    if not sizes or min(sizes) < 1 or endpoints < 1 or endpoints > 50 or count < 1 \
            or warmup < 0 or rounds < 1 or chunks < 1:
        raise ValueError("need --services N,... >= 1, 1 <= --endpoints <= 50, --count >= 1, "
                         "--warmup >= 0, --rounds >= 1, --chunks >= 1")
    if cpu is None:
        cpu = (os.cpu_count() or 1) - 1
    if cpu not in os.sched_getaffinity(0):
        raise ValueError(f"CPU {cpu} is not available to this process")
    return Bench(sorted(set(sizes)), endpoints, count, warmup, rounds, min(chunks, count), cpu,
                 say).run()
