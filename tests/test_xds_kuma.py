"""Kuma's sidecar-shaped xDS (accel/xds/shapes/kuma.py): every outbound:IP:PORT listener is
its VIP:port's service with exactly its endpoints and the split's weights; MeshHTTPRoute
path matches, passthrough, inbound and loopback listeners are left to the kernel path with
the reason; Kuma's mTLS is named as ignored. Then the same resources over a real ADS
stream carry traffic between lab pods, with getpeername() = the VIP."""

from __future__ import annotations

import pytest

from accel.xds import translate as tr
from accel.xds.shapes.kuma import service, sidecar_config, subset

TCP = {"redis": ("10.96.7.1", 6379, [("10.244.1.1", 6379, 1), ("10.244.1.2", 6379, 1)])}
HTTP = {"backend": ("10.96.7.2", 3001, [("10.244.1.3", 3001, 1)]),
        # A Kuma VIP (kuma.io/service hostname backend-api.mesh), endpoints weighted 1:3.
        "api": ("240.0.0.3", 80, [("10.244.1.4", 8080, 1), ("10.244.1.5", 8080, 3)])}
# TrafficSplit 90/10 over tcp; MeshHTTPRoute 50/50 over HTTP.
TCP_SPLIT = {"db": ("10.96.7.3", 5432, {"v1": (90, [("10.244.1.6", 5432, 1)]),
                                        "v2": (10, [("10.244.1.7", 5432, 1),
                                                    ("10.244.1.8", 5432, 3)])})}
HTTP_SPLIT = {"web": ("10.96.7.4", 8080, {"v1": (50, [("10.244.1.9", 8080, 1)]),
                                          "v2": (50, [("10.244.1.10", 8080, 1)])})}
BY_PATH = {"shop": ("10.96.7.5", 8080, [("10.244.1.11", 8080, 1)])}


def services(t: tr.Translation) -> dict[tuple[str, int], dict[tuple[str, int], int]]:
    """(VIP, port) -> {(endpoint IP, port): weight} of the usable endpoints."""
    return {(str(s.vip), s.port): {(str(e.address), e.port): e.weight
                                   for e in s.endpoints if e.healthy}
            for s in t.table.services}


def test_kuma_sidecar_maps_every_outbound_with_its_endpoints_and_weights() -> None:
    t = tr.to_table(sidecar_config(TCP, HTTP, TCP_SPLIT, HTTP_SPLIT, BY_PATH))
    want = {(vip, port): {(ip, p): w for ip, p, w in eps}
            for vip, port, eps in [*TCP.values(), *HTTP.values()]}
    # db: v1 gets 90 on one endpoint, v2 10 split 1:3 -> 90 : 2.5 : 7.5 = 36 : 1 : 3.
    want[("10.96.7.3", 5432)] = {("10.244.1.6", 5432): 36, ("10.244.1.7", 5432): 1,
                                 ("10.244.1.8", 5432): 3}
    want[("10.96.7.4", 8080)] = {("10.244.1.9", 8080): 1, ("10.244.1.10", 8080): 1}
    assert services(t) == want
    by_vip = {str(s.vip): s for s in t.table.services}
    # Named by their cluster (kuma.io/service), as Kuma knows them; splits by the listener.
    assert by_vip["10.96.7.1"].name == service("redis", 6379) == "redis_kuma-demo_svc_6379"
    assert by_vip["10.96.7.3"].name == "outbound:10.96.7.3:5432"
    assert {by_vip["10.96.7.3"].name, by_vip["10.96.7.4"].name} <= t.multi

    # Left, with the reason: path-routed HTTP, the passthrough and inbound listeners, and
    # the admin listener on loopback. None of it NACKs.
    assert "by L7 attributes" in t.skipped["outbound:10.96.7.5:8080"]
    assert t.left["outbound:10.96.7.5:8080"][:2] == (_ip("10.96.7.5"), 8080)
    assert "original_dst" in t.skipped["outbound:passthrough:ipv4"]
    assert "INBOUND" in t.skipped["inbound:passthrough:ipv4"]
    assert "INBOUND" in t.skipped["inbound:10.244.0.5:5000"]
    assert "loopback" in t.skipped["kuma:envoy:admin"]
    assert set(t.left) == {"outbound:10.96.7.5:8080"}  # the rest name no VIP

    # Kuma's mTLS and the filters before the proxy are named, not applied.
    redis = t.ignored[service("redis", 6379)]
    assert f"cluster {service('redis', 6379)}: transport_socket envoy.transport_sockets.tls" \
        in redis
    split = t.ignored["outbound:10.96.7.3:5432"]
    assert any(subset("db", 5432, "v2") in i for i in split)


def test_kuma_split_endpoint_change_keeps_the_other_subsets_share() -> None:
    """An EDS update of one subset of a split re-weighs the whole service (its share stays
    90/10), not that subset alone."""
    res = sidecar_config({}, {}, TCP_SPLIT)
    t = tr.to_table(res)
    v2 = subset("db", 5432, "v2")
    from accel.xds.shapes.kuma import kuma_cla

    changed = {v2: kuma_cla(v2, [("10.244.1.7", 5432, 1)], "v2")}
    assert tr.update_endpoints(t, changed) is None  # a part of a split: translated whole
    res.endpoints.update(changed)
    t2 = tr.to_table(res)
    assert services(t2)[("10.96.7.3", 5432)] == {("10.244.1.6", 5432): 9,
                                                 ("10.244.1.7", 5432): 1}


def _ip(s: str):
    import ipaddress

    return ipaddress.ip_address(s)


@pytest.mark.kernel
def test_kuma_shaped_ads_carries_traffic(lab_factory, datapath) -> None:
    """Kuma's resources over ADS (state of the world, CDS -> EDS -> LDS) into a Runtime:
    ACKed, and connects to an HTTP outbound's VIP and to a TrafficSplit's VIP reach their
    endpoints, with getpeername() the VIP; the path-routed one stays on the kernel path."""
    from accel.runtime import Runtime
    from tests.test_xds_client import Harness
    from tests.traffic import EchoServer, connect

    lab = lab_factory(3)
    client, a, b = lab.pods
    http = {"backend": ("10.96.7.2", 8080, [(str(a.ip), 8080, 1)])}
    split = {"db": ("10.96.7.3", 8080, {"v1": (50, [(str(a.ip), 8080, 1)]),
                                        "v2": (50, [(str(b.ip), 8080, 1)])})}
    by_path = {"shop": ("10.96.7.5", 8080, [(str(b.ip), 8080, 1)])}
    res = sidecar_config({}, http, split, by_path=by_path, pod_ip=str(client.ip))
    runtime = Runtime(datapath=datapath)
    h = Harness(on_update=runtime.apply)
    try:
        assert not res.routes  # Kuma's route configurations are inline
        h.push_all(res)
        table = h.wait_table(lambda t: len(t.services) == 2)
        assert {str(s.vip) for s in table.services} == {"10.96.7.2", "10.96.7.3"}
        assert runtime.table is table
        seen = set()
        with EchoServer(a, 8080, reply_prefix=b"a:"), EchoServer(b, 8080, reply_prefix=b"b:"):
            for vip in ("10.96.7.2",) + ("10.96.7.3",) * 40:
                with connect(client, vip, 8080, timeout=5) as s:
                    assert s.getpeername() == (vip, 8080)
                    s.sendall(b"kuma")
                    reply = b""
                    while len(reply) < 6 and (chunk := s.recv(16)):
                        reply += chunk
                    assert reply.endswith(b"kuma"), reply
                    if vip == "10.96.7.2":
                        assert reply == b"a:kuma"  # backend's one endpoint
                    else:
                        seen.add(reply)
        # 50/50 over 40 connects: both subsets answer (each misses with 2 * 2^-40).
        assert seen == {b"a:kuma", b"b:kuma"}
        assert datapath.counters()["connect_balanced"] >= 41
    finally:
        h.close()
