"""Compiled Verdicts (accel.policy.compile via the workload API) against the direct
evaluation of Istio's rules (tests/policy_reference.py) for every (source address,
destination address, port): the fixture stream, then random policies (seeded)."""

from __future__ import annotations

import ipaddress
import random
import time

import pytest

from accel.policy.verdicts import Verdicts
from accel.xds.gen.istio import security_pb2 as sec
from accel.xds.gen.istio import workload_pb2 as wl
from accel.xds.workload.decode import AddressProcessor, AuthorizationProcessor
from accel.xds.workload.kinds import ADDRESS, AUTHORIZATION, resource_name
from accel.xds.workload.state import WorkloadState
from accel.xds.workload.to_verdicts import to_verdicts
from tests import policy_reference as ref
from tests import workload_resources as r


def held(addresses: list[wl.Address], policies: list[sec.Authorization]) -> WorkloadState:
    """The resources as a client holds them after one response of each type."""
    a = AddressProcessor().decode_all({resource_name(x): x.SerializeToString()
                                       for x in addresses})
    p = AuthorizationProcessor().decode_all({resource_name(x): x.SerializeToString()
                                             for x in policies})
    return WorkloadState().apply(AUTHORIZATION, p).apply(ADDRESS, a)


def probes(workloads: list[wl.Workload], policies: list[sec.Authorization]):
    """Source addresses: every workload's, and for every prefix a policy names its first,
    last and a middle address, and one outside all of them; ports: every named one and
    two others."""
    ips = {ref._ip(a) for w in workloads for a in w.addresses}
    ports = {1, 65535}
    for p in policies:
        for g in p.groups:
            for rl in g.rules:
                for m in rl.matches:
                    ports |= set(m.destination_ports) | set(m.not_destination_ports)
                    for a in (*m.source_ips, *m.not_source_ips, *m.destination_ips,
                              *m.not_destination_ips):
                        net = ipaddress.ip_network((ref._ip(a.address), a.length), strict=False)
                        ips |= {net.network_address, net.broadcast_address,
                                net.network_address + net.num_addresses // 2}
    ips |= {ipaddress.ip_address("203.0.113.9"), ipaddress.ip_address("2001:db8::9")}
    return sorted(ips, key=lambda a: (a.version, a)), sorted(ports)


def compare(workloads: list[wl.Workload], policies: list[sec.Authorization], node: str,
            verdicts: Verdicts) -> int:
    srcs, ports = probes(workloads, policies)
    dsts = sorted({ref._ip(a) for w in workloads for a in w.addresses},
                  key=lambda a: (a.version, a))
    n = 0
    for dst in dsts:
        for src in srcs:
            for port in ports:
                want = ref.decide(workloads, policies, node, src, dst, port)
                d = verdicts.decide(src, dst, port)
                got = None if d is None else (
                    d.verdict.name, verdicts.policies[d.policy - 1] if d.policy else None)
                assert got == want, f"{src} -> {dst}:{port}: compiled {got}, Istio's {want}"
                n += 1
    return n


def test_fixture_stream_matches_istio_semantics():
    addrs, pols = r.fixture_addresses(), r.fixture_authorizations()
    compiled = to_verdicts(held(addrs, pols), r.NODE)
    workloads = [a.workload for a in addrs if a.HasField("workload")]
    assert compare(workloads, pols, r.NODE, compiled.verdicts) >= 900


def test_fixture_spot_checks():
    """What the fixture's policies say, in words, checked on the compiled table."""
    addrs, pols = r.fixture_addresses(), r.fixture_authorizations()
    v = to_verdicts(held(addrs, pols), r.NODE).verdicts
    ip = ipaddress.ip_address
    web1, client1, client2 = ip("10.0.1.10"), ip("10.0.1.20"), ip("10.0.1.21")
    pg1, admin, web2 = ip("10.0.2.10"), ip("10.0.2.30"), ip("10.0.1.11")

    def said(src, dst, port):
        d = v.decide(src, dst, port)
        return None if d is None else (d.verdict.name,
                                       v.policies[d.policy - 1] if d.policy else None)

    assert said(client1, pg1, 5432) == ("ALLOW", "db/pg-only-shop")  # from namespace shop
    assert said(client1, pg1, 5433) == ("DENY", None)  # not the allowed port
    assert said(admin, pg1, 5432) == ("ALLOW", "db/pg-only-shop")  # the admin account
    assert said(client1, pg1, 22) == ("DENY", "db/no-ssh")
    assert said(ip("192.168.3.4"), pg1, 5432) == ("DENY", "istio-system/deny-lab")
    assert said(ip("203.0.113.9"), pg1, 5432) == ("DENY", None)  # no identity: no namespace
    assert said(client2, web1, 8080) == ("DENY", None)  # sa default: no principal matches
    assert said(client1, web1, 8080) == ("ALLOW", "shop/web-allow-db")  # suffix /sa/client
    assert said(admin, web1, 9090) == ("DENY", None)  # namespace db, but not port 9090
    assert said(admin, web1, 8080)[0] == "DRY_RUN_DENY"  # audit-admin would deny
    assert said(client1, web2, 8080) is None  # web-2 runs on n2: not policed here
    assert said(client1, ip("fd00::1:10"), 8080) == ("ALLOW", "shop/v6-only")


# -- random policies

NAMESPACES = ["shop", "db", "ops", ""]
ACCOUNTS = ["default", "web", "client", "postgres", "admin"]
NETS = ["10.0.0.0/8", "10.0.1.0/24", "10.0.1.0/25", "10.0.1.10/32", "10.0.2.0/24",
        "192.168.0.0/16", "fd00::/16", "fd00::1:10/128", "0.0.0.0/0"]
PORTS = [80, 8080, 5432, 22, 443]


def random_world(rng: random.Random) -> tuple[list[wl.Workload], list[sec.Authorization]]:
    workloads = []
    for i in range(rng.randint(4, 10)):
        ns = rng.choice(NAMESPACES[:3])
        addrs = [f"10.0.{rng.randint(1, 2)}.{rng.randint(1, 20)}"]
        if rng.random() < 0.3:
            addrs.append(f"fd00::1:{rng.randint(1, 20):x}")
        w = r.workload(ns, f"w{i}", addrs, rng.choice(["n1", "n2"]),
                       sa=rng.choice(ACCOUNTS + [""])).workload
        if rng.random() < 0.1:
            w.network_mode = wl.HOST_NETWORK
        workloads.append(w)
    policies = []
    for i in range(rng.randint(1, 8)):
        ns = rng.choice(NAMESPACES[:3])
        groups = []
        for _ in range(rng.choice([0, 1, 1, 2])):
            rules = []
            for _ in range(rng.choice([0, 1, 1, 2])):
                rules.append([random_match(rng) for _ in range(rng.choice([0, 1, 1, 2]))])
            groups.append(rules)
        pol = r.authz(ns, f"p{i}", rng.choice([sec.GLOBAL, sec.NAMESPACE, sec.WORKLOAD_SELECTOR]),
                      rng.choice([sec.ALLOW, sec.DENY]), groups, dry_run=rng.random() < 0.2)
        policies.append(pol)
        for w in workloads:
            if pol.scope == sec.WORKLOAD_SELECTOR and rng.random() < 0.5:
                w.authorization_policies.append(f"{ns}/p{i}")
    return workloads, policies


def random_match(rng: random.Random) -> sec.Match:
    m = sec.Match()
    strings = [r.exact, r.prefix, r.suffix]
    for _ in range(rng.randint(0, 3)):
        f = rng.choice(["namespaces", "not_namespaces", "principals", "not_principals",
                        "service_accounts", "not_service_accounts", "source_ips",
                        "not_source_ips", "destination_ips", "not_destination_ips",
                        "destination_ports", "not_destination_ports"])
        field = getattr(m, f)
        if f.endswith("namespaces"):
            field.append(r.presence() if rng.random() < 0.1 else
                         rng.choice(strings)(rng.choice(NAMESPACES[:3])[:rng.randint(1, 4)]))
        elif f.endswith("principals"):
            p = f"cluster.local/ns/{rng.choice(NAMESPACES[:3])}/sa/{rng.choice(ACCOUNTS)}"
            cut = rng.randint(1, len(p))
            field.append(rng.choice([r.exact(p), r.prefix(p[:cut]), r.suffix(p[-cut:]),
                                     r.presence()]))
        elif f.endswith("accounts"):
            field.append(sec.ServiceAccountMatch(namespace=rng.choice(NAMESPACES[:3]),
                                                 service_account=rng.choice(ACCOUNTS)))
        elif f.endswith("ips"):
            field.append(r.cidr(rng.choice(NETS)))
        else:
            field.append(rng.choice(PORTS))
    return m


@pytest.mark.parametrize("seed", range(60))
def test_random_policies_match_istio_semantics(seed):
    rng = random.Random(seed)
    workloads, policies = random_world(rng)
    addrs = [wl.Address(workload=w) for w in workloads]
    for node in ("n1", "n2"):
        compiled = to_verdicts(held(addrs, policies), node)
        compare(workloads, policies, node, compiled.verdicts)


def big_world(n_workloads: int, n_policies: int, seed: int = 7):
    """A mesh at scale: 20 namespaces, two nodes, policies mostly selecting workloads (as
    real meshes write them), some per namespace, a few mesh-wide."""
    rng = random.Random(seed)
    nss = [f"ns{i}" for i in range(20)]
    addrs, pols = [], []
    for i in range(n_workloads):
        addrs.append(r.workload(rng.choice(nss), f"w{i}", [f"10.{i // 250}.{i % 250}.{1 + i % 7}"],
                                rng.choice(["n1", "n2"]), sa=rng.choice(ACCOUNTS)))
    for i in range(n_policies):
        scope = rng.choices([sec.GLOBAL, sec.NAMESPACE, sec.WORKLOAD_SELECTOR], [1, 9, 90])[0]
        ns = rng.choice(nss)
        pol = r.authz(ns, f"p{i}", scope, rng.choice([sec.ALLOW, sec.DENY]),
                      [[[random_match(rng)], [random_match(rng)]]], dry_run=rng.random() < 0.05)
        pols.append(pol)
        if scope == sec.WORKLOAD_SELECTOR:
            for a in rng.sample(addrs, 3):
                a.workload.authorization_policies.append(f"{ns}/p{i}")
    return addrs, pols


def test_compile_scale():
    """1,000 policies over 300 workloads compile in well under a second (the figure is
    printed; the bound leaves room for a loaded machine)."""
    addrs, pols = big_world(300, 1000)
    state = held(addrs, pols)
    t = time.perf_counter()
    compiled = to_verdicts(state, "n1")
    took = time.perf_counter() - t
    print(f"compile: 1000 policies x 300 workloads: {took * 1000:.0f} ms, "
          f"{len(compiled.verdicts.rules)} rules, {len(compiled.verdicts.policed)} policed")
    assert compiled.verdicts.policed
    assert took < 2.0
