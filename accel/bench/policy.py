"""What authorization costs and how fast it acts, on lab pods:

- connection rate (accel-crr, TCP_CRR style) through a VIP with no policy loaded and with
  1,000 policies (1,000 policed workloads, 100,000 rules; the server among them, the client
  allowed by a rule), alternating in one run, every process on one CPU; medians of repeats;
  and the run time per call of connect4 and of the pod-side program (kernel statistics);
- apply() -> enforced: a one-policy change on top of the 1,000, until the new table is
  live (the flip), and until established connections it denies are reset (the walk);
- apply() -> a held connection cut: a client's connection that the update denies, from
  apply() to the client's recv() failing.

    python -m accel.bench.policy [--seconds S] [--repeats N] [--cpu C] [--updates N]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import statistics
import time
from typing import Any

from accel.bench.modes import POD_SYSCTLS
from accel.bench.workloads import run_client, start_server, wait_listening
from accel.datapath import cgroup as cg
from accel.datapath.datapath import Datapath
from accel.datapath.policy import PodSide, PolicyMaps
from accel.kernel import attach, bpf
from accel.lab import Lab
from accel.model import Endpoint, Service, ServiceTable
from accel.policy.verdicts import Decision, Verdict, Verdicts

VIP = "10.96.7.7"
CLIENT, SERVER, OTHER = 1, 2, 3


def many(n: int, client: ipaddress.IPv4Address, server: ipaddress.IPv4Address,
         other: ipaddress.IPv4Address, rules_per_dst: int = 100) -> Verdicts:
    """n policies over n policed workloads (the server one of them), rules_per_dst rules
    each; the client allowed to the server by policy 1."""
    addrs: dict[Any, int] = {client: CLIENT, server: SERVER, other: OTHER}
    policed = {SERVER: Decision(Verdict.DENY)}
    rules = {(CLIENT, SERVER, 8080): Decision(Verdict.ALLOW, 1),
             (OTHER, SERVER, 8080): Decision(Verdict.ALLOW, 1)}
    base = 10
    for i in range(n - 1):
        ident = base + i
        addrs[ipaddress.ip_address(f"10.{100 + i // 60000}.{i // 250 % 240}.{i % 250 + 1}")] = ident
        policed[ident] = Decision(Verdict.DENY)
        for j in range(rules_per_dst):
            rules[(base + (i + j + 1) % (n - 1), ident, 8080)] = Decision(Verdict.ALLOW, 2 + i)
    names = tuple(f"bench/p{i}" for i in range(1, n + 1))
    return Verdicts(policies=names, addr_ident=addrs, policed=policed, rules=rules)


def run(seconds: float = 2.0, repeats: int = 5, cpu: int = 1, updates: int = 50,
        policies: int = 1000) -> dict[str, Any]:
    tag = f"pb{int(time.time()) % 100000}"
    group = cg.cgroup2_mount() / f"accel-bench-{tag}"
    pin = f"/sys/fs/bpf/accel-bench-{tag}"
    group.mkdir()
    lab = Lab(3, prefix=tag, cgroup=str(group))
    dp = pm = None
    procs = []
    try:
        lab.up()
        client, server, other = lab.pods
        for p in lab.pods:
            p.run(["sysctl", "-qw", *POD_SYSCTLS])
        dp = Datapath(pin_dir=pin, cgroup_path=str(group)).start()
        dp.apply(ServiceTable((Service("bench", VIP, 80,
                                       endpoints=(Endpoint(server.ip, 8080),)),)))
        pm = PolicyMaps(pin, dp.capacities, dp.defines())
        spaces = {f"/run/netns/{client.name}": CLIENT, f"/run/netns/{server.name}": SERVER,
                  f"/run/netns/{other.name}": OTHER}
        from pyroute2 import IPRoute

        with IPRoute(netns=server.name) as ipr:
            sides = [PodSide(f"/run/netns/{server.name}", ipr.link_lookup(ifname="eth0")[0])]
        procs.append(start_server("crr", server, "0.0.0.0", 8080, cpu))
        wait_listening(server, 8080, procs)
        loaded = many(policies, client.ip, server.ip, other.ip)
        t = time.monotonic()
        pm.apply(loaded, spaces, sides)
        first_apply_s = time.monotonic() - t
        rates: dict[str, list[float]] = {"none": [], "policies": []}
        # What the programs themselves cost, per run: the kernel's own run-time statistics
        # (steadier than a rate on a shared machine).
        progs = {"connect4": attach.Program(os.path.join(pin, "prog_accel_connect4")),
                 "policy_tc": pm.tc_prog}
        ns: dict[str, dict[str, list[float]]] = {p: {"none": [], "policies": []}
                                                 for p in progs}
        stats_fd = bpf.enable_stats()
        try:
            for _ in range(repeats):
                for case in ("none", "policies"):
                    pm.apply(Verdicts() if case == "none" else loaded, spaces, sides)
                    before = {p: bpf.prog_run_stats(g.fd) for p, g in progs.items()}
                    r = run_client("crr", client, VIP, 80, cpu, seconds)
                    rates[case].append(r["conn_per_s"])
                    for p, g in progs.items():
                        t1, n1 = bpf.prog_run_stats(g.fd)
                        t0, n0 = before[p]
                        ns[p][case].append((t1 - t0) / max(1, n1 - n0))
        finally:
            os.close(stats_fd)
        pm.apply(loaded, spaces, sides)
        enforced, cut = [], []
        for i in range(updates):
            # One policy changed: the client is let in on one more port.
            v = Verdicts(policies=loaded.policies, addr_ident=loaded.addr_ident,
                         policed=loaded.policed,
                         rules={**loaded.rules,
                                (CLIENT, SERVER, 9000 + i): Decision(Verdict.ALLOW, 1)})
            done = pm.apply(v, spaces, sides)
            enforced.append(done.enforced_s * 1000)
            cut.append(done.cut_s * 1000)
        held = []
        for _ in range(max(3, repeats)):
            pm.apply(loaded, spaces, sides)
            s = other.socket()
            s.settimeout(5)
            s.connect((str(server.ip), 8080))
            deny = Verdicts(policies=loaded.policies, addr_ident=loaded.addr_ident,
                            policed=loaded.policed,
                            rules={k: d for k, d in loaded.rules.items() if k[0] != OTHER})
            t = time.monotonic()
            pm.apply(deny, spaces, sides)
            try:
                s.recv(1)  # the crr server never sends first: only the reset ends this
            except OSError:
                pass
            held.append((time.monotonic() - t) * 1000)
            s.close()
        status = pm.status()
        none, pol = statistics.median(rates["none"]), statistics.median(rates["policies"])
        return {
            "cpu": cpu, "seconds": seconds, "repeats": repeats, "policies": policies,
            "rules": len(loaded.rules),
            "crr_conn_per_s": {"none": rates["none"], "policies": rates["policies"],
                               "median_none": none, "median_policies": pol,
                               "ratio": round(pol / none, 4) if none else None},
            "ns_per_run": {p: {c: round(statistics.median(v), 1) for c, v in per.items()}
                           for p, per in ns.items()},
            "first_apply_ms": round(first_apply_s * 1000, 1),
            "update_enforced_ms": _pcts(enforced),
            "update_walked_ms": _pcts(cut),
            "held_connection_cut_ms": _pcts(held),
            "maps": {k: vars(u) for k, u in status.maps.items()},
            "allowed_counted": status.policies["bench/p1"].allowed,
        }
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if pm is not None:
            pm.close()
        if dp is not None:
            dp.close()
        lab.down()
        group.rmdir()
        shutil.rmtree(pin, ignore_errors=True)


def _pcts(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"p50": round(statistics.median(s), 2),
            "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))], 2),
            "max": round(s[-1], 2), "n": len(s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu", type=int, default=1)
    p.add_argument("--updates", type=int, default=50)
    p.add_argument("--policies", type=int, default=1000)
    a = p.parse_args()
    print(json.dumps(run(a.seconds, a.repeats, a.cpu, a.updates, a.policies), indent=2))


if __name__ == "__main__":
    main()
