"""istiod's sidecar-shaped xDS (accel/xds/shapes/istio.py): never NACKed for what the kernel
cannot do; every ClusterIP service mapped with exactly its endpoints; what is left to the
kernel path (original_dst, Passthrough, L7 splits) and what is ignored (istio.stats, mTLS,
HTTP filters) is said. Then the same resources over a real ADS stream carry traffic
between lab pods, with getpeername() = the VIP."""

from __future__ import annotations

import os

import pytest

from accel.xds import translate as tr
from accel.xds.shapes.istio import host, outbound, sidecar_config

TCP = {"mysql": ("10.96.5.5", 3306, ["10.200.5.1", "10.200.5.2"])}
SNIFFED = {"ratings": ("10.96.5.6", 8080, ["10.200.5.3"])}
HTTP = {"reviews": ("10.96.5.7", 9080, ["10.200.5.4", "10.200.5.5", "10.200.5.6"]),
        "details": ("10.96.5.8", 9080, ["10.200.5.7"]),
        "productpage": ("10.96.5.9", 9081, ["10.200.5.8"])}


def services(t: tr.Translation) -> dict[tuple[str, int], list[str]]:
    return {(str(s.vip), s.port): sorted(str(e.address) for e in s.endpoints)
            for s in t.table.services}


def test_sidecar_config_maps_every_clusterip_service() -> None:
    t = tr.to_table(sidecar_config(TCP, SNIFFED, HTTP))
    want = {(vip, port): sorted(eps) for vip, port, eps in
            [*TCP.values(), *SNIFFED.values(), *HTTP.values()]}
    assert services(t) == want
    by_vip = {str(s.vip): s for s in t.table.services}
    # Named by their cluster (Istio's outbound|port||host), as Envoy knows them.
    assert by_vip["10.96.5.5"].name == outbound("mysql", 3306)
    assert "virtualOutbound" in t.skipped and "original_dst" in t.skipped["virtualOutbound"]
    ignored = t.ignored[outbound("mysql", 3306)]
    assert "network filter istio.stats" in ignored
    assert "network filter istio.metadata_exchange" in ignored
    assert any(i.startswith("listener filter envoy.filters.listener.tls_inspector")
               for i in ignored)
    assert any("envoy.filters.http.fault" in i for i in t.ignored[outbound("reviews", 9080)])


def test_l7_split_is_left_to_the_kernel_path_with_the_reason() -> None:
    res = sidecar_config(TCP, SNIFFED, HTTP,
                         split={"reviews": outbound("reviews-v2", 9080)})
    t = tr.to_table(res)
    assert ("10.96.5.7", 9080) not in services(t)
    assert ("10.96.5.8", 9080) in services(t)  # the other host on the port still is
    [(where, why)] = [(k, v) for k, v in t.skipped.items() if "reviews" in k]
    assert where == f"0.0.0.0_9080/{host('reviews')}:9080" and "by L7 attributes" in why


def test_a_vip_with_its_own_listener_is_that_listeners() -> None:
    """A ClusterIP that is also named by a 0.0.0.0_PORT virtual host (a port both TCP and
    HTTP in Istio's view) keeps its own listener's service; the other is reported."""
    http = dict(HTTP)
    http["mysql"] = tcp_mysql = ("10.96.5.5", 9080, ["10.200.5.1"])
    t = tr.to_table(sidecar_config({"mysql": tcp_mysql}, {}, http))
    assert services(t)[("10.96.5.5", 9080)] == ["10.200.5.1"]
    assert t.listeners[outbound("mysql", 9080)] == "10.96.5.5_9080"
    assert any("is served by Listener[10.96.5.5_9080]" in v for v in t.skipped.values())
    assert len(t.table.services) == len(HTTP) + 1


@pytest.mark.kernel
def test_istio_shaped_ads_carries_traffic(lab_factory, datapath) -> None:
    """The resources over ADS (SotW, the order istiod pushes) into a Runtime: ACKed, and a
    connect to the 0.0.0.0_9080 virtual host's ClusterIP reaches its endpoint, with
    getpeername() the VIP."""
    from accel.runtime import Runtime
    from tests.test_xds_client import Harness
    from tests.traffic import EchoServer, connect

    lab = lab_factory(3)
    client, a, b = lab.pods
    http = {"reviews": ("10.96.5.7", 8080, [str(a.ip), str(b.ip)]),
            "details": ("10.96.5.8", 8080, [str(a.ip)])}
    tcp = {"mysql": ("10.96.5.5", 8080, [str(b.ip)])}
    res = sidecar_config(tcp, {}, http, split={"details": outbound("details-v2", 8080)})
    runtime = Runtime(datapath=datapath)
    h = Harness(on_update=runtime.apply)
    try:
        assert list(res.routes) == ["8080"]  # the 0.0.0.0_8080 listener's
        h.push_all(res)
        # details splits by path: left to the kernel path, not a NACK.
        table = h.wait_table(lambda t: len(t.services) == 2)  # details is left: L7
        assert {str(s.vip) for s in table.services} == {"10.96.5.7", "10.96.5.5"}
        assert runtime.table is table
        with EchoServer(a, 8080), EchoServer(b, 8080):
            for vip in ("10.96.5.7", "10.96.5.5"):
                with connect(client, vip, 8080, timeout=5) as s:
                    assert s.getpeername() == (vip, 8080)
                    s.sendall(b"istio")
                    assert s.recv(5) == b"istio"
        assert datapath.counters()["connect_balanced"] >= 2

        # What was taken and what was left, as `accel services --json` shows it.
        from accel.api import client as api_client
        from accel.api import server as api_server

        runtime.xds = h.client
        sock = f"/run/accel/test-istio-{os.getpid()}.sock"
        api = api_server.serve(runtime, unix_path=sock)
        try:
            listed = {s["name"]: s for s in api_client.list_services(sock)["services"]}
            st = api_client.get_status(sock)
        finally:
            api.stop()
        mysql = listed[outbound("mysql", 8080)]
        assert mysql["accelerated"] and "network filter istio.stats" in mysql["reasons"]
        [details] = [s for s in listed.values() if s["vip"] == "10.96.5.8"]
        assert not details["accelerated"] and details["port"] == 8080
        assert "by L7 attributes" in details["reasons"][0]
        left = [s for s in listed.values() if not s["accelerated"]]
        assert (st["services"], st["services_left"]) == (2, len(left)) and left
    finally:
        h.close()


def test_transparent_listener_chains_by_vip_and_port() -> None:
    """An original_dst listener (Consul's transparent outbound listener on 127.0.0.1:15001):
    a chain for VIP/32 + destination_port is that VIP:port's service; a chain for every
    port of a VIP is the VIP's any-port service (port 0); passthrough chains (0.0.0.0/0)
    are destinations, not services; the listener's own loopback address is not a VIP (no
    NACK)."""
    from envoy.config.listener.v3 import listener_pb2

    from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, sock
    from accel.xds.shapes.istio import _istio_tcp_filters

    lst = listener_pb2.Listener(name="outbound_listener:127.0.0.1:15001",
                                address=sock("127.0.0.1", 15001))
    lst.listener_filters.add(name="envoy.filters.listener.original_dst")
    one = lst.filter_chains.add(filters=_istio_tcp_filters("db.default.dc1.internal.consul"))
    one.filter_chain_match.prefix_ranges.add(address_prefix="10.96.6.1").prefix_len.value = 32
    one.filter_chain_match.destination_port.value = 5432
    anyport = lst.filter_chains.add(filters=_istio_tcp_filters("api.default.dc1.internal"))
    anyport.filter_chain_match.prefix_ranges.add(address_prefix="10.96.6.2").prefix_len.value \
        = 32
    passthrough = lst.filter_chains.add(filters=_istio_tcp_filters("original-destination"))
    passthrough.filter_chain_match.prefix_ranges.add(
        address_prefix="0.0.0.0").prefix_len.value = 0
    db, api = "db.default.dc1.internal.consul", "api.default.dc1.internal"
    res = tr.Resources({lst.name: lst}, {}, {db: eds_cluster(db), api: eds_cluster(api)},
                       {db: cla(db, locality(lbe("10.200.6.1", 5432), lbe("10.200.6.2", 5432))),
                        api: cla(api, locality(lbe("10.200.6.3", 20000)))})
    t = tr.to_table(res)
    assert services(t) == {("10.96.6.1", 5432): ["10.200.6.1", "10.200.6.2"],
                           ("10.96.6.2", 0): ["10.200.6.3"]}
    assert not t.left  # the passthrough chain names no VIP


def test_weighted_clusters_keep_their_weights() -> None:
    """Istio's canary (a route's weighted_clusters, 90/10) and Kuma's split (tcp_proxy
    weighted_clusters on an outbound:IP:PORT listener): one service whose endpoints carry
    each cluster's share, split inside by endpoint weight."""
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

    from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, pack, tcp_listener

    res = sidecar_config({}, {}, {"reviews": ("10.96.5.7", 9080, ["10.200.5.4"])})
    v1, v2 = outbound("reviews", 9080), "outbound|9080|v2|" + host("reviews")
    res.clusters[v2] = eds_cluster(v2, service_name=v2)
    res.endpoints[v2] = cla(v2, locality(lbe("10.200.5.5", 9080), lbe("10.200.5.6", 9080, 3)))
    vh = next(v for v in res.routes["9080"].virtual_hosts if v.name.startswith("reviews"))
    action = vh.routes[0].route
    action.ClearField("cluster")
    for name, w in ((v1, 90), (v2, 10)):
        action.weighted_clusters.clusters.add(name=name).weight.value = w
    t = tr.to_table(res)
    [svc] = [s for s in t.table.services if str(s.vip) == "10.96.5.7"]
    # v1's one endpoint 90; v2's 10 split 1:3 -> 2.5 and 7.5: 90 : 2.5 : 7.5 = 36 : 1 : 3.
    assert {str(e.address): e.weight for e in svc.endpoints} == {
        "10.200.5.4": 36, "10.200.5.5": 1, "10.200.5.6": 3}
    assert svc.name in t.multi

    # Kuma: tcp_proxy weighted_clusters, 1:1.
    lst = tcp_listener("outbound:10.96.5.9:80", "10.96.5.9", 80, v1)
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix="kuma")
    tp.weighted_clusters.clusters.add(name=v1, weight=1)
    tp.weighted_clusters.clusters.add(name=v2, weight=1)
    lst.filter_chains[0].filters[0].typed_config.CopyFrom(pack(tp))
    res.listeners[lst.name] = lst
    t = tr.to_table(res)
    [kuma] = [s for s in t.table.services if str(s.vip) == "10.96.5.9"]
    assert kuma.name == "outbound:10.96.5.9:80"
    assert {str(e.address): e.weight for e in kuma.endpoints} == {
        "10.200.5.4": 4, "10.200.5.5": 1, "10.200.5.6": 3}


def test_go_control_plane_sample_is_taken_without_a_nack() -> None:
    """go-control-plane's sample: listener_0 on 0.0.0.0:10000, RDS through an API config
    source, a LOGICAL_DNS cluster with a host name. Nothing the kernel can balance (no IP
    anywhere), so no service, each part said why, and no NACK."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.listener.v3 import listener_components_pb2 as lc
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_components_pb2 as rcp
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    from accel.xds.shapes.builders import cla, lbe, locality, pack, sock

    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="http")
    hcm.rds.route_config_name = "local_route"
    api = hcm.rds.config_source.api_config_source
    api.api_type = api.GRPC
    api.grpc_services.add().envoy_grpc.cluster_name = "xds_cluster"
    hcm.http_filters.add(name="http-router")
    lst = listener_pb2.Listener(name="listener_0", address=sock("0.0.0.0", 10000),
                                filter_chains=[lc.FilterChain(filters=[lc.Filter(
                                    name="http-connection-manager", typed_config=pack(hcm))])])
    rc = route_pb2.RouteConfiguration(name="local_route", virtual_hosts=[rcp.VirtualHost(
        name="local_service", domains=["*"], routes=[rcp.Route(
            match=rcp.RouteMatch(prefix="/"),
            route=rcp.RouteAction(cluster="example_proxy_cluster",
                                  host_rewrite_literal="www.envoyproxy.io"))])])
    c = cluster_pb2.Cluster(name="example_proxy_cluster", type=cluster_pb2.Cluster.LOGICAL_DNS,
                            load_assignment=cla("example_proxy_cluster",
                                                locality(lbe("10.0.0.1", 443))))
    c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address = \
        "www.envoyproxy.io"
    t = tr.to_table(tr.Resources({lst.name: lst}, {rc.name: rc}, {c.name: c}, {}))
    assert not t.table.services and t.rds_names == {"local_route"}
    assert "name no IP" in t.skipped["listener_0"]
