"""Bad xDS, fuzzed (issue 7): valid resource sets, generated, then corrupted one way at a time.

Translate level: every input either translates (when it is in fact valid) or raises a
ValidationError whose message names the resource and the field -- never another exception.
Wire level: a real XdsClient feeding a real Datapath NACKs each bad response (last good
version, that response's nonce, INVALID_ARGUMENT, resource and field named) and the kernel
maps stay byte-for-byte the same; the next good response is ACKed.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as epc
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.udp_proxy.v3 import udp_proxy_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, wrappers_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from accel.model import Endpoint, Guard, Service, ServiceTable, ValidationError
from accel.xds import translate as tr
from accel.xds.client import XdsClient
from accel.xds.shapes.builders import lbe, locality, pack, tcp_listener
from accel.xds.translate import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.test_xds_client import Harness, ScriptedAds  # noqa: F401 -- ScriptedAds via Harness

pytestmark = pytest.mark.reliability

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def fuzz(n: int) -> settings:
    """Reproducible (derandomized) and bounded: CI sees the same inputs every run."""
    return settings(FUZZ, max_examples=n)
KINDS = r"(Listener|RouteConfiguration|Cluster|ClusterLoadAssignment)"
# Every rejection names a resource: "Listener[x]...", "Cluster resources[2]: ..."
NAMED = re.compile(rf"^{KINDS}(\[[^\]]*\]| resources\[\d+\])")
COUNTS: Counter = Counter()


def summary(capsys, layer: str) -> None:
    n = {k[1]: v for k, v in COUNTS.items() if k[0] == layer}
    with capsys.disabled():
        print(f"\n[fuzz] {layer}: {sum(n.values())} inputs "
              f"({n.get('rejected', 0)} rejected, {n.get('accepted', 0)} accepted"
              + (f", {n['ignored']} ignored" if n.get("ignored") else "") + ")")


# --------------------------------------------------------------------------- valid states

ADS = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource())


def hcm_filter(route: str | None = None, cluster: str | None = None) -> lc.Filter:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="h")
    if route is not None:
        hcm.rds.CopyFrom(hcm_pb2.Rds(config_source=ADS, route_config_name=route))
    else:
        hcm.route_config.CopyFrom(route_pb2.RouteConfiguration(name="inline", virtual_hosts=[
            rc.VirtualHost(name="v", domains=["*"], routes=[rc.Route(
                match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster=cluster))])]))
    return lc.Filter(name="envoy.filters.network.http_connection_manager",
                     typed_config=pack(hcm))


def resources(table: ServiceTable, shapes: dict[str, str]) -> tr.Resources:
    """The controller's resources for `table`, with some services reshaped into the other
    forms the agent reads: "rds"/"inline" (HCM instead of tcp_proxy), "static" (endpoints
    inline in the cluster instead of EDS)."""
    res = tr.to_resources(table)
    for svc in table.services:
        shape = shapes.get(svc.name, "")
        lst = res.listeners[f"{svc.name}.vip"]
        if shape in ("rds", "inline") and svc.protocol == "TCP":
            lst.filter_chains[0].filters[0].CopyFrom(
                hcm_filter(f"{svc.name}.route") if shape == "rds" else hcm_filter(None, svc.name))
        if shape == "static":
            c = res.clusters[svc.name]
            c.Clear()
            c.name, c.type = svc.name, cluster_pb2.Cluster.STATIC
            c.load_assignment.CopyFrom(res.endpoints.pop(svc.name))
    return res


names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)


@st.composite
def tables(draw) -> ServiceTable:
    services = []
    for i, name in enumerate(draw(st.lists(names, min_size=1, max_size=4, unique=True))):
        v6 = draw(st.booleans())
        vip = f"fd00:96::{i:x}:{draw(st.integers(1, 0xffff)):x}" if v6 else \
            f"10.96.{i}.{draw(st.integers(1, 254))}"
        eps = []
        for j in range(draw(st.integers(0, 4))):
            addr = f"fd00:200::{i:x}:{j + 1:x}" if draw(st.booleans()) else f"10.200.{i}.{j + 1}"
            eps.append(Endpoint(addr, draw(st.integers(1, 65535)), draw(st.integers(1, 100)),
                                draw(st.booleans())))
        services.append(Service(name, vip, draw(st.integers(1, 65535)),
                                draw(st.sampled_from(["TCP", "TCP", "UDP"])), tuple(eps),
                                draw(st.booleans())))
    guard = Guard() if draw(st.booleans()) else \
        Guard((ipaddress.ip_network("192.0.2.0/24"),), 100, 200)
    return ServiceTable(tuple(services), guard=guard)


@st.composite
def states(draw) -> tuple[ServiceTable, tr.Resources]:
    table = draw(tables())
    shapes = {s.name: draw(st.sampled_from(["", "", "rds", "inline", "static"]))
              for s in table.services}
    return table, resources(table, shapes)


# --------------------------------------------------------------------------- corruption


@dataclass
class Case:
    """One corrupted resource set. Mutations change `res` (messages) or `wire` (the Anys of
    one type, as they will travel) and say what a rejection must look like."""

    res: tr.Resources
    draw: Callable
    wire: dict[str, list[any_pb2.Any]] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    expect: str | None = None  # regex the error must match; None: may be valid
    accept: bool = False  # must be accepted
    # Valid, but left to the kernel path: accepted, and a skipped entry ("where: why")
    # matches this regex (what the kernel cannot do is never a NACK).
    skip: str | None = None

    def pick(self, items, label: str = ""):
        items = sorted(items)
        assume(items)  # this state has nothing of the kind: another one
        return self.draw(st.sampled_from(items), label=label)

    def anys(self, t: str) -> list[any_pb2.Any]:
        if t not in self.wire:
            self.wire[t] = [pack(m) for _, m in sorted(self.res.of(t).items())]
        self.touched.add(t)
        return self.wire[t]

    def all_wire(self) -> dict[str, list[any_pb2.Any]]:
        return {t: self.wire[t] if t in self.wire else
                [pack(m) for _, m in sorted(self.res.of(t).items())] for t in tr.PUSH_ORDER}


def copy_resources(res: tr.Resources) -> tr.Resources:
    def dup(d):
        return {k: type(v).FromString(v.SerializeToString()) for k, v in d.items()}
    return tr.Resources(dup(res.listeners), dup(res.routes), dup(res.clusters), dup(res.endpoints))


def vip_listener(c: Case, proto: str | None = None) -> tuple[str, listener_pb2.Listener]:
    names = [n for n, lst in c.res.listeners.items() if lst.address.HasField("socket_address")
             and (proto is None or
                  (lst.address.socket_address.protocol == address_pb2.SocketAddress.UDP)
                  == (proto == "UDP"))]
    name = c.pick(names, "listener")
    c.touched.add(LISTENER)
    return name, c.res.listeners[name]


def first_filter(lst: listener_pb2.Listener) -> lc.Filter | None:
    return lst.filter_chains[0].filters[0] if lst.filter_chains else None


def assignment(c: Case) -> tuple[endpoint_pb2.ClusterLoadAssignment, str]:
    """A ClusterLoadAssignment in use (EDS or inline), with at least one endpoint, and the
    path errors about it start with."""
    choices = [(f"E:{n}") for n in c.res.endpoints] + \
        [f"C:{n}" for n, cl in c.res.clusters.items() if cl.HasField("load_assignment")]
    which = c.pick(choices, "assignment")
    kind, name = which.split(":", 1)
    if kind == "E":
        a, where = c.res.endpoints[name], rf"ClusterLoadAssignment\[{re.escape(name)}\]"
        c.touched.add(ENDPOINT)
    else:
        a, where = c.res.clusters[name].load_assignment, \
            rf"Cluster\[{re.escape(name)}\]\.load_assignment"
        c.touched.add(CLUSTER)
    if not any(loc.lb_endpoints for loc in a.endpoints):
        a.endpoints.append(locality(lbe("10.201.0.1", 8080)))
    return a, where


def lb_endpoint(c: Case) -> tuple[epc.LbEndpoint, str]:
    a, where = assignment(c)
    spots = [(li, ei) for li, loc in enumerate(a.endpoints) for ei in range(len(loc.lb_endpoints))]
    li, ei = c.pick(spots, "endpoint")
    return a.endpoints[li].lb_endpoints[ei], \
        rf"{where}\.endpoints\[{li}\]\.lb_endpoints\[{ei}\]"


def route_listener(c: Case) -> tuple[str, route_pb2.RouteConfiguration]:
    used = tr.listener_rds_names(c.res.listeners)
    name = c.pick([n for n in c.res.routes if n in used], "route")
    c.touched.add(ROUTE)
    return name, c.res.routes[name]


def used_cluster(c: Case) -> str:
    used = set()
    for n, lst in c.res.listeners.items():
        if lst.HasField("api_listener") or not lst.address.HasField("socket_address"):
            continue
        [f] = tr._front(n, lst)
        used.add(f.cluster if f.cluster else tr._route_cluster(c.res.routes[f.route]))
    return c.pick(used, "cluster")


BAD_ADDRESSES = ["", " ", "1.2.3.4.5", "256.1.1.1", "10.0.0", "01.2.3.4", "10.0.0.1/32",
                 "fd00::1::2", "gggg::1", ":::", "fd00:::1", "[fd00::1]", "fd00::1%eth0",
                 "fe80::1%1", "example.com", "localhost", "10.0.0.1 ", "1e1.0.0.1", "0x0a000001",
                 "::ffff:10.0.0.300", "12345", "\x00", "10.0.0.1\n", "ａ.b.c.d", "١٠.٠.٠.١"]
BAD_PORTS = [0, 65536, 70000, 2**31, 2**32 - 1]


def not_an_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return False
    except ValueError:
        return True


garbage_text = st.text(max_size=40).filter(not_an_ip)
MUTATIONS: dict[str, tuple[Callable[[Case], None], bool]] = {}  # name -> (fn, on the wire)


def mutation(wire: bool = True):
    def add(fn):
        MUTATIONS[fn.__name__] = (fn, wire)
        return fn
    return add


SA = r"\.address\.socket_address"


# ---- listener addresses


@mutation()
def vip_bad_address(c: Case) -> None:
    name, lst = vip_listener(c)
    address = c.draw(
        st.one_of(st.sampled_from(BAD_ADDRESSES + ["0.0.0.0", "::", "224.0.0.1", "ff02::1",
                                                   "127.0.0.1"]),
                  garbage_text), label="address")
    lst.address.socket_address.address = address
    if address in ("224.0.0.1", "ff02::1", "127.0.0.1"):
        # Valid for Envoy (Kuma's and Consul's explicit upstreams listen on 127.0.0.1), but
        # no VIP the kernel may balance in every pod: left, with the reason.
        c.skip = rf"^{re.escape(name)}: its address .* cannot be a service VIP"
        return
    if address in ("0.0.0.0", "::"):
        # A wildcard listener is valid (Istio's 0.0.0.0_PORT); with a tcp_proxy or an inline
        # route it names no VIP (an RDS one would be expanded by its virtual hosts' IPs).
        if tr.listener_rds_names({name: lst}):
            c.accept = True
        else:
            c.skip = rf"^{re.escape(name)}: a wildcard (address|listener)"
        return
    c.expect = rf"^Listener\[{name}\]{SA}\.address: "


@mutation()
def vip_bad_port(c: Case) -> None:
    name, lst = vip_listener(c)
    lst.address.socket_address.port_value = c.draw(st.sampled_from(BAD_PORTS), label="port")
    c.expect = rf"^Listener\[{name}\]{SA}\.port_value: port \d+ is out of range 1-65535"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ld(num: int, payload: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(payload)) + payload


@mutation()
def vip_port_out_of_uint32(c: Case) -> None:
    """-1, 2**32, 2**64-1 as they can only arrive: varints on the wire, cut to 32 bits."""
    name, lst = vip_listener(c)
    value = c.draw(st.sampled_from([2**32, 2**64 - 1, 2**33 + 2**32, -1 & (2**64 - 1)]),
                   label="raw port")
    port = varint(3 << 3 | 0) + varint(value)  # SocketAddress.port_value = 3
    extra = ld(2, ld(1, port))  # Listener.address = 2 { Address.socket_address = 1 { ... } }
    anys = c.anys(LISTENER)
    i = sorted(c.res.listeners).index(name)
    anys[i] = any_pb2.Any(type_url=tr.LISTENER, value=anys[i].value + extra)
    c.expect = rf"^Listener\[{name}\]{SA}\.port_value: port \d+ is out of range"


@mutation()
def vip_named_port_or_resolver(c: Case) -> None:
    name, lst = vip_listener(c)
    if c.draw(st.booleans(), label="named"):
        lst.address.socket_address.named_port = "http"
        c.expect = rf"^Listener\[{name}\]{SA}\.named_port: "
    else:
        lst.address.socket_address.resolver_name = "envoy.dns"
        c.expect = rf"^Listener\[{name}\]{SA}\.resolver_name: "


@mutation()
def vip_unknown_protocol(c: Case) -> None:
    name, lst = vip_listener(c)
    lst.address.socket_address.protocol = c.draw(st.integers(2, 1000), label="proto")
    c.expect = rf"^Listener\[{name}\]{SA}\.protocol: "


@mutation()
def vip_not_a_socket_address(c: Case) -> None:
    """Pipes, internal addresses and no address at all have no VIP: ignored, not errors."""
    name, lst = vip_listener(c)
    how = c.draw(st.sampled_from(["clear", "pipe", "internal"]), label="how")
    if how == "clear":
        lst.ClearField("address")
    elif how == "pipe":
        lst.address.pipe.path = "/run/x.sock"
    else:
        lst.address.envoy_internal_address.server_listener_name = "x"
    c.accept = True


@mutation()
def vip_duplicate(c: Case) -> None:
    name, lst = vip_listener(c)
    dup = type(lst).FromString(lst.SerializeToString())
    dup.name = name + "-dup"
    sa = dup.address.socket_address
    addr = ipaddress.ip_address(sa.address)
    if addr.version == 4 and c.draw(st.booleans(), label="v4-mapped spelling"):
        sa.address = f"::ffff:{addr}"
    c.res.listeners[dup.name] = dup
    c.expect = rf"^Listener\[{re.escape(dup.name)}\]\.address: duplicate VIP .*Listener\[{name}\]"


@mutation()
def same_service_name(c: Case) -> None:
    name, lst = vip_listener(c)
    dup = type(lst).FromString(lst.SerializeToString())
    dup.name = name + "-2"
    dup.address.socket_address.port_value = lst.address.socket_address.port_value % 65535 + 1
    for x in (lst, dup):
        x.metadata.filter_metadata[tr.META_KEY].update({"service": "same"})
    c.res.listeners[dup.name] = dup
    c.expect = r"^Listener\[[^\]]+\]: service name 'same' is also used by Listener"


@mutation()
def bad_metadata(c: Case) -> None:
    name, lst = vip_listener(c)
    key, value = c.draw(st.sampled_from([("service", 7), ("service", ""), ("service", "  "),
                                         ("service", True), ("edge", "yes"), ("edge", 1),
                                         ("edge", None), ("service", None)]), label="meta")
    meta = lst.metadata.filter_metadata[tr.META_KEY]
    meta.update({key: value})
    c.expect = rf"^Listener\[{name}\]\.metadata\.filter_metadata\.meshaccel\.{key}: "


# ---- filters


OTHER_TYPES = ["type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
               "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy",
               "type.googleapis.com/google.protobuf.Struct", "type.googleapis.com/",
               "", "no-slash", "type.googleapis.com/envoy.config.listener.v3.Listener"]


@mutation()
def unknown_network_filter(c: Case) -> None:
    name, lst = vip_listener(c, "TCP")
    flt = first_filter(lst)
    flt.typed_config.type_url = c.draw(st.sampled_from(OTHER_TYPES), label="type")
    # Valid (a redis proxy, say), but no service the kernel path can take.
    c.skip = rf"^{re.escape(name)}: its filter chain ends in"


@mutation()
def filter_before_the_proxy(c: Case) -> None:
    name, lst = vip_listener(c, "TCP")
    extra = lc.Filter(name="envoy.filters.network.rbac",
                      typed_config=any_pb2.Any(type_url=c.draw(st.sampled_from(OTHER_TYPES[:3]))))
    if c.draw(st.booleans(), label="a second proxy instead"):
        extra = type(first_filter(lst)).FromString(first_filter(lst).SerializeToString())
    lst.filter_chains[0].filters.insert(0, extra)
    # Filters before the last (istio.stats, rbac, ...) are ignored at L4: still a service.
    c.accept = True


@mutation()
def filter_shapes(c: Case) -> None:
    name, lst = vip_listener(c, "TCP")
    how = c.draw(st.sampled_from(["no typed_config", "ecds", "two chains", "no chain",
                                  "empty chain", "matcher", "default chain too"]), label="how")
    flt = first_filter(lst)
    fc = rf"^Listener\[{name}\]"
    if how == "no typed_config":
        flt.ClearField("typed_config")
        c.expect = fc + r"\.filter_chains\[0\]\.filters\[0\]\.typed_config: filter .* has no"
    elif how == "ecds":
        flt.ClearField("typed_config")
        flt.config_discovery.config_source.ads.SetInParent()
        c.skip = rf"^{re.escape(name)}: its last filter .* filter config discovery"
    elif how == "two chains":  # the same match twice: Envoy refuses it too
        lst.filter_chains.add().CopyFrom(lst.filter_chains[0])
        c.expect = fc + r"\.filter_chains\[1\]\.filter_chain_match: the same match"
    elif how == "default chain too":  # the chain without a match wins over the default
        lst.default_filter_chain.CopyFrom(lst.filter_chains[0])
        c.accept = True
    elif how == "no chain":
        del lst.filter_chains[:]
        c.expect = fc + r"\.filter_chains: no filter chain"
    elif how == "empty chain":
        del lst.filter_chains[0].filters[:]
        c.skip = rf"^{re.escape(name)}: the filter chain a plain connection takes has no"
    else:
        lst.filter_chain_matcher.SetInParent()
        c.skip = rf"^{re.escape(name)}: filter_chain_matcher"


@mutation()
def proxy_without_one_cluster(c: Case) -> None:
    name, lst = vip_listener(c, "TCP")
    flt = first_filter(lst)
    if flt.typed_config.type_url == tr.TCP_PROXY:
        tp = tcp_proxy_pb2.TcpProxy(stat_prefix="x")
        n = c.draw(st.sampled_from([0, 2, 3]), label="clusters")
        if n:
            # Weights kept: clusters the state has, each its share (one named twice sums).
            own = tcp_proxy_pb2.TcpProxy.FromString(flt.typed_config.value).cluster
            for i in range(n):
                tp.weighted_clusters.clusters.add(name=own if i % 2 == 0 else used_cluster(c),
                                                  weight=i + 1)
            c.accept = True
        else:
            c.expect = r"\.typed_config\.cluster: tcp_proxy names no cluster"
        flt.typed_config.CopyFrom(pack(tp))
    else:
        hcm = hcm_pb2.HttpConnectionManager(stat_prefix="x")
        how = c.draw(st.sampled_from(["none", "scoped", "empty rds"]), label="hcm")
        if how == "scoped":
            hcm.scoped_routes.name = "s"
            c.skip = rf"^{re.escape(name)}: its routes come from scoped_routes"
        elif how == "empty rds":
            hcm.rds.config_source.CopyFrom(ADS)
        flt.typed_config.CopyFrom(pack(hcm))
        if not c.skip:
            c.expect = r"\.typed_config\.(route_specifier|rds\.route_config_name): "
    if c.expect:
        c.expect = rf"^Listener\[{name}\]\.filter_chains\[0\]\.filters\[0\]" + c.expect


@mutation()
def typed_config_garbage(c: Case) -> None:
    name, lst = vip_listener(c)
    if lst.listener_filters:
        tc, where = lst.listener_filters[0].typed_config, r"\.listener_filters\[0\]\.typed_config"
    else:
        tc, where = first_filter(lst).typed_config, \
            r"\.filter_chains\[0\]\.filters\[0\]\.typed_config"
    # A length-delimited field 1 that claims more bytes than there are: never decodes.
    tc.value = ld(1, b"x" * 8)[:-c.draw(st.integers(1, 7), label="cut")]
    c.expect = rf"^Listener\[{name}\]{where}: malformed Any"


@mutation()
def udp_proxy_without_cluster(c: Case) -> None:
    name, lst = vip_listener(c, "UDP")
    how = c.draw(st.sampled_from(["no cluster", "unknown type"]), label="how")
    if how == "no cluster":
        lst.listener_filters[0].typed_config.CopyFrom(
            pack(udp_proxy_pb2.UdpProxyConfig(stat_prefix="u")))
        c.skip = rf"^{re.escape(name)}: a udp_proxy routing by matcher"
    else:
        # Another UDP listener filter (a dns_filter answers itself): valid, no service.
        lst.listener_filters[0].typed_config.type_url = OTHER_TYPES[0]
        c.skip = rf"^{re.escape(name)}: a UDP listener without a udp_proxy"


# ---- clusters


@mutation()
def cluster_kind_unsupported(c: Case) -> None:
    name = used_cluster(c)
    cl = c.res.clusters[name]
    c.touched.add(CLUSTER)
    how = c.draw(st.sampled_from(["ORIGINAL_DST", "unknown number", "custom"]), label="how")
    # Valid clusters with no list of endpoints: their services are left to the kernel.
    if how == "custom":
        cl.cluster_type.name = "envoy.clusters.aggregate"
        c.skip = rf": cluster '{re.escape(name)}': custom cluster type"
    else:
        cl.type = cluster_pb2.Cluster.ORIGINAL_DST if how == "ORIGINAL_DST" else \
            c.draw(st.integers(7, 10_000), label="type")
        c.skip = rf": cluster '{re.escape(name)}': cluster type \w+: no list of endpoints"


@mutation(wire=False)  # the client holds a service whose cluster is missing (make-before-break)
def reference_missing(c: Case) -> None:
    how = c.draw(st.sampled_from(["cluster", "assignment", "route"]), label="how")
    if how == "route" and tr.listener_rds_names(c.res.listeners):
        name, _ = route_listener(c)
        del c.res.routes[name]
        c.expect = rf"^Listener\[[^\]]+\]: route_config_name '{re.escape(name)}' names no"
        return
    if how == "assignment" and c.res.endpoints:
        name = c.pick(c.res.endpoints, "assignment")
        del c.res.endpoints[name]
        c.expect = rf"^Cluster\[{re.escape(name)}\]: no ClusterLoadAssignment"
        return
    name = used_cluster(c)
    del c.res.clusters[name]
    c.expect = rf"^Listener\[[^\]]+\]( via RouteConfiguration\[[^\]]+\])?: references unknown " \
        f"cluster '{re.escape(name)}'"


@mutation()
def cluster_without_endpoints(c: Case) -> None:
    a, _ = assignment(c)
    del a.endpoints[:]
    c.accept = True


@mutation()
def mesh_settings_bad(c: Case) -> None:
    mc = cluster_pb2.Cluster(name=tr.MESH_CLUSTER, type=cluster_pb2.Cluster.STATIC)
    key, value, path = c.draw(st.sampled_from([
        ("mesh_cidrs", ["10.0.0.0/33"], r"mesh_cidrs\[0\]"),
        ("mesh_cidrs", "10.0.0.0/8", "mesh_cidrs"),
        ("mesh_cidrs", [7], r"mesh_cidrs\[0\]"),
        ("guard", {"syn_rate": -1}, r"guard\.syn_rate"),
        ("guard", {"syn_rate": 1.5}, r"guard\.syn_rate"),
        ("guard", {"deny": ["nope"]}, r"guard\.deny\[0\]"),
        ("guard", {"what": 1}, "guard"),
        ("guard", [], "guard"),
        ("color", "red", ""),
    ]), label="setting")
    mc.metadata.filter_metadata[tr.META_KEY].update({key: value})
    c.res.clusters[tr.MESH_CLUSTER] = mc
    c.touched.add(CLUSTER)
    c.expect = r"^Cluster\[meshaccel\.mesh\]\.metadata\.filter_metadata\.meshaccel" + \
        (rf"\.{path}: " if path else ": unknown field")


# ---- endpoints


@mutation()
def endpoint_bad_address(c: Case) -> None:
    e, where = lb_endpoint(c)
    e.endpoint.address.socket_address.address = c.draw(
        st.one_of(st.sampled_from(BAD_ADDRESSES), garbage_text), label="address")
    c.expect = rf"^{where}\.endpoint{SA}\.address: "


@mutation()
def endpoint_bad_port(c: Case) -> None:
    e, where = lb_endpoint(c)
    e.endpoint.address.socket_address.port_value = c.draw(st.sampled_from(BAD_PORTS))
    c.expect = rf"^{where}\.endpoint{SA}\.port_value: port \d+ is out of range"


@mutation()
def endpoint_not_a_socket_address(c: Case) -> None:
    e, where = lb_endpoint(c)
    how = c.draw(st.sampled_from(["clear", "pipe", "internal", "named"]), label="how")
    if how == "named":
        e.endpoint_name = "somewhere"
        c.expect = rf"^{where}\.endpoint_name: named endpoints are not supported"
        return
    if how == "clear":
        e.endpoint.ClearField("address")
    elif how == "pipe":
        e.endpoint.address.pipe.path = "/run/x.sock"
    else:
        e.endpoint.address.envoy_internal_address.server_listener_name = "x"
    c.expect = rf"^{where}\.endpoint\.address: expected a socket_address"


@mutation()
def endpoint_weight_zero(c: Case) -> None:
    e, where = lb_endpoint(c)
    e.load_balancing_weight.CopyFrom(wrappers_pb2.UInt32Value(value=0))
    c.expect = rf"^{where}\.load_balancing_weight: must be >= 1"


@mutation()
def endpoint_duplicate(c: Case) -> None:
    a, where = assignment(c)
    loc = next(loc for loc in a.endpoints if loc.lb_endpoints)
    e = loc.lb_endpoints[0]
    e.health_status = 1  # HEALTHY: a healthy duplicate in the same priority is an error
    loc.load_balancing_weight.Clear()
    for other in a.endpoints:
        other.ClearField("load_balancing_weight")  # no locality weights: every one is live
    loc.lb_endpoints.add().CopyFrom(e)
    c.expect = rf"^{where}\.endpoints\[\d+\]\.lb_endpoints\[\d+\]: duplicate endpoint"


@mutation()
def endpoint_leds(c: Case) -> None:
    a, where = assignment(c)
    a.endpoints[0].leds_cluster_locality_config.leds_collection_name = "x"
    c.expect = rf"^{where}\.endpoints\[0\]\.leds_cluster_locality_config: "


@mutation()
def endpoint_loop(c: Case) -> None:
    """An endpoint at its own VIP:port, or at another service's (written as IPv4, IPv6 or
    v4-mapped IPv6)."""
    fronts = {}
    for n, lst in c.res.listeners.items():
        if lst.address.HasField("socket_address"):
            [f] = tr._front(n, lst)
            cluster = f.cluster or tr._route_cluster(c.res.routes[f.route])
            fronts[cluster] = f
    own = c.pick(fronts, "service")
    mine = fronts[own]
    others = [f for f in fronts.values() if f.protocol == mine.protocol and f is not mine]
    target = c.draw(st.sampled_from(others), label="other") if others and \
        c.draw(st.booleans(), label="other service") else mine
    cl = c.res.clusters[own]
    if cl.HasField("load_assignment"):
        a, where = cl.load_assignment, rf"Cluster\[{re.escape(own)}\]\.load_assignment"
        c.touched.add(CLUSTER)
    else:
        name = tr._cluster_eds_name(cl)
        a, where = c.res.endpoints[name], rf"ClusterLoadAssignment\[{re.escape(name)}\]"
        c.touched.add(ENDPOINT)
    addr = str(target.vip)
    if target.vip.version == 4 and c.draw(st.booleans(), label="v4-mapped"):
        addr = f"::ffff:{addr}"
    e = lbe(addr, target.port, health=1)
    a.endpoints.insert(0, locality(e))
    for loc in a.endpoints:
        loc.ClearField("load_balancing_weight")
        loc.priority = 0
    reason = "an endpoint may not be its own VIP:port" if target is mine else \
        "is the VIP:port of service"
    c.expect = rf"^{where} \(service '[^']+'\)\.endpoints\[\d+\]: .*{reason}"


# ---- routes


@mutation()
def route_unsupported(c: Case) -> None:
    if not tr.listener_rds_names(c.res.listeners):
        name, lst = vip_listener(c, "TCP")
        first_filter(lst).CopyFrom(hcm_filter(f"{name}.r"))
        c.res.routes[f"{name}.r"] = route_pb2.RouteConfiguration(name=f"{name}.r")
        c.skip = rf"RouteConfiguration '{re.escape(name)}\.r': no virtual host matches"
        c.touched.add(ROUTE)
        return
    name, r = route_listener(c)
    # Valid route configs whose requests do not all go to one cluster: the VIP is left to
    # the kernel path with the reason, never NACKed (only malformed ones are).
    where = rf"RouteConfiguration '{re.escape(name)}': "
    vh = r.virtual_hosts[0]
    how = c.draw(st.sampled_from(["no vhost", "two vhosts", "domains", "no routes", "redirect",
                                  "two clusters", "no catch-all", "vhds", "three weighted",
                                  "empty cluster"]),
                 label="how")
    if how == "no vhost":
        del r.virtual_hosts[:]
        c.skip = where + "no virtual host matches"
    elif how == "two vhosts":  # the first "*" host serves
        r.virtual_hosts.add().CopyFrom(vh)
        c.accept = True
    elif how == "domains":
        del vh.domains[:]
        vh.domains.append("example.com")
        c.skip = where + "no virtual host matches"
    elif how == "no routes":
        del vh.routes[:]
        c.skip = where + "virtual host .* has no routes"
    elif how == "redirect":
        vh.routes[0].redirect.host_redirect = "x"
        c.skip = where + "virtual host .* route 0 is a redirect"
    elif how == "two clusters":  # after the catch-all: never reached, still one cluster
        extra = vh.routes.add()
        extra.CopyFrom(vh.routes[0])
        extra.route.cluster = vh.routes[0].route.cluster + "-other"
        c.accept = True
    elif how == "no catch-all":
        vh.routes[0].match.prefix = "/api"
        c.skip = where + "virtual host .* has no catch-all"
    elif how == "vhds":
        r.vhds.config_source.CopyFrom(ADS)
        c.skip = where + "its virtual hosts come from VHDS"
    elif how == "three weighted":  # weights kept over clusters the state has
        own = vh.routes[0].route.cluster
        for i in range(3):
            vh.routes[0].route.weighted_clusters.clusters.add(
                name=own if i != 1 else used_cluster(c),
                weight=wrappers_pb2.UInt32Value(value=i + 1))
        c.accept = True
    else:
        vh.routes[0].route.cluster = ""
        c.expect = rf"^RouteConfiguration\[{re.escape(name)}\]\.virtual_hosts\[0\]" \
            r"\.routes\[0\]\.route\.cluster: empty cluster name"


# ---- Anys and names


@mutation()
def any_wrong_type_url(c: Case) -> None:
    t = c.pick([t for t in tr.PUSH_ORDER if c.res.of(t)], "type")
    anys = c.anys(t)
    i = c.draw(st.integers(0, len(anys) - 1), label="index")
    anys[i] = any_pb2.Any(type_url=c.draw(st.sampled_from(
        [u for u in OTHER_TYPES + list(tr.PUSH_ORDER) if u != t])), value=anys[i].value)
    c.expect = rf"^{tr.KIND[t]} resources\[{i}\]: type_url .* does not match"


@mutation()
def any_undecodable(c: Case) -> None:
    t = c.pick([t for t in tr.PUSH_ORDER if c.res.of(t)], "type")
    anys = c.anys(t)
    i = c.draw(st.integers(0, len(anys) - 1), label="index")
    how = c.draw(st.sampled_from(["overrun", "bad utf-8 name", "bad tag", "wrapped overrun"]))
    if how == "overrun":
        value = anys[i].value + ld(1, b"abcdef")[:-3]
    elif how == "bad utf-8 name":
        value = anys[i].value + ld(1, b"\xff\xfe")  # field 1 is the name: a proto3 string
    elif how == "bad tag":
        value = anys[i].value + b"\x00"  # field number 0 does not exist
    else:
        inner = any_pb2.Any(type_url=anys[i].type_url, value=anys[i].value + b"\x0a\x09ab")
        wrapped = discovery_pb2.Resource(name="w", resource=inner)
        anys[i] = any_pb2.Any(type_url=tr._RESOURCE_WRAPPER, value=wrapped.SerializeToString())
        c.expect = rf"^{tr.KIND[t]} resources\[{i}\]: malformed Any"
        return
    anys[i] = any_pb2.Any(type_url=t, value=value)
    c.expect = rf"^{tr.KIND[t]} resources\[{i}\]: malformed Any"


@mutation()
def any_empty_or_nameless(c: Case) -> None:
    t = c.pick([t for t in tr.PUSH_ORDER if c.res.of(t)], "type")
    anys = c.anys(t)
    anys.append(any_pb2.Any(type_url=t, value=b""))
    c.expect = rf"^{tr.KIND[t]} resources\[{len(anys) - 1}\]: resource has no name"


@mutation()
def any_duplicate_name(c: Case) -> None:
    t = c.pick([t for t in tr.PUSH_ORDER if c.res.of(t)], "type")
    anys = c.anys(t)
    i = c.draw(st.integers(0, len(anys) - 1), label="index")
    anys.append(anys[i])
    name = sorted(c.res.of(t))[i]
    c.expect = rf"^{tr.KIND[t]}\[{re.escape(name)}\]: duplicate {tr.KIND[t]} name"


@mutation()
def any_wrapped_in_resource(c: Case) -> None:
    """Servers may wrap each resource in a discovery Resource: valid."""
    t = c.pick([t for t in tr.PUSH_ORDER if c.res.of(t)], "type")
    anys = c.anys(t)
    for i, a in enumerate(anys):
        anys[i] = pack(discovery_pb2.Resource(name="w", version="1", resource=a))
    c.accept = True


@mutation(wire=False)  # may decode into something valid, or into some other error
def any_bytes_damaged(c: Case) -> None:
    t = c.pick([t for t in tr.PUSH_ORDER if c.res.of(t)], "type")
    anys = c.anys(t)
    i = c.draw(st.integers(0, len(anys) - 1), label="index")
    v = bytearray(anys[i].value)
    how = c.draw(st.sampled_from(["truncate", "flip", "garbage", "splice"]), label="how")
    if how == "truncate" and v:
        v = v[:c.draw(st.integers(0, len(v) - 1), label="cut")]
    elif how == "flip" and v:
        for _ in range(c.draw(st.integers(1, 4), label="flips")):
            j = c.draw(st.integers(0, len(v) - 1), label="at")
            v[j] ^= 1 << c.draw(st.integers(0, 7), label="bit")
    elif how == "splice":
        j = c.draw(st.integers(0, len(v)), label="at")
        v[j:j] = c.draw(st.binary(min_size=1, max_size=16), label="bytes")
    else:
        v = bytearray(c.draw(st.binary(max_size=64), label="garbage"))
    anys[i] = any_pb2.Any(type_url=t, value=bytes(v))


@mutation(wire=False)
def empty_response(c: Case) -> None:
    for t in tr.PUSH_ORDER:
        c.anys(t).clear()
    c.accept = True


# --------------------------------------------------------------------------- translate level


def translate_wire(wire: dict[str, list[any_pb2.Any]], **kw) -> tr.Translation:
    """Through the wire, as an agent gets it: serialize a response per type, parse, unpack."""
    parts = {}
    for t in tr.PUSH_ORDER:
        resp = discovery_pb2.DiscoveryResponse(type_url=t, version_info="1", resources=wire[t])
        parts[t] = tr.unpack(t, discovery_pb2.DiscoveryResponse.FromString(
            resp.SerializeToString()).resources)
    return tr.to_table(tr.Resources(parts[LISTENER], parts[ROUTE], parts[CLUSTER],
                                    parts[ENDPOINT]), **kw)


def judge(case: Case, layer: str) -> None:
    try:
        out = translate_wire(case.all_wire())
    except ValidationError as e:
        COUNTS[layer, "rejected"] += 1
        msg = str(e)
        assert not case.accept, f"valid input rejected: {msg}"
        assert not case.skip, f"valid input (to be left to the kernel path) rejected: {msg}"
        assert NAMED.match(msg), f"no resource named: {msg}"
        if case.expect:
            assert re.search(case.expect, msg), f"expected /{case.expect}/, got: {msg}"
        return
    COUNTS[layer, "accepted"] += 1
    assert case.expect is None, f"accepted, expected a rejection /{case.expect}/"
    assert isinstance(out.table, ServiceTable)
    if case.skip:
        entries = [f"{k}: {v}" for k, v in out.skipped.items()]
        assert any(re.search(case.skip, e) for e in entries), \
            f"expected a skipped entry /{case.skip}/, got {entries}"


def test_translate_corrupted_resources(capsys) -> None:
    layer = "xds translate (mutations)"

    def checker(which: str):
        @fuzz(24)
        @given(state=states(), data=st.data())
        def check(state, data) -> None:
            _, res = state
            case = Case(copy_resources(res), data.draw)
            MUTATIONS[which][0](case)
            judge(case, layer)
        return check

    for which in sorted(MUTATIONS):  # each kind of damage gets its own examples
        before = sum(v for k, v in COUNTS.items() if k[0] == layer)
        checker(which)()
        assert sum(v for k, v in COUNTS.items() if k[0] == layer) - before >= 8, which
    summary(capsys, layer)


def test_translate_garbage_anys(capsys) -> None:
    """Arbitrary bytes as resources (of the right type URL, or another)."""
    layer = "xds translate (garbage bytes)"

    @fuzz(300)
    @given(t=st.sampled_from(tr.PUSH_ORDER), values=st.lists(st.binary(max_size=80), max_size=4),
           type_url=st.one_of(st.none(), st.sampled_from(OTHER_TYPES + list(tr.PUSH_ORDER))))
    def check(t, values, type_url) -> None:
        case = Case(tr.Resources(), None)
        case.wire[t] = [any_pb2.Any(type_url=type_url or t, value=v) for v in values]
        judge(case, layer)

    check()
    summary(capsys, layer)


@pytest.mark.parametrize("t", [*tr.PUSH_ORDER, "type.googleapis.com/envoy.config.Nope", ""])
def test_unpack_unknown_response_type(t) -> None:
    if t in tr.PUSH_ORDER:
        assert tr.unpack(t, []) == {}
        return
    with pytest.raises(ValidationError, match=r"^type_url: .* is not a type meshaccel"):
        tr.unpack(t, [])


# ---- huge


def huge_state() -> tuple[tr.Resources, str]:
    table = ServiceTable((Service("big", "10.96.9.1", 80, "TCP"),
                          Service("u", "fd00:96::9", 53, "UDP", (Endpoint("fd00::53", 53),))))
    return resources(table, {}), "big"


def test_huge_resources(capsys) -> None:
    layer = "xds translate (huge)"
    res, name = huge_state()
    # 10,000 endpoints in one ClusterLoadAssignment, over four priorities and 100 localities.
    a = res.endpoints[name]
    del a.endpoints[:]
    for loc in range(100):
        a.endpoints.append(locality(*(lbe(f"10.{100 + loc // 50}.{loc % 50}.{j + 1}", 8080,
                                          weight=1 + j % 5, health=1) for j in range(100)),
                                    priority=loc % 4, weight=1 + loc))
    case = Case(copy_resources(res), None, accept=True)
    out = translate_wire(case.all_wire())
    COUNTS[layer, "accepted"] += 1
    svc = out.table.by_name()[name]
    assert len(svc.endpoints) == 10_000 and len(svc.usable_endpoints) == 2_500

    big = "n" * 65536
    # A 64 KiB listener name is fine (it names no service here) ...
    case = Case(copy_resources(res), None, accept=True)
    case.res.listeners[big] = case.res.listeners.pop(f"{name}.vip")
    case.res.listeners[big].name = big
    judge(case, layer)
    # ... a 64 KiB cluster name becomes the service name, which is too long ...
    case = Case(copy_resources(res), None)
    cl, ca = case.res.clusters.pop(name), case.res.endpoints.pop(name)
    cl.name = ca.cluster_name = big
    case.res.clusters[big], case.res.endpoints[big] = cl, ca
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix="x", cluster=big)
    first_filter(case.res.listeners[f"{name}.vip"]).typed_config.CopyFrom(pack(tp))
    case.expect = r"^ClusterLoadAssignment\[n+\] \(service 'n+'\)\.name: name is longer"
    judge(case, layer)
    # ... and so is a 64 KiB service name from metadata; a 64 KiB address is no address.
    case = Case(copy_resources(res), None)
    case.res.listeners[f"{name}.vip"].metadata.filter_metadata[tr.META_KEY].update(
        {"service": big})
    case.expect = r"\(service 'n+'\)\.name: name is longer than 253"
    judge(case, layer)
    case = Case(copy_resources(res), None)
    case.res.listeners[f"{name}.vip"].address.socket_address.address = "1" * 65536
    case.expect = rf"^Listener\[{name}\.vip\]{SA}\.address: "
    judge(case, layer)
    # 2,000 listeners, one of them bad: named among the many.
    case = Case(copy_resources(res), None)
    for i in range(2000):
        lst = tcp_listener(f"l{i}", f"10.97.{i // 250}.{i % 250 + 1}", 80, name,
                           service=f"s{i}")
        case.res.listeners[lst.name] = lst
    case.res.listeners["l1234"].address.socket_address.port_value = 0
    case.expect = rf"^Listener\[l1234\]{SA}\.port_value: port 0"
    judge(case, layer)
    summary(capsys, layer)


# --------------------------------------------------------------------------- wire level


def free_port() -> int:
    from tests import api_harness  # imports the datapath (bcc): wire level only

    return api_harness.free_port(range(18600, 18700))


class WireHarness(Harness):
    """tests.test_xds_client's Harness on one of this helper's ports."""

    def __init__(self, on_update: Callable[[ServiceTable], None]):  # noqa: D107
        self.port = free_port()
        self.tables: list[ServiceTable] = []
        self.events: list[tuple[str, dict]] = []
        self.cond = threading.Condition()
        self.hook = on_update
        self.start_server()
        self.client = XdsClient(f"127.0.0.1:{self.port}", "hf-node", self._on_update,
                                backoff_initial=0.1, backoff_max=0.5)
        self.client.events.append(lambda k, i: self.events.append((k, i)))
        self.client.start()


WIRE_TABLE = ServiceTable((
    Service("web", "10.96.7.1", 80, "TCP", (Endpoint("10.200.7.1", 8080, 2),
                                             Endpoint("10.200.7.2", 8080, 1))),
    Service("api", "fd00:96::7", 443, "TCP", (Endpoint("fd00:200::7", 8443),
                                               Endpoint("10.200.7.3", 8443, 3, False))),
    Service("dns", "10.96.7.53", 53, "UDP", (Endpoint("10.200.7.53", 53),)),
    Service("db", "10.96.7.5", 5432, "TCP", (Endpoint("10.200.7.5", 5432),)),
), guard=Guard((ipaddress.ip_network("192.0.2.0/24"),), 100, 100))
WIRE_SHAPES = {"api": "rds", "dns": "static", "db": "inline"}


def test_wire_nack_keeps_the_maps(side_agent, capsys) -> None:
    layer = "xds wire (NACKs)"
    agent = side_agent
    dp = agent.datapath
    h = WireHarness(agent.apply)
    good = resources(WIRE_TABLE, WIRE_SHAPES)
    wire = {t: [pack(m) for _, m in sorted(good.of(t).items())] for t in tr.PUSH_ORDER}
    try:
        h.ads.wait(lambda r: r.type_url == CLUSTER)
        assert not h.ads.reply_to(h.ads.send(CLUSTER, "g1", wire[CLUSTER])).error_detail.code
        h.ads.wait(lambda r: r.type_url == ENDPOINT and len(r.resource_names) == 3)
        assert not h.ads.reply_to(h.ads.send(ENDPOINT, "g1", wire[ENDPOINT])).error_detail.code
        assert not h.ads.reply_to(h.ads.send(LISTENER, "g1", wire[LISTENER])).error_detail.code
        h.ads.wait(lambda r: r.type_url == ROUTE and list(r.resource_names) == ["api.route"])
        assert not h.ads.reply_to(h.ads.send(ROUTE, "g1", wire[ROUTE])).error_detail.code
        table = h.wait_table(lambda t: len(t.services) == 4)
        assert table.canonical() == WIRE_TABLE.canonical()
        before = dp.dump()
        assert len(before["services"]) == 4 and before["mesh_nets"]
        good_table = h.client.table
        # A response of a type nobody asked for is ignored (as Envoy does), not fatal: no
        # ACK, no NACK, the stream goes on (the NACKs below arrive on it).
        for t in ("type.googleapis.com/envoy.config.Nope", "", tr._RESOURCE_WRAPPER):
            nonce = h.ads.send(t, "x", [any_pb2.Any(type_url=t, value=b"\xff")])
            with pytest.raises(AssertionError, match="no such request"):
                h.ads.reply_to(nonce, timeout=0.3)
            COUNTS[layer, "ignored"] += 1
        assert dp.dump() == before and h.client.table is good_table
        bad = sorted(n for n, (_, on_wire) in MUTATIONS.items() if on_wire)
        sent = Counter()

        def nack(which: str, data) -> None:
            case = Case(copy_resources(good), data.draw)
            MUTATIONS[which][0](case)
            if case.accept or not case.expect:
                return  # valid (maybe left to the kernel path): not a NACK case
            assert case.expect and len(case.touched) == 1, (which, case.touched)
            [t] = case.touched
            n = sum(sent.values())
            sent[t] += 1
            nonce = h.ads.send(t, f"bad-{n}", case.all_wire()[t])
            req = h.ads.reply_to(nonce)
            COUNTS[layer, "rejected" if req.HasField("error_detail") else "accepted"] += 1
            assert req.HasField("error_detail"), f"{which}: ACKed, expected /{case.expect}/"
            assert req.error_detail.code == 3  # INVALID_ARGUMENT
            assert re.search(case.expect, req.error_detail.message), \
                f"{which}: /{case.expect}/ not in {req.error_detail.message}"
            assert (req.version_info, req.response_nonce) == ("g1", nonce)
            assert h.client.table is good_table
            assert dp.dump() == before  # byte for byte: the kernel maps are untouched

        def nacker(which: str):
            return fuzz(6)(given(data=st.data())(lambda data: nack(which, data)))

        for which in bad:
            nacker(which)()
        assert sum(sent.values()) > 80 and len(sent) == 4, sent
        # Then a good response is ACKed and reaches the kernel.
        more = copy_resources(good)
        more.endpoints["web"].endpoints[0].lb_endpoints.add().CopyFrom(lbe("10.200.7.9", 8080))
        nonce = h.ads.send(ENDPOINT, "g2", [pack(m) for _, m in sorted(more.endpoints.items())])
        ack = h.ads.reply_to(nonce)
        assert not ack.HasField("error_detail") and ack.version_info == "g2"
        after = dp.dump()
        assert ("10.200.7.9", 8080) in after["services"]["10.96.7.1:80/TCP"]
        assert after["services"]["10.96.7.5:5432/TCP"] == before["services"]["10.96.7.5:5432/TCP"]
        st_ = h.client.state()
        assert st_[ENDPOINT]["last_ack_version"] == "g2"
        assert st_[LISTENER]["last_ack_version"] == "g1"
        assert agent.rejected_count == 0  # NACKed before the datapath was ever asked
    finally:
        h.close()
    summary(capsys, layer)
