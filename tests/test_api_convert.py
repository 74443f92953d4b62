"""The agent's status crosses the API as typed messages: the edge's and pod routing's
reports come back from GetStatus exactly as the runtime made them (no untyped Struct)."""

from __future__ import annotations

from accel.api import convert

EDGE = {"iface": "e0", "mode": "native", "maglev_size": 65537,
        "guard": {"deny": ["192.0.2.0/24", "2001:db8::/32"], "syn_rate": 5, "syn_burst": 6},
        "vips": [{"service": "web", "vip": "10.96.0.1", "port": 80, "protocol": "TCP",
                  "dirty_slots": 3, "connection_limit": {"connections": 2.5, "burst": 4},
                  "backends": [{"address": "10.1.1.1", "port": 8080, "via": "kernel route"},
                               {"address": "10.1.1.2", "port": 8080,
                                "via": "redirect ifindex 7"}]},
                 {"service": "api", "vip": "10.96.0.2", "port": 80, "protocol": "TCP",
                  "dirty_slots": 0, "connection_limit": None,
                  "backends": [{"address": "10.1.1.3", "port": 8080,
                                "via": "tc redirect_peer ifindex 9: a pod's veth"}]}]}
PODS = {"netns": "lab", "patterns": ["p*"],
        "ports": [{"iface": "p0", "addresses": ["10.2.0.1", "fd00::1"], "bridge": 4},
                  {"iface": "p1", "addresses": [], "bridge": None}],
        "addresses": 2, "conflicts": ["10.2.0.9 on p0 and p1"], "failures": {"p2": "isolated"}}


def round_trip(st: dict) -> dict:
    return convert.status_to_json(convert.status_to_proto({"version": "t", **st}))


def test_edge_and_pod_routing_status_are_typed_and_exact() -> None:
    out = round_trip({"edge": EDGE, "pod_routing": PODS})
    assert out["edge"] == EDGE and out["pod_routing"] == PODS
    msg = convert.status_to_proto({"edge": EDGE})
    assert msg.edge.vips[0].backends[1].via == "redirect ifindex 7"
    assert list(msg.edge.guard.deny) == EDGE["guard"]["deny"]


def test_unavailable_pod_routing_says_why_and_absent_parts_are_none() -> None:
    down = {"netns": "", "patterns": ["veth*"], "ports": [], "addresses": 0, "conflicts": [],
            "failures": {}, "error": "bpf_redirect_peer: not in this kernel"}
    out = round_trip({"pod_routing": down})
    assert out["pod_routing"] == down and out["edge"] is None
    assert round_trip({})["pod_routing"] is None
