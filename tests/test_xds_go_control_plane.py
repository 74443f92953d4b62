"""go-control-plane's sample server shape (its internal/example resources): listener_0 with
RDS `local_route` through an `api_config_source` (GRPC, naming the xDS cluster: the same
server), a LOGICAL_DNS cluster with a host name (left, reported) and, as its users write
it for their own services, a STATIC cluster with IP endpoints behind a listener with an IP
(taken). Over a real ADS stream the client asks for the route configuration by name even
though the listener names a non-ADS config source."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rcp
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from accel.xds import translate as tr
from accel.xds.shapes.builders import cla, lbe, locality, pack, sock

ROUTE_NAME = "local_route"


def listener(name: str, addr: str, port: int) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="http",
                                        codec_type=hcm_pb2.HttpConnectionManager.AUTO)
    rds = hcm.rds
    rds.route_config_name = ROUTE_NAME
    rds.config_source.resource_api_version = config_source_pb2.V3
    api = rds.config_source.api_config_source
    api.api_type = api.GRPC
    api.transport_api_version = config_source_pb2.V3
    api.set_node_on_first_message_only = True
    api.grpc_services.add().envoy_grpc.cluster_name = "xds_cluster"
    hcm.http_filters.add(name="http-router", typed_config=pack(router_pb2.Router()))
    return listener_pb2.Listener(name=name, address=sock(addr, port), filter_chains=[
        lc.FilterChain(filters=[lc.Filter(name="http-connection-manager",
                                          typed_config=pack(hcm))])])


def routes(cluster: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=ROUTE_NAME, virtual_hosts=[rcp.VirtualHost(
        name="local_service", domains=["*"], routes=[rcp.Route(
            match=rcp.RouteMatch(prefix="/"),
            route=rcp.RouteAction(cluster=cluster, host_rewrite_literal="www.envoyproxy.io"))])])


def dns_cluster() -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name="example_proxy_cluster", type=cluster_pb2.Cluster.LOGICAL_DNS,
                            lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
                            dns_lookup_family=cluster_pb2.Cluster.V4_ONLY,
                            load_assignment=cla("example_proxy_cluster",
                                                locality(lbe("10.0.0.1", 80))))
    c.connect_timeout.seconds = 5
    c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address = \
        "www.envoyproxy.io"
    return c


def static_cluster(name: str, *ips: str) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC,
                            load_assignment=cla(name, locality(*(lbe(ip, 8080) for ip in ips))))
    c.connect_timeout.seconds = 5
    return c


def test_sample_with_a_vip_listener_and_a_static_cluster_is_taken() -> None:
    """The sample's LOGICAL_DNS host name leaves its VIP to the kernel path with the reason;
    the same listener shape on an IP to a STATIC cluster of IPs is a service."""
    lst = listener("listener_1", "10.96.9.1", 10000)
    t = tr.to_table(tr.Resources({lst.name: lst}, {ROUTE_NAME: routes("example_proxy_cluster")},
                                 {"example_proxy_cluster": dns_cluster()}, {}))
    assert not t.table.services and t.rds_names == {ROUTE_NAME}
    assert "resolves names by DNS" in t.skipped["listener_1"]
    assert t.left["listener_1"][1:] == (10000, "TCP")

    t = tr.to_table(tr.Resources({lst.name: lst}, {ROUTE_NAME: routes("backend")},
                                 {"backend": static_cluster("backend", "10.244.3.1",
                                                            "10.244.3.2")}, {}))
    [svc] = t.table.services
    assert (str(svc.vip), svc.port, svc.name) == ("10.96.9.1", 10000, "backend")
    assert sorted(str(e.address) for e in svc.endpoints) == ["10.244.3.1", "10.244.3.2"]
    assert not t.skipped and not t.eds_names


def test_rds_through_an_api_config_source_is_asked_over_the_ads_stream() -> None:
    """The client subscribes to `local_route` on its one ADS stream (the api_config_source
    names the same server), and the STATIC cluster needs no EDS."""
    from tests.test_xds_client import Harness

    lst = listener("listener_1", "10.96.9.1", 10000)
    h = Harness()
    try:
        h.ads.wait(lambda r: r.type_url == tr.CLUSTER)
        reply = h.ads.reply_to(h.ads.send(tr.CLUSTER, "1", [pack(static_cluster(
            "backend", "10.244.3.1"))]))
        assert not reply.error_detail.message
        h.ads.send(tr.LISTENER, "1", [pack(lst)])
        h.ads.wait(lambda r: r.type_url == tr.ROUTE and list(r.resource_names) == [ROUTE_NAME])
        reply = h.ads.reply_to(h.ads.send(tr.ROUTE, "1", [pack(routes("backend"))]))
        assert not reply.error_detail.message
        table = h.wait_table(lambda t: len(t.services) == 1)
        assert [(str(s.vip), s.port, s.name) for s in table.services] == [
            ("10.96.9.1", 10000, "backend")]
        assert not [r for r in h.ads.requests if r.type_url == tr.ENDPOINT
                    and r.resource_names]
    finally:
        h.close()
