"""translate.py: ServiceTable <-> Envoy v3 resources, the mapping rules and their errors."""

from __future__ import annotations

import ipaddress

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, health_check_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from accel.model import Endpoint, Guard, Service, ServiceTable, ValidationError, endpoint_loops
from accel.xds import translate as tr
from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, pack, sock, tcp_listener
from accel.xds.translate import CLUSTER, ENDPOINT, LISTENER, ROUTE

# ---------------------------------------------------------------- helpers


def wire(res: tr.Resources) -> tr.Resources:
    """Through the wire: pack each type into a DiscoveryResponse, serialize, parse, unpack."""
    out = {}
    for t in tr.PUSH_ORDER:
        resp = discovery_pb2.DiscoveryResponse(type_url=t, version_info="1",
                                               resources=list(tr.pack_all(res.of(t)).values()))
        back = discovery_pb2.DiscoveryResponse.FromString(resp.SerializeToString())
        out[t] = tr.unpack(t, back.resources)
    return tr.Resources(out[LISTENER], out[ROUTE], out[CLUSTER], out[ENDPOINT])


def one(listeners=(), clusters=(), assignments=(), routes=()) -> tr.Resources:
    return tr.Resources({x.name: x for x in listeners}, {x.name: x for x in routes},
                        {x.name: x for x in clusters}, {x.cluster_name: x for x in assignments})


def simple(**kw) -> tr.Resources:
    return one([tcp_listener("l", "10.96.0.1", 80, "c")], [eds_cluster("c")],
               [cla("c", locality(lbe("10.0.0.1", 8080)))], **kw)


def error_of(res: tr.Resources, **kw) -> str:
    with pytest.raises(ValidationError) as e:
        tr.to_table(res, **kw)
    return str(e.value)


def weights(table: ServiceTable) -> dict[str, tuple[int, bool]]:
    return {str(ep): (ep.weight, ep.healthy) for ep in table.services[0].endpoints}


# ---------------------------------------------------------------- round trip

names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
v4 = st.integers(0x0A000001, 0x0AFFFFFE).map(ipaddress.IPv4Address)
v6 = st.integers(1, 2**64).map(lambda i: ipaddress.IPv6Address((0xFD00 << 112) | i))
addrs = st.one_of(v4, v6)
endpoints = st.builds(Endpoint, address=addrs, port=st.integers(1, 65535),
                      weight=st.integers(1, 65535), healthy=st.booleans())


@st.composite
def tables(draw) -> ServiceTable:
    services = []
    keys = set()
    for name in draw(st.lists(names, unique=True, max_size=8)):
        vip, port = draw(addrs), draw(st.integers(1, 65535))
        proto = draw(st.sampled_from(["TCP", "UDP"]))
        if (vip, port, proto) in keys:
            continue
        keys.add((vip, port, proto))
        eps = draw(st.lists(endpoints, max_size=6, unique_by=lambda e: (e.address, e.port)))
        eps = [e for e in eps if (e.address, e.port) != (vip, port)]
        services.append(Service(name, vip, port, proto, tuple(eps), draw(st.booleans())))
    nets = st.lists(st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False),
                              addrs, st.integers(8, 32)), max_size=3, unique=True)
    rate = draw(st.integers(0, 10_000_000))
    guard = Guard(tuple(draw(nets)), rate, draw(st.integers(1 if rate else 0, 100_000_000)))
    assume(not any(endpoint_loops(services)))  # an endpoint at another VIP:port is refused
    return ServiceTable(tuple(services), mesh_cidrs=tuple(draw(nets)), guard=guard)


@settings(max_examples=150, deadline=None)
@given(tables())
def test_round_trip(table: ServiceTable) -> None:
    back = tr.to_table(wire(tr.to_resources(table))).table
    assert back.canonical() == table.canonical()


def test_resources_shape_for_grpc_and_agents() -> None:
    svc = Service("reviews", "10.96.0.10", 9080, "TCP",
                  (Endpoint("10.0.0.1", 9080, 3), Endpoint("10.0.0.2", 9080, 1, False)), True)
    res = tr.to_resources(ServiceTable((svc,)))
    assert set(res.listeners) == {"reviews", "reviews.vip"}
    vip = res.listeners["reviews.vip"]
    assert vip.address.socket_address.address == "10.96.0.10"
    assert vip.metadata.filter_metadata["meshaccel"]["edge"] is True
    api = res.listeners["reviews"]
    hcm = hcm_pb2.HttpConnectionManager()
    assert api.api_listener.api_listener.Unpack(hcm)
    assert hcm.rds.route_config_name == "reviews.route" and hcm.rds.config_source.HasField("ads")
    assert hcm.http_filters[-1].typed_config.type_url == tr.ROUTER
    vh = res.routes["reviews.route"].virtual_hosts[0]
    assert list(vh.domains) == ["*"] and vh.routes[0].route.cluster == "reviews"
    c = res.clusters["reviews"]
    assert c.type == cluster_pb2.Cluster.EDS and c.eds_cluster_config.eds_config.HasField("ads")
    loc = res.endpoints["reviews"].endpoints[0]
    assert loc.load_balancing_weight.value == 1
    assert [(e.load_balancing_weight.value, e.health_status) for e in loc.lb_endpoints] == [
        (3, health_check_pb2.HEALTHY), (1, health_check_pb2.UNHEALTHY)]


def test_udp_service_uses_the_udp_proxy_listener_filter() -> None:
    svc = Service("dns", "fd00::53", 53, "UDP", (Endpoint("fd00::1", 53),))
    lst = tr.to_resources(ServiceTable((svc,))).listeners["dns.vip"]
    assert lst.address.socket_address.protocol == address_pb2.SocketAddress.UDP
    assert lst.listener_filters[0].typed_config.type_url == tr.UDP_PROXY
    assert not lst.filter_chains


# ---------------------------------------------------------------- the mapping, foreign shapes


def test_service_name_edge_and_api_listeners() -> None:
    res = simple()
    res.listeners["l"] = tcp_listener("l", "10.96.0.1", 80, "c", service="web", edge=True)
    res.listeners["grpc"] = listener_pb2.Listener(
        name="grpc", api_listener=api_listener_pb2.ApiListener(
            api_listener=pack(hcm_pb2.HttpConnectionManager())))
    t = tr.to_table(res).table
    assert [(s.name, s.edge, str(s.vip), s.port) for s in t.services] == [
        ("web", True, "10.96.0.1", 80)]


def test_two_listeners_on_one_cluster_take_their_listener_names() -> None:
    res = simple()
    res.listeners["l6"] = tcp_listener("l6", "fd00::1", 80, "c")
    t = tr.to_table(res).table
    assert sorted(s.name for s in t.services) == ["l", "l6"]


def test_http_connection_manager_inline_and_rds() -> None:
    def hcm_listener(name: str, vip: str, hcm) -> listener_pb2.Listener:
        return listener_pb2.Listener(name=name, address=sock(vip, 80), filter_chains=[
            listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))])])

    rc = route_pb2.RouteConfiguration(name="r", virtual_hosts=[route_components_pb2.VirtualHost(
        name="all", domains=["*"], routes=[route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster="c"))])])
    inline = hcm_pb2.HttpConnectionManager(stat_prefix="x", route_config=rc)
    rds = hcm_pb2.HttpConnectionManager(stat_prefix="y", rds=hcm_pb2.Rds(route_config_name="r"))
    res = simple()
    res.listeners = {"a": hcm_listener("a", "10.96.0.1", inline),
                     "b": hcm_listener("b", "10.96.0.2", rds)}
    res.routes = {"r": rc}
    t = tr.to_table(res)
    assert sorted(s.name for s in t.table.services) == ["a", "b"]
    assert t.rds_names == {"r"}
    # RDS not there yet: the client holds the listener back (strict mode says why).
    res.routes = {}
    assert tr.to_table(res, strict=False).pending == {"b": "RouteConfiguration 'r'"}
    assert "route_config_name 'r' names no RouteConfiguration" in error_of(res)
    # A virtual host naming the VIP wins over "*"; one splitting requests by path between
    # clusters is L7: the VIP is left to the kernel path, said why, never NACKed.
    vh = rc.virtual_hosts.add(name="by-ip", domains=["10.96.0.2:80", "web.local"])
    vh.routes.add(match=route_components_pb2.RouteMatch(prefix="/api"),
                  route=route_components_pb2.RouteAction(cluster="c2"))
    vh.routes.add(match=route_components_pb2.RouteMatch(prefix="/"),
                  route=route_components_pb2.RouteAction(cluster="c"))
    res.routes = {"r": rc}
    t = tr.to_table(res)
    assert [str(s.vip) for s in t.table.services] == ["10.96.0.1"]
    assert "by L7 attributes" in t.skipped["b"], t.skipped
    del vh.routes[0]
    t = tr.to_table(res)
    assert sorted(s.name for s in t.table.services) == ["a", "b"] and not t.skipped


def test_static_and_strict_dns_clusters_with_ip_endpoints() -> None:
    st_c = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC,
                               load_assignment=cla("c", locality(lbe("10.0.0.9", 81, 2))))
    res = simple()
    res.clusters = {"c": st_c}
    res.endpoints = {}
    assert weights(tr.to_table(res).table) == {"10.0.0.9:81": (2, True)}
    st_c.type = cluster_pb2.Cluster.STRICT_DNS
    st_c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address \
        = "backend.example"
    # Host names are valid for a DNS cluster: nothing to balance to, left and said why.
    t = tr.to_table(res)
    assert not t.table.services and "DNS" in t.skipped["l"]
    assert "'backend.example' is not an IPv4 or IPv6 address" in t.skipped["l"]


def test_eds_service_name_and_resource_wrapper() -> None:
    res = simple()
    res.clusters = {"c": eds_cluster("c", service_name="c-eds")}
    res.endpoints = {"c-eds": cla("c-eds", locality(lbe("10.0.0.5", 80)))}
    t = tr.to_table(res)
    assert t.eds_names == {"c-eds"} and len(t.table.services[0].endpoints) == 1
    wrapped = pack(discovery_pb2.Resource(name="c", version="1", resource=pack(eds_cluster("c"))))
    assert list(tr.unpack(CLUSTER, [wrapped])) == ["c"]


def test_health_priorities_and_weights() -> None:
    H, U = health_check_pb2.HEALTHY, health_check_pb2.UNHEALTHY
    res = simple()
    res.endpoints = {"c": cla(
        "c",
        locality(lbe("10.0.0.1", 80, 5, U), lbe("10.0.0.2", 80, 1, health_check_pb2.DRAINING),
                 priority=0),
        locality(lbe("10.0.0.3", 80, 2, H), lbe("10.0.0.4", 80, None), priority=1),
        locality(lbe("10.0.0.5", 80, 7, H), priority=2))}
    # Priority 0 has nobody healthy, so priority 1 carries the traffic; the rest stay listed.
    assert weights(tr.to_table(res).table) == {
        "10.0.0.1:80": (5, False), "10.0.0.2:80": (1, False), "10.0.0.3:80": (2, True),
        "10.0.0.4:80": (1, True), "10.0.0.5:80": (7, False)}


def test_locality_weights_share_traffic_per_locality() -> None:
    res = simple()
    res.endpoints = {"c": cla(
        "c",
        locality(lbe("10.0.0.1", 80), weight=1, zone="a"),
        locality(lbe("10.0.0.2", 80), lbe("10.0.0.3", 80, 3), weight=1, zone="b"),
        locality(lbe("10.0.0.4", 80), zone="c"))}  # no weight in weighted mode: no traffic
    # a gets 1/2 of the traffic; b's 1/2 splits 1:3 -> 4:1:3 in eighths.
    assert weights(tr.to_table(res).table) == {
        "10.0.0.1:80": (4, True), "10.0.0.2:80": (1, True), "10.0.0.3:80": (3, True),
        "10.0.0.4:80": (1, False)}
    # Weights beyond 16 bits are scaled, keeping the ratio.
    res.endpoints = {"c": cla("c", locality(lbe("10.0.0.1", 80, 200000),
                                            lbe("10.0.0.2", 80, 1000)))}
    assert weights(tr.to_table(res).table) == {"10.0.0.1:80": (65535, True),
                                               "10.0.0.2:80": (328, True)}


# ---------------------------------------------------------------- errors


def test_bad_listener_address_and_ports() -> None:
    res = simple()
    res.listeners["l"].address.socket_address.address = "not-an-ip"
    assert error_of(res).startswith("Listener[l].address.socket_address.address: 'not-an-ip'")
    res = simple()
    res.listeners["l"].address.socket_address.port_value = 0
    assert error_of(res) == ("Listener[l].address.socket_address.port_value: "
                             "port 0 is out of range 1-65535")
    res.listeners["l"].address.socket_address.port_value = 70000
    assert "port 70000 is out of range" in error_of(res)
    res = simple()
    res.endpoints["c"].endpoints[0].lb_endpoints[0].endpoint.address.socket_address \
        .port_value = 0
    assert error_of(res) == ("ClusterLoadAssignment[c].endpoints[0].lb_endpoints[0].endpoint."
                             "address.socket_address.port_value: port 0 is out of range 1-65535")
    # A wildcard listener is valid (Istio's 0.0.0.0_PORT): without a route config naming
    # IPs it has no VIP, and it is reported, not NACKed.
    res = simple()
    res.listeners["l"].address.socket_address.address = "0.0.0.0"
    t = tr.to_table(res)
    assert not t.table.services and "wildcard" in t.skipped["l"]


def test_unknown_cluster_duplicate_vip_and_filters() -> None:
    res = simple()
    res.listeners["l"] = tcp_listener("l", "10.96.0.1", 80, "nope")
    assert error_of(res) == "Listener[l]: references unknown cluster 'nope'"
    # Before CDS (or for listeners not changed in this update) the client just waits.
    assert tr.to_table(res, strict=False, cds_seen=False, check_clusters={"l"}).pending == {
        "l": "Cluster 'nope'"}
    assert "unknown cluster" in error_of(res, strict=False, check_clusters={"l"})

    res = simple()
    res.listeners["m"] = tcp_listener("m", "10.96.0.1", 80, "c")
    assert error_of(res) == ("Listener[m].address: duplicate VIP 10.96.0.1:80/TCP, "
                             "already used by Listener[l]")

    # A filter before the proxy (rbac, istio.stats, ...) is ignored at L4 and named.
    res = simple()
    flt = res.listeners["l"].filter_chains[0].filters
    flt.insert(0, listener_components_pb2.Filter(
        name="rbac", typed_config=any_pb2.Any(
            type_url="type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC")))
    t = tr.to_table(res)
    assert [s.name for s in t.table.services] == ["c"]
    assert t.ignored == {"c": ("network filter rbac",)}


def test_malformed_and_duplicate_resources() -> None:
    bad = any_pb2.Any(type_url=LISTENER, value=b"\x0a\xff\xff")
    with pytest.raises(ValidationError, match=r"^Listener resources\[0\]: malformed Any"):
        tr.unpack(LISTENER, [bad])
    res = simple()
    res.listeners["l"].filter_chains[0].filters[0].typed_config.value = b"\x12\xff"
    assert "Listener[l].filter_chains[0].filters[0].typed_config: malformed Any (TcpProxy)" \
        in error_of(res)
    with pytest.raises(ValidationError, match=r"^Listener\[l\]: duplicate Listener name"):
        tr.unpack(LISTENER, [pack(tcp_listener("l", "10.0.0.1", 1, "c"))] * 2)
    with pytest.raises(ValidationError, match="does not match the response type"):
        tr.unpack(LISTENER, [pack(eds_cluster("c"))])


def test_mesh_settings_cluster() -> None:
    table = ServiceTable((), mesh_cidrs=(ipaddress.ip_network("10.201.0.0/16"),),
                         guard=Guard((ipaddress.ip_network("192.0.2.0/24"),), 1000, 2000))
    res = tr.to_resources(table)
    assert list(res.clusters) == [tr.MESH_CLUSTER] and not res.listeners
    assert tr.to_table(wire(res)).table == table
    assert tr.to_resources(ServiceTable()).clusters == {}
    meta = res.clusters[tr.MESH_CLUSTER].metadata.filter_metadata["meshaccel"]
    meta["guard"]["syn_rate"] = 1.5
    assert error_of(res) == ("Cluster[meshaccel.mesh].metadata.filter_metadata.meshaccel."
                             "guard.syn_rate: expected an integer, got 1.5")
    meta["bogus"] = 1
    assert "unknown field(s) bogus" in error_of(res)
