"""The edge programs in this kernel, run by BPF_PROG_TEST_RUN on crafted packets.

Each test loads nothing of its own: one EdgeDatapath (both programs, pinned
maps under a unique dir) serves the module; tests apply their own tables and
use their own client addresses, and the flow tables are emptied between tests.
"""

from __future__ import annotations

import ctypes
import ipaddress
import random
import secrets
import subprocess

import pytest

pytest.importorskip("bcc")
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, IPOption, IPv6, IPv6ExtHdrFragment, Raw, raw

from accel import maglev
from accel.datapath.edge import EdgeCapacityError, EdgeDatapath, NextHop, flow_slot
from accel.kernel.testrun import TC_ACT_OK, XDP_DROP, XDP_PASS, XDP_REDIRECT, prog_test_run
from accel.lab import in_netns
from accel.model import Endpoint, Guard, Service, ServiceTable, parse_network

pytestmark = pytest.mark.kernel

NODE_MAC = "02:00:00:00:0e:01"
CLIENT_MAC = "02:00:00:00:0e:02"
SMAC = bytes.fromhex("02000000ee01")


def mac_for(addr) -> bytes:
    return b"\x02\xbe" + ipaddress.ip_address(addr).packed[-4:]


def mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


class Hops:
    """A resolver the test controls: every address redirects out of lo unless told."""

    def __init__(self):
        self.route_mode: set = set()
        self.mtu = 0

    def __call__(self, addrs):
        return {a: None if str(a) in self.route_mode
                else NextHop(1, mac_for(a), SMAC, mtu=self.mtu) for a in addrs}


@pytest.fixture(scope="module")
def hops():
    return Hops()


@pytest.fixture(scope="module")
def dp(hops):
    d = EdgeDatapath(None, f"/sys/fs/bpf/he-{secrets.token_hex(4)}", resolver=hops)
    d.load()
    yield d
    d.close()


@pytest.fixture(autouse=True)
def fresh(dp, hops):
    hops.route_mode.clear()
    hops.mtu = 0
    dp.set_guard(Guard())
    dp.apply(ServiceTable())
    dp.table("edge_conns").clear()
    dp.table("edge_revs").clear()
    dp.table("edge_syn").clear()
    yield


def svc(name, vip, port, eps, proto="TCP", **kw):
    return Service(name, vip, port, proto, tuple(eps), edge=True, **kw)


def eps(*addrs, port=80, weight=1):
    return [Endpoint(a, port, weight) for a in addrs]


def frame(src, dst, sport=40000, dport=80, flags="A", proto="TCP", vlan=None, payload=b"hello",
          **ipkw):
    l3 = IP(src=src, dst=dst, **ipkw) if ":" not in dst else IPv6(src=src, dst=dst)
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=100, ack=5) if proto == "TCP" else UDP(
        sport=sport, dport=dport)
    eth = Ether(src=CLIENT_MAC, dst=NODE_MAC)
    if vlan is not None:
        eth = eth / Dot1Q(vlan=vlan)
    return eth / l3 / l4 / Raw(payload)


def xdp(dp, pkt):
    data = raw(pkt) if not isinstance(pkt, bytes) else pkt
    r = prog_test_run(dp.xdp_fd, data)
    return r.retval, r.data


def checksums_valid(data: bytes) -> bool:
    p = Ether(data)
    q = p.copy()
    for layer in (IP, TCP, UDP):
        if layer in q:
            del q[layer].chksum
    q = Ether(raw(q))
    return all(p[layer].chksum == q[layer].chksum for layer in (IP, TCP, UDP) if layer in p)


def backend_of(dp, src, sport, vip="10.96.0.1", flags="A", dport=80):
    act, out = xdp(dp, frame(src, vip, sport=sport, dport=dport, flags=flags))
    assert act == XDP_REDIRECT, act
    p = Ether(out)
    return p[IPv6].dst if IPv6 in p else p[IP].dst


def glob(dp, name):
    return dp.counters()["global"][name]


def vip_row(dp, service):
    return next(r for r in dp.counters()["vips"] if r["service"] == service)


# ---- hit and miss -------------------------------------------------------------------------


def test_hit_rewrites_destination_and_macs_with_valid_checksums(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1", "10.1.0.2"))]))
    act, out = xdp(dp, frame("192.0.2.10", "10.96.0.1", flags="S"))
    assert act == XDP_REDIRECT
    p = Ether(out)
    assert p[IP].dst in ("10.1.0.1", "10.1.0.2")
    assert p[IP].src == "192.0.2.10" and p[TCP].dport == 80 and p[TCP].sport == 40000
    assert p.dst == mac_str(mac_for(p[IP].dst)) and p.src == mac_str(SMAC)
    assert bytes(p[Raw]) == b"hello"
    assert checksums_valid(out)
    row = vip_row(dp, "web")
    assert row["packets"] == 1 and row["new_flows"] == 1 and row["bytes"] == len(out)


@pytest.mark.parametrize(
    "dst,dport,proto",
    [("10.96.0.9", 80, "TCP"), ("10.96.0.1", 81, "TCP"), ("10.96.0.1", 80, "UDP")],
    ids=["other-address", "other-port", "other-protocol"],
)
def test_miss_passes_untouched(dp, dst, dport, proto):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    pkt = raw(frame("192.0.2.11", dst, dport=dport, proto=proto))
    act, out = xdp(dp, pkt)
    assert act == XDP_PASS and out == pkt


def test_non_ip_passes_untouched(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    arp = bytes.fromhex("ffffffffffff02000000000208060001080006040001") + bytes(20)
    act, out = xdp(dp, arp)
    assert act == XDP_PASS and out == arp


def test_endpoint_port_is_translated_and_checksummed(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.5", port=8080))]))
    act, out = xdp(dp, frame("192.0.2.12", "10.96.0.1", flags="S"))
    p = Ether(out)
    assert act == XDP_REDIRECT and p[IP].dst == "10.1.0.5" and p[TCP].dport == 8080
    assert checksums_valid(out)


def test_udp_hit_and_zero_checksum_kept(dp):
    dp.apply(ServiceTable.of([svc("dns", "10.96.0.53", 53, eps("10.1.0.7", port=5353),
                                  proto="UDP")]))
    act, out = xdp(dp, frame("192.0.2.13", "10.96.0.53", dport=53, proto="UDP"))
    p = Ether(out)
    assert act == XDP_REDIRECT and p[IP].dst == "10.1.0.7" and p[UDP].dport == 5353
    assert checksums_valid(out)
    nocsum = frame("192.0.2.13", "10.96.0.53", sport=40001, dport=53, proto="UDP")
    nocsum[UDP].chksum = 0
    act, out = xdp(dp, nocsum)
    assert act == XDP_REDIRECT and Ether(out)[UDP].chksum == 0


def test_ip_options_are_stepped_over(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    pkt = frame("192.0.2.14", "10.96.0.1", options=[IPOption(b"\x01\x01\x01\x01")])
    assert Ether(raw(pkt))[IP].ihl == 6  # what goes in carries 4 bytes of options
    act, out = xdp(dp, pkt)
    p = Ether(out)
    assert act == XDP_REDIRECT and p[IP].ihl == 6 and p[IP].dst == "10.1.0.1"
    assert checksums_valid(out)


def test_ipv6_hit_with_valid_checksums(dp):
    dp.apply(ServiceTable.of([
        svc("web6", "fd00:96::1", 443, eps("fd00:1::1", "fd00:1::2", port=8443)),
        svc("dns6", "fd00:96::53", 53, eps("fd00:1::3"), proto="UDP", ),
    ]))
    act, out = xdp(dp, frame("2001:db8::10", "fd00:96::1", dport=443, flags="S"))
    p = Ether(out)
    assert act == XDP_REDIRECT and p[IPv6].dst in ("fd00:1::1", "fd00:1::2")
    assert p[TCP].dport == 8443 and p.dst == mac_str(mac_for(p[IPv6].dst))
    assert checksums_valid(out)
    act, out = xdp(dp, frame("2001:db8::10", "fd00:96::53", dport=80, proto="UDP"))
    assert act == XDP_PASS  # port 80 is not the VIP's
    act, out = xdp(dp, frame("2001:db8::10", "fd00:96::53", dport=53, proto="UDP"))
    assert act == XDP_REDIRECT and Ether(out)[IPv6].dst == "fd00:1::3"
    assert checksums_valid(out)


def test_endpoint_of_the_other_family_is_skipped(dp):
    dp.apply(ServiceTable.of([svc("mixed", "10.96.0.1", 80,
                                  [Endpoint("fd00:1::9", 80), Endpoint("10.1.0.9", 80)])]))
    for sport in range(41000, 41020):
        assert backend_of(dp, "192.0.2.15", sport) == "10.1.0.9"


def test_vlan_tag_is_popped_on_redirect(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    pkt = raw(frame("192.0.2.16", "10.96.0.1", vlan=42))
    act, out = xdp(dp, pkt)
    p = Ether(out)
    assert act == XDP_REDIRECT and Dot1Q not in p and p.type == 0x0800
    assert len(out) == len(pkt) - 4 and p[IP].dst == "10.1.0.1"
    assert checksums_valid(out)
    miss = raw(frame("192.0.2.16", "10.96.0.2", vlan=42))
    act, out = xdp(dp, miss)
    assert act == XDP_PASS and out == miss


def test_double_tagged_frames_pass_untouched(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    pkt = raw(Ether(src=CLIENT_MAC, dst=NODE_MAC, type=0x88A8) / Dot1Q(vlan=1) / Dot1Q(vlan=2)
              / IP(src="192.0.2.17", dst="10.96.0.1") / TCP(dport=80))
    act, out = xdp(dp, pkt)
    assert act == XDP_PASS and out == pkt


@pytest.mark.parametrize("vip,ep,client", [("10.96.0.1", "10.1.0.7", "192.0.2.19"),
                                           ("fd00:96::1", "fd00:1::7", "2001:db8::19")])
def test_redirect_forwards_ttl_minus_one_and_leaves_expiring_packets_to_the_kernel(
        dp, vip, ep, client):
    dp.apply(ServiceTable.of([svc("web", vip, 80, eps(ep))]))
    v6 = ":" in vip

    def with_ttl(ttl):
        f = frame(client, vip)
        if v6:
            f[IPv6].hlim = ttl
        else:
            f[IP].ttl = ttl
        return f

    act, out = xdp(dp, with_ttl(64))
    p = Ether(out)
    assert act == XDP_REDIRECT and (p[IPv6].hlim if v6 else p[IP].ttl) == 63
    assert checksums_valid(out)
    before = glob(dp, "fwd_ttl_expiring")
    act, out = xdp(dp, with_ttl(1))
    p = Ether(out)
    # Rewritten to the backend, passed: the kernel's time-exceeded quotes the backend,
    # which edge_tc translates back to the VIP.
    assert act == XDP_PASS and (p[IPv6].dst if v6 else p[IP].dst) == ep
    assert (p[IPv6].hlim if v6 else p[IP].ttl) == 1 and checksums_valid(out)
    assert glob(dp, "fwd_ttl_expiring") == before + 1


def test_packet_bigger_than_the_backend_mtu_goes_to_the_kernel(dp, hops):
    hops.mtu = 1280
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.8"))]))
    before = glob(dp, "fwd_too_big")
    act, _ = xdp(dp, frame("192.0.2.20", "10.96.0.1", payload=b"x" * (1280 - 40)))
    assert act == XDP_REDIRECT  # exactly the MTU: fits
    act, out = xdp(dp, frame("192.0.2.20", "10.96.0.1", payload=b"x" * (1281 - 40)))
    assert act == XDP_PASS and Ether(out)[IP].dst == "10.1.0.8" and checksums_valid(out)
    assert glob(dp, "fwd_too_big") == before + 1


def test_route_mode_rewrites_and_hands_to_the_kernel(dp, hops):
    hops.route_mode.add("10.1.0.3")
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.3"))]))
    before = glob(dp, "fwd_route")
    pkt = frame("192.0.2.18", "10.96.0.1")
    act, out = xdp(dp, pkt)
    p = Ether(out)
    assert act == XDP_PASS and p[IP].dst == "10.1.0.3" and p.dst == NODE_MAC
    assert checksums_valid(out)
    assert glob(dp, "fwd_route") == before + 1


def test_vip_without_endpoints_drops_and_counts(dp):
    dp.apply(ServiceTable.of([svc("empty", "10.96.0.1", 80, [])]))
    act, _ = xdp(dp, frame("192.0.2.19", "10.96.0.1", flags="S"))
    assert act == XDP_DROP
    assert vip_row(dp, "empty")["drop_no_backend"] == 1


# ---- fragments and malformed packets ------------------------------------------------------


@pytest.mark.parametrize("mf,offset", [(1, 0), (0, 100)], ids=["first", "later"])
def test_ipv4_fragments_pass_untouched(dp, mf, offset):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    before = glob(dp, "pass_fragment")
    f = frame("192.0.2.20", "10.96.0.1")
    f[IP].flags = mf
    f[IP].frag = offset
    pkt = raw(f)
    act, out = xdp(dp, pkt)
    assert act == XDP_PASS and out == pkt
    assert glob(dp, "pass_fragment") == before + 1


def test_ipv6_extension_headers_pass_untouched(dp):
    dp.apply(ServiceTable.of([svc("web6", "fd00:96::1", 80, eps("fd00:1::1"))]))
    pkt = raw(Ether(src=CLIENT_MAC, dst=NODE_MAC) / IPv6(src="2001:db8::1", dst="fd00:96::1")
              / IPv6ExtHdrFragment(m=1) / TCP(dport=80))
    act, out = xdp(dp, pkt)
    assert act == XDP_PASS and out == pkt


def test_truncated_headers_pass_untouched(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    full = raw(frame("192.0.2.21", "10.96.0.1"))
    before = glob(dp, "pass_malformed")
    for cut in (15, 20, 33, 34 + 10, 34 + 17):  # in the IP header, in the TCP header
        act, out = xdp(dp, full[:cut])
        assert act == XDP_PASS and out == full[:cut], cut
    assert glob(dp, "pass_malformed") >= before + 4
    bad_ihl = bytearray(full)
    bad_ihl[14] = 0x44
    act, out = xdp(dp, bytes(bad_ihl))
    assert act == XDP_PASS and out == bytes(bad_ihl)


def test_random_garbage_is_never_aborted_or_altered(dp):
    dp.apply(ServiceTable.of([
        svc("web", "10.96.0.1", 80, eps("10.1.0.1")),
        svc("web6", "fd00:96::1", 80, eps("fd00:1::1")),
    ]))
    rng = random.Random(1234)
    heads = [b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x88\xa8"]
    vip4 = ipaddress.ip_address("10.96.0.1").packed
    for i in range(600):
        body = bytearray(rng.randbytes(rng.randrange(0, 90)))
        if i % 3 == 0 and len(body) >= 24:  # an IPv4 header to the VIP with random rest
            body[0] = 0x40 | rng.randrange(0, 16)
            body[16:20] = vip4
        pkt = bytes.fromhex("020000000e01020000000e02") + rng.choice(heads) + bytes(body)
        act, out = xdp(dp, pkt)
        assert act in (XDP_PASS, XDP_DROP, XDP_REDIRECT), (act, pkt.hex())
        if act == XDP_PASS:
            assert out == pkt, pkt.hex()


# ---- flood guard --------------------------------------------------------------------------


def test_deny_list_drops_v4_and_v6_sources_and_can_be_lifted(dp):
    dp.apply(ServiceTable.of([
        svc("web", "10.96.0.1", 80, eps("10.1.0.1")),
        svc("web6", "fd00:96::1", 80, eps("fd00:1::1")),
    ]))
    established = frame("203.0.113.9", "10.96.0.1", sport=42000)
    assert xdp(dp, established)[0] == XDP_REDIRECT
    dp.set_guard(Guard(deny=(parse_network("203.0.113.0/24", "d"),
                             parse_network("2001:db8:bad::/48", "d"))))
    assert xdp(dp, frame("203.0.113.9", "10.96.0.1", flags="S"))[0] == XDP_DROP
    assert xdp(dp, established)[0] == XDP_DROP  # flows from before the deny too
    assert xdp(dp, frame("203.0.114.9", "10.96.0.1"))[0] == XDP_REDIRECT
    assert xdp(dp, frame("2001:db8:bad::5", "fd00:96::1"))[0] == XDP_DROP
    assert xdp(dp, frame("2001:db8:bae::5", "fd00:96::1"))[0] == XDP_REDIRECT
    # Traffic that is not for a VIP is the kernel's business.
    assert xdp(dp, frame("203.0.113.9", "10.96.0.77"))[0] == XDP_PASS
    assert vip_row(dp, "web")["drop_deny"] == 2 and vip_row(dp, "web6")["drop_deny"] == 1
    assert glob(dp, "drop_deny") >= 3
    dp.set_guard(Guard(deny=(parse_network("198.51.100.0/24", "d"),)))
    assert xdp(dp, established)[0] == XDP_REDIRECT


def test_deny_prefixes_shorter_than_a_byte(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    dp.set_guard(Guard(deny=(parse_network("128.0.0.0/2", "d"),)))
    assert xdp(dp, frame("150.1.2.3", "10.96.0.1"))[0] == XDP_DROP
    assert xdp(dp, frame("191.255.0.1", "10.96.0.1"))[0] == XDP_DROP
    assert xdp(dp, frame("192.0.2.1", "10.96.0.1"))[0] == XDP_REDIRECT


def test_syn_token_bucket_per_source(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    dp.set_guard(Guard(syn_rate=1, syn_burst=3))
    verdicts = [xdp(dp, frame("192.0.2.30", "10.96.0.1", sport=43000 + i, flags="S"))[0]
                for i in range(5)]
    assert verdicts == [XDP_REDIRECT] * 3 + [XDP_DROP] * 2
    # Another source has its own budget; segments that are no SYN are never limited.
    assert xdp(dp, frame("192.0.2.31", "10.96.0.1", flags="S"))[0] == XDP_REDIRECT
    assert xdp(dp, frame("192.0.2.30", "10.96.0.1", sport=43000))[0] == XDP_REDIRECT
    assert vip_row(dp, "web")["drop_syn"] == 2
    dp.set_guard(Guard())
    assert xdp(dp, frame("192.0.2.30", "10.96.0.1", sport=43999, flags="S"))[0] == XDP_REDIRECT


# ---- balancing and the flow table --------------------------------------------------------


def test_flows_follow_the_python_ring_prediction(dp):
    backends = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps(*backends))]))
    ring = maglev.build([(f"{b}:80", 1) for b in backends], dp.maglev_size)
    names = sorted(f"{b}:80" for b in backends)
    for sport in range(44000, 44100):
        want = names[ring[flow_slot(ipaddress.ip_address("192.0.2.40"), sport, 80,
                                    dp.maglev_size)]]
        assert backend_of(dp, "192.0.2.40", sport) + ":80" == want


def test_new_flows_balance_by_weight(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, [
        Endpoint("10.1.0.1", 80, 1), Endpoint("10.1.0.2", 80, 1), Endpoint("10.1.0.3", 80, 2)])]))
    hits: dict[str, int] = {}
    n = 0
    for a in range(20):
        for sport in range(45000, 45200):
            b = backend_of(dp, f"198.18.{a}.7", sport, flags="S")
            hits[b] = hits.get(b, 0) + 1
            n += 1
    shares = [hits.get(b, 0) / n for b in ("10.1.0.1", "10.1.0.2", "10.1.0.3")]
    assert shares == pytest.approx([0.25, 0.25, 0.5], abs=0.03)


def test_established_flows_keep_their_backend_as_backends_come_and_go(dp):
    base = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"]
    table = lambda addrs: ServiceTable.of([svc("web", "10.96.0.1", 80, eps(*addrs))])  # noqa: E731
    dp.apply(table(base))
    flows = {sport: backend_of(dp, "198.19.0.1", sport, flags="S") for sport in range(1000, 1400)}

    assert dp.apply(table(base + ["10.1.0.5"]))["changed"] == ["web"]
    for sport, b in flows.items():
        assert backend_of(dp, "198.19.0.1", sport) == b
    fresh = {backend_of(dp, "198.19.0.2", s, flags="S") for s in range(2000, 2200)}
    assert "10.1.0.5" in fresh

    dp.apply(table(["10.1.0.1", "10.1.0.3", "10.1.0.4", "10.1.0.5"]))  # 10.1.0.2 leaves
    moved = 0
    for sport, b in flows.items():
        now = backend_of(dp, "198.19.0.1", sport)
        if b == "10.1.0.2":
            assert now != "10.1.0.2"
            moved += 1
        else:
            assert now == b
    assert 40 < moved < 160  # about a quarter of 400
    assert glob(dp, "repick") >= moved


def test_compact_cleans_slots_no_flow_needs_and_keeps_flows(dp):
    base = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    table = lambda addrs: ServiceTable.of([svc("web", "10.96.0.1", 80, eps(*addrs))])  # noqa: E731
    dp.apply(table(base))
    flows = {s: backend_of(dp, "198.19.3.1", s, flags="S") for s in range(5000, 5300)}
    dp.apply(table(base + ["10.1.0.4"]))
    dirty = dp.status()["vips"][0]["dirty_slots"]
    assert dirty > 0.15 * dp.maglev_size  # about a quarter of the slots changed owner
    cleaned = dp.compact()
    left = dp.status()["vips"][0]["dirty_slots"]
    assert cleaned == dirty - left and left <= 150  # only the slots of moved flows stay dirty
    for s, b in flows.items():
        assert backend_of(dp, "198.19.3.1", s) == b
    # Once the flow table has forgotten them, every slot comes clean.
    dp.table("edge_conns").clear()
    dp.compact()
    assert dp.status()["vips"][0]["dirty_slots"] == 0
    assert backend_of(dp, "198.19.3.2", 1, flags="S") in base + ["10.1.0.4"]


def test_unhealthy_endpoint_drains(dp):
    def table(healthy: bool):
        return ServiceTable.of([svc("web", "10.96.0.1", 80, [
            Endpoint("10.1.0.1", 80), Endpoint("10.1.0.2", 80, healthy=healthy)])])

    dp.apply(table(True))
    flows = {s: backend_of(dp, "198.19.1.1", s, flags="S") for s in range(3000, 3100)}
    assert "10.1.0.2" in flows.values()
    dp.apply(table(False))
    for s, b in flows.items():
        assert backend_of(dp, "198.19.1.1", s) == b  # established flows stay
    assert {backend_of(dp, "198.19.1.2", s, flags="S") for s in range(100)} == {"10.1.0.1"}


def test_apply_rewrites_only_changed_vips(dp):
    a = svc("a", "10.96.0.1", 80, eps("10.1.0.1"))
    b = svc("b", "10.96.0.2", 80, eps("10.1.0.2"))
    plain = Service("plain", "10.96.0.3", 80, "TCP", tuple(eps("10.1.0.3")), edge=False)
    res = dp.apply(ServiceTable.of([a, b, plain]))
    assert sorted(res["added"]) == ["a", "b"]
    rings = {r.key.addr.w[3]: r.ring for _, r in dp.table("edge_vips").items() if r.state == 1}
    b2 = svc("b", "10.96.0.2", 80, eps("10.1.0.2", "10.1.0.4"))
    res = dp.apply(ServiceTable.of([a, b2, plain]))
    assert res["changed"] == ["b"] and res["unchanged"] == ["a"]
    after = {r.key.addr.w[3]: r.ring for _, r in dp.table("edge_vips").items() if r.state == 1}
    a_w = int.from_bytes(ipaddress.ip_address("10.96.0.1").packed, "little")
    b_w = int.from_bytes(ipaddress.ip_address("10.96.0.2").packed, "little")
    assert after[a_w] == rings[a_w] and after[b_w] != rings[b_w]  # b flipped to a new ring
    assert xdp(dp, frame("192.0.2.50", "10.96.0.3"))[0] == XDP_PASS  # not an edge service
    res = dp.apply(ServiceTable.of([b2]))
    assert res["removed"] == ["a"]
    assert xdp(dp, frame("192.0.2.50", "10.96.0.1"))[0] == XDP_PASS


def test_too_many_vips_is_refused_and_changes_nothing(dp):
    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    many = [svc(f"s{i}", f"10.97.{i // 200}.{i % 200 + 1}", 80, eps("10.1.0.1"))
            for i in range(dp.max_vips + 1)]
    with pytest.raises(EdgeCapacityError, match="max_vips"):
        dp.apply(ServiceTable.of(many))
    assert backend_of(dp, "192.0.2.60", 1) == "10.1.0.1"


# ---- reverse NAT (tc) ---------------------------------------------------------------------


def reply(src, dst, sport, dport, proto="TCP"):
    l3 = IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)
    l4 = TCP(sport=sport, dport=dport, flags="SA") if proto == "TCP" else UDP(sport=sport,
                                                                              dport=dport)
    return raw(Ether(src="02:be:00:00:00:01", dst=CLIENT_MAC) / l3 / l4 / Raw(b"world"))


def icmp_error(src, dst, quoted, kind):
    """An ICMP error from `src` to `dst` quoting the packet `quoted` (L3 and on)."""
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig

    if ":" in dst:
        icmp = ICMPv6PacketTooBig(mtu=1280) if kind == "too-big" else ICMPv6DestUnreach(code=4)
        l3 = IPv6(src=src, dst=dst) / icmp
    else:
        l3 = IP(src=src, dst=dst) / (ICMP(type=3, code=4, nexthopmtu=1280) if kind == "too-big"
                                     else ICMP(type=3, code=3))
    return raw(Ether(src="02:be:00:00:00:01", dst=CLIENT_MAC) / l3 / quoted)


@pytest.mark.parametrize(
    "vip,ep,client,sender,kind",
    [("10.96.0.1", "10.1.0.5", "192.0.2.71", "10.9.9.9", "too-big"),  # a router on the path
     ("10.96.0.1", "10.1.0.5", "192.0.2.71", "10.1.0.5", "unreachable"),  # the backend
     ("fd00:96::1", "fd00:1::5", "2001:db8::71", "fd00:9::9", "too-big"),
     ("fd00:96::1", "fd00:1::5", "2001:db8::71", "fd00:1::5", "unreachable")],
)
def test_icmp_errors_about_a_balanced_flow_leave_quoting_the_vip(dp, vip, ep, client, sender,
                                                                  kind):
    from scapy.layers.inet import ICMP, IPerror, TCPerror
    from scapy.layers.inet6 import IPerror6

    dp.apply(ServiceTable.of([svc("s", vip, 80, eps(ep, port=8080))]))
    act, out = xdp(dp, frame(client, vip, sport=46100, flags="S", payload=b"x" * 1400))
    assert act == XDP_REDIRECT
    quoted = Ether(out).payload  # what the backend side saw: client -> ep:8080
    before = glob(dp, "icmp_revnat")
    r = prog_test_run(dp.tc_fd, icmp_error(sender, client, quoted, kind))
    assert r.retval == TC_ACT_OK
    p = Ether(r.data)
    v6 = ":" in vip
    inner = p[IPerror6] if v6 else p[IPerror]
    assert inner.src == client and inner.dst == vip and p[TCPerror].dport == 80
    assert p[TCPerror].sport == 46100
    outer = p[IPv6] if v6 else p[IP]
    assert outer.dst == client and outer.src == (vip if sender == ep else sender)
    assert glob(dp, "icmp_revnat") == before + 1
    # Every checksum the client checks is valid: outer IP, ICMP, the quoted IP header.
    q = Ether(r.data)
    if v6:
        icmp = q[IPv6].payload
        del icmp.cksum
    else:
        del q[IP].chksum
        del q[ICMP].chksum
        del q[IPerror].chksum
    again = Ether(raw(q))
    if v6:
        assert again[IPv6].payload.cksum == p[IPv6].payload.cksum
    else:
        assert again[IP].chksum == p[IP].chksum and again[ICMP].chksum == p[ICMP].chksum
        assert again[IPerror].chksum == p[IPerror].chksum
    # And the quoted segment's own checksum: valid again for the client -> VIP:80 it was.
    # (From the bytes: scapy cuts a port-unreachable's quote at 128 bytes, RFC 4884.)
    inner = 14 + (40 if v6 else (r.data[14] & 0xF) * 4) + 8
    seg = r.data[inner + (40 if v6 else (r.data[inner] & 0xF) * 4):]
    pkt = (IPv6(src=client, dst=vip) if v6 else IP(src=client, dst=vip)) / TCP(seg)
    sent = pkt[TCP].chksum
    del pkt[TCP].chksum
    assert (IPv6 if v6 else IP)(raw(pkt))[TCP].chksum == sent
    # An error about no balanced flow goes out as it came.
    other = icmp_error(sender, client, IP(src=client, dst="10.1.0.99") / TCP(sport=1, dport=2)
                       if not v6 else IPv6(src=client, dst="fd00:1::99") / TCP(sport=1, dport=2),
                       kind)
    assert prog_test_run(dp.tc_fd, other).data == other


@pytest.mark.parametrize(
    "vip,ep,client,proto",
    [("10.96.0.1", "10.1.0.5", "192.0.2.70", "TCP"),
     ("10.96.0.53", "10.1.0.6", "192.0.2.70", "UDP"),
     ("fd00:96::1", "fd00:1::5", "2001:db8::70", "TCP")],
)
def test_replies_leave_from_the_vip(dp, vip, ep, client, proto):
    dp.apply(ServiceTable.of([svc("s", vip, 80, eps(ep, port=8080), proto=proto)]))
    act, _ = xdp(dp, frame(client, vip, sport=46000, proto=proto, flags="S"))
    assert act == XDP_REDIRECT
    r = prog_test_run(dp.tc_fd, reply(ep, client, 8080, 46000, proto))
    assert r.retval == TC_ACT_OK
    p = Ether(r.data)
    l3 = p[IPv6] if IPv6 in p else p[IP]
    l4 = p[TCP] if TCP in p else p[UDP]
    assert l3.src == vip and l3.dst == client and l4.sport == 80 and l4.dport == 46000
    assert checksums_valid(r.data)
    assert vip_row(dp, "s")["reply_packets"] == 1
    # A packet of no balanced flow goes out as it came.
    other = reply(ep, client, 8080, 46001, proto)
    assert prog_test_run(dp.tc_fd, other).data == other

    # edge_reply, on a backend's interface: the same rewrite; forwarded (TTL one less) by
    # the route to the client while the edge is attached (edge_uplink set), else left to
    # the kernel to route. Run in a namespace of its own, whose routes the test sets: a
    # test run's packet comes from that namespace's loopback.
    fd = dp.prog_fd("edge_reply")
    uplink = dp.table("edge_uplink")
    ns = f"he-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in ("ip link set lo up", "ip link add d0 type veth peer name d1",
                    "ip link set d0 up", "ip link set d1 up",
                    "sysctl -qw net.ipv4.conf.all.forwarding=1",
                    "sysctl -qw net.ipv6.conf.all.forwarding=1",
                    "ip route add 192.0.2.0/24 dev d0", "ip -6 route add 2001:db8::/64 dev d0"):
            subprocess.run(["ip", "netns", "exec", ns, *cmd.split()], check=True)
        for out_ifindex in (0, 1):
            uplink[ctypes.c_uint32(0)] = ctypes.c_uint32(out_ifindex)
            try:
                r = in_netns(ns, lambda: prog_test_run(fd, reply(ep, client, 8080, 46000,
                                                                 proto)))
            finally:
                uplink[ctypes.c_uint32(0)] = ctypes.c_uint32(0)
            p = Ether(r.data)
            l3 = p[IPv6] if IPv6 in p else p[IP]
            l4 = p[TCP] if TCP in p else p[UDP]
            assert r.retval == (TC_ACT_REDIRECT if out_ifindex else TC_ACT_OK)
            assert l3.src == vip and l4.sport == 80 and checksums_valid(r.data)
            assert (l3.hlim if IPv6 in p else l3.ttl) == 64 - (1 if out_ifindex else 0)
        # No route to the client: given the VIP back, left to the kernel (and counted).
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "del", "d0"], check=True)
        uplink[ctypes.c_uint32(0)] = ctypes.c_uint32(1)
        try:
            kernel = glob(dp, "reply_kernel")
            r = in_netns(ns, lambda: prog_test_run(fd, reply(ep, client, 8080, 46000, proto)))
        finally:
            uplink[ctypes.c_uint32(0)] = ctypes.c_uint32(0)
        assert r.retval == TC_ACT_OK and glob(dp, "reply_kernel") == kernel + 1
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    assert prog_test_run(fd, other).retval == 0xFFFFFFFF  # TC_ACT_UNSPEC (-1): the next filter's


TC_ACT_REDIRECT = 7


@pytest.mark.parametrize(
    "vip,ep,port,proto",
    [("10.96.0.1", "10.1.0.5", 8080, "TCP"),
     ("10.96.0.1", "10.1.0.5", 80, "TCP"),
     # Address words with equal sums: the address change is 0 mod 0xffff, the checksum's
     # form cannot be told from the helper's result, and the port goes through it again.
     ("10.96.0.1", "10.1.0.96", 8080, "TCP"),
     ("10.96.0.53", "10.1.0.6", 5353, "UDP"),
     ("fd00:96::1", "fd00:1::5", 8443, "TCP")],
)
def test_tc_balancer_rewrites_with_valid_checksums(dp, vip, ep, port, proto):
    """edge_tc_balance on a full-checksum frame (as from a wire): destination, port, MACs
    and TTL rewritten, every checksum valid."""
    dp.apply(ServiceTable.of([svc("s", vip, 80, eps(ep, port=port), proto=proto)]))
    fd = dp.prog_fd("edge_tc_balance")
    for flags in ("S", "A"):  # a new flow, then the fast path
        pkt = frame("192.0.2.90" if ":" not in vip else "2001:db8::90", vip, sport=47000,
                    proto=proto, flags=flags, payload=b"x" * 300)
        r = prog_test_run(fd, raw(pkt))
        assert r.retval == TC_ACT_REDIRECT, (flags, r.retval)
        p = Ether(r.data)
        l3 = p[IPv6] if IPv6 in p else p[IP]
        l4 = p[TCP] if TCP in p else p[UDP]
        assert l3.dst == ep and l4.dport == port and l4.sport == 47000
        assert (l3.hlim if IPv6 in p else l3.ttl) == 63
        assert p.dst == mac_str(mac_for(ep)) and r.data.endswith(b"x" * 300)
        assert checksums_valid(r.data), (flags, p.show2(dump=True))


def test_pinned_counters_are_readable_without_the_agent(dp):
    from accel.datapath.edge import open_pinned

    dp.apply(ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1"))]))
    xdp(dp, frame("192.0.2.80", "10.96.0.1", flags="S"))
    reader = open_pinned(dp.pin_dir)
    try:
        mine, theirs = dp.counters(), reader.counters()
        assert theirs["global"] == mine["global"]
        assert [{**r, "service": ""} for r in mine["vips"]] == theirs["vips"]
        assert theirs["vips"][0]["vip"] == "10.96.0.1" and theirs["vips"][0]["packets"] == 1
    finally:
        reader.close()
    # The reader left the agent's maps alone.
    assert backend_of(dp, "192.0.2.80", 40000) == "10.1.0.1"
    assert open_pinned(f"/sys/fs/bpf/he-none-{secrets.token_hex(3)}") is None


# ---- lifecycle ----------------------------------------------------------------------------


def test_restarted_agent_adopts_pinned_state_and_close_unpins(hops):
    pin = f"/sys/fs/bpf/he-{secrets.token_hex(4)}"
    table = ServiceTable.of([svc("web", "10.96.0.1", 80, eps("10.1.0.1", "10.1.0.2", "10.1.0.3"))])
    first = EdgeDatapath(None, pin, 16411, max_vips=8, resolver=hops)
    try:
        first.apply(table)
        flows = {s: backend_of(first, "198.19.2.1", s, flags="S") for s in range(50)}
    finally:
        first.close(unpin=False)
    second = EdgeDatapath(None, pin, 16411, max_vips=8, resolver=hops)
    try:
        second.load()
        # Before the new agent applies anything, the pinned VIP still serves.
        assert {s: backend_of(second, "198.19.2.1", s) for s in flows} == flows
        second.apply(table)
        assert {s: backend_of(second, "198.19.2.1", s) for s in flows} == flows
        second.apply(ServiceTable())
        assert xdp(second, frame("198.19.2.1", "10.96.0.1"))[0] == XDP_PASS
    finally:
        second.close()
    import os

    assert not os.path.exists(pin)


def test_maps_pinned_by_an_older_build_are_recreated(hops):
    """An agent left its maps pinned (--keep) and a newer build with another layout starts:
    bcc would open the old map as it is and the verifier refuse the programs. The edge
    starts its maps afresh instead of failing to start."""
    import os

    from bcc import BPF

    pin = f"/sys/fs/bpf/hs-{secrets.token_hex(4)}"
    os.makedirs(pin)
    old = BPF(text=f'BPF_TABLE_PINNED("array", u32, u64, edge_limits, 64, "{pin}/edge_limits");')
    old["edge_limits"]  # created and pinned with an 8-byte value
    dp = EdgeDatapath(None, pin, resolver=hops)
    try:
        dp.load()
        assert ctypes.sizeof(dp.table("edge_limits").Leaf) == 24  # struct edge_limit
    finally:
        dp.close()
        old.cleanup()
        assert not os.path.exists(pin)


def test_a_failed_first_load_leaves_no_pins(hops, tmp_path, monkeypatch):
    """Programs this kernel refuses (here: edge_xdp calling a helper XDP may not use): the
    load fails with the program named, and the pin directory it made is gone again."""
    import os

    from accel.datapath.edge import EdgeError
    from tests.test_agent_lifecycle import with_rejected_helper

    monkeypatch.setenv("ACCEL_BPF_DIR", str(with_rejected_helper(
        tmp_path, "edge_lb.c", "int edge_xdp(struct xdp_md *ctx)\n{")))
    pin = f"/sys/fs/bpf/hf-{secrets.token_hex(4)}"
    dp = EdgeDatapath(None, pin, resolver=hops)
    with pytest.raises(EdgeError, match="edge_xdp"):
        dp.load()
    assert not os.path.exists(pin)
