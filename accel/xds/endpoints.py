"""A ClusterLoadAssignment as weighted endpoints: localities, priorities and health
flattened the way Envoy's and gRPC's balancers would weigh them (README: "xDS mapping")."""

from __future__ import annotations

import math
from fractions import Fraction

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from accel.model import MAX_WEIGHT, Endpoint, IPAddress, ValidationError
from accel.xds.decode import socket_address

USED_HEALTH = (health_check_pb2.HEALTHY, health_check_pb2.UNKNOWN)


def endpoints_of(cla: endpoint_pb2.ClusterLoadAssignment, where: str) -> tuple[Endpoint, ...]:
    """Flatten localities and priorities into weighted endpoints (README: "xDS mapping")."""
    rows = []  # (priority, locality index, address, port, weight, healthy, path)
    loc_weights: dict[int, int | None] = {}
    for li, loc in enumerate(cla.endpoints):
        lw = f"{where}.endpoints[{li}]"
        if loc.HasField("leds_cluster_locality_config"):
            raise ValidationError(f"{lw}.leds_cluster_locality_config", "LEDS is not supported")
        loc_weights[li] = loc.load_balancing_weight.value if \
            loc.HasField("load_balancing_weight") else None
        for ei, lbe in enumerate(loc.lb_endpoints):
            ew = f"{lw}.lb_endpoints[{ei}]"
            if lbe.WhichOneof("host_identifier") != "endpoint":
                raise ValidationError(f"{ew}.endpoint_name", "named endpoints are not supported")
            ep_addr = lbe.endpoint.address
            if ep_addr.WhichOneof("address") != "socket_address":
                raise ValidationError(f"{ew}.endpoint.address", "expected a socket_address")
            addr, port = socket_address(ep_addr.socket_address,
                                         f"{ew}.endpoint.address.socket_address")
            weight = lbe.load_balancing_weight.value if \
                lbe.HasField("load_balancing_weight") else 1
            if weight < 1:
                raise ValidationError(f"{ew}.load_balancing_weight", "must be >= 1")
            rows.append((loc.priority, li, addr, port, weight,
                         lbe.health_status in USED_HEALTH, ew))
    if not rows:
        return ()
    healthy_prios = sorted({r[0] for r in rows if r[5]})
    active = healthy_prios[0] if healthy_prios else min(r[0] for r in rows)
    act = [r for r in rows if r[0] == active]
    weighted_mode = any(loc_weights[li] is not None for li in {r[1] for r in act})
    live_locs = {li for li in {r[1] for r in act} if not weighted_mode or loc_weights[li]}

    weights: dict[int, int] = {}
    healthy: dict[int, bool] = {}
    for i, r in enumerate(rows):
        healthy[i] = r[5] and r[0] == active and r[1] in live_locs
        weights[i] = r[4]
    if weighted_mode and len(live_locs) > 1:
        # Each locality gets its weight's share of traffic, split inside by endpoint weight
        # (Envoy's locality-weighted LB and gRPC's weighted_target both work this way).
        sums: dict[int, int] = {}
        for i, r in enumerate(rows):
            if healthy[i]:
                sums[r[1]] = sums.get(r[1], 0) + r[4]
        shares = {i: Fraction(loc_weights[rows[i][1]] * rows[i][4], sums[rows[i][1]])
                  for i in range(len(rows)) if healthy[i]}
        if shares:
            lcm = math.lcm(*(f.denominator for f in shares.values()))
            ints = {i: int(f * lcm) for i, f in shares.items()}
            g = math.gcd(*ints.values())
            weights.update({i: v // g for i, v in ints.items()})
    top = max(weights.values())
    if top > MAX_WEIGHT:  # keep the ratios as well as 16 bits allow
        weights = {i: max(1, round(w * MAX_WEIGHT / top)) for i, w in weights.items()}

    # Keyed by (int, version, port): an ipaddress object's hash goes through hex().
    out: dict[tuple[int, int, int], tuple[Endpoint, str]] = {}
    for i, r in enumerate(rows):
        key = (int(r[2]), r[2].version, r[3])
        ep = Endpoint.trusted(r[2], r[3], weights[i], healthy[i])  # checked above
        hit = out.get(key)
        if hit is not None:
            # The same address in a standby priority is only a fallback: the active one wins.
            if hit[0].healthy and healthy[i]:
                raise ValidationError(r[6], f"duplicate endpoint {ep} (also at {hit[1]})")
            if healthy[i]:
                out[key] = (ep, r[6])
            continue
        out[key] = (ep, r[6])
    return tuple(ep for ep, _ in out.values())


def merge_weighted(parts: list[tuple[tuple[Endpoint, ...], int]]) -> tuple[Endpoint, ...]:
    """One service from several clusters, each with a weight (tcp_proxy's or a route's
    weighted_clusters: Kuma's splits, Istio's canaries): a cluster gets its weight's share
    of the traffic, split inside by endpoint weight, as Envoy does. An endpoint in two
    clusters gets both shares; a cluster without a healthy endpoint gets nothing (its
    endpoints stay listed, unhealthy)."""
    shares: dict[tuple[IPAddress, int], Fraction] = {}
    listed: dict[tuple[IPAddress, int], Endpoint] = {}
    for eps, weight in parts:
        total = sum(e.weight for e in eps if e.healthy)
        for e in eps:
            key = (e.address, e.port)
            listed.setdefault(key, e)
            if e.healthy and total and weight:
                shares[key] = shares.get(key, Fraction(0)) + Fraction(weight * e.weight, total)
    if not shares:
        return tuple(Endpoint(e.address, e.port, e.weight, False) for e in listed.values())
    lcm = math.lcm(*(f.denominator for f in shares.values()))
    ints = {k: int(f * lcm) for k, f in shares.items()}
    g = math.gcd(*ints.values())
    ints = {k: v // g for k, v in ints.items()}
    top = max(ints.values())
    if top > MAX_WEIGHT:  # keep the ratios as well as 16 bits allow
        ints = {k: max(1, round(v * MAX_WEIGHT / top)) for k, v in ints.items()}
    return tuple(Endpoint(a, p, ints[(a, p)], True) if (a, p) in ints
                 else Endpoint(a, p, e.weight, False) for (a, p), e in listed.items())
