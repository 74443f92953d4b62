"""Consul's transparent proxy (accel/xds/shapes/consul.py): the one outbound listener's
chains for an upstream's virtual IP and ClusterIP without a destination port are the VIP
on every port (port 0, ANY_PORT), with exactly the upstream's sidecars; a chain with a
destination port is that VIP:port and wins over the VIP's any-port service in the kernel;
passthrough, explicit upstreams on loopback, the public listener and the DNS listener are
left with the reason, never NACKed. Over Delta xDS into a Runtime, real traffic to two
ports of one VIP reaches the upstream, with getpeername() = the VIP and the port dialed."""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os

import pytest

from accel.model import ANY_PORT, Endpoint, Service, ServiceTable, ValidationError, endpoint_loops
from accel.xds import translate as tr
from accel.xds.shapes.consul import OUTBOUND, PUBLIC_PORT, sidecar_config, sni

TCP = {"db": (["240.0.0.1", "10.96.8.1"], [("10.244.2.1", PUBLIC_PORT),
                                            ("10.244.2.2", PUBLIC_PORT)])}
HTTP = {"web": (["240.0.0.2", "10.96.8.2"], [("10.244.2.3", PUBLIC_PORT)])}
SPLIT = {"api": (["240.0.0.3"], {"v1": (80, [("10.244.2.4", PUBLIC_PORT)]),
                                 "v2": (20, [("10.244.2.5", PUBLIC_PORT)])})}
ROUTED = {"shop": (["240.0.0.4"], [("10.244.2.6", PUBLIC_PORT)])}
DESTINATIONS = {"kafka": ("192.168.2.1", 9093, [("10.244.2.7", 8443)])}
PASSTHROUGH = {"foo": ["10.244.2.63", "10.244.2.64"]}


def services(t: tr.Translation) -> dict[tuple[str, int], dict[tuple[str, int], int]]:
    return {(str(s.vip), s.port): {(str(e.address), e.port): e.weight
                                   for e in s.endpoints if e.healthy}
            for s in t.table.services}


def test_consul_transparent_proxy_maps_each_upstream_on_every_port() -> None:
    t = tr.to_table(sidecar_config(TCP, HTTP, SPLIT, ROUTED, DESTINATIONS, PASSTHROUGH))
    db = {("10.244.2.1", PUBLIC_PORT): 1, ("10.244.2.2", PUBLIC_PORT): 1}
    assert services(t) == {
        ("240.0.0.1", ANY_PORT): db, ("10.96.8.1", ANY_PORT): db,
        ("240.0.0.2", ANY_PORT): {("10.244.2.3", PUBLIC_PORT): 1},
        ("10.96.8.2", ANY_PORT): {("10.244.2.3", PUBLIC_PORT): 1},
        # The service-splitter's 80/20 kept.
        ("240.0.0.3", ANY_PORT): {("10.244.2.4", PUBLIC_PORT): 4,
                                  ("10.244.2.5", PUBLIC_PORT): 1},
        # A terminating-gateway destination: its VIP:port only.
        ("192.168.2.1", 9093): {("10.244.2.7", 8443): 1},
    }
    # The service-router's path match: left, on every port of its VIP, with the reason.
    [(where, why)] = [(k, v) for k, v in t.skipped.items() if "240.0.0.4" in str(t.left.get(k))]
    assert t.left[where] == (ipaddress.ip_address("240.0.0.4"), ANY_PORT, "TCP")
    assert "by L7 attributes" in why
    # Passthrough chains (pod IPs to ORIGINAL_DST) name destinations, not VIPs.
    assert set(t.left) == {where}
    assert any("ORIGINAL_DST" in v for v in t.skipped.values())
    # The explicit upstream on loopback, the public listener, the DNS: left, no NACK.
    assert "loopback" in t.skipped["db:127.0.0.1:9191"]
    assert "INBOUND" in t.skipped[f"public_listener:0.0.0.0:{PUBLIC_PORT}"]
    assert "loopback" in t.skipped["virtual_dns:127.0.0.1:8653"]
    # mTLS and the listener filter are named, not applied.
    [svc] = [s for s in t.table.services if str(s.vip) == "240.0.0.1"]
    assert svc.name.startswith(OUTBOUND + "/")
    ignored = t.ignored[svc.name]
    assert f"cluster {sni('db')}: transport_socket tls" in ignored
    assert any("original_dst" in i for i in ignored)


def test_any_port_service_in_the_model() -> None:
    """Port 0 is every port of the VIP: never an edge service, never its own endpoint on
    any port, and an endpoint on its VIP at any port is a loop; mesh.yaml names a port."""
    from accel import config

    svc = Service("db", "240.0.0.1", ANY_PORT, endpoints=(Endpoint("10.244.2.1", 20000),))
    specific = Service("db-9000", "240.0.0.1", 9000, endpoints=(Endpoint("10.244.2.2", 1),))
    ServiceTable((svc, specific))  # the same VIP: the specific port and every other one
    with pytest.raises(ValidationError, match="^edge: "):
        Service("e", "240.0.0.1", ANY_PORT, edge=True)
    with pytest.raises(ValidationError, match="its own VIP:port"):
        Service("x", "240.0.0.1", ANY_PORT, endpoints=(Endpoint("240.0.0.1", 5432),))
    loop = Service("y", "10.96.0.9", 80, endpoints=(Endpoint("240.0.0.1", 5432),))
    [(bad, i, other)] = list(endpoint_loops([svc, loop]))
    assert (bad.name, i, other.name) == ("y", 0, "db")
    with pytest.raises(ValidationError, match=r"^services\[a\]\.port: port 0 is out of range"):
        config.load_text("services: [{name: a, vip: 10.0.0.1, port: 0}]")


@pytest.mark.kernel
def test_consul_shaped_delta_xds_carries_traffic_on_every_port(lab_factory, datapath,
                                                               capsys) -> None:
    """Consul's shape over Delta xDS into a Runtime: connects to two ports of an upstream's
    virtual IP and to its ClusterIP reach the upstream's sidecar port, getpeername() = the
    VIP and the port dialed; a chain with a destination port on the same VIP wins for that
    port, and once it is removed (a Delta update) that port falls to the any-port service.
    `accel services` shows the any-port VIP as VIP:*."""
    from accel.api import client as api_client
    from accel.api import server as api_server
    from accel.commands import services as services_cmd
    from accel.runtime import Runtime
    from tests.test_xds_delta import DeltaHarness
    from tests.traffic import EchoServer, connect

    lab = lab_factory(3)
    client, a, b = lab.pods
    port = 21000  # the upstream sidecars' public port
    tcp = {"db": (["240.0.0.1", "10.96.8.1"], [(str(a.ip), port)])}
    special = {"special": ("240.0.0.1", 9000, [(str(b.ip), port)])}
    res = sidecar_config(tcp, destinations=special, passthrough={"foo": [str(b.ip)]})
    runtime = Runtime(datapath=datapath)
    h = DeltaHarness(hook=runtime.apply)

    def push(t: str, items: dict) -> None:
        # Consul's versions: a digest of each resource.
        reply = h.ads.reply_to(h.ads.send(t, {
            n: (hashlib.sha256(m.SerializeToString()).hexdigest()[:16], m)
            for n, m in items.items()}))
        assert not reply.error_detail.message, (t, reply.error_detail.message)

    def dial(vip: str, dport: int) -> bytes:
        with connect(client, vip, dport, timeout=5) as s:
            assert s.getpeername() == (vip, dport)
            s.sendall(b"consul")
            reply = b""
            while len(reply) < 8 and (chunk := s.recv(16)):
                reply += chunk
            return reply

    try:
        h.ads.wait(lambda r: r.type_url == tr.CLUSTER)
        push(tr.CLUSTER, res.clusters)
        h.ads.wait(lambda r: r.type_url == tr.ENDPOINT
                   and len(r.resource_names_subscribe) == len(res.endpoints))
        h.ads.send(tr.ENDPOINT, {n: ("e1", m) for n, m in res.endpoints.items()})
        push(tr.LISTENER, res.listeners)
        _, table = h.rec.wait(lambda t: len(t.services) == 3)
        assert {(str(s.vip), s.port) for s in table.services} == {
            ("240.0.0.1", ANY_PORT), ("10.96.8.1", ANY_PORT), ("240.0.0.1", 9000)}
        with EchoServer(a, port, reply_prefix=b"a:"), EchoServer(b, port, reply_prefix=b"b:"):
            for vip, dport in (("240.0.0.1", 5432), ("240.0.0.1", 6543), ("10.96.8.1", 80)):
                assert dial(vip, dport) == b"a:consul", (vip, dport)
            assert dial("240.0.0.1", 9000) == b"b:consul"  # VIP:port before VIP:any

            # What `accel services` says: the any-port VIP as VIP:*.
            runtime.xds = h.client
            sock = f"/run/accel/test-consul-{os.getpid()}.sock"
            api = api_server.serve(runtime, unix_path=sock)
            try:
                capsys.readouterr()
                assert services_cmd.run(argparse.Namespace(json=False, api_socket=sock)) == 0
                text = capsys.readouterr().out
                listed = api_client.list_services(sock)["services"]
            finally:
                api.stop()
            assert "240.0.0.1:*/TCP" in text and "240.0.0.1:9000/TCP" in text, text
            # --json and the API: port 0 is every port.
            assert {(s["vip"], s["port"]) for s in listed if s["accelerated"]} == {
                ("240.0.0.1", 0), ("10.96.8.1", 0), ("240.0.0.1", 9000)}

            # The destination's chain goes: port 9000 is now the any-port service's.
            out = res.listeners[OUTBOUND]
            keep = [c for c in out.filter_chains
                    if not c.filter_chain_match.HasField("destination_port")]
            del out.filter_chains[:]
            out.filter_chains.extend(keep)
            push(tr.LISTENER, {OUTBOUND: out})
            h.rec.wait(lambda t: len(t.services) == 2)
            assert dial("240.0.0.1", 9000) == b"a:consul"
        assert datapath.counters()["connect_balanced"] >= 5
    finally:
        h.close()


def test_transparent_chains_by_source_or_ipv6() -> None:
    """A chain only some sources match is left (the kernel balances every client alike);
    an IPv6 /128 without a destination port is that VIP on every port."""
    res = sidecar_config({"db": (["240.0.0.1"], [("10.244.2.1", PUBLIC_PORT)]),
                          "v6": (["fd00:96::8"], [("fd00:244::1", PUBLIC_PORT)])})
    out = res.listeners[OUTBOUND]
    out.filter_chains[0].filter_chain_match.source_prefix_ranges.add(
        address_prefix="10.244.0.0").prefix_len.value = 16
    t = tr.to_table(res)
    assert services(t) == {("fd00:96::8", ANY_PORT): {("fd00:244::1", PUBLIC_PORT): 1}}
    [why] = [v for k, v in t.skipped.items() if t.left.get(k, (None,))[0]
             == ipaddress.ip_address("240.0.0.1")]
    assert "some sources only" in why
