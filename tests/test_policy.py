"""L4 authorization enforced by the kernel (lib/policy.h): lab pods, real connections,
Verdicts written by hand (the compiler is another part's), assertions on errnos, timings,
bytes and every counter."""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import socket
import struct
import subprocess
import sys
import time

import pytest
from pyroute2 import IPRoute

from accel.datapath import cgroup as cg
from accel.datapath.policy import PodSide, PolicyCounters, PolicyMaps
from accel.kernel import testrun
from accel.model import Endpoint, Service, ServiceTable
from accel.policy.verdicts import Decision, Verdict, Verdicts
from tests.traffic import EchoServer, connect, roundtrip

pytestmark = pytest.mark.kernel

VIP, VIP6 = "10.96.0.20", "fd00:96::20"
ALLOW, DENY, DRY = Verdict.ALLOW, Verdict.DENY, Verdict.DRY_RUN_DENY
A, B, S = 1, 2, 3  # identities: two clients and the server


@pytest.fixture
def policy(datapath):
    pm = PolicyMaps(datapath.pin_dir, datapath.capacities, datapath.defines())
    try:
        yield pm
    finally:
        pm.close()


def netns(pod) -> str:
    return f"/run/netns/{pod.name}"


def side(pod) -> PodSide:
    with IPRoute(netns=pod.name) as ipr:
        return PodSide(netns(pod), ipr.link_lookup(ifname="eth0")[0])


def table(server, fastpath="route") -> ServiceTable:
    return ServiceTable((
        Service("web", VIP, 80, endpoints=(Endpoint(server.ip, 8080),), fastpath=fastpath),
        Service("web6", VIP6, 80, endpoints=(Endpoint(server.ip6, 8080),), fastpath=fastpath),
    ))


DENY_ALL = Decision(DENY)


def verdicts(pods, rules, default=DENY_ALL, policies=("ns/allow-a", "ns/dry-b")):
    """Clients pods[0] (A), pods[1] (B), server pods[2] (S), each with both addresses."""
    idents = {}
    for ident, pod in zip((A, B, S), pods, strict=False):
        idents[pod.ip] = idents[pod.ip6] = ident
    return Verdicts(policies=policies, addr_ident=idents, policed={S: default}, rules=rules)


def refused(pod, host, port, family=socket.AF_INET) -> tuple[int, float]:
    t = time.monotonic()
    try:
        connect(pod, host, port, family, timeout=5).close()
    except OSError as e:
        return e.errno, time.monotonic() - t
    return 0, time.monotonic() - t


def counts(pm: PolicyMaps, name: str | None = None):
    st = pm.status()
    return st.default if name is None else st.policies[name]


def test_local_clients_allowed_and_denied_through_vip_and_pod_ip(lab_factory, datapath, policy):
    a, b, s = lab_factory(3).pods
    datapath.apply(table(s))
    policy.apply(verdicts((a, b, s), {(A, S, 8080): Decision(ALLOW, 1)}),
                 {netns(a): A, netns(b): B, netns(s): S}, [side(s)])
    payload = os.urandom(20_000)
    with EchoServer(s, 8080, host="::", family=socket.AF_INET6):
        for host, fam in ((VIP, socket.AF_INET), (str(s.ip), socket.AF_INET),
                          (VIP6, socket.AF_INET6), (str(s.ip6), socket.AF_INET6)):
            assert roundtrip(a, host, 80 if host in (VIP, VIP6) else 8080, payload,
                             family=fam) == payload
            err, took = refused(b, host, 80 if host in (VIP, VIP6) else 8080, fam)
            assert err == errno.EPERM and took < 0.1, (host, err, took)
    assert counts(policy, "ns/allow-a") == PolicyCounters(allowed=4)
    assert counts(policy).denied == 4 and counts(policy).allowed == 0
    c = datapath.counters()
    assert c["connect_balanced"] == 4 and c["policy_connect_deferred"] == 0


def test_dry_run_allows_and_counts(lab_factory, datapath, policy):
    a, b, s = lab_factory(3).pods
    datapath.apply(table(s))
    policy.apply(verdicts((a, b, s), {(B, S, 0): Decision(DRY, 2)}, default=Decision(ALLOW)),
                 {netns(a): A, netns(b): B, netns(s): S}, [side(s)])
    with EchoServer(s, 8080):
        assert roundtrip(b, VIP, 80, b"x" * 100) == b"x" * 100
        assert roundtrip(b, str(s.ip), 8080, b"y") == b"y"
        assert roundtrip(a, VIP, 80, b"z") == b"z"
    assert counts(policy, "ns/dry-b").dry_run_denied == 2
    assert counts(policy, "ns/dry-b").denied == 0
    assert counts(policy).allowed == 1  # A: the destination's default, no policy decided
    assert datapath.counters()["policy_rst_failures"] == 0


def _held(pod, host, port, family=socket.AF_INET) -> socket.socket:
    sock = connect(pod, host, port, family)
    sock.sendall(b"hello")
    assert sock.recv(5) == b"hello"
    return sock


def _cut(sock: socket.socket, deadline: float) -> tuple[int | None, float]:
    """Wait for the connection to be reset: (errno or None if it never was, when)."""
    sock.settimeout(0.02)
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"p")
            data = sock.recv(100)
            if not data:
                return 0, time.monotonic()
        except TimeoutError:
            continue
        except OSError as e:
            return e.errno, time.monotonic()
    return None, time.monotonic()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_update_cuts_denied_held_connection_allowed_keeps_redirect(lab_factory, datapath,
                                                                   policy, family):
    a, b, s = lab_factory(3).pods
    vip = VIP if family == socket.AF_INET else VIP6
    datapath.apply(table(s, fastpath="redirect"))
    both = {(A, S, 8080): Decision(ALLOW, 1), (B, S, 8080): Decision(ALLOW, 1)}
    spaces = {netns(a): A, netns(b): B, netns(s): S}
    policy.apply(verdicts((a, b, s), both), spaces, [side(s)])
    with EchoServer(s, 8080, host="::", family=socket.AF_INET6):
        keep, lose = _held(a, vip, 80, family), _held(b, vip, 80, family)
        before = datapath.counters()["msg_redirects"]
        t0 = time.monotonic()
        done = policy.apply(verdicts((a, b, s), {(A, S, 8080): Decision(ALLOW, 1)},
                                     policies=("ns/allow-a", "ns/deny-b"),
                                     default=Decision(DENY, 2)), spaces, [side(s)])
        err, when = _cut(lose, t0 + 2)
        assert err in (errno.ECONNABORTED, errno.ECONNRESET), err
        assert when - t0 < 1, when - t0
        for _ in range(20):  # the allowed one keeps flowing, socket to socket
            keep.sendall(b"k" * 100)
            got = b""
            while len(got) < 100:
                got += keep.recv(100)
        keep.close()
        lose.close()
    assert datapath.counters()["msg_redirects"] >= before + 40
    assert counts(policy, "ns/deny-b").closed_by_update == 1  # one connection, two ends
    assert counts(policy, "ns/allow-a").closed_by_update == 0
    assert counts(policy, "ns/allow-a").allowed == 2  # A and B, both let in before the update
    assert done.walked == 4 and done.enforced_s < done.cut_s < 1


# ---- an outside client: another netns, routed by the host, not in the agent's cgroup --------

CLIENT = r"""
import socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam)
s.settimeout(5)
t = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"ping"); print("ok", s.recv(4).decode(), time.monotonic() - t)
except OSError as e:
    print("err", e.errno, time.monotonic() - t)
"""


@pytest.fixture
def outside(lab_factory, uid):
    """A client namespace behind the lab's node, which routes between it and the pods (as
    a host routes a client from another host); tx checksum offload off, as a wire gives."""
    lab = lab_factory(2)
    ext = f"ax{uid}ext"
    subprocess.run(["ip", "netns", "add", ext], check=True)
    try:
        node = lab.node
        run = lambda *c: subprocess.run(c, check=True)  # noqa: E731
        run("ip", "-n", node, "link", "add", f"x{uid}", "type", "veth", "peer", "name", "eth0",
            "netns", ext)
        run("ip", "-n", node, "addr", "add", "10.201.0.1/24", "dev", f"x{uid}")
        run("ip", "-n", node, "addr", "add", "fd00:201::1/64", "dev", f"x{uid}", "nodad")
        run("ip", "-n", node, "addr", "add", "fd00:200::1/64", "dev", "br0", "nodad")
        run("ip", "-n", node, "link", "set", f"x{uid}", "up")
        run("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1")
        run("ip", "-n", ext, "addr", "add", "10.201.0.2/24", "dev", "eth0")
        run("ip", "-n", ext, "addr", "add", "fd00:201::2/64", "dev", "eth0", "nodad")
        run("ip", "-n", ext, "link", "set", "eth0", "up")
        run("ip", "-n", ext, "link", "set", "lo", "up")
        run("ip", "-n", ext, "route", "add", "default", "via", "10.201.0.1")
        run("ip", "-n", ext, "-6", "route", "add", "default", "via", "fd00:201::1")
        run("ip", "netns", "exec", ext, "ethtool", "-K", "eth0", "tx", "off")
        for p in lab.pods:
            run("ip", "-n", p.name, "-6", "route", "add", "default", "via", "fd00:200::1")
        yield lab, ext
    finally:
        subprocess.run(["ip", "netns", "del", ext], check=False)


def from_outside(ext: str, host: str, port: int) -> tuple[str, float]:
    root = cg.cgroup2_mount() / "cgroup.procs"
    out = subprocess.run(
        ["ip", "netns", "exec", ext, sys.executable, "-c", CLIENT, host, str(port)],
        capture_output=True, text=True, timeout=30,
        # Out of the test's cgroup, where the agent's programs are attached: nothing
        # decides this client at connect(); only the packet reaching the pod does.
        preexec_fn=lambda: root.write_text(str(os.getpid())))
    words = out.stdout.split()
    assert words, out.stderr
    return " ".join(words[:-1]), float(words[-1])


def test_outside_client_gets_a_reset_allowed_one_passes(outside, datapath, policy):
    lab, ext = outside
    other, s = lab.pods
    outside4, outside6 = ipaddress.ip_network("10.201.0.0/24"), \
        ipaddress.ip_network("fd00:201::/64")
    X = 7  # the outside range's identity (a source prefix some policy names)
    v = Verdicts(policies=("ns/allow-x-9000",),
                 addr_ident={s.ip: S, s.ip6: S, other.ip: A, other.ip6: A},
                 cidr_ident={outside4: X, outside6: X}, policed={S: Decision(DENY)},
                 rules={(X, S, 9000): Decision(ALLOW, 1)})
    policy.apply(v, {netns(s): S, netns(other): A}, [side(s)])
    with EchoServer(s, 8080, host="::", family=socket.AF_INET6), \
            EchoServer(s, 9000, host="::", family=socket.AF_INET6):
        for host in (str(s.ip), str(s.ip6)):
            res, took = from_outside(ext, host, 8080)
            assert res == f"err {errno.ECONNREFUSED}" and took < 0.1, (host, res, took)
            res, took = from_outside(ext, host, 9000)
            assert res == "ok ping", (host, res)
    assert counts(policy).denied == 2
    assert counts(policy, "ns/allow-x-9000").allowed == 2
    c = datapath.counters()
    assert c["policy_rst_failures"] == 0 and c["policy_connect_deferred"] == 0


HOLDER = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8080))
s.sendall(b"a"); s.recv(1); print("up", flush=True)
t = time.monotonic()
s.settimeout(5)
try:
    while s.recv(10):
        pass
    print("eof", time.monotonic() - t)
except OSError as e:
    print("err", e.errno, time.monotonic() - t)
"""


def test_outside_client_held_connection_cut_on_update(outside, datapath, policy):
    lab, ext = outside
    _, s = lab.pods
    net = ipaddress.ip_network("10.201.0.0/24")
    allow = Verdicts(policies=("ns/x",), addr_ident={s.ip: S}, cidr_ident={net: 7},
                     policed={S: Decision(ALLOW)})
    deny = Verdicts(policies=("ns/x",), addr_ident={s.ip: S}, cidr_ident={net: 7},
                    policed={S: Decision(ALLOW)}, rules={(7, S, 0): Decision(DENY, 1)})
    policy.apply(allow, {netns(s): S}, [side(s)])
    root = cg.cgroup2_mount() / "cgroup.procs"
    with EchoServer(s, 8080):
        proc = subprocess.Popen(["ip", "netns", "exec", ext, sys.executable, "-c", HOLDER,
                                 str(s.ip)],
                                stdout=subprocess.PIPE, text=True,
                                preexec_fn=lambda: root.write_text(str(os.getpid())))
        try:
            assert proc.stdout.readline().strip() == "up"
            policy.apply(deny, {netns(s): S}, [side(s)])
            last = proc.stdout.readline().split()
        finally:
            proc.kill()
            proc.wait()
    # The server end, here, was reset; the client on the other side learns it by the reset.
    assert last[0] in ("err", "eof") and float(last[-1]) < 1, last
    assert counts(policy, "ns/x").closed_by_update == 1


# ---- the kernel's lookup against the reference ---------------------------------------------

def _syn(src, dst, sport, dport) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    if src.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, src.packed,
                         dst.packed)
        return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp
    ip = struct.pack("!IHBB16s16s", 6 << 28, 20, 6, 64, src.packed, dst.packed)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + ip + tcp


def _random_verdicts(rng: random.Random) -> Verdicts:
    npol = 6
    addrs = {}
    for i in range(1, 41):
        addrs[ipaddress.ip_address(f"10.50.{i // 200}.{i % 200 + 1}")] = i
        if i % 3 == 0:
            addrs[ipaddress.ip_address(f"fd00:50::{i:x}")] = i
    cidrs = {ipaddress.ip_network("10.60.0.0/16"): 50, ipaddress.ip_network("10.60.5.0/24"): 51,
             ipaddress.ip_network("fd00:60::/48"): 52, ipaddress.ip_network("0.0.0.0/0"): 53}

    def dec() -> Decision:
        v = rng.choice([ALLOW, DENY, DRY])
        return Decision(v, rng.choice([0, *range(1, npol + 1)]) if v != DRY
                        else rng.randrange(1, npol + 1))

    policed = {d: dec() for d in rng.sample(range(1, 41), 25)}
    srcs = [0, *range(1, 41), 50, 51, 52, 53]
    rules = {}
    for _ in range(600):
        rules[(rng.choice(srcs), rng.choice(list(policed)),
               rng.choice([0, 0, 80, 443, 8080]))] = dec()
    return Verdicts(policies=tuple(f"ns/p{i}" for i in range(1, npol + 1)), addr_ident=addrs,
                    cidr_ident=cidrs, policed=policed, rules=rules)


def _mutate(rng: random.Random, v: Verdicts, rename: bool) -> Verdicts:
    """The next table a compiler might give: rules changed, added and removed, a default
    flipped, an address moved to another workload; with rename, the policy list shifts
    (every counter index moves: the writer's full path)."""
    rules = dict(v.rules)
    for k in rng.sample(list(rules), 60):
        del rules[k]
    for k in rng.sample(list(rules), 60):
        rules[k] = Decision(rng.choice([ALLOW, DENY]), rng.randrange(0, len(v.policies) + 1))
    policed = dict(v.policed)
    d = rng.choice(list(policed))
    policed[d] = Decision(DENY if policed[d].verdict != DENY else ALLOW)
    for _ in range(60):
        rules[(rng.randrange(0, 41), rng.choice(list(policed)), rng.choice([0, 80]))] = \
            Decision(rng.choice([ALLOW, DENY, DRY]), rng.randrange(1, len(v.policies) + 1))
    addrs = dict(v.addr_ident)
    moved = rng.choice(list(addrs))
    addrs[moved] = rng.randrange(1, 41)
    policies = (*v.policies[1:], v.policies[0]) if rename else v.policies
    return Verdicts(policies=policies, addr_ident=addrs, cidr_ident=v.cidr_ident,
                    policed=policed, rules=rules)


def _agree(policy: PolicyMaps, v: Verdicts, rng: random.Random, n: int) -> int:
    """Decide n random SYNs in the kernel (BPF_PROG_TEST_RUN of the pod-side program) and
    compare each with Verdicts.decide: the verdict and the policy counted."""
    candidates = [*v.addr_ident, ipaddress.ip_address("10.60.5.9"),
                  ipaddress.ip_address("10.60.9.9"), ipaddress.ip_address("192.0.2.1"),
                  ipaddress.ip_address("fd00:60::9"), ipaddress.ip_address("fd00:99::1")]
    names = dict(enumerate(v.policies, 1))
    checked = 0
    for _ in range(n):
        src, dst = rng.choice(candidates), rng.choice(candidates)
        if src.version != dst.version:
            continue
        port = rng.choice([80, 443, 8080, 22])
        want = v.decide(src, dst, port)
        before = policy.counters()
        r = testrun.prog_test_run(policy.tc_prog.fd, _syn(src, dst, 40000, port))
        after = policy.counters()
        moved = {i: (a.allowed - before[i].allowed, a.denied - before[i].denied,
                     a.dry_run_denied - before[i].dry_run_denied)
                 for i, a in after.items() if a != before[i]}
        if want is None:
            assert r.retval == testrun.TC_ACT_OK and not moved, (src, dst, port)
            continue
        index = policy.counter_of[names[want.policy]] if want.policy else 0
        col = {ALLOW: (1, 0, 0), DENY: (0, 1, 0), DRY: (0, 0, 1)}[want.verdict]
        assert moved == {index: col}, (src, dst, port, want, moved)
        assert (r.retval == 7) == (want.verdict == DENY), (src, dst, port, want, r.retval)
        checked += 1
    return checked


def test_kernel_decisions_equal_the_reference(datapath, policy):
    """A seeded random table, then a chain of updates (incremental and full writes, the two
    slots taking turns): after each, the kernel and Verdicts.decide agree on every one of
    hundreds of (source, destination, port) triples, verdict and policy counted."""
    rng = random.Random(14)
    v = _random_verdicts(rng)
    checked = 0
    for step in range(5):
        policy.apply(v, {})
        checked += _agree(policy, v, rng, 2000 if step == 0 else 500)
        v = _mutate(rng, v, rename=step == 2)
    assert checked > 1000
    # The live table holds exactly the last one: nothing of the older left in its slot.
    assert policy.status().maps["rules"].used == len(policy.verdicts.rules)


def test_a_table_that_does_not_fit_changes_nothing(datapath, policy):
    from accel.config import CapacityError

    rng = random.Random(5)
    v = _random_verdicts(rng)
    policy.apply(v, {})
    small = policy.tables["rules"].capacity
    huge = Verdicts(policies=v.policies, addr_ident=v.addr_ident, policed=v.policed,
                    rules={(s, 1, p): Decision(ALLOW) for s in range(small // 100 + 1)
                           for p in range(1, 101)})
    live = policy.live
    with pytest.raises(CapacityError, match="policy_rules"):
        policy.apply(huge, {})
    assert policy.live == live
    assert _agree(policy, v, rng, 300) > 100  # still the last good table


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def test_reset_built_from_the_syn(datapath, policy):
    src4, dst4 = ipaddress.ip_address("10.70.0.1"), ipaddress.ip_address("10.70.0.2")
    src6, dst6 = ipaddress.ip_address("fd00:70::1"), ipaddress.ip_address("fd00:70::2")
    policy.apply(Verdicts(addr_ident={dst4: 1, dst6: 1}, policed={1: Decision(DENY)}), {})
    for src, dst in ((src4, dst4), (src6, dst6)):
        syn = _syn(src, dst, 40001, 8080)
        syn = syn + b"\x01" * 20 if src.version == 4 else syn  # options/payload are dropped
        r = testrun.prog_test_run(policy.tc_prog.fd, syn)
        assert r.retval == 7  # TC_ACT_REDIRECT: back out of the pod's interface
        out = r.data
        assert out[:6] == b"\x04" * 6 and out[6:12] == b"\x02" * 6
        if src.version == 4:
            ip, tcp = out[14:34], out[34:]
            assert _csum(ip) == 0xFFFF and ip[12:16] == dst.packed and ip[16:20] == src.packed
            pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
        else:
            ip, tcp = out[14:54], out[54:]
            assert ip[8:24] == dst.packed and ip[24:40] == src.packed
            pseudo = ip[8:40] + struct.pack("!IxxxB", len(tcp), 6)
        assert len(tcp) == 20 and _csum(pseudo + tcp) == 0xFFFF
        sport, dport, seq, ack, off, flags = struct.unpack("!HHIIBB", tcp[:14])
        assert (sport, dport, seq, ack, off >> 4, flags) == (8080, 40001, 0, 1001, 5, 0x14)



@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_pod_routed_syn_is_decided_too(lab_factory, datapath, policy, family):
    """Pod routing hands pod-to-pod packets over with bpf_redirect_peer, skipping the host
    side's egress: the pod side's ingress still sees the SYN, and its reset goes back the
    same way. The client runs outside the agent's cgroup: only the packet is decided."""
    from accel.datapath.podroute import PodRouter
    from accel.datapath.policy import pod_namespaces

    lab = lab_factory(3)
    a, b, s = lab.pods
    datapath.apply(ServiceTable((), mesh_cidrs=(ipaddress.ip_network(lab.subnet),
                                                ipaddress.ip_network(lab.subnet6))))
    router = PodRouter(datapath.pin_dir, tuple(p.host_ifname for p in lab.pods),
                       netns=lab.node)
    try:
        router.refresh()
        v = verdicts((a, b, s), {(A, S, 8080): Decision(ALLOW, 1)})
        idents, sides = pod_namespaces(v, [(p.peer_netns, p.peer_ifindex, p.addresses)
                                           for p in router.ports.values()])
        assert idents == {netns(a): A, netns(b): B, netns(s): S}
        assert sides == [side(s)]
        policy.apply(v, idents, sides)
        host = str(s.ip) if family == socket.AF_INET else str(s.ip6)
        before = datapath.counters()["pod_redirects"]
        with EchoServer(s, 8080, host="::", family=socket.AF_INET6):
            res, took = from_outside(b.name, host, 8080)
            assert res == f"err {errno.ECONNREFUSED}" and took < 0.1, (res, took)
            res, _ = from_outside(a.name, host, 8080)
            assert res == "ok ping", res
        # SYN and reset, and the allowed connection's packets: all handed pod to pod.
        assert datapath.counters()["pod_redirects"] - before >= 2 + 6
    finally:
        router.close()
    assert counts(policy).denied == 1
    # A's connection was decided at its SYN only (outside the cgroup), but A's namespace is
    # known (its address is marked local): an allowed SYN from it is not counted again.
    assert counts(policy, "ns/allow-a").allowed == 0
    assert datapath.counters()["policy_connect_deferred"] == 0


def test_enforcer_follows_pods_and_uninstall_detaches(lab_factory, datapath):
    """The runtime's handle: pod routing's pods give the namespaces and the guarded
    interfaces; a pod gone is dropped on refresh(); what an agent left attached is found
    again from its state and removed."""
    from accel.datapath.podroute import PodRouter
    from accel.datapath.policy import Enforcer, detach_from

    lab = lab_factory(3)
    a, b, s = lab.pods
    router = PodRouter(datapath.pin_dir, tuple(p.host_ifname for p in lab.pods),
                       netns=lab.node)
    enforcer = Enforcer(datapath, router)
    try:
        router.refresh()
        enforcer.apply(verdicts((a, b, s), {(A, S, 8080): Decision(ALLOW, 1)}))
        st = enforcer.status()
        assert st.guarded == [f"{side(s).netns}:{side(s).ifindex}"] and st.namespaces == 3

        def filters() -> str:
            return s.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout

        assert "accel_policy_tc" in filters()
        with EchoServer(s, 8080):
            assert roundtrip(a, str(s.ip), 8080, b"in") == b"in"
            assert refused(b, str(s.ip), 8080)[0] == errno.EPERM
        subprocess.run(["ip", "-n", lab.node, "link", "del", b.host_ifname], check=True)
        router.refresh()
        enforcer.refresh()
        assert enforcer.status().namespaces == 2
        guarded = enforcer.status().guarded
        enforcer.close(keep=True)  # as an agent stopped with --keep leaves it
        assert "accel_policy_tc" in filters()
        assert len(detach_from(guarded)) == 1 and "accel_policy_tc" not in filters()
    finally:
        router.close()


def test_ipv6_extension_headers_to_a_policed_pod_are_dropped(datapath, policy):
    """A SYN could hide behind IPv6 extension headers the program does not walk: to a
    policed destination such a packet is dropped and counted; elsewhere left alone."""
    src, dst = ipaddress.ip_address("fd00:71::1"), ipaddress.ip_address("fd00:71::2")
    free = ipaddress.ip_address("fd00:71::3")
    policy.apply(Verdicts(addr_ident={dst: 1, free: 2}, policed={1: Decision(ALLOW)}), {})

    def hop_by_hop(to) -> bytes:
        tcp = _syn(src, to, 40002, 80)[54:]
        hbh = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # next: TCP; PadN
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(hbh) + len(tcp), 0, 64, src.packed,
                         to.packed)
        return b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + ip + hbh + tcp

    before = datapath.counters()["policy_unparsed"]
    assert testrun.prog_test_run(policy.tc_prog.fd, hop_by_hop(dst)).retval == \
        testrun.TC_ACT_SHOT
    assert testrun.prog_test_run(policy.tc_prog.fd, hop_by_hop(free)).retval == \
        testrun.TC_ACT_OK
    assert datapath.counters()["policy_unparsed"] == before + 1


def test_client_of_unknown_namespace_never_passes_undecided(lab_factory, datapath, policy):
    """A client whose namespace the agent has no identity for (in the cgroup, unbound): to
    a pod that answers denied SYNs it is left to that check (by its address: a reset); to
    one that does not, decided at connect() as an unknown source. Never let through."""
    a, b, s = lab_factory(3).pods
    v = verdicts((a, b, s), {(A, S, 8080): Decision(ALLOW, 1)})
    with EchoServer(s, 8080):
        policy.apply(v, {netns(s): S}, [])  # s not guarded
        assert refused(b, str(s.ip), 8080) == (errno.EPERM, pytest.approx(0, abs=0.1))
        assert datapath.counters()["policy_connect_deferred"] == 0
        assert counts(policy).denied == 1
        policy.apply(v, {netns(s): S}, [side(s)])
        err, took = refused(b, str(s.ip), 8080)
        assert err == errno.ECONNREFUSED and took < 0.1, (err, took)
        assert datapath.counters()["policy_connect_deferred"] == 1
        assert counts(policy).denied == 2  # counted once, at the SYN
        assert roundtrip(a, str(s.ip), 8080, b"ok") == b"ok"  # a's address is allowed
    assert counts(policy, "ns/allow-a").allowed == 1
