"""The workload API's user-space side: decoding Address and Authorization resources
(malformed ones named precisely, unknown fields skipped), the held state, and the
ServiceTable made of it for one node."""

from __future__ import annotations

import ipaddress

import pytest

from accel.model import Endpoint, ValidationError
from accel.policy.rules import Action, Scope, StringMatch
from accel.xds.gen.istio import security_pb2 as sec
from accel.xds.gen.istio import workload_pb2 as wl
from accel.xds.workload.decode import AddressProcessor, AuthorizationProcessor
from accel.xds.workload.kinds import ADDRESS, AUTHORIZATION, pack, resource_name
from accel.xds.workload.resources import ServiceInfo, WorkloadInfo
from accel.xds.workload.state import WorkloadState
from accel.xds.workload.to_table import to_table
from tests import workload_resources as r
from tests.test_workload_policy import held

ip = ipaddress.ip_address
WEB = "shop/web.shop.svc.cluster.local"
PG = "db/pg.db.svc.cluster.local"


def build(node: str = r.NODE, addrs=None):
    return to_table(held(addrs or r.fixture_addresses(), r.fixture_authorizations()), node)


# -- decoding


def test_decodes_a_workload_and_a_service():
    wk = AddressProcessor().decode(r.uid("shop", "web-1"), r.fixture_addresses()[0])
    assert isinstance(wk, WorkloadInfo)
    assert wk.addresses == (ip("10.0.1.10"), ip("fd00::1:10"))
    assert (wk.namespace, wk.service_account, wk.node) == ("shop", "web", "n1")
    assert wk.ports_for(WEB)[0].target_port == 8080
    assert wk.policies == ("shop/web-allow-db",)
    svc = AddressProcessor().decode(WEB, r.service("shop", "web", ["10.96.0.10"], [(80, 8080)])
                                    .SerializeToString())
    assert isinstance(svc, ServiceInfo)
    assert svc.vips == (("", ip("10.96.0.10")),) and svc.key == WEB


def test_decodes_an_authorization():
    p = AuthorizationProcessor().decode("shop/web-allow-db", r.fixture_authorizations()[3])
    assert (p.key, p.scope, p.action, p.dry_run) == ("shop/web-allow-db",
                                                      Scope.WORKLOAD_SELECTOR, Action.ALLOW,
                                                      False)
    first = p.groups[0][0][0]
    assert first.principals == (StringMatch("prefix", "cluster.local/ns/shop/sa/web"),
                                StringMatch("suffix", "/sa/client"))
    assert p.groups[1][0][0].not_destination_ports == (9090,)


def test_unknown_fields_are_skipped():
    """A newer istiod's fields (any number we do not declare) change nothing."""
    extra = b"\xf8\x06\x01" + b"\x82\x07\x03abc"  # field 111 varint 1, field 112 "abc"
    a = r.fixture_addresses()[0]
    raw = a.SerializeToString()
    inner = a.workload.SerializeToString() + extra  # inside the Workload, and beside it
    with_extra = b"\x0a" + _varint(len(inner)) + inner + extra
    assert AddressProcessor().decode(None, with_extra) == AddressProcessor().decode(None, raw)
    pol = r.fixture_authorizations()[1]
    assert AuthorizationProcessor().decode(None, pol.SerializeToString() + extra) == \
        AuthorizationProcessor().decode(None, pol)


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def _svc(**kw) -> wl.Address:
    return r.service("default", "reviews", ["10.96.0.5"], [(9080, 9080)], **kw)


BAD_ADDRESSES = [
    (lambda: wl.Address(service=wl.Service(
        namespace="default", hostname="reviews.default.svc.cluster.local",
        addresses=[wl.NetworkAddress(address=b"\x01\x02\x03\x04\x05")])),
     "Address[default/reviews.default.svc.cluster.local].service.addresses[0].address: "
     "5 bytes is not an IPv4 or IPv6 address"),
    (lambda: r.service("default", "reviews", ["10.96.0.5"], [(0, 9080)]),
     "Address[default/reviews.default.svc.cluster.local].service.ports[0].service_port: "
     "port 0 is out of range 1-65535"),
    (lambda: r.service("default", "reviews", ["10.96.0.5"], [(9080, 70000)]),
     "Address[default/reviews.default.svc.cluster.local].service.ports[0].target_port: "
     "port 70000 is out of range 0-65535"),
    (lambda: r.service("default", "reviews", ["10.96.0.5"], [(80, 1), (80, 2)]),
     "Address[default/reviews.default.svc.cluster.local].service.ports[1].service_port: "
     "port 80 is listed twice"),
    (lambda: wl.Address(workload=wl.Workload(uid="K//Pod/ns/p", addresses=[b"\x0a\x00"])),
     "Address[K//Pod/ns/p].workload.addresses[0]: 2 bytes is not an IPv4 or IPv6 address"),
    (lambda: r.workload("ns", "p", ["10.0.0.1"], "n1", services={"nohost": [(80, 80)]}),
     "Address[Kubernetes//Pod/ns/p].workload.services[nohost]: the key must be "
     "namespace/hostname"),
    (lambda: wl.Address(workload=wl.Workload(name="p", namespace="ns")),
     "Address: resource has no name"),
]


@pytest.mark.parametrize("make,message", BAD_ADDRESSES)
def test_malformed_address_is_named(make, message):
    msg = make()
    with pytest.raises(ValidationError) as e:
        AddressProcessor().decode(None, msg.SerializeToString())
    assert str(e.value) == message


def test_address_without_a_kind_and_misnamed():
    with pytest.raises(ValidationError) as e:
        AddressProcessor().decode("x", wl.Address())
    assert str(e.value) == "Address[x]: resource has no name"
    with pytest.raises(ValidationError) as e:
        AddressProcessor().decode("other", _svc())
    assert str(e.value) == ("Address[default/reviews.default.svc.cluster.local]: sent under "
                            "the name 'other'")
    with pytest.raises(ValidationError) as e:
        AddressProcessor().decode(None, b"\x0a\x05abc")
    assert str(e.value).startswith("Address: malformed Address")


def _pol(match: sec.Match, **kw) -> sec.Authorization:
    return r.authz("ns", "p", sec.NAMESPACE, sec.DENY, [[[match]]], **kw)


BAD_POLICIES = [
    (_pol(sec.Match(source_ips=[sec.Address(address=b"\x0a\x00\x00", length=8)])),
     "Authorization[ns/p].groups[0].rules[0].matches[0].source_ips[0].address: 3 bytes is "
     "not an IPv4 or IPv6 address"),
    (_pol(sec.Match(not_destination_ips=[sec.Address(address=b"\x0a\x00\x00\x00",
                                                     length=33)])),
     "Authorization[ns/p].groups[0].rules[0].matches[0].not_destination_ips[0].length: "
     "/33 is longer than the address"),
    (_pol(sec.Match(destination_ports=[80, 65536])),
     "Authorization[ns/p].groups[0].rules[0].matches[0].destination_ports[1]: port 65536 "
     "is out of range 1-65535"),
    (_pol(sec.Match(namespaces=[sec.StringMatch()])),
     "Authorization[ns/p].groups[0].rules[0].matches[0].namespaces[0]: StringMatch sets no "
     "exact, prefix, suffix or presence"),
    (r.authz("ns", "p", 7, sec.DENY, []), "Authorization[ns/p].scope: unknown scope 7"),
    (r.authz("ns", "p", sec.GLOBAL, 2, []), "Authorization[ns/p].action: unknown action 2"),
    (r.authz("ns", "", sec.GLOBAL, sec.DENY, []), "Authorization[ns/].name: missing required "
     "field"),
]


@pytest.mark.parametrize("msg,message", BAD_POLICIES)
def test_malformed_authorization_is_named(msg, message):
    with pytest.raises(ValidationError) as e:
        AuthorizationProcessor().decode_all({resource_name(msg): msg.SerializeToString()})
    assert str(e.value) == message


def test_decode_all_is_all_or_nothing_and_memoised():
    p = AddressProcessor()
    good = {resource_name(a): a.SerializeToString() for a in r.fixture_addresses()}
    first = p.decode_all(good)
    again = p.decode_all(good)
    assert all(again[n] is first[n] for n in good)  # unchanged bytes: not decoded again
    bad = dict(good)
    bad[WEB] = _svc().SerializeToString()  # sent under another name
    with pytest.raises(ValidationError):
        p.decode_all(bad)


def test_pack_uses_istio_type_urls():
    assert pack(r.fixture_addresses()[0]).type_url == ADDRESS
    assert pack(r.fixture_authorizations()[0]).type_url == AUTHORIZATION
    assert ADDRESS == "type.googleapis.com/istio.workload.Address"
    assert AUTHORIZATION == "type.googleapis.com/istio.security.Authorization"


def test_state_applies_upserts_and_removals():
    s = held(r.fixture_addresses(), r.fixture_authorizations())
    assert WEB in s.services and r.uid("db", "pg-1") in s.workloads
    s2 = s.apply(ADDRESS, {}, [WEB, r.uid("db", "pg-1"), "never-sent"])
    assert WEB not in s2.services and r.uid("db", "pg-1") not in s2.workloads
    assert WEB in s.services  # the old state is untouched
    s3 = s2.apply(AUTHORIZATION, {}, ["db/no-ssh"])
    assert "db/no-ssh" not in s3.policies and len(s3.policies) == len(s.policies) - 1
    assert isinstance(s3, WorkloadState)


# -- the table


def test_table_balances_each_vip_port_over_healthy_endpoints():
    b = build()
    t = b.table
    web4 = t.get(f"{WEB}@10.96.0.10:80")
    assert web4 is not None and web4.port == 80 and web4.protocol == "TCP"
    # web-3 is UNHEALTHY: left out; web-2 listens on its own target port 8081
    assert sorted(web4.endpoints) == [Endpoint(ip("10.0.1.10"), 8080),
                                      Endpoint(ip("10.0.1.11"), 8081)]
    web6 = t.get(f"{WEB}@[fd00:96::10]:80")
    assert web6.endpoints == (Endpoint(ip("fd00::1:10"), 8080),)
    assert any("no IPv6 address" in n for n in b.ignored[f"{WEB}@[fd00:96::10]:80"])
    pg = t.get(f"{PG}:5432")
    # target_port 0: pg-1 has no own port either -> left out; pg-2 says 5433. Weight =
    # capacity.
    assert pg.endpoints == (Endpoint(ip("10.0.2.11"), 5433),)
    assert any("pg-1: no target port" in n for n in b.ignored[f"{PG}:5432"])


def test_waypoint_service_left_and_reported():
    b = build()
    cart = "shop/cart.shop.svc.cluster.local:80"
    assert b.table.get(cart) is None
    assert "waypoint" in b.skipped[cart]
    assert b.left[cart] == (ip("10.96.0.30"), 80, "TCP")


def test_mesh_addresses_are_this_nodes_workloads():
    nets = {str(n) for n in build().table.mesh_cidrs}
    assert nets == {"10.0.1.10/32", "fd00::1:10/128", "10.0.1.20/32", "10.0.2.10/32",
                    "10.0.2.30/32"}


def _pg(mode: int, prefs: list[int], **kw) -> list[wl.Address]:
    pg = r.host("pg", "db")
    lb = wl.LoadBalancing(mode=mode, routing_preference=prefs, **kw)
    return [
        r.workload("db", "a", ["10.0.2.1"], "n1", services={f"db/{pg}": []}, zone="z1"),
        r.workload("db", "b", ["10.0.2.2"], "n2", services={f"db/{pg}": []}, zone="z1"),
        r.workload("db", "c", ["10.0.2.3"], "n3", services={f"db/{pg}": []}, zone="z2"),
        r.workload("db", "d", ["10.0.2.4"], "n3", services={f"db/{pg}": []}, zone="z2",
                   healthy=False),
        r.service("db", "pg", ["10.96.0.20"], [(5432, 5432)], load_balancing=lb),
    ]


def _eps(addrs, node="n1"):
    t = to_table(held(addrs, []), node).table.get(f"{PG}:5432")
    return None if t is None else sorted(str(e.address) for e in t.endpoints)


LB = wl.LoadBalancing


def test_failover_prefers_the_closest_tier_with_endpoints():
    assert _eps(_pg(LB.FAILOVER, [LB.REGION, LB.ZONE, LB.NODE])) == ["10.0.2.1"]
    # on n2: same zone z1, not the same node -> a and b
    assert _eps(_pg(LB.FAILOVER, [LB.REGION, LB.ZONE, LB.NODE]), "n2") == ["10.0.2.2"]
    addrs = _pg(LB.FAILOVER, [LB.REGION, LB.ZONE, LB.NODE])
    addrs += [r.workload("ops", "x", ["10.0.9.1"], "n4", zone="z2")]
    assert _eps(addrs, "n4") == ["10.0.2.3"]  # zone z2: c (d is unhealthy)


def test_strict_keeps_only_full_matches():
    addrs = _pg(LB.STRICT, [LB.ZONE]) + [r.workload("ops", "x", ["10.0.9.1"], "n4",
                                                    zone="z3")]
    assert _eps(addrs, "n4") == []  # nothing in z3: no endpoints, as Istio says
    assert _eps(_pg(LB.STRICT, [LB.ZONE]), "n1") == ["10.0.2.1", "10.0.2.2"]
    b = to_table(held(_pg(LB.STRICT, [LB.ZONE]), []), "n9")  # no workload on n9
    assert f"{PG}:5432" in b.skipped


def test_allow_all_health_policy_and_passthrough():
    got = _eps(_pg(LB.FAILOVER, [LB.ZONE], health_policy=LB.ALLOW_ALL), "n3")
    assert got == ["10.0.2.3", "10.0.2.4"]
    b = to_table(held(_pg(LB.PASSTHROUGH, []), []), "n1")
    assert "PASSTHROUGH" in b.skipped[f"{PG}:5432"]


def test_enum_values_of_a_newer_istiod_are_valid_input():
    """An unknown load-balancing mode or scope leaves the service on the kernel path; an
    unknown workload status is not HEALTHY."""
    for lb in (LB(mode=9), LB(mode=LB.FAILOVER, routing_preference=[LB.ZONE, 42])):
        b = to_table(held(_pg(LB.STRICT, []) + [r.service("db", "pg", ["10.96.0.20"],
                                                          [(5432, 5432)], load_balancing=lb)],
                          []), "n1")
        assert "unknown to meshaccel" in b.skipped[f"{PG}:5432"]
    w = r.workload("db", "a", ["10.0.2.1"], "n1")
    w.workload.status = 7
    assert AddressProcessor().decode(None, w.SerializeToString()).healthy is False


def test_vip_port_clash_is_reported_not_nacked():
    addrs = r.fixture_addresses() + [r.service("other", "web", ["10.96.0.10"], [(80, 80)])]
    b = build(addrs=addrs)
    # by name order: other/... keeps it
    assert b.skipped[f"{WEB}@10.96.0.10:80"] == ("10.96.0.10:80 is already taken by service "
                                                  "'other/web.other.svc.cluster.local:80'")
    assert b.table.get("other/web.other.svc.cluster.local:80") is not None
    assert b.table.get(f"{WEB}@[fd00:96::10]:80") is not None


def test_fuzzed_stream_is_decoded_or_refused_by_name():
    """Random byte flips, cuts and splices of valid resources: each decodes or raises
    ValidationError (a NACK) naming the resource kind; whatever decodes builds a table and
    verdicts without error."""
    import random

    from accel.xds.workload.to_verdicts import to_verdicts

    rng = random.Random(14)
    valid = [(AddressProcessor, a.SerializeToString()) for a in r.fixture_addresses()] + \
        [(AuthorizationProcessor, p.SerializeToString()) for p in r.fixture_authorizations()]
    accepted = refused = 0
    state = held(r.fixture_addresses(), r.fixture_authorizations())
    for _ in range(3000):
        proc, data = rng.choice(valid)
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(b))
            if op < 0.6:
                b[i] = rng.randrange(256)
            elif op < 0.8:
                del b[i:i + rng.randint(1, 8)]
            else:
                b[i:i] = rng.randbytes(rng.randint(1, 8))
            if not b:
                b = bytearray(b"\x00")
        p = proc()
        try:
            got = p.decode(None, bytes(b))
        except ValidationError as e:
            assert str(e).startswith(p.kind), e
            refused += 1
            continue
        accepted += 1
        type_url = ADDRESS if proc is AddressProcessor else AUTHORIZATION
        name = got.key if hasattr(got, "key") else got.uid
        s = state.apply(type_url, {name: got})
        to_table(s, r.NODE)
        to_verdicts(s, r.NODE)
    print(f"[fuzz] workload API: {accepted} accepted, {refused} refused")
    assert accepted > 100 and refused > 100


def test_rebuild_keeps_unchanged_services_as_the_same_objects():
    """One endpoint's health changes: only that service is new (the map writers skip the
    rest by identity)."""
    first = build().table
    addrs = r.fixture_addresses()
    addrs[1].workload.status = wl.UNHEALTHY  # web-2
    again = to_table(held(addrs, []), r.NODE, previous=first).table
    d = again.delta(first)
    assert {s.name for s in d.added} == {f"{WEB}@10.96.0.10:80"}
    assert again.get(f"{PG}:5432") is first.get(f"{PG}:5432")
    assert again.canonical() == to_table(held(addrs, []), r.NODE).table.canonical()


def test_view_applies_responses_and_keeps_the_last_good_state_on_a_nack():
    from accel.xds.workload.view import WorkloadView

    view = WorkloadView(r.NODE)
    view.apply(AUTHORIZATION, {resource_name(p): p.SerializeToString()
                               for p in r.fixture_authorizations()})
    good = view.apply(ADDRESS, {resource_name(a): a.SerializeToString()
                                for a in r.fixture_addresses()})
    assert good.table.table.get(f"{PG}:5432") is not None and good.policy.verdicts.policed
    bad = r.service("db", "pg", ["10.96.0.20"], [(5432, 0)])
    bad.service.addresses[0].address = b"\x01\x02\x03"
    with pytest.raises(ValidationError) as e:
        view.apply(ADDRESS, {PG: bad.SerializeToString(),
                             r.uid("db", "pg-2"): r.fixture_addresses()[6].SerializeToString()},
                   remove=[WEB])
    assert str(e.value).startswith(f"Address[{PG}].service.addresses[0].address: 3 bytes")
    assert view.last is good and WEB in view.state.services  # nothing changed
    after = view.apply(ADDRESS, {}, remove=[WEB])
    assert after.table.table.get(f"{WEB}@10.96.0.10:80") is None
    assert after.table.table.get(f"{PG}:5432") is good.table.table.get(f"{PG}:5432")
    with pytest.raises(ValidationError):
        view.apply("type.googleapis.com/envoy.config.listener.v3.Listener", {})


def test_ztunnel_node():
    from accel.xds.workload.kinds import ztunnel_node

    n = ztunnel_node("n1", "10.0.0.1", "ztunnel-abc")
    assert n.id == "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    assert n.metadata["NODE_NAME"] == "n1" and n.metadata["INSTANCE_IPS"] == "10.0.0.1"
    assert ztunnel_node("n1", "10.0.0.1", node_id="x").id == "x"
